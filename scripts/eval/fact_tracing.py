"""Fact tracing on planted-fact corpora (issue 7, part 3): recall@1, recall@10 and MRR of each fact's source document.

Each query asks one planted fact, stated in exactly one corpus document (attrib.synthetic's generator).
Two corpora: "plain" (facts among filler documents; the source is the only document holding the
completion's invented name, so lexical search finds it trivially) and "distractors" (two more documents
per fact repeat its prompt's words and its object, twice each, without stating it: lexical hard negatives).
The models are trained long enough to recall the facts (greedy accuracy is reported).
Methods: attrib's ekfac, kfac and identity (attrib defaults otherwise: true Fisher, 1 label sample,
λ = 0.1 × mean(Λ), full query rank), TF-IDF and BM25 (attrib's prefilter scores, query text =
prompt + completion), and ekfac restricted to the TF-IDF top-K candidates (the `--prefilter K` route).

    python scripts/eval/fact_tracing.py --out scripts/eval/results/fact_tracing.json
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
CORPORA = {
    "plain": dict(n_facts=40, n_filler=150, seed=0),
    "distractors": dict(n_facts=40, n_filler=110, distractors=2, seed=1),
}
MODEL = dict(hidden=64, layers=2, vocab=512, steps=800, batch_size=16, lr=3e-3)
QUICK = dict(n_facts=8, n_filler=16, distractors=2, seed=0, hidden=16, layers=2, vocab=320, steps=150)


def ranking_metrics(scores: np.ndarray, att: Attributor) -> dict:
    """Rank of each fact query's source document; for corpora with distractors, also how often the
    source outranks all of its own distractors."""
    ranks, above = [], []
    for qi, query in enumerate(att.queries):
        target = att.doc_index[att.source_doc[query.query_id]]
        # rank = 1 + number of documents scoring strictly higher (exact ties, which real-valued
        # influence scores do not produce, count in the method's favour)
        ranks.append(1 + int((scores[qi] > scores[qi, target]).sum()))
        distractors = [att.doc_index[d] for d in att.distractor_docs[query.query_id]]
        if distractors:
            above.append(bool((scores[qi, target] > scores[qi, distractors]).all()))
    ranks = np.array(ranks)
    out = {"recall_at_1": float((ranks <= 1).mean()), "recall_at_10": float((ranks <= 10).mean()),
           "mrr": float((1.0 / ranks).mean()), "median_rank": float(np.median(ranks)), "ranks": ranks.tolist()}
    if above:
        out["source_above_distractors"] = float(np.mean(above))
    return out


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
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"comma list of {sorted(CORPORA)}")
    parser.add_argument("--candidate-k", type=int, default=20)
    parser.add_argument("--work", default=str(default_work()), help="cache of models, subset models and factors (default $ATTRIB_CACHE_DIR/eval)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    results = []
    for corpus in ["quick"] if args.quick else args.corpora.split(","):
        for arch in args.archs.split(","):
            setup = Setup(arch=arch, **(QUICK if args.quick else {**CORPORA[corpus], **MODEL}))
            log(f"fact tracing: {setup.name()}")
            results.append({"corpus": corpus, **evaluate(setup, Path(args.work), candidate_k=args.candidate_k)})
            write_json(args.out, {"evaluation": "fact_tracing", "quick": args.quick, "partial": True,
                                  "results": results})
    rows = []
    for r in results:
        name = f"{r['shapes']['model_type']}, {r['corpus']} ({r['shapes']['documents']} docs)"
        for method, m in r["metrics"].items():
            rows.append([name, f"{r['fact_accuracy']:.2f}", method, m["recall_at_1"], m["recall_at_10"], m["mrr"],
                         m.get("source_above_distractors", "—"), m["seconds"]])
    print(markdown_table(["model, corpus", "fact acc.", "method", "recall@1", "recall@10", "MRR",
                          "source above its distractors", "seconds"], rows))
    for r in results:
        print(f"\n{r['shapes']}, {r['seconds']} s")
    write_json(args.out, {"evaluation": "fact_tracing", "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    from attrib.runtime import session

    with session(quiet=True):  # attrib's own progress lines would bury the script's
        raise SystemExit(main())
