"""`attrib fit-factors`: EK-FAC curvature over the tracked layers."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    ChatTemplate, Corpus, Device, IdField, Lines, LongDocuments, LossOn, MaxDocs, MaxLength, Model, Modules, Out,
    Overwrite, Seed, SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode, checked_max_length, corpus_spec,
    parse_duration,
)
from attrib.memory import parse_bytes


def fit_factors(
    model: Model,
    corpus: Corpus,
    out: Out,
    strategy: Annotated[str, typer.Option(help="ekfac, kfac, diagonal or identity (gradient dot product).")] = "ekfac",
    fisher: Annotated[str, typer.Option(help="true (labels sampled from the model) or empirical (the data's labels).")] = "true",
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
    from dataclasses import asdict

    from attrib.data import chat_format, check_corpus, default_max_length
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
    spec = corpus_spec(corpus, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                       chat_template, loss_on)
    model_source(model)  # a mistyped --model path is named before the corpus is read
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    every = parse_duration(checkpoint_every, "--checkpoint-every")
    timeout = parse_duration(collective_timeout, "--collective-timeout")
    budget = parse_bytes(max_memory, "--max-memory") if max_memory is not None else None
    if budget is not None and layers_per_pass is not None:
        raise InputError("give --layers-per-pass or --max-memory, not both")
    if timeout <= 0:
        raise InputError("--collective-timeout must be positive")
    world = detect_world(device, timeout=timeout)
    try:
        dtype = default_dtype(dtype, world.device)
        lm, tokenizer = load_model(model, dtype, world.device, trust_remote_code)
        layers = find_tracked_layers(lm, modules)
        settings = FitSettings(
            strategy=strategy, fisher=fisher, fisher_samples=fisher_samples,
            max_length=max_length or default_max_length(lm.config, tokenizer),
            tokens_per_batch=tokens_per_batch, docs_per_part=docs_per_part,
            max_sequences=max_sequences, max_tokens=max_tokens, stats_dtype=stats_dtype,
            covariance_max_tokens=covariance_max_tokens,
            seed=seed, world_size=world.size, layers_per_pass=layers_per_pass,
            tf32=str(world.device).startswith("cuda") if tf32 is None else tf32,
        )
        settings.validate()
        if budget is not None:
            settings.layers_per_pass = layers_for_budget(budget, lm, layers, settings, dtype, world.device)
        reading = {key: value for key, value in asdict(spec).items() if key not in ("source", "long_documents")}
        recorded = {**asdict(settings), "modules": modules, "dtype": dtype, "long_documents": long_documents,
                    "corpus_options": reading,
                    "chat": {**chat_format(tokenizer, chat_template).identity(), "loss_on": loss_on}}
        inputs = {"corpus": input_identity(corpus)}
        record = model_record(model, lm, layers)
        stage = world.main_first(
            lambda is_main: StageDir(out, "fit-factors", recorded, record, inputs, overwrite and is_main)
        )
        if stage.already_complete:
            message(f"{out} is already complete; use --overwrite to fit again")
            return
        with stage.guard():
            manifest = run_fit(lm, tokenizer, layers, spec, stage, settings, world, checkpoint_every=every)
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


def default_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 compute on CUDA (statistics stay float32), float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def layers_for_budget(budget: int, lm, layers, settings, dtype: str, device: str) -> int | None:
    """--layers-per-pass from --max-memory through attrib.memory's model of fit-factors."""
    from attrib import memory
    from attrib.errors import InputError

    shape, shapes = memory.model_shape(lm), memory.layer_shapes(layers)
    kind = "cpu" if str(device) == "cpu" else "cuda"

    def predict(layers_per_pass):
        return memory.fit_factors(
            shape, shapes, tokens_per_batch=settings.tokens_per_batch, dtype=dtype, device=kind,
            layers_per_pass=layers_per_pass, strategy=settings.strategy, fisher=settings.fisher,
            stats_dtype=settings.stats_dtype,
        )

    try:
        return memory.choose_layers_per_pass(budget, predict, len(layers), kind)
    except ValueError as exc:
        raise InputError(
            f"--max-memory {budget / memory.GiB:.1f} GiB is too small: {exc}; lower --tokens-per-batch or raise --max-memory"
        ) from None
