"""`attrib fit-factors`: EK-FAC curvature over the tracked layers."""

from __future__ import annotations

from attrib.errors import RunError


def fit_factors() -> None:
    """Fit EK-FAC factors (covariances, eigenbases, eigenvalue correction).

    Example: attrib fit-factors --model M --corpus C --out run/factors
    """
    raise RunError("`attrib fit-factors` is not built yet")
