"""EK-FAC mathematics (docs/design.md §2): statistics, eigenbases, eigenvalue correction, H⁻¹V.

Tensors in, tensors out; no I/O. Per layer the curvature is described by
eigenvectors Q_A [d_in, d_in], Q_S [d_out, d_out] and eigenvalues Λ [d_out, d_in]
in that eigenbasis; the damped inverse is H⁻¹V = Q_S ((Q_Sᵀ V Q_A) ⊘ (Λ + λ)) Q_Aᵀ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.options import DEFAULT_DAMPING_SCALE


class CovarianceSums:
    """Running sums Σ a aᵀ and Σ g gᵀ over real tokens of one layer; they merge by addition."""

    def __init__(self, d_in: int | None, d_out: int, dtype: torch.dtype, device):
        # d_in None: the layer shares another layer's A (its input), so keeps no Σ a aᵀ of its own
        self.activation = None if d_in is None else torch.zeros(d_in, d_in, dtype=dtype, device=device)
        self.gradient = torch.zeros(d_out, d_out, dtype=dtype, device=device)

    def add_activations(self, a: torch.Tensor) -> None:
        flat = a.reshape(-1, a.shape[-1]).to(self.activation.dtype)  # [tokens, d_in]
        self.activation.addmm_(flat.T, flat)

    def add_gradients(self, g: torch.Tensor, weight: float = 1.0) -> None:
        flat = g.reshape(-1, g.shape[-1]).to(self.gradient.dtype)  # [tokens, d_out]
        self.gradient.addmm_(flat.T, flat, alpha=weight)


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors of a PSD matrix, in float64."""
    symmetric = matrix.to(torch.float64, copy=True)
    symmetric.add_(symmetric.T.contiguous()).mul_(0.5)  # (M + Mᵀ)/2 with one temporary, not three
    values, vectors = torch.linalg.eigh(symmetric)
    del symmetric
    return values.clamp(min=0.0), vectors


class CorrectionSums:
    """Running Σ_n ((Q_Sᵀ G_n Q_A)_ij)² over sequences n of one layer (the "E" of EK-FAC).

    Q_Sᵀ G_n Q_A is formed whichever way is cheaper for the batch's length T: rotating
    a and g first costs T·(d_in² + d_out²) per sequence, rotating G_n = gᵀa afterwards
    d_out·d_in·(d_out + d_in); both then cost T·d_out·d_in for the product.
    """

    def __init__(self, activation_basis, gradient_basis, d_in: int, d_out: int, dtype, device):
        self.activation_basis = None if activation_basis is None else activation_basis.to(device, dtype)
        self.gradient_basis = None if gradient_basis is None else gradient_basis.to(device, dtype)
        self.squares = torch.zeros(d_out, d_in, dtype=dtype, device=device)

    def rotate_activations(self, a: torch.Tensor) -> tuple[bool, torch.Tensor]:
        """(whether a was rotated first, a [batch, seq, d_in]) for `add_gradients`."""
        a = a.to(self.squares.dtype)
        d_out, d_in = self.squares.shape
        length = a.shape[1]
        rotate_first = self.activation_basis is None or length * (d_in**2 + d_out**2) <= d_out * d_in * (d_out + d_in)
        if rotate_first and self.activation_basis is not None:
            a = a @ self.activation_basis
        return rotate_first, a

    def add_gradients(self, kept: tuple[bool, torch.Tensor], g: torch.Tensor, weight: float = 1.0, sequences_per_step: int | None = None) -> None:
        """Form per-sequence rotated gradients a few sequences at a time, square and add them.

        A step holds [sequences, d_out, d_in] a few times over; by default as many sequences
        (at most 8) as keep one such tensor under STEP_ELEMENTS, so 7B-wide layers go one by one.
        """
        rotate_first, activations = kept
        g = g.to(self.squares.dtype)
        if sequences_per_step is None:
            sequences_per_step = correction_sequences_per_step(*self.squares.shape)
        if rotate_first and self.gradient_basis is not None:
            g = g @ self.gradient_basis  # [batch, seq, d_out]
        for start in range(0, g.shape[0], sequences_per_step):
            stop = start + sequences_per_step
            per_sequence = torch.bmm(g[start:stop].transpose(1, 2), activations[start:stop])
            if not rotate_first:
                per_sequence = self.gradient_basis.T @ per_sequence @ self.activation_basis
            self.squares.add_(per_sequence.square().sum(0), alpha=weight)


STEP_ELEMENTS = 2**24  # elements of one [sequences, d_out, d_in] block of per-sequence gradients


def correction_sequences_per_step(d_out: int, d_in: int) -> int:
    """Sequences whose gradients the correction forms at once (see CorrectionSums.add_gradients)."""
    return max(1, min(8, STEP_ELEMENTS // (d_out * d_in)))


def kfac_eigenvalues(gradient_values, activation_values, tokens_per_sequence: float) -> torch.Tensor:
    """Λ = λ_S λ_Aᵀ scaled to a sequence's summed loss, so K-FAC and EK-FAC share one scale.

    With independent tokens E[vec G vec Gᵀ] = T · (A ⊗ S) for a sequence of T tokens.
    """
    return tokens_per_sequence * torch.outer(gradient_values, activation_values)


# 0.001, not docs/design.md §2's 0.1: LDS on real text and the synthetic kits (docs/benchmarks.md,
# "Defaults chosen on real text"); it matches kronfluence's absolute 1e-8 on every kit measured.


def default_damping(eigenvalues: torch.Tensor, scale: float = DEFAULT_DAMPING_SCALE) -> float:
    """λ = scale × mean(Λ), per layer."""
    return scale * float(eigenvalues.mean(dtype=torch.float64))


@dataclass
class LayerCurvature:
    """The fitted curvature of one layer; `None` bases mean the identity basis."""

    eigenvalues: torch.Tensor | None  # Λ [d_out, d_in]; None for the identity strategy
    gradient_basis: torch.Tensor | None  # Q_S [d_out, d_out]
    activation_basis: torch.Tensor | None  # Q_A [d_in, d_in]
    damping: float

    def inverse_times(self, gradient: torch.Tensor) -> torch.Tensor:
        """H⁻¹ V for gradients V [..., d_out, d_in] (any leading batch dims)."""
        if self.eigenvalues is None:
            return gradient
        dtype = self.eigenvalues.dtype
        rotated = gradient.to(dtype)
        if self.gradient_basis is not None:
            rotated = self.gradient_basis.T @ rotated @ self.activation_basis
        rotated = rotated / (self.eigenvalues + self.damping)
        if self.gradient_basis is not None:
            rotated = self.gradient_basis @ rotated @ self.activation_basis.T
        return rotated
