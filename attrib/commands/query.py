"""`attrib query-gradients` and `attrib query`: preconditioned query gradients and influence scores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    Corpus, Device, Dtype, IdField, Lines, LongDocuments, MaxDocs, MaxLength, Model, Out, Overwrite, Queries,
    SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode, checked_max_length, corpus_spec,
)

Factors = Annotated[str, typer.Option(help="Output directory of `attrib fit-factors`.")]
DOCUMENTS_TOP = 1000  # without candidates: each query's most positive and most negative documents kept
QueryRank = Annotated[int, typer.Option(help="Rank of each preconditioned query gradient (0 = full).")]
Damping = Annotated[Optional[float], typer.Option(help="Damping λ, the same for every layer (default: --damping-scale × mean(Λ) per layer).")]
DampingScale = Annotated[Optional[float], typer.Option(help="Damping as a multiple of each layer's mean eigenvalue (default 0.1; see docs/benchmarks.md).")]


def _load(model: str, factors: str, dtype: str, device: str, trust_remote_code: bool):
    """Model, tokenizer, the factors' tracked layers and the world, checked against the factors."""
    import re

    from attrib.distributed import detect_world
    from attrib.errors import InputError
    from attrib.models import find_tracked_layers, fingerprint, load_model
    from attrib.storage import open_input

    world = detect_world(device)
    factors_manifest = open_input(factors, "fit-factors", option="--factors")
    lm, tokenizer = load_model(model, dtype, world.device, trust_remote_code)
    names = factors_manifest["model"]["tracked_modules"]
    present = {name for name, _ in lm.named_modules()}
    if not set(names) <= present:
        raise InputError(
            f"--factors {factors} was fitted for another model ({factors_manifest['model']['model_type']}, "
            f"modules like {names[0]}); fit factors for --model {model}"
        )
    layers = find_tracked_layers(lm, "^(" + "|".join(re.escape(n) for n in names) + ")$")
    open_input(factors, "fit-factors", fingerprint(lm, layers), option="--factors")
    return world, lm, tokenizer, layers


def _checked_queries(queries: str, tokenizer, max_length: int):
    """The queries, each checked to tokenize into a prompt and a completion that fit the context."""
    from attrib.data import load_queries, query_sequence, special_prefix

    query_list = load_queries(queries)
    prefix = special_prefix(tokenizer)
    for item in query_list:
        query_sequence(tokenizer, item, max_length, prefix)
    return query_list


def _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world):
    """QuerySettings from flags (queries per batch are set from the memory budget by `_batching`)."""
    from attrib.errors import InputError
    from attrib.query_stage import QuerySettings

    if damping is not None and damping_scale is not None:
        raise InputError("give either --damping (absolute) or --damping-scale (relative), not both")
    settings = QuerySettings(query_rank=32 if query_rank is None else query_rank, damping=damping,
                             max_length=max_length, tokens_per_batch=tokens_per_batch, world_size=world.size)
    if damping_scale is not None:
        settings.damping_scale = damping_scale
    settings.validate()
    return settings


def _batching(lm, layers, factors, queries: int, rank: int, max_memory, settings, world, docs_per_part=2000):
    """(queries per batch, queries per pass) whose predicted peaks fit --max-memory (default: 90% of
    the GPU, half of the host's RAM on CPU); see attrib.memory and `attrib inspect`."""
    from attrib import memory
    from attrib.storage import open_input

    budget = memory.parse_bytes(max_memory, "--max-memory") if max_memory else memory.default_budget(world.device)
    strategy = open_input(factors, "fit-factors", option="--factors")["settings"]["strategy"]
    return memory.query_batching(
        memory.model_shape(lm), memory.layer_shapes(layers), queries=queries, budget=budget,
        tokens_per_batch=settings.tokens_per_batch, dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
        device=str(world.device), rank=rank, max_length=settings.max_length, rotates=strategy in ("ekfac", "kfac"),
        docs_per_part=docs_per_part,
    )


MaxMemory = Annotated[Optional[str], typer.Option(help="Memory per process the stage may plan for, e.g. 80GiB: sets the queries per batch and per pass (default: 90% of the GPU, half the RAM on CPU).")]


def query_gradients(
    model: Model,
    factors: Factors,
    queries: Queries,
    out: Out,
    query_rank: QueryRank = 32,
    damping: Damping = None,
    damping_scale: DampingScale = None,
    max_length: MaxLength = None,
    tokens_per_batch: TokensPerBatch = 4096,
    max_memory: MaxMemory = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Compute, precondition and compress each query's gradient.

    Example: attrib query-gradients --model M --factors run/factors --queries Q --out run/query
    """
    from attrib.data import default_max_length
    from attrib.progress import message
    from attrib.query_stage import run_query_gradients

    max_length = checked_max_length(max_length)
    world, lm, tokenizer, layers = _load(model, factors, dtype, device, trust_remote_code)
    try:
        max_length = max_length or default_max_length(lm.config, tokenizer)
        settings = _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world)
        query_list = _checked_queries(queries, tokenizer, max_length)
        settings.queries_per_batch, _ = _batching(lm, layers, factors, len(query_list), settings.query_rank, max_memory,
                                                  settings, world)
        run_query_gradients(out, model, lm, tokenizer, layers, factors, query_list, settings, world, overwrite)
        message(f"query gradients written to {out}")
    finally:
        world.close()


def _parse_token_scores_top(value: str) -> int:
    from attrib.errors import InputError

    if value == "all":
        return -1
    if value == "none":
        return 0
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise InputError(f"--token-scores-top {value} must be a positive number, 'all' or 'none'")


def _checked_query_gradients(query_gradients_dir: str, given: dict) -> dict:
    """DIR's manifest; flags that would change DIR's gradients must agree with it."""
    from attrib.errors import InputError
    from attrib.storage import open_input

    manifest = open_input(query_gradients_dir, "query-gradients", option="--query-gradients")
    recorded = manifest["settings"]
    for name, value in given.items():
        if value is not None and recorded.get(name) != value:
            raise InputError(
                f"--{name.replace('_', '-')} {value} conflicts with --query-gradients {query_gradients_dir}, computed "
                f"with {recorded.get(name)}; drop the flag or recompute the query gradients"
            )
    return manifest


def query(
    model: Model,
    factors: Factors,
    corpus: Corpus,
    out: Out,
    queries: Annotated[Optional[str], typer.Option(help='JSONL of queries {"id", "prompt", "completion"} (not needed with --query-gradients).')] = None,
    query_gradients_dir: Annotated[Optional[str], typer.Option("--query-gradients", help="Output of `attrib query-gradients` (default: computed into OUT/query-gradients).")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="Output of `attrib prefilter`: score only these candidates.")] = None,
    prefilter: Annotated[Optional[int], typer.Option(help="Run the TF-IDF prefilter first and keep this many candidates per query.")] = None,
    token_scores_top: Annotated[str, typer.Option(help="Store per-token scores for the top K documents per query, 'all' or 'none'.")] = "100",
    query_rank: Annotated[Optional[int], typer.Option(help="Rank of each preconditioned query gradient (0 = full; default 32).")] = None,
    damping: Damping = None,
    damping_scale: DampingScale = None,
    keep_all_scores: Annotated[bool, typer.Option(help="Without candidates, keep every (query, document) score in documents.parquet (default: each query's 1,000 most positive and 1,000 most negative, plus summary.parquet).")] = False,
    queries_per_pass: Annotated[int, typer.Option(help="Queries scored per pass over the corpus (0: as many as --max-memory allows; more passes cost more time, not memory).")] = 0,
    max_memory: MaxMemory = None,
    docs_per_part: Annotated[int, typer.Option(help="Documents per output part (resume granularity).")] = 2000,
    tokens_per_batch: TokensPerBatch = 4096,
    max_length: MaxLength = None,
    text_field: TextField = "text",
    id_field: IdField = None,
    lines: Lines = False,
    max_docs: MaxDocs = None,
    skip_bad_rows: SkipBadRows = False,
    split: Split = "train",
    long_documents: LongDocuments = "chunk",
    dtype: Dtype = "float32",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Score training sequences against every query: per document, per layer and per token.

    Example: attrib query --model M --factors run/factors --queries Q --corpus C --out run/scores
    """
    from attrib.data import check_corpus, default_max_length
    from attrib.errors import InputError
    from attrib.prefilter_stage import check_candidates_chunking
    from attrib.query_stage import ScoreRequest, run_query
    from attrib.scoring import ScoreSettings
    from attrib.storage import open_input

    top = _parse_token_scores_top(token_scores_top)
    max_length = checked_max_length(max_length)
    if candidates is not None and prefilter is not None:
        raise InputError("give either --candidates or --prefilter, not both")
    if prefilter is not None and prefilter < 1:
        raise InputError("--prefilter must be at least 1")
    if query_gradients_dir is None and queries is None:
        raise InputError("--queries is needed unless --query-gradients gives computed query gradients")
    if docs_per_part < 1 or tokens_per_batch < 1 or queries_per_pass < 0:
        raise InputError("--docs-per-part and --tokens-per-batch must be positive, --queries-per-pass at least 0")
    candidates_manifest = open_input(candidates, "prefilter", option="--candidates") if candidates is not None else None
    if query_gradients_dir is not None:
        gradients_manifest = _checked_query_gradients(
            query_gradients_dir, {"query_rank": query_rank, "damping": damping, "damping_scale": damping_scale})
    spec = corpus_spec(corpus, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents)
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    world, lm, tokenizer, layers = _load(model, factors, dtype, device, trust_remote_code)
    try:
        max_length = max_length or default_max_length(lm.config, tokenizer)
        if candidates_manifest is not None:
            check_candidates_chunking(candidates_manifest, tokenizer, max_length, long_documents)
        query_settings = _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world)
        if query_gradients_dir is None:
            query_list = _checked_queries(queries, tokenizer, max_length)
            count, rank = len(query_list), query_settings.query_rank
        else:
            query_list = None
            count, rank = len(gradients_manifest["queries"]), gradients_manifest["settings"]["query_rank"]
        per_batch, per_pass = _batching(lm, layers, factors, count, rank, max_memory, query_settings, world, docs_per_part)
        query_settings.queries_per_batch = per_batch
        every = keep_all_scores or candidates is not None or prefilter is not None
        score_settings = ScoreSettings(max_length, tokens_per_batch, docs_per_part, top, queries_per_pass or per_pass,
                                       0 if every else DOCUMENTS_TOP, world.size)
        request = ScoreRequest(factors, spec, queries, query_gradients_dir, candidates, prefilter)
        manifest = run_query(out, model, lm, tokenizer, layers, request, query_list, query_settings, score_settings,
                             world, overwrite)
        if manifest is not None:
            _print_top(out)
    finally:
        world.close()


def _print_top(out: str, per_query: int = 3) -> None:
    """A short table of each query's top documents with a snippet, on stdout."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from attrib.score_tables import read_token_rows, read_top_documents

    top = read_top_documents(out, per_query).to_pylist()
    snippets = {}
    for row in read_token_rows(out, [(r["query_id"], r["doc_id"]) for r in top]).to_pylist():
        snippets.setdefault((row["query_id"], row["doc_id"]), " ".join(row["text"].split())[:70])
    table = Table(title=f"top documents per query ({out})")
    for column in ("query", "rank", "document", "score", "text"):
        table.add_column(column, overflow="fold")
    for row in top:
        table.add_row(row["query_id"], str(row["rank"]), row["doc_id"], f"{row['score']:.4g}",
                      snippets.get((row["query_id"], row["doc_id"]), ""))
    Console(width=None if sys.stdout.isatty() else 140).print(table)
