"""attrib: which training documents made a language model say what it said (EK-FAC influence).

The stages as Python functions (the code the `attrib` commands run; see attrib/api.py):

    import attrib
    factors = attrib.fit_factors(model, corpus, out="run/factors")
    candidates = attrib.prefilter(corpus, queries, out="run/candidates", top_k=100)
    scores = attrib.query(model, factors, queries, corpus, out="run/scores", candidates=candidates)
    scores.documents(pandas=True)

Importing attrib is cheap: attrib.api is loaded on first use of one of its names, torch and
transformers when a stage runs.
"""

__version__ = "0.1.0"

from attrib.errors import AttribError, InputError, RunError  # noqa: E402

API = ("StageResult", "combine", "fit_factors", "prefilter", "query", "query_gradients", "self_influence", "index")
__all__ = ["AttribError", "InputError", "RunError", *API]


def __getattr__(name: str):
    if name in API:
        from attrib import api

        return getattr(api, name)
    raise AttributeError(f"module 'attrib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))
