"""Text-like synthetic corpora for the benchmarks: timing depends on token statistics, not meaning."""

from __future__ import annotations

import random

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "st", "br", "kl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "s", "l", "nd", "rt"]


def synthetic_texts(num_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed invented words with punctuation: text-like token statistics."""
    rng = random.Random(seed)
    lexicon, seen = [], set()
    while len(lexicon) < 20000:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice((1, 2, 2, 3))))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    docs = []
    for _ in range(num_docs):
        words = rng.choices(lexicon, weights, k=words_per_doc)
        out, sentence = [], 0
        for word in words:
            sentence += 1
            out.append(word.capitalize() if sentence == 1 else word)
            if sentence > 6 and rng.random() < 0.15:
                out[-1] += "."
                sentence = 0
        docs.append(" ".join(out) + ".")
    return docs
