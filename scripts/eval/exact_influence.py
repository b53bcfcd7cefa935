"""Agreement of attrib's influence with exact influence under the dense damped Fisher (issue 7, part 1).

Exact influence: I*(q, m) = vec(V_q)ᵀ (F + Λ_damp)⁻¹ vec(G_m) over all tracked parameters, where
F is the full (not block-diagonal) Fisher over the tracked parameters, formed densely in float64:
  * empirical: F = (1/N) Σ_n vec(G_n) vec(G_n)ᵀ over the N corpus sequences with their own labels,
    which is exactly the quantity EK-FAC approximates under `--fisher empirical`;
  * true: the same with labels sampled from the model (--exact-samples K draws per sequence).
Damping matches attrib's: per layer λ_l = c × tr(F_ll)/P_l (the mean eigenvalue of the layer's
block; equal to mean(Λ_l) of EK-FAC fitted on the same gradients); c = 0.1 is attrib's default.
A block-diagonal reference (cross-layer blocks of F dropped) separates the block-diagonal
approximation from the Kronecker/eigenbasis one.

    python scripts/eval/exact_influence.py --out eval-out/exact.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import common  # noqa: E402
from common import (Attributor, Setup, build_setup, correlations, default_work, exact_influence, log,  # noqa: E402
                    markdown_table, write_json)


def evaluate(setup: Setup, work: Path, ranks, dampings, fisher_samples, fisher_seeds, exact_samples,
             strategies=("ekfac", "kfac", "diagonal", "identity"), covariance_fractions=()) -> dict:
    started = time.perf_counter()
    att = Attributor(build_setup(setup, work), work)
    slices = att.layer_slices()
    G, _ = att.gradients(att.sequences)
    F_emp = G.T @ G / len(att.sequences)
    D = att.doc_matrix(G)
    V = att.query_gradients()
    rows = []

    def add(group, method, fisher, k, seed, damping, rank, reference, predicted, exact):
        c = correlations(predicted, exact)
        rows.append({"group": group, "method": method, "fisher": fisher, "samples": k, "seed": seed,
                     "damping": damping, "rank": rank, "reference": reference, **c})

    exact = {c: exact_influence(V, D, F_emp, slices, c) for c in dampings}
    exact_block = exact_influence(V, D, F_emp, slices, 0.1, block_diagonal=True)
    for strategy in strategies:
        factors = att.fit(strategy, "empirical")
        scores = att.scores(factors)
        add("strategy", strategy, "empirical", 1, 0, 0.1, "full", "full F", scores, exact[0.1])
        add("strategy", strategy, "empirical", 1, 0, 0.1, "full", "block-diag F", scores, exact_block)
    total_tokens = att.shapes()["tokens"]
    for fraction in covariance_fractions:  # A and S from a sample of the tokens, Λ from all (fit-factors --covariance-max-tokens)
        cap = max(common.MAX_LENGTH, int(fraction * total_tokens))
        scores = att.scores(att.fit("ekfac", "empirical", covariance_max_tokens=cap))
        add("covariance sample", f"ekfac, A and S from {fraction:.0%} of tokens", "empirical", 1, 0, 0.1, "full",
            "full F", scores, exact[0.1])
    factors = att.fit("ekfac", "empirical")
    for rank in ranks:
        add("rank", "ekfac", "empirical", 1, 0, 0.1, rank or "full", "full F", att.scores(factors, rank=rank),
            exact[0.1])
    for c in dampings:
        for strategy in ("ekfac", "kfac"):
            scores = att.scores(att.fit(strategy, "empirical"), damping_scale=c)
            add("damping", strategy, "empirical", 1, 0, c, "full", "full F, same c", scores, exact[c])
            add("damping", strategy, "empirical", 1, 0, c, "full", "full F, c=0.1", scores, exact[0.1])
    if exact_samples:
        _, F_true = att.gradients(att.sequences, fisher_samples=exact_samples, seed=12345)
        exact_true = exact_influence(V, D, F_true, slices, 0.1)
        add("fisher", "exact true-Fisher ref", f"true K={exact_samples}", exact_samples, 0, 0.1, "full",
            "full F (empirical)", exact_true, exact[0.1])
        for k in fisher_samples:
            for seed in fisher_seeds:
                scores = att.scores(att.fit("ekfac", "true", k, seed))
                add("fisher", "ekfac", "true", k, seed, 0.1, "full", f"full F (true, K={exact_samples})",
                    scores, exact_true)
                add("fisher", "ekfac", "true", k, seed, 0.1, "full", "full F (empirical)", scores, exact[0.1])
        scores = att.scores(att.fit("ekfac", "empirical"))
        add("fisher", "ekfac", "empirical", 1, 0, 0.1, "full", f"full F (true, K={exact_samples})", scores,
            exact_true)
    return {"setup": setup.__dict__, "shapes": att.shapes(), "rows": rows,
            "seconds": round(time.perf_counter() - started, 1)}


def summary_rows(result: dict) -> list[list]:
    name = f"{result['shapes']['model_type']} s{result['setup']['seed']}"
    if result["setup"].get("distractors"):
        name += f", {result['setup']['distractors']} distractors per fact"
    grouped: dict[tuple, list] = {}
    for r in result["rows"]:
        key = (r["group"], r["method"], r["fisher"], r["samples"], r["damping"], r["rank"], r["reference"])
        grouped.setdefault(key, []).append(r)
    out = []
    for key, items in grouped.items():
        pearson = [r["pearson"] for r in items]
        spearman = [r["spearman"] for r in items]
        spread = f" ± {np.std(pearson):.3f} ({len(items)} seeds)" if len(items) > 1 else ""
        out.append([name, *key, f"{np.mean(pearson):.3f}{spread}", float(np.mean(spearman)),
                    float(np.mean([r["pearson_min"] for r in items]))])
    return out


HEADERS = ["model", "group", "method", "fisher", "K", "damping c", "rank", "reference", "Pearson (mean)",
           "Spearman (mean)", "Pearson (worst query)"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the test suite's variant)")
    parser.add_argument("--archs", default="llama,gpt2")
    parser.add_argument("--seeds", default="0", help="corpus/model seeds")
    parser.add_argument("--distractors", type=int, default=0,
                        help="documents per fact that repeat its words without stating it (a second kind of corpus)")
    parser.add_argument("--work", default=str(default_work()), help="cache of models and factors (default $ATTRIB_CACHE_DIR/eval)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--fisher-seeds", default=None, help="seeds of attrib's true-Fisher fits (default 0,1,2)")
    parser.add_argument("--exact-samples", type=int, default=None, help="label draws per sequence for the true-Fisher reference")
    parser.add_argument("--covariance-fractions", default="",
                        help="fit A and S on these fractions of the tokens too, e.g. 0.25,0.5 (fit-factors --covariance-max-tokens)")
    args = parser.parse_args(argv)
    if args.quick:
        base = dict(n_facts=8, n_filler=24, steps=120)
        ranks, dampings, fisher_samples, fisher_seeds = [4, 0], [0.1, 1.0], [1], [0]
        exact_samples = args.exact_samples if args.exact_samples is not None else 0
    else:
        base = dict(n_facts=20, n_filler=60, steps=300)
        ranks, dampings, fisher_samples, fisher_seeds = [1, 2, 4, 8, 0], [0.001, 0.01, 0.1, 1.0, 10.0], [1, 4, 16], [0, 1, 2]
        exact_samples = args.exact_samples if args.exact_samples is not None else 32
    results = []
    for arch in args.archs.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            setup = Setup(arch=arch, seed=seed, distractors=args.distractors, **base)
            log(f"exact influence: {setup.name()}")
            if args.fisher_seeds:
                fisher_seeds = [int(x) for x in args.fisher_seeds.split(",")]
            fractions = [float(x) for x in args.covariance_fractions.split(",") if x]
            results.append(evaluate(setup, Path(args.work), ranks, dampings, fisher_samples, fisher_seeds,
                                    exact_samples, covariance_fractions=fractions))
            write_json(args.out, {"evaluation": "exact_influence", "quick": args.quick, "partial": True,
                                  "results": results})
    table = [row for result in results for row in summary_rows(result)]
    print(markdown_table(HEADERS, table))
    for result in results:
        print(f"\n{result['shapes']['model_type']}: {result['shapes']}, {result['seconds']} s")
    write_json(args.out, {"evaluation": "exact_influence", "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    from attrib.runtime import session

    with session(quiet=True):  # attrib's own progress lines would bury the script's
        raise SystemExit(main())
