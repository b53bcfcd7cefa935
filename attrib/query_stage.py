"""The query-gradients and query stages: orchestration beside fit.py (DESIGN.md §1–3).

`run_query_gradients` writes one safetensors part per batch of queries (ranks split the
batches; a rerun skips finished parts). `run_query` scores the corpus against them in
passes of queries sized to a memory budget, then ranks and writes the final tables.
The commands in attrib/commands/query.py only parse arguments and call these.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from attrib.distributed import World
from attrib.errors import InputError
from attrib.factors import DEFAULT_DAMPING_SCALE
from attrib.progress import message
from attrib.solve import DEFAULT_SOLVE_TOKENS, SOLVERS

QUERIES_FILE = "queries.jsonl"


@dataclass
class QuerySettings:
    """Everything that changes the query gradients; stored in the manifest and checked on resume."""

    query_rank: int = 32
    damping: float | None = None
    damping_scale: float = DEFAULT_DAMPING_SCALE
    max_length: int = 512
    tokens_per_batch: int = 4096
    queries_per_batch: int = 64
    world_size: int = 1
    chat_template: str = "auto"  # how chat queries were rendered (the identity of the template is recorded too)
    solver: str = "ekfac"  # or "cg": refine H⁻¹∇L_q by CG on the damped Gauss-Newton system (attrib.solve)
    solve_iterations: int = 0
    solve_tokens: int = DEFAULT_SOLVE_TOKENS

    @property
    def solves(self) -> bool:
        """Whether CG iterations run (cg with 0 iterations is EK-FAC exactly and reads no sample)."""
        return self.solver == "cg" and self.solve_iterations > 0

    def validate(self) -> None:
        if self.query_rank < 0:
            raise InputError("--query-rank must be 0 (full) or positive")
        if self.damping is not None and self.damping <= 0:
            raise InputError("--damping must be positive (Λ + λ is divided by)")
        if self.damping_scale <= 0:
            raise InputError("--damping-scale must be positive (Λ + λ is divided by)")
        if self.max_length < 2 or self.tokens_per_batch < 1 or self.queries_per_batch < 1:
            raise InputError("--max-length must be at least 2 and --tokens-per-batch positive")
        if self.solver not in SOLVERS:
            raise InputError(f"--solver {self.solver} is not one of {', '.join(SOLVERS)}")
        if self.solve_iterations < 0:
            raise InputError("--solve-iterations must be 0 or more")
        if self.solve_tokens < 2:
            raise InputError("--solve-tokens must be at least 2 (one sequence)")


def queries_digest(queries) -> str:
    """A content identity of the queries (ids, prompts, completions), for the resume check."""
    import hashlib

    return hashlib.sha256(json.dumps([q.as_row() for q in queries], sort_keys=True).encode()).hexdigest()


def solve_corpus_of(factors_manifest: dict, given: str | None, fallback: str | None = None):
    """The CorpusSpec of the CG sample: `given` (--solve-corpus), else the corpus the factors were
    fitted on (as their manifest records it), else `fallback` (query's --corpus). It is read with the
    fit's reading options (--text-field, --id-field, --lines, …) and chunking (--max-length,
    --long-documents), so by default the sample is the start of exactly what the fit saw."""
    from attrib.data import CorpusSpec

    recorded = (factors_manifest.get("inputs") or {}).get("corpus") or {}
    source = given or recorded.get("path") or recorded.get("name") or fallback
    if source is None:
        raise InputError("--solver cg needs --solve-corpus: the factors' manifest records no corpus")
    fit = factors_manifest["settings"]
    options = fit.get("corpus_options", {})
    return CorpusSpec(source, **{k: v for k, v in options.items() if k in CorpusSpec.__dataclass_fields__},
                      long_documents=fit.get("long_documents", "chunk"))


def run_query_gradients(out, model_spec: str, lm, tokenizer, layers, factors: str, queries: list, settings: QuerySettings,
                        world: World, overwrite: bool = False, record: dict | None = None,
                        solve_corpus: str | None = None, solve_fallback: str | None = None) -> dict:
    """Compute, precondition and compress every query's gradient into `out`; returns its manifest.

    With `settings.solver == "cg"` the sample comes from `solve_corpus`, else the fit's corpus, else
    `solve_fallback` (see `solve_corpus_of`)."""
    from attrib.data import chat_format, check_chat_agrees
    from attrib.models import model_record
    from attrib.storage import StageDir, input_identity, open_input, read_manifest

    settings.validate()
    factors_manifest = open_input(factors, "fit-factors", option="--factors")
    strategy = factors_manifest["settings"]["strategy"]
    if settings.solver == "cg" and strategy == "identity":
        raise InputError("--solver cg needs fitted curvature as its preconditioner and damping; these factors are "
                         "'identity': fit ekfac, kfac or diagonal factors")
    chat = chat_format(tokenizer, settings.chat_template).identity()
    check_chat_agrees(factors_manifest["settings"].get("chat"), chat, f"--factors {factors}")
    recorded = {**asdict(settings), "strategy": strategy, "chat": chat}
    inputs = {"factors": input_identity(factors), "queries_sha256": queries_digest(queries)}
    sample_spec = None
    if settings.solves:
        sample_spec = solve_corpus_of(factors_manifest, solve_corpus, solve_fallback)
        inputs["solve_corpus"] = input_identity(sample_spec.source)
    record = record or model_record(model_spec, lm, layers)
    stage = world.main_first(lambda is_main: StageDir(out, "query-gradients", recorded, record, inputs, overwrite and is_main))
    if stage.already_complete:
        return read_manifest(out)
    with stage.guard():
        _compute_query_gradients(stage, lm, tokenizer, layers, factors, queries, settings, world, record,
                                 factors_manifest, sample_spec)
    return read_manifest(out)


def _cg_solver(lm, tokenizer, layers, curvature, settings: QuerySettings, world, factors_manifest, sample_spec):
    """The CGSolver of `settings`: the first --solve-tokens tokens of the solve corpus, chunked like the fit."""
    import torch

    from attrib.solve import CGSolver, GaussNewton, SolveSample

    compute = torch.promote_types(next(lm.parameters()).dtype, torch.float32)
    gauss_newton = None
    if settings.solves:
        sample = SolveSample.read(sample_spec, tokenizer, factors_manifest["settings"]["max_length"],
                                  settings.solve_tokens)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        gauss_newton = GaussNewton(lm, layers, sample, settings.tokens_per_batch, pad_id, world.device)
    return CGSolver(curvature, gauss_newton, settings.solve_iterations, world.device, compute)


def _compute_query_gradients(stage, lm, tokenizer, layers, factors, queries, settings: QuerySettings, world, record,
                             factors_manifest, sample_spec):
    from attrib.curvature import Curvature
    from attrib.preconditioned_gradients import iter_query_gradient_batches, part_name, save_part, solve_records
    from attrib.storage import atomic_path

    curvature = Curvature(factors, layers, settings.damping, settings.damping_scale, record["fingerprint"])
    owns = lambda number: world.owns(number) and not stage.has(part_name(number))  # noqa: E731
    solver = None
    if settings.solver == "cg":
        solver = _LazySolver(lambda: _cg_solver(lm, tokenizer, layers, curvature, settings, world, factors_manifest,
                                                sample_spec))
    batches = iter_query_gradient_batches(
        lm, tokenizer, layers, queries, curvature, settings.query_rank, settings.max_length, settings.tokens_per_batch,
        settings.queries_per_batch, world.device, owns=owns, solver=solver,
    )
    for number, _, factors_of_batch in batches:
        if factors_of_batch is not None:
            save_part(stage.file(part_name(number)), factors_of_batch)
    world.barrier()
    if world.is_main:
        with atomic_path(stage.file(QUERIES_FILE)) as tmp:
            tmp.write_text("".join(json.dumps(q.as_row()) + "\n" for q in queries), encoding="utf-8")
        dampings = {layer.name: curvature.damping_of(index) for index, layer in enumerate(layers)}
        parts = stage.parts("query_gradients-*.safetensors")
        extra = {}
        if settings.solver == "cg":
            extra["solve"] = {"solver": "cg", "iterations": settings.solve_iterations,
                              "corpus": sample_spec.source if sample_spec is not None else None,
                              **solve_records([stage.file(name) for name in parts])}
        stage.complete(
            {"queries": len(queries), "layers": len(layers)},
            parts + [QUERIES_FILE],
            queries=[q.as_row() for q in queries],
            layers=[layer.name for layer in layers],
            damping=dampings,
            **extra,
        )
    world.barrier()


class _LazySolver:
    """Builds the solver (reading the sample) on the first batch this process computes, so a resumed
    run with every part done, or a rank with no batch, reads no sample."""

    def __init__(self, build):
        self.build, self.solver = build, None

    def solve(self, gradients):
        if self.solver is None:
            self.solver = self.build()
        return self.solver.solve(gradients)

    def sample_counts(self) -> dict:
        return self.solver.sample_counts()


@dataclass
class ScoreRequest:
    """Where the query stage reads from, besides the model: recorded as the stage's inputs."""

    factors: str
    corpus: object  # CorpusSpec
    queries: str | None = None
    query_gradients: str | None = None
    candidates: str | None = None
    prefilter: int | None = None
    solve_corpus: str | None = None  # --solver cg: the sample's corpus (default: the fit's, else `corpus`)


def run_query(out, model_spec: str, lm, tokenizer, layers, request: ScoreRequest, query_list, query_settings: QuerySettings,
              score_settings, world: World, overwrite: bool = False) -> dict | None:
    """Score the corpus against the queries into `out`; returns the final manifest (None when already complete)."""
    from attrib.models import model_record
    from attrib.storage import StageDir, input_identity

    check_corpus_chat(request, tokenizer)
    record = model_record(model_spec, lm, layers)
    inputs = {
        "factors": input_identity(request.factors),
        "corpus": {**asdict(request.corpus), "identity": input_identity(request.corpus.source)},
        "queries": input_identity(request.queries),
        "query_gradients": input_identity(request.query_gradients),
        "candidates": input_identity(request.candidates),
        "prefilter": request.prefilter,
        "solve_corpus": input_identity(request.solve_corpus),
    }
    recorded = {**asdict(score_settings), "query_gradients": asdict(query_settings)}
    stage = world.main_first(lambda is_main: StageDir(out, "query", recorded, record, inputs, overwrite and is_main))
    if stage.already_complete:
        message(f"{out} is already complete; use --overwrite to score again")
        return None
    with stage.guard():
        return _score(stage, out, model_spec, lm, tokenizer, layers, request, query_list, query_settings, score_settings,
                      world, record)


def check_corpus_chat(request: ScoreRequest, tokenizer) -> None:
    """The corpus must be rendered and its loss taken as in the fit (and as the query gradients' queries)."""
    from attrib.data import chat_format, check_chat_agrees
    from attrib.storage import open_input

    spec = request.corpus
    current = {**chat_format(tokenizer, spec.chat_template).identity(), "loss_on": spec.loss_on}
    factors = open_input(request.factors, "fit-factors", option="--factors")
    check_chat_agrees(factors["settings"].get("chat"), current, f"--factors {request.factors}")
    if request.query_gradients is not None:
        gradients = open_input(request.query_gradients, "query-gradients", option="--query-gradients")
        check_chat_agrees(gradients["settings"].get("chat"), current, f"--query-gradients {request.query_gradients}")


def _score(stage, out, model_spec, lm, tokenizer, layers, request, query_list, query_settings, score_settings, world,
           record):
    from attrib.preconditioned_gradients import QueryGradientStore
    from attrib.scoring import discard_parts, score_documents_and_tokens
    from attrib.storage import open_input

    gradients_dir = request.query_gradients or str(Path(out) / "query-gradients")
    if request.query_gradients is None:
        run_query_gradients(gradients_dir, model_spec, lm, tokenizer, layers, request.factors, query_list,
                            query_settings, world, record=record, solve_corpus=request.solve_corpus,
                            solve_fallback=request.corpus.source)
    gradients_manifest = open_input(gradients_dir, "query-gradients", record["fingerprint"], option="--query-gradients")
    store = QueryGradientStore(gradients_dir, gradients_manifest)
    candidates = None
    if request.prefilter is not None:
        candidates = _run_prefilter(Path(out) / "prefilter", request.corpus, gradients_dir, request.prefilter, store, world)
    elif request.candidates is not None:
        from attrib.candidates import open_candidates

        candidates = open_candidates(request.candidates, store.query_ids)
    stats, counts, files = score_documents_and_tokens(lm, tokenizer, layers, store, request.corpus, stage,
                                                      score_settings, world, candidates)
    if not world.is_main:
        return None
    extra = _unscored_candidates(stage, candidates) if candidates is not None else {}
    manifest = stage.complete(
        {**counts, "rows_skipped": stats.skipped, **extra},
        files,
        queries=gradients_manifest["queries"],
        layers=store.layer_names,
        strategy=gradients_manifest["settings"]["strategy"],
        query_gradients_settings=gradients_manifest["settings"],
    )
    discard_parts(stage)
    return manifest


def _unscored_candidates(stage, candidates) -> dict:
    """Counts (and a warning) of candidate documents never scored and candidate query ids that match no query."""
    import sys

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from attrib.progress import QUIET
    from attrib.score_tables import DOCUMENTS

    scored = set(pc.unique(pq.read_table(stage.file(DOCUMENTS), columns=["doc_id"])["doc_id"]).to_pylist())
    unscored = sum(doc_id not in scored for doc_id in candidates.doc_number)
    if (unscored or candidates.unknown_queries) and not QUIET:
        print(f"warning: {unscored} of {len(candidates.doc_number)} candidate documents were not found in the corpus "
              f"and {len(candidates.unknown_queries)} candidate query ids match no query (check --corpus, --id-field "
              "and --queries)", file=sys.stderr)
    return {"unscored_candidate_documents": unscored, "unknown_candidate_queries": len(candidates.unknown_queries)}


def _run_prefilter(out, spec, gradients_dir: str, top_k: int, store, world):
    """`--prefilter K`: the TF-IDF stage over the same corpus and the query-gradients' queries."""
    from attrib.candidates import open_candidates
    from attrib.prefilter_stage import run_prefilter

    if world.is_main:
        run_prefilter(corpus=spec, queries=f"{gradients_dir}/{QUERIES_FILE}", out=str(out), top_k=top_k)
    world.barrier()
    return open_candidates(str(out), store.query_ids)
