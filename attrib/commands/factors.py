"""`attrib fit-factors`: EK-FAC curvature over the tracked layers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    Corpus, Device, Dtype, IdField, Lines, LongDocuments, MaxDocs, MaxLength, Model, Modules, Out, Overwrite, Seed,
    SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode, checked_max_length, corpus_spec,
)


def fit_factors(
    model: Model,
    corpus: Corpus,
    out: Out,
    strategy: Annotated[str, typer.Option(help="ekfac, kfac, diagonal or identity (gradient dot product).")] = "ekfac",
    fisher: Annotated[str, typer.Option(help="true (labels sampled from the model) or empirical (the data's labels).")] = "true",
    fisher_samples: Annotated[int, typer.Option(help="Sampled labels per position (true Fisher); more = less noise.")] = 1,
    max_sequences: Annotated[Optional[int], typer.Option(help="Fit on at most this many sequences.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Fit on at most this many tokens.")] = None,
    stats_dtype: Annotated[str, typer.Option(help="Accumulation dtype of the statistics: float32 or float64.")] = "float32",
    docs_per_part: Annotated[int, typer.Option(help="Documents between checkpoints (resume granularity).")] = 2000,
    tokens_per_batch: TokensPerBatch = 4096,
    max_length: MaxLength = None,
    long_documents: LongDocuments = "chunk",
    seed: Seed = 0,
    modules: Modules = None,
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
    """Fit EK-FAC factors (covariances, eigenbases, eigenvalue correction).

    Example: attrib fit-factors --model M --corpus C --out run/factors
    """
    from dataclasses import asdict

    from attrib.data import check_corpus, default_max_length
    from attrib.distributed import detect_world
    from attrib.errors import InputError
    from attrib.fit import FitSettings
    from attrib.fit import fit_factors as run_fit
    from attrib.models import find_tracked_layers, load_model, model_record, model_source
    from attrib.progress import message
    from attrib.storage import StageDir, input_identity

    max_length = checked_max_length(max_length)
    if dtype == "float16":
        raise InputError(
            "--dtype float16 is refused for fit-factors: without loss scaling its gradients underflow to zero "
            "or overflow; use --dtype bfloat16 (same memory, float32's range)"
        )
    spec = corpus_spec(corpus, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents)
    model_source(model)  # a mistyped --model path is named before the corpus is read
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    world = detect_world(device)
    try:
        lm, tokenizer = load_model(model, dtype, world.device, trust_remote_code)
        layers = find_tracked_layers(lm, modules)
        settings = FitSettings(
            strategy=strategy, fisher=fisher, fisher_samples=fisher_samples,
            max_length=max_length or default_max_length(lm.config, tokenizer),
            tokens_per_batch=tokens_per_batch, docs_per_part=docs_per_part,
            max_sequences=max_sequences, max_tokens=max_tokens, stats_dtype=stats_dtype,
            seed=seed, world_size=world.size,
        )
        settings.validate()
        reading = {key: value for key, value in asdict(spec).items() if key not in ("source", "long_documents")}
        recorded = {**asdict(settings), "modules": modules, "dtype": dtype, "long_documents": long_documents,
                    "corpus_options": reading}
        inputs = {"corpus": input_identity(corpus)}
        record = model_record(model, lm, layers)
        stage = world.main_first(
            lambda is_main: StageDir(out, "fit-factors", recorded, record, inputs, overwrite and is_main)
        )
        if stage.already_complete:
            message(f"{out} is already complete; use --overwrite to fit again")
            return
        with stage.guard():
            manifest = run_fit(lm, tokenizer, layers, spec, stage, settings, world)
        if world.is_main:
            counts = manifest["counts"]
            skipped = counts.get("rows_skipped") or {}
            empty = skipped.get("empty text", 0)
            bad = sum(skipped.values()) - empty
            notes = [f"{empty:,} empty documents skipped"] if empty else []
            notes += [f"{bad:,} bad rows skipped"] if bad else []
            message(
                f"factors ({strategy}) for {len(layers)} layers written to {out} "
                f"({counts.get('covariance_tokens', counts.get('correction_sequences', 0)):,} "
                f"{'tokens' if 'covariance_tokens' in counts else 'sequences'}"
                f"{''.join('; ' + note for note in notes)})"
            )
    finally:
        world.close()
