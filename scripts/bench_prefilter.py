"""Benchmark `attrib prefilter` on generated corpora: docs/s and peak RSS.

Each measurement runs in a fresh Python process, so its peak RSS is its own.
Corpora (JSONL, Zipf-distributed words, 20–80 words a document) are generated
once and cached in --cache. The baseline is plain scikit-learn: the corpus in a
list, `TfidfVectorizer().fit_transform`, `linear_kernel` with the queries and a
top-k per query; it runs at every size up to --baseline-max.

    python scripts/bench_prefilter.py --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VOCABULARY = 50_000
N_QUERIES = 100

STREAMING_CHILD = """
import json, resource, sys, time
from attrib.data import CorpusSpec
from attrib.runtime import configure
from attrib.stages.prefilter import run_prefilter
corpus, queries, out, backend, top_k = sys.argv[1:6]
configure(quiet=True)
start = time.perf_counter()
manifest = run_prefilter(CorpusSpec(corpus, id_field="id"), queries, out, int(top_k), backend=backend, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "documents": manifest["counts"]["documents"], "candidates": manifest["counts"]["candidates"]}))
"""

BASELINE_CHILD = """
import json, resource, sys, time
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics.pairwise import linear_kernel
corpus, queries, top_k = sys.argv[1], sys.argv[2], int(sys.argv[3])
start = time.perf_counter()
with open(corpus, encoding="utf-8") as handle:
    texts = [json.loads(line)["text"] for line in handle]
with open(queries, encoding="utf-8") as handle:
    query_texts = [(row["prompt"] + row["completion"]) for row in map(json.loads, handle)]
vectorizer = TfidfVectorizer()
matrix = vectorizer.fit_transform(texts)
scores = linear_kernel(vectorizer.transform(query_texts), matrix)
best = np.argpartition(-scores, min(top_k, scores.shape[1] - 1), axis=1)[:, :top_k]
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "documents": len(texts), "candidates": int(best.size)}))
"""


def generate(cache: Path, n_docs: int, seed: int = 0) -> tuple[Path, Path]:
    """A Zipf-worded corpus and queries that each share words with a few documents; cached by size."""
    import numpy as np

    corpus, queries = cache / f"corpus-{n_docs}.jsonl", cache / f"queries-{n_docs}.jsonl"
    if corpus.exists() and queries.exists():
        return corpus, queries
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array([f"w{index}x" for index in range(VOCABULARY)])
    weights = 1.0 / np.arange(1, VOCABULARY + 1)
    weights /= weights.sum()
    tmp = corpus.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for start in range(0, n_docs, 10_000):
            count = min(10_000, n_docs - start)
            lengths = rng.integers(20, 81, count)
            drawn = words[rng.choice(VOCABULARY, size=int(lengths.sum()), p=weights)]
            cuts = np.cumsum(lengths)[:-1]
            handle.writelines(
                json.dumps({"id": f"d{start + i}", "text": " ".join(doc)}) + "\n"
                for i, doc in enumerate(np.split(drawn, cuts))
            )
    os.replace(tmp, corpus)
    with open(queries, "w", encoding="utf-8") as handle:
        for index in range(N_QUERIES):
            prompt = " ".join(words[rng.choice(VOCABULARY, size=8, p=weights)])
            completion = " " + " ".join(words[rng.integers(1000, VOCABULARY, size=2)])
            handle.write(json.dumps({"id": f"q{index}", "prompt": prompt, "completion": completion}) + "\n")
    return corpus, queries


def measure(script: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="Corpus sizes in documents, comma-separated.")
    parser.add_argument("--top-k", type=int, default=10_000)
    parser.add_argument("--backends", default="streaming", help="attrib backends to time (streaming,exact).")
    parser.add_argument("--baseline-max", type=int, default=1_000_000, help="Largest size to run the baseline at.")
    parser.add_argument("--cache", default="/tmp/attrib-bench", help="Where generated corpora are kept.")
    args = parser.parse_args()
    cache = Path(args.cache)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        started = time.perf_counter()
        corpus, queries = generate(cache, size)
        print(f"# corpus of {size:,} docs ready ({corpus.stat().st_size / 2**20:,.0f} MiB, "
              f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        runs = [(f"attrib {backend}", STREAMING_CHILD, (str(corpus), str(queries), str(cache / "out"), backend,
                                                        str(args.top_k))) for backend in args.backends.split(",")]
        if size <= args.baseline_max:
            runs.append(("sklearn baseline", BASELINE_CHILD, (str(corpus), str(queries), str(args.top_k))))
        for name, script, script_args in runs:
            figures = measure(script, *script_args)
            row = {"size": size, "method": name, **figures}
            rows.append(row)
            if "error" in figures:
                print(f"{size:>9,}  {name:<18} failed: {figures['error']}", flush=True)
            else:
                print(f"{size:>9,}  {name:<18} {figures['seconds']:8.1f} s  {size / figures['seconds']:10,.0f} docs/s  "
                      f"peak RSS {figures['peak_rss'] / 2**20:8,.0f} MiB", flush=True)
    largest = max((r["size"] for r in rows if r["method"] == "sklearn baseline" and "error" not in r), default=None)
    if largest is not None:
        timed = {r["method"]: r for r in rows if r["size"] == largest and "error" not in r}
        for name, row in timed.items():
            if name != "sklearn baseline":
                ratio = row["seconds"] / timed["sklearn baseline"]["seconds"]
                memory = row["peak_rss"] / timed["sklearn baseline"]["peak_rss"]
                print(f"{name} / sklearn baseline at {largest:,} docs: time ×{ratio:.2f}, peak RSS ×{memory:.2f}")
    print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
