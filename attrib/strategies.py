"""The curvature strategies: what each one fits and reads, declared once.

The fit (which passes run), the curvature of the query stages (which files to read), the memory
model and `attrib inspect` all ask a `Strategy` instead of comparing names; a new strategy is a
row here (and, if it needs new statistics, the code in attrib.factors that computes them).
No torch here: the memory model and `attrib --help` read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    """What a curvature strategy needs fitted."""

    name: str
    covariances: bool  # pass 1: A and S
    rotates: bool  # eigenbases of A and S (else the identity basis)
    corrects: bool  # pass 2: Λ from per-sequence gradients (else from the covariance spectra)

    @property
    def has_factors(self) -> bool:
        """Whether it fits anything (identity, the plain gradient dot product, writes no factor file)."""
        return self.covariances or self.corrects


STRATEGY = {
    "ekfac": Strategy("ekfac", covariances=True, rotates=True, corrects=True),
    "kfac": Strategy("kfac", covariances=True, rotates=True, corrects=False),
    "diagonal": Strategy("diagonal", covariances=False, rotates=False, corrects=True),
    "identity": Strategy("identity", covariances=False, rotates=False, corrects=False),
}
