"""`attrib report` and `attrib top`: influence scores for people."""

from __future__ import annotations

from attrib.errors import RunError


def report() -> None:
    """Write a self-contained HTML page of the top documents, tokens coloured by influence.

    Example: attrib report run/scores --out run/report.html
    """
    raise RunError("`attrib report` is not built yet")


def top() -> None:
    """Print each query's top documents as a table, JSON or CSV.

    Example: attrib top run/scores --format csv
    """
    raise RunError("`attrib top` is not built yet")
