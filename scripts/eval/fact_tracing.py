"""Fact tracing on planted-fact corpora (issue 7, part 3): recall@10 and MRR of each fact's source document.

Each query asks one planted fact, stated in exactly one corpus document (attrib.synthetic's generator).
Methods: attrib's ekfac, kfac and identity (attrib defaults otherwise: true Fisher, 1 label sample,
λ = 0.1 × mean(Λ), full query rank), TF-IDF and BM25 (attrib's prefilter scores, query text =
prompt + completion), and ekfac restricted to the TF-IDF top-K candidates (the `--prefilter K` route).

    python scripts/eval/fact_tracing.py --out eval-out/fact_tracing.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attrib.synthetic import fact_accuracy  # noqa: E402
from common import (Attributor, Setup, build_setup, default_work, log,  # noqa: E402
                     markdown_table, prefilter_scores, write_json)

METHODS = ("ekfac", "kfac", "identity", "tfidf", "bm25", "ekfac@tfidf")


def ranking_metrics(scores: np.ndarray, att: Attributor, k: int = 10) -> dict:
    ranks = []
    for qi, query in enumerate(att.queries):
        target = att.doc_index[att.source_doc[query.query_id]]
        # rank = 1 + number of documents scoring strictly higher (ties resolved in the method's favour
        # only for exact ties, which real-valued influence scores do not produce)
        ranks.append(1 + int((scores[qi] > scores[qi, target]).sum()))
    ranks = np.array(ranks)
    return {"recall_at_10": float((ranks <= k).mean()), "mrr": float((1.0 / ranks).mean()),
            "median_rank": float(np.median(ranks)), "ranks": ranks.tolist()}


def evaluate(setup: Setup, work: Path, methods=METHODS, candidate_k: int = 20) -> dict:
    started = time.perf_counter()
    att = Attributor(build_setup(setup, work), work)
    with torch.no_grad():
        accuracy = fact_accuracy(att.model, att.tokenizer, [q.as_row() for q in att.queries])
    scores, seconds = {}, {}
    for method in methods:
        t0 = time.perf_counter()
        if method in ("ekfac", "kfac", "identity"):
            scores[method] = att.scores(att.fit(method))
        elif method in ("tfidf", "bm25"):
            scores[method] = prefilter_scores(att, method, work)
        elif method == "ekfac@tfidf":
            base = scores.get("ekfac")
            base = att.scores(att.fit("ekfac")) if base is None else base
            tfidf = scores.get("tfidf")
            tfidf = prefilter_scores(att, "tfidf", work) if tfidf is None else tfidf
            restricted = np.full_like(base, -np.inf)
            for qi in range(len(base)):
                top = np.argsort(-tfidf[qi], kind="stable")[:candidate_k]
                restricted[qi, top] = base[qi, top]
            scores[method] = restricted
        seconds[method] = round(time.perf_counter() - t0, 2)
    metrics = {m: {**ranking_metrics(s, att), "seconds": seconds[m]} for m, s in scores.items()}
    return {"setup": setup.__dict__, "shapes": att.shapes(), "fact_accuracy": accuracy, "candidate_k": candidate_k,
            "metrics": metrics, "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--archs", default="llama,gpt2")
    parser.add_argument("--corpora", default=None,
                        help="comma list of seed:n_facts:n_filler (default 0:30:120,1:40:160; quick 0:8:24)")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--candidate-k", type=int, default=20)
    parser.add_argument("--work", default=str(default_work()), help="cache of models, subset models and factors (default $ATTRIB_CACHE_DIR/eval)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    corpora = args.corpora or ("0:8:24" if args.quick else "0:30:120,1:40:160")
    hidden = args.hidden or (16 if args.quick else 32)
    steps = args.steps or (150 if args.quick else 400)
    results = []
    for arch in args.archs.split(","):
        for spec in corpora.split(","):
            seed, n_facts, n_filler = (int(x) for x in spec.split(":"))
            setup = Setup(arch=arch, seed=seed, n_facts=n_facts, n_filler=n_filler, hidden=hidden, steps=steps,
                          vocab=320 if args.quick else 512)
            log(f"fact tracing: {setup.name()}")
            results.append(evaluate(setup, Path(args.work), candidate_k=args.candidate_k))
            write_json(args.out, {"evaluation": "fact_tracing", "quick": args.quick, "partial": True,
                                  "results": results})
    rows = []
    for r in results:
        name = f"{r['shapes']['model_type']} s{r['setup']['seed']} ({r['shapes']['documents']} docs)"
        for method, m in r["metrics"].items():
            rows.append([name, f"{r['fact_accuracy']:.2f}", method, m["recall_at_10"], m["mrr"], m["median_rank"],
                         m["seconds"]])
    print(markdown_table(["corpus/model", "fact acc.", "method", "recall@10", "MRR", "median rank", "seconds"], rows))
    for r in results:
        print(f"\n{r['shapes']}, {r['seconds']} s")
    write_json(args.out, {"evaluation": "fact_tracing", "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
