"""Gradient index (issue 20) at a wider model: which representation finds more of exact EK-FAC's top 10 at
equal bytes per document, and how the needed size grows with width, so that a default can be stated for 7B.

Kit: the Debian fortunes of scripts/eval/realtext.py (its corpus split, held-out queries, tokenizer and
training recipe) with a 2-block Llama of --hidden (MLP 4 × hidden). Reference: exact EK-FAC over the whole
corpus (attrib's own scores in float64, full-rank query gradients, empirical Fisher, the default damping),
as scripts/bench_index.py. Rows: `lowrank` rank r (one attrib build each) and `kronecker` eigen / random
k×k for k of 16..256 and the k whose k² matches rank r's r·(d_out + d_in) values per layer. The Kronecker
rows come from one build at the largest k per projection, sliced: the top-k eigenvectors of S and A are the
first k columns of the top-K ones, so eigen k×k is the leading k×k block of eigen K×K; k Gaussian columns of
variance 1/K, rescaled, are a Gaussian projection of variance 1/k (another draw than attrib's seed gives,
same distribution; a uniform scale changes no ranking). Builds run the float32 model, storage bfloat16;
each honest build's time is a ratio to a plain forward+backward over the same sequences in the same run.
Also printed: bytes per sequence of each candidate default at Llama-2-7B's shape and the disk for 10M.

    python scripts/eval/index_width.py --fortunes /tmp/combine-work/fortunes/pkg/usr/share/games/fortunes \
        --hidden 512 --work /tmp/wide-work --out scripts/eval/results/index-width-h512.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from bench_index import index_scores, plain_step_seconds, recall, spearman
from common import MAX_LENGTH, Attributor, log, markdown_table, prefilter_scores, write_json
from realtext import RealSetup, build_realtext

import attrib.scoring
from attrib.distributed import World
from attrib.models import find_tracked_layers, load_model
from attrib.preconditioned_gradients import QueryGradientStore
from attrib.stages.index import IndexReader, IndexSettings, _pass_transforms, build_index
from attrib.stages.query_gradients import QuerySettings, run_query_gradients
from attrib.storage import open_input

SHARES = (0.01, 0.05, 0.10)
RANKS = (1, 2, 4, 8)
SIDES = (16, 32, 64, 128, 256)
HONEST = [{"projection": "eigen", "dims": [16, 16]}, {"projection": "random", "dims": [16, 16]}]  # timed, and checks slicing
# Llama-2-7B: 32 blocks, tracked gate/up [11008 × 4096] and down [4096 × 11008]
SEVEN_B = {"blocks": 32, "hidden": 4096, "mlp": 11008}
SEQUENCES_7B = 10_000_000


def seven_b_sizes(ranks=RANKS + (16,), sides=(16, 32, 64, 128, 256)) -> list[dict]:
    """Values and bytes (bfloat16) per sequence at Llama-2-7B's tracked shapes, and the disk for 10M sequences."""
    layers = 3 * SEVEN_B["blocks"]
    width = SEVEN_B["hidden"] + SEVEN_B["mlp"]
    rows = [(f"lowrank rank {r}", layers * r * width) for r in ranks]
    rows += [(f"kronecker {k}×{k}", layers * k * k) for k in sides]
    return [{"representation": label, "values_per_sequence": values, "bytes_per_sequence": 2 * values,
             "disk_10M_TB": 2 * values * SEQUENCES_7B / 1e12} for label, values in rows]


def kronecker_sides(att: Attributor, ranks, sides) -> tuple[list[int], dict[int, int]]:
    """The k of SIDES that fit every layer, and per rank r the k with k² nearest r·(d_out + d_in) (equal bytes)."""
    widest = min(min(layer.d_out, layer.d_in_folded) for layer in att.layers)
    matched = {r: round((r * (att.layers[0].d_out + att.layers[0].d_in_folded)) ** 0.5) for r in ranks}
    return sorted({k for k in (*sides, *matched.values()) if k <= widest}), matched


def nested_kronecker(att: Attributor, factors: Path, gradients: Path, out: Path, projection: str, sides: list[int],
                     model, layers) -> tuple[dict[int, np.ndarray], float]:
    """Scores [queries, documents] of kronecker `projection` k×k for every k of `sides`, from one build at the
    largest (see the docstring), and that build's seconds."""
    largest = max(sides)
    settings = IndexSettings(representation="kronecker", projection=projection, dims=[largest, largest],
                             max_length=MAX_LENGTH, docs_per_part=500, storage_dtype="bfloat16")
    shutil.rmtree(out, ignore_errors=True)
    manifest = build_index(out, att.record["spec"], model, att.tokenizer, layers, str(factors), att.corpus, settings)
    reader = IndexReader(out)
    store = QueryGradientStore(gradients, open_input(gradients, "query-gradients"))
    assert store.query_ids == [q.query_id for q in att.queries], "query gradients in another order"
    transformed = _pass_transforms(store, layers, reader, reader.transforms(layers, torch.float32), store.query_ids,
                                   torch.float32)  # T_q = P_Sᵀ P_q P_A per layer [Q, K, K]
    scores = {k: np.zeros((len(att.queries), len(att.doc_ids))) for k in sides}
    from safetensors import safe_open

    for name in reader.shards:
        with safe_open(str(out / name), framework="pt") as handle:
            columns = [att.doc_index[d] for d in json.loads(handle.metadata()["doc_ids"])]
            for layer, t in zip(layers, transformed):
                stored = handle.get_tensor(f"{layer.name}.projected").float()  # [n, K, K]
                for k in sides:
                    block = (t[:, :k, :k].flatten(1) @ stored[:, :k, :k].flatten(1).T).double().numpy()
                    np.add.at(scores[k].T, columns, block.T)
                del stored
    seconds = manifest["timings"]["build_seconds"]
    shutil.rmtree(out, ignore_errors=True)
    return scores, seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fortunes", required=True, help="the fortune files (see scripts/eval/realtext.py)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--work", required=True, help="cache of the kit, model, factors and exact scores")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    setup = RealSetup(docs=args.docs, queries=args.queries, hidden=args.hidden, steps=args.steps)
    started = time.perf_counter()
    att = Attributor(build_realtext(setup, Path(args.fortunes), work), work)
    log(f"index width benchmark on {setup.name()}: {att.shapes()} ({time.perf_counter() - started:.0f} s)")
    factors = att.fit("ekfac", fisher="empirical")
    log(f"factors fitted ({time.perf_counter() - started:.0f} s)")
    tag = att.record["fingerprint"][:12]
    exact_path = work / f"exact-{tag}-q{len(att.queries)}.npy"
    if not exact_path.is_file():
        # the reference holds every query's dense P_q of every layer (Q·P·8 bytes), not attrib's 256 MB cap
        attrib.scoring.DENSE_BYTES = max(attrib.scoring.DENSE_BYTES, len(att.queries) * att.num_params * 8)
        np.save(exact_path, att.scores(factors, rank=0))
    exact = np.load(exact_path)
    log(f"exact scores ({time.perf_counter() - started:.0f} s)")
    tfidf = prefilter_scores(att, "tfidf", work)
    gradients = work / f"query-gradients-{tag}-q{len(att.queries)}"
    run_query_gradients(gradients, att.record["spec"], att.model, att.tokenizer, att.layers, str(factors),
                        att.queries, QuerySettings(query_rank=0, max_length=MAX_LENGTH), World(), record=att.record)
    model, _ = load_model(str(att.model_dir), "float32", "cpu")
    layers = find_tracked_layers(model)
    tokens = sum(len(s) for s in att.sequences)
    plain = [plain_step_seconds(model, att.tokenizer, att.sequences) for _ in range(2)]
    log(f"plain forward+backward {plain} s ({time.perf_counter() - started:.0f} s)")

    documents = len(att.doc_ids)
    budgets = [max(1, round(share * documents)) for share in SHARES]
    sides, matched = kronecker_sides(att, RANKS, SIDES)
    per_layer_width = att.layers[0].d_out + att.layers[0].d_in_folded
    rows = [{"representation": "TF-IDF (attrib prefilter)", "recall": [recall(tfidf, exact, k, positive_only=True)
                                                                       for k in budgets],
             "spearman": spearman(tfidf, exact)}]

    def add(label, scores, values, build_seconds=None, **extra):
        rows.append({"representation": label, "values_per_sequence": values,
                     "bytes_per_document": 2 * values * len(att.sequences) / documents,
                     "recall": [recall(scores, exact, k) for k in budgets], "spearman": spearman(scores, exact),
                     "build_seconds": build_seconds,
                     "build_over_plain": None if build_seconds is None else build_seconds / min(plain), **extra})
        log(f"{label}: {rows[-1]['recall']} Spearman {rows[-1]['spearman']:.3f}"
            + ("" if build_seconds is None else f", build {build_seconds:.1f} s = {rows[-1]['build_over_plain']:.2f}×"))

    scratch, seven = work / f"scratch-{tag}", seven_b_sizes()

    def save(partial: bool) -> None:  # after every row: a run cut short keeps what it measured
        write_json(args.out, {"benchmark": "index width", "date": "2026-12-06", "partial": partial,
                              "setup": setup.__dict__, "shapes": att.shapes(), "budgets": budgets,
                              "matched_sides": matched, "rows": rows, "plain_seconds": plain, "tokens": tokens,
                              "seven_b": seven, "seconds": round(time.perf_counter() - started, 1)})

    def lowrank(rank):
        scores, manifest = index_scores(att, factors, gradients, scratch, "lowrank", {"rank": rank}, model, layers)
        add(manifest["representation"], scores, manifest["values_per_sequence"], manifest["timings"]["build_seconds"])

    def kronecker(projection):
        nested, seconds = nested_kronecker(att, factors, gradients, scratch / "nested", projection, sides, model,
                                           layers)
        for k in sides:
            equal = [r for r, m in matched.items() if m == k]
            add(f"kronecker {projection} {k}x{k}" + (f" (= rank {equal[0]} bytes)" if equal else ""), nested[k],
                len(layers) * k * k, seconds if k == max(sides) else None, sliced_from=max(sides))

    def own_build(options):
        scores, manifest = index_scores(att, factors, gradients, scratch, "kronecker", options, model, layers)
        add(manifest["representation"] + " (own build)", scores, manifest["values_per_sequence"],
            manifest["timings"]["build_seconds"])

    # most telling first, on a shared machine
    steps = [lambda: kronecker("eigen"), lambda: lowrank(1), lambda: lowrank(8), lambda: kronecker("random"),
             lambda: lowrank(2), lambda: lowrank(4)] + [lambda o=o: own_build(o) for o in HONEST]
    for step in steps:
        step()
        save(partial=True)
    plain.append(plain_step_seconds(model, att.tokenizer, att.sequences))
    shutil.rmtree(scratch, ignore_errors=True)
    groups = ("TF-IDF", "lowrank", "kronecker eigen", "kronecker random")
    group = lambda r: next(i for i, g in enumerate(groups) if r["representation"].startswith(g))
    rows.sort(key=lambda r: (group(r), "own build" in r["representation"], r.get("values_per_sequence", 0)))

    headers = ["representation", "values per sequence", "bytes per document (bf16)"] + [
        f"top {share:.0%} ({k} docs)" for share, k in zip(SHARES, budgets)] + ["Spearman vs exact", "build / plain"]
    table = [[r["representation"], f"{r.get('values_per_sequence', 0):,}" if "values_per_sequence" in r else "—",
              f"{r['bytes_per_document']:,.0f}" if "bytes_per_document" in r else "—"]
             + [f"{v:.2f}" for v in r["recall"]] + [f"{r['spearman']:.2f}",
                                                   f"{r['build_over_plain']:.2f}×" if r.get("build_over_plain") else "—"]
             for r in rows]
    print(f"\n{setup.name()}: {documents} documents, {len(att.sequences)} sequences, {tokens:,} tokens, "
          f"{len(att.queries)} queries; tracked {att.shapes()['layers']}; d_out + d_in = {per_layer_width}")
    print(f"plain forward+backward (float32, 1 thread): {', '.join(f'{p:.1f}' for p in plain)} s "
          f"= {min(plain) / tokens * 1e6:.1f} µs/token (best)\n")
    print(markdown_table(headers, table))
    print("\nLlama-2-7B (96 tracked layers, 4096 ↔ 11008), bfloat16:\n")
    print(markdown_table(["representation", "values per sequence", "bytes per sequence", "10M sequences"],
                         [[r["representation"], f"{r['values_per_sequence']:,}", f"{r['bytes_per_sequence']:,}",
                           f"{r['disk_10M_TB']:.2f} TB"] for r in seven]))
    save(partial=False)
    return 0


if __name__ == "__main__":
    from attrib.runtime import session

    with session(quiet=True):
        raise SystemExit(main())
