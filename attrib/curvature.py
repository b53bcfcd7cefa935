"""Reading fitted curvature one layer at a time (docs/design.md §2–3).

A fit-factors directory may hold its tensors in one file per kind or in one file per
layer group; the manifest lists them. `FactorFiles` indexes tensor names across those
files and reads one tensor at a time through `safe_open`, so no stage ever holds the
factors of the whole model. `Curvature` turns one layer's tensors into a damped
`LayerCurvature` on the device that needs it, in float32 (float64 only for a float64
model, which the dense oracle tests use).
"""

from __future__ import annotations

from pathlib import Path

import torch

from attrib.errors import InputError
from attrib.factors import LayerCurvature, default_damping
from attrib.models import TrackedLayer
from attrib.options import DEFAULT_DAMPING_SCALE, DampingOptions
from attrib.runtime import flag
from attrib.storage import open_input
from attrib.strategies import STRATEGY


class FactorFiles:
    """Tensor name → file over every safetensors file a fit-factors manifest lists."""

    def __init__(self, directory: str | Path, manifest: dict):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.aliases: dict[str, str] = manifest.get("activation_alias", {})
        self.where: dict[str, Path] = {}
        for name in manifest.get("files", []):
            path = self.directory / name
            if not name.endswith(".safetensors"):
                continue
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        self.where[key] = path
            except Exception as exc:  # safetensors raises several types for a missing or truncated file
                raise InputError(f"{flag('factors', directory)}: {name} is unreadable ({exc}); rerun `attrib fit-factors`") from exc

    def read(self, name: str, device="cpu") -> torch.Tensor:
        from safetensors import safe_open

        layer, _, kind = name.rpartition(".")
        if name not in self.where and kind.startswith("activation_") and layer in self.aliases:
            name = f"{self.aliases[layer]}.{kind}"
        if name not in self.where:
            raise InputError(f"{flag('factors', self.directory)} lacks the tensor {name}; refit with the same {flag('modules')}")
        with safe_open(str(self.where[name]), framework="pt", device=str(device)) as handle:
            return handle.get_tensor(name)


class Curvature:
    """The damped curvature of every tracked layer of a fit-factors directory, loaded on demand.

    Damping is `damping` for every layer, or `damping_scale` × mean(Λ_l) per layer; it
    must be positive, so Λ + λ never divides by zero.
    """

    def __init__(
        self,
        directory: str | Path,
        layers: list[TrackedLayer],
        damping: float | None = None,
        damping_scale: float = DEFAULT_DAMPING_SCALE,
        fingerprint: str | None = None,
    ):
        self.manifest = open_input(directory, "fit-factors", fingerprint, option=flag("factors"))
        self.strategy = STRATEGY[self.manifest["settings"]["strategy"]]
        missing = [l.name for l in layers if l.name not in self.manifest["model"]["tracked_modules"]]
        if missing:
            raise InputError(
                f"{flag('factors', directory)} has no factors for {', '.join(missing[:3])}; refit with the same {flag('modules')}"
            )
        DampingOptions(damping, None if damping is not None else damping_scale).check_fields({"damping", "damping_scale"})
        self.layers = layers
        self.damping, self.damping_scale = damping, damping_scale
        self.files = FactorFiles(directory, self.manifest) if self.strategy.has_factors else None
        self.dampings: dict[str, float] = {}  # per layer, filled as layers are loaded

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int, device="cpu", dtype: torch.dtype = torch.float32) -> LayerCurvature:
        """Layer `index`'s curvature on `device` in `dtype` (stored factors are float32)."""
        name = self.layers[index].name
        if not self.strategy.has_factors:
            return LayerCurvature(None, None, None, 0.0)
        eigenvalues = self.files.read(f"{name}.lambda", device).to(dtype)
        damping = self._damping(name, eigenvalues)
        if not self.strategy.rotates:
            return LayerCurvature(eigenvalues, None, None, damping)
        return LayerCurvature(
            eigenvalues,
            self.files.read(f"{name}.gradient_eigenvectors", device).to(dtype),
            self.files.read(f"{name}.activation_eigenvectors", device).to(dtype),
            damping,
        )

    def damped_eigenvalues(self, index: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Layer `index`'s Λ + λ on the CPU (None without factors), read without its eigenbases."""
        if not self.strategy.has_factors:
            return None
        eigenvalues = self.files.read(f"{self.layers[index].name}.lambda").to(dtype)
        return eigenvalues + self._damping(self.layers[index].name, eigenvalues)

    def damping_of(self, index: int) -> float:
        """Layer `index`'s λ (reads only its Λ, once)."""
        name = self.layers[index].name
        if not self.strategy.has_factors:
            return 0.0
        if name not in self.dampings:
            self._damping(name, self.files.read(f"{name}.lambda"))
        return self.dampings[name]

    def _damping(self, name: str, eigenvalues: torch.Tensor) -> float:
        if self.damping is not None:
            damping = self.damping
        else:
            damping = default_damping(eigenvalues, self.damping_scale)
            if not damping > 0:
                raise InputError(
                    f"{flag('factors')}: layer {name} has Λ with mean {damping / self.damping_scale:g}, so "
                    f"{flag('damping_scale')} × mean(Λ) is not positive; give an absolute {flag('damping')}"
                )
        self.dampings[name] = damping
        return damping

    def __getitem__(self, index: int) -> LayerCurvature:
        """Layer `index` on the CPU in float64: for tests and dense evaluations on tiny models."""
        return self.layer(index, "cpu", torch.float64)


def load_curvature(
    factors_dir: str,
    layers: list[TrackedLayer],
    damping: float | None,
    fingerprint: str | None = None,
    damping_scale: float = DEFAULT_DAMPING_SCALE,
) -> Curvature:
    """The curvature of a fit-factors directory for `layers` (checked against the model's fingerprint)."""
    return Curvature(factors_dir, layers, damping, damping_scale, fingerprint)
