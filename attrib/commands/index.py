"""`attrib index`: a compressed gradient of every training sequence, scored later for any query."""

from __future__ import annotations

from typing import Annotated

import typer

from attrib.commands.options import (
    ChatTemplate, Corpus, Device, Dtype, IdField, Lines, LongDocuments, LossOn, MaxDocs, MaxLength, Model, Out,
    Overwrite, SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode,
)
from attrib.commands.query import Damping, DampingScale, Factors


def index(
    model: Model,
    factors: Factors,
    corpus: Corpus,
    out: Out,
    representation: Annotated[str, typer.Option(help="lowrank: rank --rank factors of each sequence's whitened gradient (eigenbasis, ÷√(Λ+λ)); kronecker: a --dims projection P_Sᵀ G P_A.")] = "lowrank",
    rank: Annotated[int, typer.Option(help="lowrank: factors kept per sequence and layer (0 = full rank, exact).")] = 8,
    dims: Annotated[str, typer.Option(help="kronecker: k_out x k_in kept per layer, e.g. 16 or 16x32 (0 = the layer's width).")] = "16",
    projection: Annotated[str, typer.Option(help="kronecker: random (seeded Gaussian) or eigen (top eigenvectors of S and A).")] = "random",
    seed: Annotated[int, typer.Option(help="Seed of the random projection.")] = 0,
    storage_dtype: Annotated[str, typer.Option(help="Stored values: bfloat16, float16, float32 or float64 (scores accumulate in float32).")] = "bfloat16",
    damping: Damping = None,
    damping_scale: DampingScale = None,
    docs_per_part: Annotated[int, typer.Option(help="Documents per shard (resume granularity).")] = 2000,
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
    """Index the corpus: one pass storing each sequence's compressed gradient (attrib.stages.index).

    Example: attrib index --model M --factors run/factors --corpus C --out run/index
    """
    options = dict(locals())
    from attrib.api import index as run
    from attrib.progress import message

    result = run(**options)
    if not result.already_complete:
        counts = result.manifest.get("counts", {})
        message(f"{counts.get('sequences', 0):,} sequences indexed ({result.manifest.get('representation')}, "
                f"{result.manifest.get('bytes_per_sequence', 0):,} bytes each) in {out}")
