"""`attrib fit-factors`: EK-FAC curvature over the tracked layers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    ChatTemplate, Corpus, Device, IdField, Lines, LongDocuments, LossOn, MaxDocs, MaxLength, Model, Modules, Out,
    Overwrite, Seed,
    SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode,
)


def fit_factors(
    model: Model,
    corpus: Corpus,
    out: Out,
    strategy: Annotated[str, typer.Option(help="ekfac, kfac, diagonal or identity (gradient dot product).")] = "ekfac",
    fisher: Annotated[str, typer.Option(help="empirical (the data's labels) or true (labels sampled from the model); see docs/benchmarks.md.")] = "empirical",
    fisher_samples: Annotated[int, typer.Option(help="Sampled labels per position (true Fisher); more = less noise.")] = 1,
    max_sequences: Annotated[Optional[int], typer.Option(help="Fit on at most this many sequences.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Fit on at most this many tokens.")] = None,
    covariance_max_tokens: Annotated[Optional[int], typer.Option(
        help="Fit A and S (pass 1) on the first this many tokens only; the eigenvalue correction (pass 2) "
             "still sees every token. Saves most of pass 1 on large corpora (see docs/benchmarks.md).")] = None,
    stats_dtype: Annotated[str, typer.Option(help="Accumulation dtype of the statistics: float32 or float64.")] = "float32",
    docs_per_part: Annotated[int, typer.Option(help="Documents per part of the corpus (the resume granularity).")] = 2000,
    layers_per_pass: Annotated[Optional[int], typer.Option(
        help="Fit this many layers per pass over the corpus (bounds memory by a group; each group costs a pass). "
             "Default: all in one pass, or what --max-memory allows.")] = None,
    max_memory: Annotated[Optional[str], typer.Option(
        help="Memory budget per process (device memory on a GPU, RAM on CPU), e.g. 80GiB: "
             "--layers-per-pass is chosen to fit it (see `attrib inspect`).")] = None,
    checkpoint_every: Annotated[str, typer.Option(
        help="Checkpoint running sums this often (e.g. 10m, 1h; 0 = after every part), and at the end of every pass.")] = "10m",
    tf32: Annotated[Optional[bool], typer.Option(
        "--tf32/--no-tf32", help="TF32 matmuls for the float32 statistics (default: on with CUDA).")] = None,
    collective_timeout: Annotated[str, typer.Option(
        help="How long a process waits for the others in a collective (several processes).")] = "6h",
    tokens_per_batch: TokensPerBatch = 4096,
    max_length: MaxLength = None,
    long_documents: LongDocuments = "chunk",
    chat_template: ChatTemplate = "auto",
    loss_on: LossOn = "all",
    seed: Seed = 0,
    modules: Modules = None,
    text_field: TextField = "text",
    id_field: IdField = None,
    lines: Lines = False,
    max_docs: MaxDocs = None,
    skip_bad_rows: SkipBadRows = False,
    split: Split = "train",
    dtype: Annotated[str, typer.Option(
        help="Model compute dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16. "
             "Statistics accumulate in --stats-dtype.")] = "auto",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Fit EK-FAC factors (covariances, eigenbases, eigenvalue correction).

    Example: attrib fit-factors --model M --corpus C --out run/factors
    """
    options = dict(locals())
    from attrib.api import fit_factors as run

    result = run(**options)
    if not result.already_complete:
        _report(result.manifest, out)


def _report(manifest: dict, out: str) -> None:
    """One line for people: what was fitted, on how much, what was skipped."""
    from attrib.progress import message

    counts = manifest.get("counts", {})
    skipped = counts.get("rows_skipped") or {}
    empty = skipped.get("empty text", 0)
    bad = sum(skipped.values()) - empty
    notes = [f"{empty:,} empty documents skipped"] if empty else []
    notes += [f"{bad:,} bad rows skipped"] if bad else []
    message(
        f"factors ({manifest['settings']['strategy']}) for {len(manifest['model']['tracked_modules'])} layers "
        f"written to {out} ({counts.get('covariance_tokens', counts.get('correction_sequences', 0)):,} "
        f"{'tokens' if 'covariance_tokens' in counts else 'sequences'}"
        f"{''.join('; ' + note for note in notes)})"
    )
