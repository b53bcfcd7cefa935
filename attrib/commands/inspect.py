"""`attrib inspect`: what attrib would track in a model, and what its factors will cost."""

from __future__ import annotations

from attrib.commands.options import Device, Dtype, Model, Modules, TrustRemoteCode


def inspect_model(
    model: Model,
    modules: Modules = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """List the tracked layers with shapes, parameters and EK-FAC factor memory.

    Example: attrib inspect --model EleutherAI/pythia-410m
    """
    import sys

    from rich.console import Console
    from rich.table import Table

    from attrib.models import factor_bytes, find_tracked_layers, fingerprint, load_model

    lm, _ = load_model(model, dtype, device, trust_remote_code)
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
    console.print(f"model parameters: {sum(p.numel() for p in lm.parameters()):,}")
    console.print(f"fingerprint: {fingerprint(lm, layers)}")
