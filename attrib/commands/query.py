"""`attrib query-gradients` and `attrib query`: preconditioned query gradients and influence scores."""

from __future__ import annotations

from attrib.errors import RunError


def query_gradients() -> None:
    """Compute, precondition and compress each query's gradient.

    Example: attrib query-gradients --model M --factors run/factors --queries Q --out run/query
    """
    raise RunError("`attrib query-gradients` is not built yet")


def query() -> None:
    """Score training sequences against every query: per document, per layer and per token.

    Example: attrib query --model M --factors run/factors --queries Q --corpus C --out run/scores
    """
    raise RunError("`attrib query` is not built yet")
