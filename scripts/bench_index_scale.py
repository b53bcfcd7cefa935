"""Index scoring at scale (issue 20, item 4): 1,000 queries against ≥ 100,000 indexed sequences.

The planted-fact kit's model and factors (scripts/bench_index.py's "large" kit: Llama hidden 64, MLP 256,
six tracked layers). Its 1,000 documents are indexed for real (`attrib index` with --representation and its
--rank or --dims; default kronecker 64, which is the stage's default on these layers), then the shards are repeated under new document
ids (and their values slightly scaled) until the index holds --sequences sequences: the work of scoring
them is that of distinct documents. The kit's 120 queries are repeated under new ids up to --queries. `attrib query --index`
then runs in a fresh process (its peak RSS read from /proc), with the query gradients computed beforehand.

Printed, from one run: the scoring seconds; its operations (the products ⟨T_q, W_n⟩ and, for lowrank,
forming W_n = L Rᵀ) per second as a share of this machine's float32 matrix-product rate (2048³, one
thread) measured in the same run (target ≥ 50 %); the peak memory against attrib.memory's prediction;
bytes per sequence and the index size.

    python scripts/bench_index_scale.py --out scripts/eval/results/index-scale-kronecker.json
    python scripts/bench_index_scale.py --representation lowrank --out scripts/eval/results/index-scale-lowrank.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "eval"))

import numpy as np
import torch
from common import Attributor, Setup, build_setup, default_work, log, write_json
from lds import MODEL

import attrib
from attrib import memory
from attrib.models import find_tracked_layers, load_meta_model
from attrib.options import DEFAULT_QUERY_RANK, parse_dims
from attrib.storage import load_tensors, save_tensors
from attrib.storage import write_json as write_manifest

KIT = dict(n_facts=100, n_filler=900, seed=0, generic=20)  # bench_index.py's "large" kit
PEAK_RSS = ("import re, sys\nfrom attrib.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\n"
            "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")


def matmul_rate(repeats: int = 5) -> float:
    square = torch.randn(2048, 2048)
    square @ square
    started = time.perf_counter()
    for _ in range(repeats):
        square @ square
    return 2 * 2048**3 * repeats / (time.perf_counter() - started)


def repeat_index(index: Path, sequences: int) -> dict:
    """Copies of the index's shards under new doc ids (doc_index + k × documents) until it holds `sequences`; copy
    k's stored values are scaled by 1 + k/1024, so that its scores differ from the original's as distinct
    documents' do (exact ties cost the running tails an exact sort)."""
    from safetensors import safe_open

    from attrib.stages.index import SHARDS_DIR, _write_sequences
    from attrib.storage import StageDir, read_manifest

    manifest = read_manifest(index)
    shards = [name for name in manifest["files"] if name.startswith(SHARDS_DIR)]
    documents, have = manifest["counts"]["documents"], manifest["counts"]["sequences"]
    copies = -(-sequences // have)
    names = list(shards)
    for copy in range(1, copies):
        for number, name in enumerate(shards):
            with safe_open(str(index / name), framework="pt") as handle:
                doc_ids = json.loads(handle.metadata()["doc_ids"])
            tensors = {key: value if key in ("doc_index", "chunk", "tokens") else value * (1 + copy / 1024)
                       for key, value in load_tensors(index / name).items()}  # scaled: copies score apart, no ties
            tensors["doc_index"] = tensors["doc_index"] + copy * documents
            target = f"{SHARDS_DIR}/r000-p{copy * len(shards) + number:05d}.safetensors"
            save_tensors(index / target, tensors, metadata={"doc_ids": json.dumps([f"{d}~{copy}" for d in doc_ids])})
            names.append(target)
    stage = StageDir.__new__(StageDir)
    stage.path = index
    counts = _write_sequences(stage)
    manifest.update(files=names + [n for n in manifest["files"] if not n.startswith(SHARDS_DIR)],
                    counts={**manifest["counts"], **counts})
    write_manifest(index / "manifest.json", manifest)
    return counts


def operations(shapes: dict, passes: int, queries: int, sequences: int) -> int:
    """Multiply-adds ×2 of scoring: every query against every sequence, and lowrank's W_n = L Rᵀ once per pass."""
    total = 0
    for shape in shapes.values():
        if "projected" in shape:
            total += 2 * queries * sequences * int(np.prod(shape["projected"]))
        else:
            (d_out, rank), (d_in, _) = shape["left"], shape["right"]
            total += 2 * queries * sequences * d_out * d_in + 2 * passes * sequences * d_out * d_in * rank
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--representation", default="kronecker", choices=("lowrank", "kronecker"))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dims", default="64")
    parser.add_argument("--work", default=str(default_work()))
    parser.add_argument("--scratch", default="/tmp/bench-index-scale")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(arch="llama", **KIT, **MODEL)
    att = Attributor(build_setup(setup, Path(args.work)), Path(args.work))
    factors = att.fit("ekfac", fisher="empirical")
    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    model = str(att.model_dir)
    queries = [{**q.as_row(), "id": f"{q.query_id}~{i // len(att.queries)}"}
               for i, q in zip(range(args.queries), att.queries * (-(-args.queries // len(att.queries))))]
    (scratch / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))

    started = time.perf_counter()
    attrib.index(model, str(factors), str(att.corpus.source), scratch / "index", representation=args.representation,
                 rank=args.rank, dims=args.dims, quiet=True)
    log(f"indexed {att.corpus.source} in {time.perf_counter() - started:.1f} s")
    counts = repeat_index(scratch / "index", args.sequences)
    log(f"index repeated to {counts['sequences']:,} sequences")
    attrib.query_gradients(model, str(factors), str(scratch / "queries.jsonl"), scratch / "qg", quiet=True)

    rate = matmul_rate()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", PEAK_RSS, "--quiet", "query", "--model", model, "--index", str(scratch / "index"),
               "--query-gradients", str(scratch / "qg"), "--out", str(scratch / "scores")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = int(done.stdout.strip().splitlines()[-1]) * 1024
    scores = json.loads((scratch / "scores" / "manifest.json").read_text())
    seconds = scores["timings"]["score_seconds"]
    index_manifest = json.loads((scratch / "index" / "manifest.json").read_text())
    meta = load_meta_model(model)
    shapes, dims = memory.layer_shapes(find_tracked_layers(meta)), parse_dims(args.dims)
    passes = -(-args.queries // memory.index_queries_per_pass(shapes, args.representation, args.rank, dims,
                                                              DEFAULT_QUERY_RANK, args.queries))
    ops = operations(scores["index"]["shapes"], passes, args.queries, counts["sequences"])
    predicted = memory.index_scoring(memory.model_shape(meta), shapes, dtype="float32", device="cpu",
                                     representation=args.representation, rank=args.rank, dims=dims,
                                     queries=args.queries)
    result = {
        "representation": scores["index"]["representation"], "sequences": counts["sequences"], "queries": args.queries,
        "passes": passes, "score_seconds": seconds, "wall_seconds": wall, "operations": ops,
        "rate": ops / seconds, "matmul_rate": rate, "share_of_matmul_rate": ops / seconds / rate,
        "peak_rss_bytes": peak, "predicted_peak_bytes": predicted.host,
        "bytes_per_sequence": index_manifest["bytes_per_sequence"],
        "index_bytes": sum(f.stat().st_size for f in (scratch / "index" / "shards").iterdir()),
    }
    print(f"{result['representation']}: {args.queries} queries × {counts['sequences']:,} sequences in {seconds:.1f} s "
          f"({passes} pass{'es' if passes > 1 else ''}; {wall:.1f} s with start-up) = {ops / seconds / 1e9:.1f} GFLOP/s, "
          f"{result['share_of_matmul_rate']:.0%} of the float32 2048³ product rate ({rate / 1e9:.1f} GFLOP/s, same run)")
    print(f"peak RSS {peak / 2**20:,.0f} MiB (predicted {predicted.host / 2**20:,.0f} MiB); "
          f"{result['bytes_per_sequence']:,} bytes per sequence, index {result['index_bytes'] / 2**30:.2f} GiB")
    write_json(args.out, {"benchmark": "index scale", "setup": setup.__dict__, "result": result})
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
