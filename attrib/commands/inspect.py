"""`attrib inspect`: what attrib would track in a model, and the memory each stage will need."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.memory import parse_bytes
from attrib.options import (
    DEFAULT_INDEX_DIMS,
    DEFAULT_QUERY_RANK,
    MODEL,
    BatchOptions,
    FitOptions,
    IndexOptions,
    ModelOptions,
    help_of,
)


def _option(group, name: str, **changes):
    """A flag of the planned run, with the help of the stage option of the same name."""
    return typer.Option(help=changes.pop("help", help_of(group, name)), **changes)


def inspect_model(
    model: Annotated[str, typer.Option(*MODEL.flags, help=MODEL.help)],
    modules: Annotated[Optional[str], _option(FitOptions, "modules")] = None,
    tokens_per_batch: Annotated[int, _option(BatchOptions, "tokens_per_batch")] = 4096,
    layers_per_pass: Annotated[Optional[int], typer.Option(help="Layers per pass of fit-factors (default: all).")] = None,
    max_memory: Annotated[Optional[str], typer.Option(
        help="Memory per process (device memory on a GPU, RAM on CPU), e.g. 80GiB: suggest --layers-per-pass.")] = None,
    strategy: Annotated[str, _option(FitOptions, "strategy")] = "ekfac",
    queries: Annotated[int, typer.Option(help="Queries of the planned query stages.")] = 16,
    query_rank: Annotated[int, typer.Option(help="Rank of the query gradients (0 = full).")] = DEFAULT_QUERY_RANK,
    max_length: Annotated[int, typer.Option(help="Tokens per sequence of the planned run.")] = 512,
    dtype: Annotated[str, typer.Option(help="Model compute dtype of the planned run: auto (bfloat16 on cuda), "
                                            "float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="Device of the planned run: cuda or cpu (nothing runs on it here).")] = "cuda",
    representation: Annotated[str, _option(IndexOptions, "representation")] = IndexOptions.representation,
    rank: Annotated[int, _option(IndexOptions, "rank")] = IndexOptions.rank,
    dims: Annotated[Optional[str], _option(IndexOptions, "dims")] = IndexOptions.dims,
    storage_dtype: Annotated[str, _option(IndexOptions, "storage_dtype")] = IndexOptions.storage_dtype,
    sequences: Annotated[int, typer.Option(help="Sequences of the planned index: its size on disk.")] = 10_000_000,
    trust_remote_code: Annotated[bool, _option(ModelOptions, "trust_remote_code")] = False,
) -> None:
    """List the tracked layers and predict each stage's peak memory, loading no weights.

    Works from a directory holding only config.json (and the tokenizer). The index's size on disk is given
    for --sequences sequences at the --representation, --rank or --dims and --storage-dtype of `attrib index`.
    Example: attrib inspect --model EleutherAI/pythia-410m --max-memory 80GiB
    """
    import sys

    from rich.console import Console
    from rich.table import Table

    from attrib import memory
    from attrib.errors import InputError
    from attrib.models import DTYPES, factor_bytes, find_tracked_layers, load_meta_model
    from attrib.runtime import default_dtype
    from attrib.strategies import STRATEGY

    kind = "cpu" if device == "cpu" else "cuda"
    dtype = default_dtype(dtype, kind)
    if dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not one of auto, {', '.join(DTYPES)}")
    if strategy not in STRATEGY:
        raise InputError(f"--strategy {strategy} is not one of {', '.join(STRATEGY)}")
    if layers_per_pass is not None and layers_per_pass < 1:
        raise InputError("--layers-per-pass must be at least 1")
    from attrib.options import STAGES, parse_dims

    STAGES["index"].parse({"representation": representation, "rank": rank, "dims": dims, "storage_dtype": storage_dtype})
    index_dims = None if dims is None else parse_dims(dims)
    budget = parse_bytes(max_memory, "--max-memory") if max_memory is not None else None
    lm = load_meta_model(model, trust_remote_code)
    layers = find_tracked_layers(lm, modules)
    table = Table(title=f"{model} ({lm.config.model_type}): {len(layers)} tracked layers")
    for column in ("module", "kind", "d_out", "d_in (+bias)", "parameters", "factors (MiB)"):
        table.add_column(column, justify="left" if column in ("module", "kind") else "right", no_wrap=True)
    total_params = total_bytes = 0
    for layer in layers:
        size = factor_bytes(layer)
        total_params += layer.num_params
        total_bytes += size
        table.add_row(
            layer.name,
            "Conv1D" if layer.transposed else "Linear",
            str(layer.d_out),
            f"{layer.d_in}{' +1' if layer.has_bias else ''}",
            f"{layer.num_params:,}",
            f"{size / 2**20:,.1f}",
        )
    table.add_row("total", "", "", "", f"{total_params:,}", f"{total_bytes / 2**20:,.1f}")
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    shape, shapes = memory.model_shape(lm), memory.layer_shapes(layers)
    console.print(f"model parameters: {shape.parameters:,}")
    console.print("fingerprint: computed from the weights by fit-factors (inspect loads none)")

    def predict(stage_layers_per_pass):
        return memory.fit_factors(shape, shapes, tokens_per_batch=tokens_per_batch, dtype=dtype, device=kind,
                                  layers_per_pass=stage_layers_per_pass, strategy=strategy)

    peaks = Table(title=f"predicted peak memory per process ({kind}, {dtype}, --tokens-per-batch {tokens_per_batch})")
    for column in ("stage", "layers per pass", "peak step", "device (GiB)", "host (GiB)", "largest terms (GiB)"):
        peaks.add_column(column, justify="left" if column in ("stage", "peak step", "largest terms (GiB)") else "right")
    for option in dict.fromkeys([layers_per_pass, None, 1]):
        peak = predict(option)
        terms = ", ".join(f"{name} {value / memory.GiB:.1f}" for name, value in
                          sorted(peak.terms.items(), key=lambda item: -item[1])[:3])
        peaks.add_row("fit-factors", "all" if option is None else str(option), peak.step,
                      f"{peak.device / memory.GiB:.1f}" if kind == "cuda" else "-", f"{peak.host / memory.GiB:.1f}", terms)
    rotates = STRATEGY[strategy].rotates
    # attrib index keeps every layer's curvature resident when it takes at most a quarter of the memory budget
    index_pass = memory.index_queries_per_pass(shapes, representation, rank, index_dims, query_rank, queries)
    planned = budget if budget is not None else memory.default_budget("cpu") if kind == "cpu" else None
    resident = planned is not None and memory.self_influence_factor_bytes(shapes, rotates) * 4 <= planned
    per_batch, per_pass = min(64, queries), queries  # what the stages do when everything fits
    if budget is not None:
        per_batch, per_pass = memory.query_batching(
            shape, shapes, queries=queries, budget=budget, tokens_per_batch=tokens_per_batch, dtype=dtype, device=kind,
            rank=query_rank, max_length=max_length, rotates=rotates)
    for stage, peak, setting in (
        ("query-gradients", memory.query_gradients(shape, shapes, tokens_per_batch=tokens_per_batch, dtype=dtype,
                                                   device=kind, rank=query_rank, queries_per_batch=per_batch,
                                                   max_length=max_length, rotates=rotates),
         f"{per_batch} queries per batch"),
        ("query", memory.query(shape, shapes, tokens_per_batch=tokens_per_batch, dtype=dtype, device=kind,
                               rank=query_rank, queries_per_pass=per_pass, max_length=max_length),
         f"{per_pass} of {queries} queries per pass"),
        ("self-influence", memory.self_influence(shape, shapes, tokens_per_batch=tokens_per_batch, dtype=dtype,
                                                 device=kind, rotates=rotates), "every layer's curvature resident"),
        ("index", memory.index_build(shape, shapes, tokens_per_batch=tokens_per_batch, dtype=dtype, device=kind,
                                     representation=representation, rank=rank, dims=index_dims,
                                     storage_dtype=storage_dtype, rotates=rotates, resident_factors=resident),
         ("every layer's curvature resident" if resident else "one layer's curvature at a time")
         if representation == "lowrank" else "projections resident"),
        ("query --index", memory.index_scoring(shape, shapes, dtype=dtype, device=kind, representation=representation,
                                               rank=rank, dims=index_dims, query_rank=query_rank, queries=queries,
                                               rotates=rotates),
         f"{index_pass} of {queries} queries per pass"),
    ):
        terms = ", ".join(f"{name} {value / memory.GiB:.1f}" for name, value in
                          sorted(peak.terms.items(), key=lambda item: -item[1])[:3])
        peaks.add_row(stage, setting, peak.step, f"{peak.device / memory.GiB:.1f}" if kind == "cuda" else "-",
                      f"{peak.host / memory.GiB:.1f}", terms)
    console.print(peaks)
    per_sequence = memory.index_values(shapes, representation, rank, index_dims) * memory.DTYPE_BYTES[storage_dtype]
    label = (f"rank {rank or 'full'}" if representation == "lowrank" else
             f"{DEFAULT_INDEX_DIMS}x{DEFAULT_INDEX_DIMS} or the layer's width" if index_dims is None else
             "x".join(map(str, index_dims)))
    console.print(f"index ({representation} {label}, {storage_dtype}): {per_sequence / 2**10:,.1f} KiB per sequence; "
                  f"{sequences:,} sequences: {per_sequence * sequences / 2**40:,.2f} TiB on disk")
    if budget is not None:
        try:
            chosen = memory.choose_layers_per_pass(budget, predict, len(layers), kind)
        except ValueError as exc:
            console.print(f"--max-memory {max_memory}: does not fit ({exc}); lower --tokens-per-batch or track fewer --modules")
        else:
            passes = 1 if chosen is None else -(-len(layers) // chosen)
            console.print(f"--max-memory {max_memory}: fit-factors --layers-per-pass {chosen or len(layers)} "
                          f"({passes} pass{'es' if passes > 1 else ''} over the corpus per step)")
