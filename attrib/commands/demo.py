"""`attrib demo`: the whole pipeline offline, on planted facts and models trained here."""

from __future__ import annotations

from attrib.errors import RunError


def demo() -> None:
    """Build a planted-fact corpus and small models, then run every stage on them.

    Example: attrib demo --out demo-run
    """
    raise RunError("`attrib demo` is not built yet")
