"""The query stage: the corpus (or its candidates) scored against every query's preconditioned
gradient, in passes of queries sized to a memory budget, then ranked into the final tables
(documents.parquet, summary.parquet, token scores). docs/design.md §3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from attrib.distributed import World
from attrib.errors import InputError
from attrib.progress import message
from attrib.results import StageResult
from attrib.runtime import flag
from attrib.stages.query_gradients import QUERIES_FILE, QuerySettings, run_query_gradients

DOCUMENTS_TOP = 1000  # without candidates: each query's most positive and most negative documents kept

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
        message(f"{out} is already complete; use {flag('overwrite')} to score again")
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
    factors = open_input(request.factors, "fit-factors", option=flag("factors"))
    check_chat_agrees(factors, current, flag("factors", request.factors))
    if request.query_gradients is not None:
        gradients = open_input(request.query_gradients, "query-gradients", option=flag("query_gradients_dir"))
        check_chat_agrees(gradients, current,
                          flag("query_gradients_dir", request.query_gradients))


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
    gradients_manifest = open_input(gradients_dir, "query-gradients", record["fingerprint"],
                                    option=flag("query_gradients_dir"))
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

    from attrib.runtime import current
    from attrib.score_tables import DOCUMENTS

    scored = set(pc.unique(pq.read_table(stage.file(DOCUMENTS), columns=["doc_id"])["doc_id"]).to_pylist())
    unscored = sum(doc_id not in scored for doc_id in candidates.doc_number)
    if (unscored or candidates.unknown_queries) and not current().quiet:
        print(f"warning: {unscored} of {len(candidates.doc_number)} candidate documents were not found in the corpus "
              f"and {len(candidates.unknown_queries)} candidate query ids match no query (check {flag('corpus')}, "
              f"{flag('id_field')} and {flag('queries')})", file=sys.stderr)
    return {"unscored_candidate_documents": unscored, "unknown_candidate_queries": len(candidates.unknown_queries)}


def _run_prefilter(out, spec, gradients_dir: str, top_k: int, store, world):
    """`--prefilter K`: the TF-IDF stage over the same corpus and the query-gradients' queries."""
    from attrib.candidates import open_candidates
    from attrib.stages.prefilter import run_prefilter

    if world.is_main:
        run_prefilter(corpus=spec, queries=f"{gradients_dir}/{QUERIES_FILE}", out=str(out), top_k=top_k)
    world.barrier()
    return open_candidates(str(out), store.query_ids)


def _checked_query_gradients(query_gradients_dir: str, options) -> dict:
    """DIR's manifest; options that would change DIR's gradients are refused unless they agree with it."""
    from attrib.storage import open_input

    manifest = open_input(query_gradients_dir, "query-gradients", option=flag("query_gradients_dir"))
    recorded = manifest["settings"]
    given = {"query_rank": options.gradients.query_rank, "damping": options.damping.damping,
             "damping_scale": options.damping.damping_scale, "solver": options.solve.solver,
             "solve_iterations": options.solve.solve_iterations, "solve_tokens": options.solve.solve_tokens}
    for name, value in given.items():
        if value is not None and recorded.get(name) != value:
            raise InputError(
                f"{flag(name, value)} conflicts with {flag('query_gradients_dir', query_gradients_dir)}, computed "
                f"with {recorded.get(name)}; drop the option or recompute the query gradients"
            )
    return manifest


def _check_inputs(factors, queries, corpus, options) -> None:
    scores = options.scores
    if scores.index is not None:
        given = [flag(name) for name, value in (("factors", factors), ("corpus", corpus), ("candidates", scores.candidates),
                                                ("prefilter", scores.prefilter), ("solver", options.solve.solver))
                 if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} has no effect with {flag('index')}, which holds its corpus and "
                             "factors; drop it")
    elif factors is None or corpus is None:
        raise InputError(f"{flag('factors')} and {flag('corpus')} are needed unless {flag('index')} is given")
    if scores.query_gradients_dir is None and queries is None:
        raise InputError(f"{flag('queries')} is needed unless {flag('query_gradients_dir')} gives computed query "
                         "gradients")
    if scores.query_gradients_dir is not None and queries is not None:
        raise InputError(f"give {flag('queries')} or {flag('query_gradients_dir')}, not both: the query gradients "
                         "hold their own queries")


def run(model, factors: str | None, queries: str | None, corpus: str | None, out, *, options,
        tokenizer=None) -> StageResult:
    """The stage as `attrib.query` runs it: inputs checked before any output exists, the model borrowed,
    the query gradients computed unless given, then the corpus scored."""
    from attrib.data import check_corpus, default_max_length
    from attrib.runtime import borrowed_model
    from attrib.scoring import ScoreSettings
    from attrib.stages.prefilter import check_candidates_chunking
    from attrib.stages.query_gradients import batching, checked_queries, tracked_layers_of_factors
    from attrib.storage import open_input, read_manifest

    _check_inputs(factors, queries, corpus, options)
    if options.scores.index is not None:
        from attrib.stages.index import score_from_index

        return score_from_index(model, options.scores.index, queries, out, options=options, tokenizer=tokenizer)
    scores, reading = options.scores, options.batch
    candidates = scores.candidates
    candidates_manifest = open_input(candidates, "prefilter", option=flag("candidates")) if candidates else None
    gradients_dir = scores.query_gradients_dir
    gradients_manifest = _checked_query_gradients(gradients_dir, options) if gradients_dir else None
    spec = options.corpus.spec(corpus)
    check_corpus(spec)  # a missing path, a wrong text field or a bad first row fail before any output exists
    with borrowed_model(model, tokenizer, options.model) as (world, model_spec, lm, tokenizer):
        layers = tracked_layers_of_factors(lm, model_spec, factors)
        max_length = reading.max_length or default_max_length(lm.config, tokenizer)
        if candidates_manifest is not None:
            check_candidates_chunking(candidates_manifest, tokenizer, max_length, spec.long_documents,
                                      chat_template=spec.chat_template)
        query_settings = QuerySettings.of(options, max_length, world.size)
        if gradients_manifest is None:
            query_list = checked_queries(queries, tokenizer, max_length, spec.chat_template)
            count, rank = len(query_list), query_settings.query_rank
        else:
            query_list = None
            count, rank = len(gradients_manifest["queries"]), gradients_manifest["settings"]["query_rank"]
        per_batch, per_pass = batching(lm, layers, factors, count, rank, options.run.memory_budget, query_settings,
                                       world, reading.docs_per_part)
        query_settings.queries_per_batch = per_batch
        every = scores.keep_all_scores or candidates is not None or scores.prefilter is not None
        score_settings = ScoreSettings(max_length, reading.tokens_per_batch, reading.docs_per_part,
                                       scores.token_scores, scores.queries_per_pass or per_pass,
                                       0 if every else DOCUMENTS_TOP, world.size)
        request = ScoreRequest(factors, spec, queries, gradients_dir, candidates, scores.prefilter,
                               options.solve.solve_corpus)
        manifest = run_query(out, model_spec, lm, tokenizer, layers, request, query_list, query_settings,
                             score_settings, world, options.run.overwrite)
        return StageResult(Path(out), read_manifest(out), world.is_main and manifest is None, world.is_main)
