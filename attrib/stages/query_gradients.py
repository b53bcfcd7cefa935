"""The query-gradients stage: each query's gradient, preconditioned by the factors (or refined by a
solver) and kept as a low-rank SVD, one safetensors part per batch of queries (ranks split the
batches; a rerun skips finished parts). docs/design.md §3.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from attrib.distributed import World
from attrib.errors import InputError
from attrib.options import (
    DEFAULT_DAMPING_SCALE,
    DEFAULT_QUERY_RANK,
    DEFAULT_SOLVE_TOKENS,
    DampingOptions,
    QueryGradientOptions,
    SolveOptions,
)
from attrib.results import StageResult
from attrib.runtime import flag

QUERIES_FILE = "queries.jsonl"


@dataclass
class QuerySettings:
    """Everything that changes the query gradients; stored in the manifest and checked on resume."""

    query_rank: int = DEFAULT_QUERY_RANK
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
    solve_system: str = "gauss-newton"  # the curvature CG solves (attrib.solve.SYSTEMS); internal, no option yet

    @property
    def solves(self) -> bool:
        """Whether CG iterations run (cg with 0 iterations is EK-FAC exactly and reads no sample)."""
        return self.solver == "cg" and self.solve_iterations > 0

    @classmethod
    def of(cls, options, max_length: int, world_size: int) -> QuerySettings:
        """The settings of a run with these stage options (queries per batch are set from the memory budget)."""
        damping, solve = options.get(DampingOptions), options.get(SolveOptions)
        return cls(query_rank=options.get(QueryGradientOptions).rank, damping=damping.damping,
                   damping_scale=damping.scale, max_length=max_length,
                   tokens_per_batch=options.batch.tokens_per_batch, world_size=world_size,
                   chat_template=options.corpus.chat_template, solver=solve.name,
                   solve_iterations=solve.iterations, solve_tokens=solve.tokens)


def queries_digest(queries) -> str:
    """A content identity of the queries (ids, prompts, completions), for the resume check."""
    import hashlib

    return hashlib.sha256(json.dumps([q.as_row() for q in queries], sort_keys=True).encode()).hexdigest()


def refinement_of(settings: QuerySettings, factors_manifest: dict):
    """The solver that refines EK-FAC's H⁻¹∇L_q (attrib.solve.REFINEMENTS), None for EK-FAC alone."""
    from attrib.solve import REFINEMENTS

    refine = REFINEMENTS.get(settings.solver)
    return None if refine is None else refine(settings, factors_manifest)


def solve_corpus_of(factors_manifest: dict, given: str | None, fallback: str | None = None):
    """The CorpusSpec of the CG sample: `given` (--solve-corpus), else the corpus the factors were
    fitted on (as their manifest records it), else `fallback` (query's --corpus). It is read with the
    fit's reading options (--text-field, --id-field, --lines, …) and chunking (--max-length,
    --long-documents), so by default the sample is the start of exactly what the fit saw."""
    from attrib.data import CorpusSpec

    recorded = (factors_manifest.get("inputs") or {}).get("corpus") or {}
    source = given or recorded.get("path") or recorded.get("name") or fallback
    if source is None:
        raise InputError(f"{flag('solver', 'cg')} needs {flag('solve_corpus')}: the factors' manifest records no "
                         "corpus")
    fit = factors_manifest["settings"]
    options = fit.get("corpus_options", {})
    return CorpusSpec(source, **{k: v for k, v in options.items() if k in CorpusSpec.__dataclass_fields__},
                      long_documents=fit.get("long_documents", "chunk"))


def run_query_gradients(out, model_spec: str, lm, tokenizer, layers, factors: str, queries: list, settings: QuerySettings,
                        world: World, overwrite: bool = False, record: dict | None = None,
                        solve_corpus: str | None = None, solve_fallback: str | None = None) -> dict:
    """Compute, precondition and compress every query's gradient into `out`; returns its manifest.

    A refining solver (`--solver cg`) reads its sample from `solve_corpus`, else the fit's corpus, else
    `solve_fallback` (see `solve_corpus_of`)."""
    from attrib.data import chat_format, check_chat_agrees
    from attrib.models import model_record
    from attrib.storage import StageDir, input_identity, open_input, read_manifest

    factors_manifest = open_input(factors, "fit-factors", option=flag("factors"))
    strategy = factors_manifest["settings"]["strategy"]
    refinement = refinement_of(settings, factors_manifest)
    chat = chat_format(tokenizer, settings.chat_template).identity()
    check_chat_agrees(factors_manifest, chat, flag("factors", factors))
    recorded = {**asdict(settings), "strategy": strategy, "chat": chat}
    inputs = {"factors": input_identity(factors), "queries_sha256": queries_digest(queries)}
    if refinement is not None and settings.solves:
        refinement.sample_spec = solve_corpus_of(factors_manifest, solve_corpus, solve_fallback)
        inputs["solve_corpus"] = input_identity(refinement.sample_spec.source)
    record = record or model_record(model_spec, lm, layers)
    stage = world.main_first(lambda is_main: StageDir(out, "query-gradients", recorded, record, inputs, overwrite and is_main))
    if stage.already_complete:
        return read_manifest(out)
    with stage.guard():
        _compute_query_gradients(stage, lm, tokenizer, layers, factors, queries, settings, world, record, refinement)
    return read_manifest(out)


def _compute_query_gradients(stage, lm, tokenizer, layers, factors, queries, settings: QuerySettings, world, record,
                             refinement):
    from attrib.curvature import Curvature
    from attrib.preconditioned_gradients import iter_query_gradient_batches, part_name, save_part
    from attrib.storage import atomic_path

    curvature = Curvature(factors, layers, settings.damping, settings.damping_scale, record["fingerprint"])
    owns = lambda number: world.owns(number) and not stage.has(part_name(number))  # noqa: E731
    solver = None if refinement is None else refinement.solver(lm, tokenizer, layers, curvature, world)
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
        extra = {} if refinement is None else {"solve": refinement.record([stage.file(name) for name in parts])}
        stage.complete(
            {"queries": len(queries), "layers": len(layers),
             "rendered_conversations": any(q.messages is not None for q in queries)},
            parts + [QUERIES_FILE],
            queries=[q.as_row() for q in queries],
            layers=[layer.name for layer in layers],
            damping=dampings,
            **extra,
        )
    world.barrier()


def tracked_layers_of_factors(lm, model_spec: str, factors: str):
    """The factors' tracked layers in `lm`, refused when the factors were fitted for another model."""
    import re

    from attrib.models import find_tracked_layers, fingerprint
    from attrib.storage import open_input

    factors_manifest = open_input(factors, "fit-factors", option=flag("factors"))
    names = factors_manifest["model"]["tracked_modules"]
    present = {name for name, _ in lm.named_modules()}
    if not set(names) <= present:
        raise InputError(
            f"{flag('factors', factors)} was fitted for another model ({factors_manifest['model']['model_type']}, "
            f"modules like {names[0]}); fit factors for {flag('model', model_spec)}"
        )
    layers = find_tracked_layers(lm, "^(" + "|".join(re.escape(n) for n in names) + ")$")
    open_input(factors, "fit-factors", fingerprint(lm, layers), option=flag("factors"))
    return layers


def checked_queries(queries: str, tokenizer, max_length: int, chat_template: str = "auto"):
    """The queries (chat queries rendered), each checked to tokenize into a prompt and a completion that fit."""
    from attrib.data import chat_format, load_queries, query_sequence, special_prefix

    query_list = load_queries(queries, chat=chat_format(tokenizer, chat_template))
    prefix = special_prefix(tokenizer)
    for item in query_list:
        query_sequence(tokenizer, item, max_length, prefix)
    return query_list


def batching(lm, layers, factors: str, queries: int, rank: int, budget: int | None, settings: QuerySettings, world,
             docs_per_part: int = 2000) -> tuple[int, int]:
    """(queries per batch, queries per pass) whose predicted peaks fit the memory budget (default: 90% of
    the GPU, half of the host's RAM on CPU); see attrib.memory and `attrib inspect`."""
    from attrib import memory
    from attrib.curvature import STRATEGY
    from attrib.storage import open_input

    strategy = STRATEGY[open_input(factors, "fit-factors", option=flag("factors"))["settings"]["strategy"]]
    return memory.query_batching(
        memory.model_shape(lm), memory.layer_shapes(layers), queries=queries,
        budget=budget or memory.default_budget(world.device), tokens_per_batch=settings.tokens_per_batch,
        dtype=str(next(lm.parameters()).dtype).removeprefix("torch."), device=str(world.device), rank=rank,
        max_length=settings.max_length, rotates=strategy.rotates, docs_per_part=docs_per_part, cg=settings.solves,
    )


def planned_queries(lm, tokenizer, layers, factors: str, queries: str | None, options, world):
    """(QuerySettings of the run, its checked queries): queries per batch fitted to the memory budget;
    no queries (None) where computed query gradients are given."""
    from attrib.data import default_max_length

    max_length = options.batch.max_length or default_max_length(lm.config, tokenizer)
    settings = QuerySettings.of(options, max_length, world.size)
    if queries is None:
        return settings, None
    query_list = checked_queries(queries, tokenizer, max_length, settings.chat_template)
    settings.queries_per_batch, _ = batching(lm, layers, factors, len(query_list), settings.query_rank,
                                             options.run.memory_budget, settings, world)
    return settings, query_list


def run(model, factors: str, queries: str, out, *, options, tokenizer=None) -> StageResult:
    """The stage as `attrib.query_gradients` runs it: the model borrowed, the queries checked, then written."""
    from attrib.runtime import borrowed_model
    from attrib.storage import stage_finished

    finished = stage_finished(out) and not options.run.overwrite
    with borrowed_model(model, tokenizer, options.model) as (world, model_spec, lm, tokenizer):
        layers = tracked_layers_of_factors(lm, model_spec, factors)
        settings, query_list = planned_queries(lm, tokenizer, layers, factors, queries, options, world)
        manifest = run_query_gradients(out, model_spec, lm, tokenizer, layers, factors, query_list, settings, world,
                                       options.run.overwrite, solve_corpus=options.solve.solve_corpus)
        return StageResult(Path(out), manifest, finished, world.is_main)
