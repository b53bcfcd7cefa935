"""`attrib self-influence`: ⟨H⁻¹∇L_m, ∇L_m⟩ of every training sequence, for outliers and memorisation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    ChatTemplate, Corpus, Device, Dtype, IdField, Lines, LongDocuments, LossOn, MaxDocs, MaxLength, Model, Out,
    Overwrite, SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode,
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
    chat_template: ChatTemplate = "auto",
    loss_on: LossOn = "all",
    dtype: Dtype = "float32",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Score every training sequence by its self-influence (high: surprising, corrupted or memorised).

    Example: attrib self-influence --model M --factors run/factors --corpus C --out run/self
    """
    options = dict(locals())
    from attrib.api import self_influence as run
    from attrib.progress import current_rank

    result = run(**options)
    if current_rank() == 0 and not result.already_complete:
        from attrib.commands.report import _print_table
        from attrib.report import open_scores, top_rows

        scores = open_scores(out)
        _print_table(top_rows(scores, 5, [q["id"] for q in scores.queries]))
