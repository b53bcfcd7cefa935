"""Linear datamodeling score (Park et al. 2023) of attrib's influence (issue 7, part 2).

M models are trained from scratch on random 50% subsets S_j of the corpus (subset j uses seed
1000 + j for both the subset draw and training; same steps and hyper-parameters as the full-data
model). For every query q, LDS(q) = Spearman over j of (actual log p(completion | prompt) under
model j, predicted Σ_{m∈S_j} τ(q, m)), where τ is computed once on the full-data model (positive
τ = training on m makes the completion more likely, so it predicts a higher log-prob). The
reported LDS is the mean over queries, overall and per kind: fact queries (one document states
the fact) and generic queries (the last word of a fresh filler sentence, moved a little by many
documents). Trained subset models and their query log-probs are cached under --work, so reruns
(and larger M) reuse them; --jobs trains that many models at once, one thread each.

Besides the strategies, the table varies one setting of attrib's default (ekfac, true Fisher with
1 label sample, λ = 0.1 × mean(Λ), query rank 32) at a time: query rank, damping, the Fisher and
its number of label samples (over three fitting seeds, for the seed-to-seed spread).

    python scripts/eval/lds.py --jobs 2 --out scripts/eval/results/lds.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from attrib.data import load_queries, query_sequence, special_prefix  # noqa: E402
from common import (MAX_LENGTH, Attributor, Setup, build_setup, default_work, log,  # noqa: E402
                    markdown_table, prefilter_scores, write_json)

# The two corpora of the full evaluation: plain planted facts, and planted facts with two
# distractor documents each; both 200 documents, with 20 generic queries besides the fact queries.
CORPORA = {
    "plain": dict(n_facts=40, n_filler=160, seed=0, generic=20),
    "distractors": dict(n_facts=30, n_filler=110, distractors=2, seed=1, generic=20),
}
MODEL = dict(hidden=64, layers=2, vocab=512, steps=300, batch_size=16, lr=3e-3)
QUICK_CORPUS = dict(n_facts=6, n_filler=14, seed=0, generic=4)
QUICK_MODEL = dict(hidden=16, layers=2, vocab=320, steps=60, batch_size=16, lr=3e-3)

DEFAULT_RANK = 32


@torch.no_grad()
def completion_log_probs(model, tokenizer, queries) -> list[float]:
    prefix = special_prefix(tokenizer)
    out = []
    for q in queries:
        seq = query_sequence(tokenizer, q, 10**6, prefix)
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0].double(), -1)
        out.append(float(sum(logp[t, y] for t, y in enumerate(seq.targets) if y >= 0)))
    return out


def subset_documents(doc_ids: list[str], j: int) -> list[str]:
    return sorted(random.Random(1000 + j).sample(doc_ids, len(doc_ids) // 2))


def train_subset(setup: Setup, setup_dir: str, result_path: str, docs: list[str], seed: int) -> dict:
    """Train one subset model and write (then return) its queries' log-probs to `result_path`."""
    from transformers import AutoTokenizer

    from attrib.synthetic import train_causal_lm

    setup_dir, result_path = Path(setup_dir), Path(result_path)
    tokenizer = AutoTokenizer.from_pretrained(setup_dir / "tokenizer")
    texts = {}
    for line in open(setup_dir / "corpus.jsonl", encoding="utf-8"):
        row = json.loads(line)
        texts[row["id"]] = row["text"]
    model = train_causal_lm(setup.arch, tokenizer, [texts[d] for d in docs], result_path.parent / "model",
                            hidden_size=setup.hidden, num_layers=setup.layers, steps=setup.steps,
                            seq_len=MAX_LENGTH, batch_size=setup.batch_size, lr=setup.lr, seed=seed,
                            schedule=setup.schedule)
    result = {"docs": docs, "log_probs": completion_log_probs(model, tokenizer, load_queries(setup_dir / "queries.jsonl"))}
    staging = result_path.with_suffix(".tmp")
    staging.write_text(json.dumps(result))
    os.replace(staging, result_path)
    return result


def subset_models(att: Attributor, setup: Setup, work: Path, num_models: int, jobs: int) -> list[dict]:
    """Results of subset models 0..M-1: cached ones read, the others trained `jobs` at a time
    in worker processes of one thread each."""
    paths = [work / f"lds-{setup.name()}" / f"subset-{j:03d}" / "result.json" for j in range(num_models)]
    results = {j: json.loads(path.read_text()) for j, path in enumerate(paths) if path.is_file()}
    missing = [j for j in range(num_models) if j not in results]
    args = [(setup, str(att.setup_dir), str(paths[j]), subset_documents(att.doc_ids, j), 1000 + j) for j in missing]
    if jobs <= 1:
        trained = [train_subset(*a) for a in args]
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            trained = list(pool.map(train_subset, *zip(*args))) if args else []
    results.update(zip(missing, trained))
    return [results[j] for j in range(num_models)]


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray, kinds: list[str]) -> dict:
    """scores [Q, D], masks [M, D] (1 = in subset), actual [M, Q] log-probs; mean Spearman per query kind."""
    predicted = masks @ scores.T  # [M, Q]
    per_query = []
    for q in range(scores.shape[0]):
        rho = stats.spearmanr(predicted[:, q], actual[:, q])[0]
        per_query.append(float(rho) if np.isfinite(rho) else 0.0)
    per_query = np.array(per_query)
    out = {"lds": float(per_query.mean()), "per_query": per_query.tolist()}
    for kind in sorted(set(kinds)):
        out[kind] = float(per_query[[k == kind for k in kinds]].mean())
    return out


def variants(att: Attributor, quick: bool):
    """(group, label, scores-thunk) for every method and setting evaluated."""
    def attrib(strategy="ekfac", fisher="true", samples=1, seed=0, rank=DEFAULT_RANK, damping=None):
        return lambda: att.scores(att.fit(strategy, fisher, samples, seed), damping_scale=damping, rank=rank)

    yield "method", "ekfac", attrib()
    yield "method", "kfac", attrib("kfac")
    yield "method", "diagonal", attrib("diagonal")
    yield "method", "identity", attrib("identity")
    yield "method", "tfidf", lambda: prefilter_scores(att, "tfidf", att.work)
    yield "method", "bm25", lambda: prefilter_scores(att, "bm25", att.work)
    if quick:
        return
    for rank in (8, 128, 0):
        yield "rank", "full" if rank == 0 else str(rank), attrib(rank=rank)
    for c in (0.001, 0.01, 1.0, 10.0):
        yield "damping", f"{c:g}", attrib(damping=c)
    for samples in (1, 4, 16):
        for seed in (0, 1, 2):
            yield "fisher", f"true, {samples} sample{'s' if samples > 1 else ''}, seed {seed}", \
                attrib(samples=samples, seed=seed)
    yield "fisher", "empirical", attrib(fisher="empirical")


def evaluate(setup: Setup, work: Path, num_models: int, jobs: int = 1, quick: bool = False,
             methods: tuple[str, ...] | None = None, random_draws: int = 20) -> dict:
    """LDS of every variant (or only the `methods` of the "method" group) and of random scores."""
    started = time.perf_counter()
    att = Attributor(build_setup(setup, work), work)
    kinds = ["fact" if att.source_doc[q.query_id] else "generic" for q in att.queries]
    t0 = time.perf_counter()
    subsets = subset_models(att, setup, work, num_models, jobs)
    train_seconds = time.perf_counter() - t0
    masks = np.array([np.isin(att.doc_ids, s["docs"]) for s in subsets], dtype=float)
    actual = np.array([s["log_probs"] for s in subsets])
    rows = []
    for group, label, thunk in variants(att, quick):
        if methods is None or (group == "method" and label in methods):
            t1 = time.perf_counter()
            rows.append({"group": group, "method": label, **lds(thunk(), masks, actual, kinds),
                         "seconds": round(time.perf_counter() - t1, 1)})
    rng = np.random.default_rng(0)
    draws = [lds(rng.standard_normal((len(att.queries), len(att.doc_ids))), masks, actual, kinds) for _ in range(random_draws)]
    rows.append({"group": "method", "method": "random", "lds": float(np.mean([d["lds"] for d in draws])),
                 "std": float(np.std([d["lds"] for d in draws])),
                 **{k: float(np.mean([d[k] for d in draws])) for k in set(kinds)}})
    return {"setup": setup.__dict__, "shapes": att.shapes(), "num_models": num_models,
            "subset_training_seconds": round(train_seconds, 1), "rows": rows,
            "actual_log_prob_std_over_models": {k: float(actual.std(0)[[x == k for x in kinds]].mean())
                                                for k in set(kinds)},
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 20-document corpus, tiny model, 8 subset models")
    parser.add_argument("--models", type=int, default=None, help="M, the number of subset models (default 50; quick 8)")
    parser.add_argument("--archs", default="llama,gpt2")
    parser.add_argument("--corpora", default=",".join(CORPORA), help=f"comma list of {sorted(CORPORA)}")
    parser.add_argument("--jobs", type=int, default=1, help="subset models trained at once (one thread each)")
    parser.add_argument("--work", default=str(default_work()),
                        help="cache of models, subset models and factors (default $ATTRIB_CACHE_DIR/eval)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    m = args.models or (8 if args.quick else 50)
    results = []
    for corpus in ["quick"] if args.quick else args.corpora.split(","):
        for arch in args.archs.split(","):
            fields = {**QUICK_CORPUS, **QUICK_MODEL} if args.quick else {**CORPORA[corpus], **MODEL}
            setup = Setup(arch=arch, **fields)
            log(f"LDS: {setup.name()}, M={m}")
            result = evaluate(setup, Path(args.work), m, args.jobs, args.quick)
            results.append({"corpus": corpus, **result})
            write_json(args.out, {"evaluation": "lds", "quick": args.quick, "partial": True, "results": results})
    table = []
    for r in results:
        name = f"{r['shapes']['model_type']}, {r['corpus']}"
        for row in r["rows"]:
            spread = f" ± {row['std']:.3f}" if "std" in row else ""
            table.append([name, row["group"], row["method"], f"{row['lds']:.3f}{spread}", row.get("fact", ""),
                          row.get("generic", "")])
    print(markdown_table(["model, corpus", "group", "setting", "LDS (all queries)", "fact queries",
                          "generic queries"], table))
    for r in results:
        print(f"\n{r['corpus']}: {r['shapes']}, subset training {r['subset_training_seconds']} s, total {r['seconds']} s")
    write_json(args.out, {"evaluation": "lds", "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    from attrib.runtime import session

    with session(quiet=True):  # attrib's own progress lines would bury the script's
        raise SystemExit(main())
