"""Gradient index quality beyond recall (issue 20, item 4): LDS of index scores, and recall after exact re-scoring.

For each representation and size of attrib.stages.index on one kit (scripts/bench_index.py's configurations,
sizes capped at the layers' widths), against exact EK-FAC (attrib's own scores over the whole corpus, float64,
full-rank query gradients, default damping and empirical Fisher, as bench_index.py):

* bytes per document, the share of exact's top 10 in the index's top 1 % / 5 % of the corpus and the Spearman
  correlation of index and exact scores (bench_index.py's recall/spearman on bench_index.py's index_scores);
* LDS of the index scores over all documents (lds.py's protocol and cached subset models, realtext.py's 95 %
  bootstrap intervals over queries), the paired difference to exact EK-FAC's LDS and their ratio (paired
  bootstrap of mean(index) / mean(exact) over the same resampled queries); skipped with --models 0;
* the two-stage pipeline run as a user runs it, float32: attrib.fit_factors, attrib.index, attrib.prefilter
  (index=…, top_k = 5 % of the corpus), attrib.query (candidates=…) with attrib's default query settings; the
  share of exact's top 10 in the re-scored top 10, next to the same with TF-IDF's top 5 % as candidates and with
  attrib.query over the whole corpus (the ceiling: what float32 and query rank 32 alone change); and the share
  of that whole-corpus attrib.query's own top 10 that re-scoring the candidates recovers (what the candidates lose).

    F=/tmp/combine-work/fortunes/pkg/usr/share/games/fortunes R=scripts/eval/results
    python scripts/eval/index_quality.py --kit fortunes --fortunes $F --hidden 16 --work /tmp/combine-work \
        --out $R/index-quality-fortunes-h16.json
    python scripts/eval/index_quality.py --kit plain --work /tmp/combine-work --out $R/index-quality-plain.json
    python scripts/eval/index_quality.py --kit fortunes --fortunes $F --hidden 96 --models 0 --work /tmp/combine-work \
        --out $R/index-quality-fortunes-h96.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lds
import numpy as np
import pyarrow.parquet as pq
import torch
from bench_index import TOP, index_scores, recall, spearman
from common import (
    MAX_LENGTH,
    Attributor,
    default_work,
    log,
    markdown_table,
    prefilter_scores,
    write_json,
)
from realtext import add_kit_arguments, bootstrap, open_kit_of

from attrib.distributed import World
from attrib.stages.query_gradients import QuerySettings, run_query_gradients

SHARES = (0.01, 0.05)
RESCORE_SHARE = 0.05


def configurations(att: Attributor) -> list[tuple[str, dict]]:
    """bench_index.py's grid (lowrank rank 1–16, Kronecker random and eigen) within the narrowest layer side,
    and full-rank lowrank (the index's exact form) as the check that the pipeline reproduces exact scores."""
    width = min(min(layer.d_out, layer.d_in_folded) for layer in att.layers)
    sizes = [k for k in (4, 8, 16, 32, 64, 96) if k <= width][-5:]
    return ([("lowrank", {"rank": r}) for r in (1, 2, 4, 8, 16) if r < width] + [("lowrank", {"rank": 0})]
            + [("kronecker", {"projection": p, "dims": [k, k]}) for p in ("random", "eigen") for k in sizes])


def ratio_interval(values: np.ndarray, reference: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of mean(values) / mean(reference), resampling queries jointly (realtext.bootstrap's draws)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), (draws, len(values)))
    ratios = values[picks].mean(1) / reference[picks].mean(1)
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def top_sets(att: Attributor, documents: Path) -> list[set[int]]:
    """Each query's top 10 documents (corpus positions) in a query run's documents.parquet."""
    rows = pq.read_table(documents / "documents.parquet", columns=["query_id", "doc_id", "score"]).to_pylist()
    by_query = {q.query_id: [] for q in att.queries}
    for row in rows:
        by_query[row["query_id"]].append(row)
    return [{att.doc_index[r["doc_id"]] for r in sorted(by_query[q.query_id], key=lambda r: -r["score"])[:TOP]}
            for q in att.queries]


def overlap(found: list[set[int]], best: list[set[int]]) -> float:
    """Mean over queries of |found ∩ best| / 10."""
    return float(np.mean([len(f & b) / TOP for f, b in zip(found, best)]))


class Pipeline:
    """The two-stage path through attrib's Python API, float32, default settings; runs cached under `root`."""

    def __init__(self, att: Attributor, root: Path, top_k: int):
        import attrib

        self.attrib, self.att, self.root, self.top_k = attrib, att, root, top_k
        self.model, self.queries = str(att.model_dir), str(att.setup_dir / "queries.jsonl")
        self.corpus = str(att.setup_dir / "corpus.jsonl")
        self.common = {"id_field": "id", "max_length": MAX_LENGTH, "quiet": True}
        self.factors = attrib.fit_factors(self.model, self.corpus, root / "factors", **self.common).out

    def rescore(self, candidates: Path | None, name: str) -> Path:
        out = self.root / f"scores-{name}"
        extra = {} if candidates is None else {"candidates": str(candidates)}
        return self.attrib.query(self.model, self.factors, self.queries, self.corpus, out, token_scores_top="none",
                                 **extra, **self.common).out

    def tfidf(self) -> Path:
        out = self.attrib.prefilter(self.corpus, self.queries, self.root / "candidates-tfidf", top_k=self.top_k,
                                    id_field="id", quiet=True).out
        return self.rescore(out, "tfidf")

    def index(self, name: str, representation: str, options: dict) -> tuple[Path, float]:
        keywords = {k: ("x".join(map(str, v)) if k == "dims" else v) for k, v in options.items()}
        started = time.perf_counter()
        index = self.attrib.index(self.model, self.factors, self.corpus, self.root / f"index-{name}",
                                  representation=representation, **keywords, **self.common).out
        candidates = self.attrib.prefilter(None, self.queries, self.root / f"candidates-{name}", model=self.model,
                                           index=str(index), top_k=self.top_k, max_length=MAX_LENGTH, quiet=True).out
        return self.rescore(candidates, name), time.perf_counter() - started


def label_of(representation: str, options: dict) -> str:
    if representation == "lowrank":
        return f"lowrank rank {options['rank']}" if options["rank"] else "lowrank full rank"
    return f"kronecker {options['projection']} {options['dims'][0]}×{options['dims'][1]}"


def evaluate(att: Attributor, setup, work: Path, scratch: Path, num_models: int, kinds: list[str],
             query_rank: int = 0, only: tuple[str, ...] = ()) -> dict:
    """Every row of the tables; index scores from query gradients of `query_rank` (0: full), configurations
    whose label contains one of `only` (all when empty)."""
    started = time.perf_counter()
    factors = att.fit("ekfac", fisher="empirical")
    exact = att.scores(factors, rank=0)
    tfidf = prefilter_scores(att, "tfidf", scratch)
    documents = len(att.doc_ids)
    budgets = [max(1, round(share * documents)) for share in SHARES]
    top_k = max(1, round(RESCORE_SHARE * documents))
    lds_of = None
    if num_models:
        subsets = lds.subset_models(att, setup, work, num_models, 1)
        masks = np.array([np.isin(att.doc_ids, s["docs"]) for s in subsets], dtype=float)
        actual = np.array([s["log_probs"] for s in subsets])
        reference = np.array(lds.lds(exact, masks, actual, kinds)["per_query"])

        def lds_of(scores):
            per_query = np.array(lds.lds(scores, masks, actual, kinds)["per_query"])
            return {"lds": float(per_query.mean()), "ci": bootstrap(per_query),
                    "delta": float((per_query - reference).mean()), "delta_ci": bootstrap(per_query - reference),
                    "ratio": float(per_query.mean() / reference.mean()),
                    "ratio_ci": ratio_interval(per_query, reference),
                    "per_query": per_query.tolist()}

    pipeline = Pipeline(att, scratch / "pipeline", top_k)
    best = [set(np.argsort(-row, kind="stable")[:TOP]) for row in exact]
    queried = top_sets(att, pipeline.rescore(None, "all"))  # attrib.query over the whole corpus, default settings

    def rescored(documents: Path) -> dict:
        found = top_sets(att, documents)
        return {"rescored": overlap(found, best), "rescored_vs_query": overlap(found, queried)}

    rows = [{"representation": "exact EK-FAC (reference)", "recall": [1.0, 1.0], "spearman": 1.0,
             **rescored(pipeline.rescore(None, "all")), **(lds_of(exact) if lds_of else {})},
            {"representation": "TF-IDF (attrib prefilter)", "recall": [recall(tfidf, exact, k, positive_only=True)
                                                                       for k in budgets],
             "spearman": spearman(tfidf, exact), **rescored(pipeline.tfidf()),
             **(lds_of(tfidf) if lds_of else {})}]
    log(f"  exact LDS {rows[0].get('lds')}, re-scored {rows[0]['rescored']}; TF-IDF recall {rows[1]['recall']}, "
        f"LDS {rows[1].get('lds')}, re-scored {rows[1]['rescored']}")
    with tempfile.TemporaryDirectory() as tmp:
        gradients = Path(tmp) / "query-gradients"
        run_query_gradients(gradients, att.record["spec"], att.model, att.tokenizer, att.layers, str(factors),
                            att.queries, QuerySettings(query_rank=query_rank, max_length=MAX_LENGTH), World(),
                            record=att.record)
        for representation, options in configurations(att):
            t0 = time.perf_counter()
            label = label_of(representation, options)
            if only and not any(part in label for part in only):
                continue
            scores, manifest = index_scores(att, factors, gradients, Path(tmp), representation, options)
            name = label.replace(" ", "-").replace("×", "x")
            documents_dir, pipeline_seconds = pipeline.index(name, representation, options)
            row = {"representation": label, "values_per_sequence": manifest["values_per_sequence"],
                   "bytes_per_document": manifest["bytes_per_sequence"] * manifest["counts"]["sequences"] / documents,
                   "recall": [recall(scores, exact, k) for k in budgets], "spearman": spearman(scores, exact),
                   **rescored(documents_dir), "pipeline_seconds": round(pipeline_seconds, 1),
                   **(lds_of(scores) if lds_of else {})}
            rows.append(row)
            log(f"  {label}: recall {row['recall']}, LDS {row.get('lds')}, ratio {row.get('ratio')}, "
                f"re-scored {row['rescored']} ({time.perf_counter() - t0:.1f} s)")
    return {"setup": setup.__dict__, "shapes": att.shapes(), "num_models": num_models, "index_query_rank": query_rank,
            "budgets": budgets,
            "rescore_top_k": top_k, "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kit_arguments(parser, "fortunes")
    parser.add_argument("--models", type=int, default=50, help="M subset models for the LDS (0: no LDS)")
    parser.add_argument("--work", default=str(default_work()), help="cache of kits, subset models and factors")
    parser.add_argument("--scratch", default=None, help="this script's own runs (default: a temporary directory)")
    parser.add_argument("--index-query-rank", type=int, default=0, help="query rank of the index-score columns "
                        "(default 0: full, as bench_index.py; the pipeline always uses attrib's default)")
    parser.add_argument("--only", default="", help="comma list: only configurations whose label contains one")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    setup, att, kinds = open_kit_of(parser, args, work)
    log(f"index quality ({args.kit}): {setup.name()}, M={args.models}, {att.shapes()}")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(args.scratch or tmp) / setup.name()
        result = {"evaluation": "index-quality", "kit": args.kit, **evaluate(att, setup, work, scratch, args.models,
                                                                             kinds, args.index_query_rank,
                                                                             tuple(filter(None, args.only.split(","))))}
    lds_headers = ["LDS [95% CI]", "Δ vs exact [95% CI]", "LDS ÷ exact [95% CI]"] if args.models else []
    table = []
    for r in result["rows"]:
        size = f"{r['bytes_per_document']:,.0f}" if "bytes_per_document" in r else "—"
        cells = [f"{r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
                 f"{r['delta']:+.3f} [{r['delta_ci'][0]:+.3f}, {r['delta_ci'][1]:+.3f}]",
                 f"{r['ratio']:.2f} [{r['ratio_ci'][0]:.2f}, {r['ratio_ci'][1]:.2f}]"] if args.models else []
        table.append([r["representation"], size] + [f"{v:.2f}" for v in r["recall"]] + [f"{r['spearman']:.2f}"]
                     + cells + [f"{r['rescored']:.2f}", f"{r['rescored_vs_query']:.2f}"])
    budgets = result["budgets"]
    print(markdown_table(["representation", "bytes per document"]
                         + [f"top {s:.0%} ({k} docs)" for s, k in zip(SHARES, budgets)] + ["Spearman vs exact"]
                         + lds_headers + [(f"re-scored top {TOP} from top {RESCORE_SHARE:.0%} "
                                          f"({result['rescore_top_k']}): of exact's top {TOP}"),
                            f"of attrib.query's top {TOP} over the whole corpus"],
                         table))
    print(f"\n{result['shapes']}, total {result['seconds']} s")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    from attrib.runtime import session

    with session(quiet=True):  # attrib's own progress lines would bury the script's
        raise SystemExit(main())
