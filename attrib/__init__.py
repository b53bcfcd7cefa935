"""attrib: which training documents made a language model say what it said (EK-FAC influence)."""

__version__ = "0.1.0"
