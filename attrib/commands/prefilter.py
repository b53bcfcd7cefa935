"""`attrib prefilter`: TF-IDF candidates for each query."""

from __future__ import annotations

from attrib.errors import RunError


def prefilter() -> None:
    """Narrow a corpus to the documents a TF-IDF search finds for each query.

    Example: attrib prefilter --corpus C --queries Q --top-k 10000 --out run/candidates
    """
    raise RunError("`attrib prefilter` is not built yet")
