"""`attrib self-influence`: ⟨H⁻¹∇L_m, ∇L_m⟩ of every training sequence, for outliers and memorisation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    Corpus, Device, Dtype, IdField, Lines, LongDocuments, MaxDocs, MaxLength, Model, Out, Overwrite, SkipBadRows,
    Split, TextField, TokensPerBatch, TrustRemoteCode, checked_max_length, corpus_spec,
)
from attrib.commands.query import Damping, DampingScale, Factors


def self_influence(
    model: Model,
    factors: Factors,
    corpus: Corpus,
    out: Out,
    token_scores_top: Annotated[str, typer.Option(help="Store per-token self-influence for the top K sequences, 'all' or 'none'.")] = "100",
    damping: Damping = None,
    damping_scale: DampingScale = None,
    max_memory: Annotated[Optional[str], typer.Option(help="Memory per process the stage may plan for, e.g. 80GiB: every layer's curvature stays on the device when it fits (default: 90% of the GPU, half the RAM on CPU).")] = None,
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
    """Score every training sequence by its self-influence (high: surprising, corrupted or memorised).

    Example: attrib self-influence --model M --factors run/factors --corpus C --out run/self
    """
    from attrib import memory
    from attrib.commands.query import _load, _parse_token_scores_top
    from attrib.data import check_corpus, default_max_length
    from attrib.errors import InputError
    from attrib.self_influence import SelfInfluenceSettings, run_self_influence

    top = _parse_token_scores_top(token_scores_top)
    max_length = checked_max_length(max_length)
    if damping is not None and damping_scale is not None:
        raise InputError("give either --damping (absolute) or --damping-scale (relative), not both")
    budget = memory.parse_bytes(max_memory, "--max-memory") if max_memory else None
    spec = corpus_spec(corpus, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents)
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    world, lm, tokenizer, layers = _load(model, factors, dtype, device, trust_remote_code)
    try:
        settings = SelfInfluenceSettings(damping=damping, max_length=max_length or default_max_length(lm.config, tokenizer),
                                         tokens_per_batch=tokens_per_batch, docs_per_part=docs_per_part,
                                         token_scores_top=top, world_size=world.size)
        if damping_scale is not None:
            settings.damping_scale = damping_scale
        manifest = run_self_influence(out, model, lm, tokenizer, layers, factors, spec, settings, world, overwrite, budget)
        if manifest is not None:
            from attrib.commands.report import _print_table
            from attrib.report import open_scores, top_rows

            run = open_scores(out)
            _print_table(top_rows(run, 5, [q["id"] for q in run.queries]))
    finally:
        world.close()
