"""`attrib query-gradients` and `attrib query`: preconditioned query gradients and influence scores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    Corpus, Device, Dtype, IdField, Lines, MaxDocs, MaxLength, Model, Out, Overwrite, Queries,
    SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode, corpus_spec,
)

Factors = Annotated[str, typer.Option(help="Output directory of `attrib fit-factors`.")]
QueryRank = Annotated[int, typer.Option(help="Rank of each preconditioned query gradient (0 = full).")]
QUERIES_FILE = "queries.jsonl"
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


def _checked_damping(damping: float | None, damping_scale: float | None) -> tuple[float | None, float]:
    """(absolute λ or None, relative scale): one of --damping and --damping-scale, non-negative."""
    from attrib.errors import InputError
    from attrib.factors import DEFAULT_DAMPING_SCALE

    if damping is not None and damping_scale is not None:
        raise InputError("give either --damping (absolute) or --damping-scale (relative), not both")
    if (damping or 0) < 0 or (damping_scale or 0) < 0:
        raise InputError("--damping and --damping-scale must be non-negative")
    return damping, DEFAULT_DAMPING_SCALE if damping_scale is None else damping_scale


def _compute_query_gradients(out, model, lm, tokenizer, layers, factors, query_list, query_rank, damping, damping_scale, max_length, tokens_per_batch, world, overwrite):
    """Run the query-gradients stage into `out` (rank 0 writes; every rank gets the result)."""
    import json

    from attrib.errors import InputError
    from attrib.fit import load_curvature
    from attrib.models import model_record
    from attrib.query_gradients import GRADIENTS_FILE, compute_query_gradients
    from attrib.storage import StageDir, atomic_path, save_tensors

    if query_rank < 0:
        raise InputError("--query-rank must be 0 (full) or positive")
    curvature, factors_manifest = load_curvature(factors, layers, damping, world.device, damping_scale=damping_scale)
    settings = {
        "query_rank": query_rank, "damping": damping, "damping_scale": damping_scale, "max_length": max_length,
        "strategy": factors_manifest["settings"]["strategy"],
    }
    inputs = {"factors": str(factors), "factors_fingerprint": factors_manifest["model"]["fingerprint"]}
    record = model_record(model, lm, layers)
    stage = world.main_first(
        lambda is_main: StageDir(out, "query-gradients", settings, record, inputs, overwrite and is_main)
    )
    if not stage.already_complete:
        gradients = compute_query_gradients(
            lm, tokenizer, layers, query_list, curvature, query_rank, max_length, tokens_per_batch, world.device
        )
        if world.is_main:
            save_tensors(stage.file(GRADIENTS_FILE), gradients.tensors())
            with atomic_path(stage.file(QUERIES_FILE)) as tmp:
                tmp.write_text("".join(json.dumps(q.as_row()) + "\n" for q in query_list), encoding="utf-8")
            stage.complete(
                {"queries": len(query_list), "layers": len(layers)},
                [GRADIENTS_FILE, QUERIES_FILE],
                queries=[q.as_row() for q in query_list],
                layers=[layer.name for layer in layers],
                damping={layer.name: c.damping for layer, c in zip(layers, curvature)},
            )
        world.barrier()
    return out


def _load_query_gradients(directory, lm, layers):
    from attrib.models import fingerprint
    from attrib.query_gradients import GRADIENTS_FILE, QueryGradients
    from attrib.storage import load_tensors, open_input

    manifest = open_input(directory, "query-gradients", fingerprint(lm, layers), option="--query-gradients")
    ids = [q["id"] for q in manifest["queries"]]
    tensors = load_tensors(f"{directory}/{GRADIENTS_FILE}")
    return QueryGradients.from_tensors(tensors, ids, manifest["layers"]), manifest


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

    damping, damping_scale = _checked_damping(damping, damping_scale)
    world, lm, tokenizer, layers = _load(model, factors, dtype, device, trust_remote_code)
    try:
        max_length = max_length or default_max_length(lm.config, tokenizer)
        query_list = _checked_queries(queries, tokenizer, max_length)
        _compute_query_gradients(out, model, lm, tokenizer, layers, factors, query_list, query_rank, damping,
                                 damping_scale, max_length, tokens_per_batch, world, overwrite)
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
    query_rank: QueryRank = 32,
    damping: Damping = None,
    damping_scale: DampingScale = None,
    docs_per_part: Annotated[int, typer.Option(help="Documents per output part (resume granularity).")] = 2000,
    tokens_per_batch: TokensPerBatch = 4096,
    max_length: MaxLength = None,
    text_field: TextField = "text",
    id_field: IdField = None,
    lines: Lines = False,
    max_docs: MaxDocs = None,
    skip_bad_rows: SkipBadRows = False,
    split: Split = "train",
    dtype: Dtype = "float32",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Score training sequences against every query: per document, per layer and per token.

    Example: attrib query --model M --factors run/factors --queries Q --corpus C --out run/scores
    """
    from dataclasses import asdict
    from pathlib import Path

    from attrib.data import default_max_length
    from attrib.errors import InputError
    from attrib.models import model_record
    from attrib.progress import message
    from attrib.scoring import ScoreSettings, discard_parts, finalize_scores, score_corpus
    from attrib.storage import StageDir

    top = _parse_token_scores_top(token_scores_top)
    damping, damping_scale = _checked_damping(damping, damping_scale)
    if candidates is not None and prefilter is not None:
        raise InputError("give either --candidates or --prefilter, not both")
    if prefilter is not None and prefilter < 1:
        raise InputError("--prefilter must be at least 1")
    if query_gradients_dir is None and queries is None:
        raise InputError("--queries is needed unless --query-gradients gives computed query gradients")
    if docs_per_part < 1 or tokens_per_batch < 1:
        raise InputError("--docs-per-part and --tokens-per-batch must be positive")
    spec = corpus_spec(corpus, text_field, id_field, lines, max_docs, skip_bad_rows, split)
    candidate_set = _open_candidates(candidates) if candidates is not None else None
    world, lm, tokenizer, layers = _load(model, factors, dtype, device, trust_remote_code)
    try:
        max_length = max_length or default_max_length(lm.config, tokenizer)
        query_list = _checked_queries(queries, tokenizer, max_length) if query_gradients_dir is None else None
        settings = ScoreSettings(max_length, tokens_per_batch, docs_per_part, top, world.size)
        inputs = {"factors": factors, "corpus": asdict(spec), "candidates": candidates, "prefilter": prefilter,
                  "query_gradients": query_gradients_dir, "queries": queries}
        recorded = {**asdict(settings), "query_rank": query_rank, "damping": damping, "damping_scale": damping_scale,
                    "dtype": dtype}
        record = model_record(model, lm, layers)
        stage = world.main_first(lambda is_main: StageDir(out, "query", recorded, record, inputs, overwrite and is_main))
        if stage.already_complete:
            message(f"{out} is already complete; use --overwrite to score again")
            return
        gradients_dir = query_gradients_dir or _compute_query_gradients(
            str(Path(out) / "query-gradients"), model, lm, tokenizer, layers, factors, query_list, query_rank,
            damping, damping_scale, max_length, tokens_per_batch, world, False,
        )
        gradients, gradients_manifest = _load_query_gradients(gradients_dir, lm, layers)
        if prefilter is not None:
            candidate_set = _run_prefilter(Path(out) / "prefilter", spec, gradients_dir, prefilter, world)
        stats = score_corpus(lm, tokenizer, layers, gradients, spec, stage, settings, world, candidate_set)
        world.barrier()
        if world.is_main:
            result = finalize_scores(stage, gradients.query_ids, settings, candidate_set)
            stage.complete(
                {**result["counts"], "rows_skipped": stats.skipped},
                result["files"],
                queries=gradients_manifest["queries"],
                layers=gradients.layer_names,
                strategy=gradients_manifest["settings"]["strategy"],
            )
            discard_parts(stage)
            _print_top(out)
    finally:
        world.close()


def _open_candidates(directory: str):
    """The prefilter's candidates as the scoring stage wants them."""
    from attrib.prefilter import load_candidates
    from attrib.scoring import Candidates

    loaded = load_candidates(directory)
    return Candidates({q: {(c.doc_id, c.chunk): c.rank for c in items} for q, items in loaded.items()})


def _run_prefilter(out, spec, gradients_dir: str, top_k: int, world):
    """`--prefilter K`: the TF-IDF stage over the same corpus and the query-gradients' queries."""
    from attrib.prefilter import run_prefilter

    if world.is_main:
        run_prefilter(corpus=spec, queries=f"{gradients_dir}/queries.jsonl", out=str(out), top_k=top_k)
    world.barrier()
    return _open_candidates(str(out))


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
