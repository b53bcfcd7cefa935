#!/usr/bin/env python
"""`attrib combine` at scale: seconds and peak memory against the rows it combines (issue 21).

One real `attrib query --keep-all-scores` run on the tiny demo (its Llama, corpus and queries) gives a
scores directory with a real manifest; its documents.parquet and summary.parquet are then replaced by
`--documents` synthetic documents per query (random scores and layer scores, the same schema), and the
directory is copied to `--inputs` checkpoints. `attrib combine` runs on them in a fresh process per size,
through the CLI; the script prints the rows combined, the wall seconds, rows per second and the peak
RSS of that process beside the bound the stage plans for (combine.GROUP_BYTES of rows in flight, plus
the process itself, measured here as the peak of combining the demo's small scores directory alone).

    python scripts/bench_combine.py                          # 10k and 100k documents per query, 4 inputs
    python scripts/bench_combine.py --documents 20000 --inputs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def attrib(*args) -> tuple[float, int]:
    """Run one attrib command in a fresh process; returns (wall seconds, its peak RSS in bytes)."""
    code = ("import resource, subprocess, sys, json; started = __import__('time').perf_counter(); "
            "subprocess.run([sys.executable, '-m', 'attrib', '--quiet', *sys.argv[1:]], check=True, "
            "stdout=subprocess.DEVNULL); print(json.dumps([__import__('time').perf_counter() - started, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024]))")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True, capture_output=True, text=True)
    seconds, peak = json.loads(done.stdout.strip().splitlines()[-1])
    return seconds, peak


def inflate(scores: Path, documents: int, seed: int) -> int:
    """Replace the tables of `scores` by `documents` synthetic documents per query; returns the rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attrib.score_tables import documents_schema

    manifest = json.loads((scores / "manifest.json").read_text())
    queries, layers = [q["id"] for q in manifest["queries"]], len(manifest["layers"])
    rng = np.random.default_rng(seed)
    doc_ids = pa.array([f"doc-{i:08d}" for i in range(documents)])
    shutil.rmtree(scores / "tokens", ignore_errors=True)
    summary = {"query_id": [], "documents": [], "mean": [], "std": [], "positive_sum": []}
    with pq.ParquetWriter(scores / "documents.parquet", documents_schema()) as writer:
        for query_id in sorted(queries):
            layer_scores = rng.standard_normal((documents, layers))
            score = layer_scores.sum(1)
            order = np.argsort(-score, kind="stable")
            writer.write_table(pa.table({
                "query_id": pa.array([query_id] * documents),
                "doc_id": doc_ids.take(pa.array(order)),
                "score": pa.array(score[order]),
                "rank": pa.array(np.arange(1, documents + 1, dtype=np.int32)),
                "prefilter_rank": pa.nulls(documents, pa.int32()),
                "layer_scores": pa.ListArray.from_arrays(pa.array(np.arange(documents + 1) * layers, pa.int32()),
                                                         pa.array(layer_scores[order].reshape(-1))),
            }, schema=documents_schema()))
            summary["query_id"].append(query_id)
            summary["documents"].append(documents)
            summary["mean"].append(float(score.mean()))
            summary["std"].append(float(score.std()))
            summary["positive_sum"].append(float(np.maximum(score, 0).sum()))
    schema = pq.read_schema(scores / "summary.parquet")
    pq.write_table(pa.table(summary, schema=schema), scores / "summary.parquet")
    return documents * len(queries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[10_000, 100_000],
                        help="documents per query, one run each")
    parser.add_argument("--inputs", type=int, default=4, help="checkpoints combined")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args(argv)
    from attrib.stages import combine
    from attrib.synthetic import cached_demo

    demo = cached_demo("tiny")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-combine-"))
    base = work / "query"
    if not (base / "manifest.json").is_file():
        attrib("fit-factors", "--model", demo.llama, "--corpus", demo.corpus, "--out", work / "factors")
        attrib("query", "--model", demo.llama, "--factors", work / "factors", "--queries", demo.queries,
               "--corpus", demo.corpus, "--keep-all-scores", "--token-scores-top", "none", "--out", base)
    _, imports = attrib("combine", base, "--out", work / "baseline", "--overwrite")
    layers = len(json.loads((base / "manifest.json").read_text())["layers"])
    print(f"tiny demo: {layers} tracked layers, {args.inputs} inputs; GROUP_BYTES {combine.GROUP_BYTES / 2**20:.0f} "
          f"MiB, {combine.group_row_bytes(args.inputs, layers)} bytes per row of a group; the demo's own scores "
          f"combined alone: {imports / 2**20:.0f} MiB peak")
    print("| documents per query | rows per input | seconds | rows/s (all inputs) | peak RSS (MiB) | bound (MiB) |")
    print("|---|---|---|---|---|---|")
    for documents in args.documents:
        inputs = []
        for k in range(args.inputs):
            path = work / f"d{documents}" / f"ckpt-{k}"
            shutil.rmtree(path, ignore_errors=True)
            shutil.copytree(base, path)
            rows = inflate(path, documents, seed=k)
            inputs.append(path)
        out = work / f"d{documents}" / "combined"
        shutil.rmtree(out, ignore_errors=True)
        seconds, peak = attrib("combine", *inputs, "--out", out)
        bound = imports + combine.GROUP_BYTES
        print(f"| {documents:,} | {rows:,} | {seconds:.1f} | {rows * args.inputs / seconds:,.0f} | "
              f"{peak / 2**20:,.0f} | {bound / 2**20:,.0f} |")
        shutil.rmtree(work / f"d{documents}")
    if args.work is None:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
