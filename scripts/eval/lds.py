"""Linear datamodeling score (Park et al. 2023) of attrib's influence (issue 7, part 2).

M models are trained from scratch on random 50% subsets S_j of the corpus (subset j uses seed
1000 + j for both the subset draw and training; same number of steps and hyper-parameters as the
full-data model). For every query q, LDS(q) = Spearman over j of (actual log p(completion | prompt)
under model j, predicted Σ_{m∈S_j} τ(q, m)), where τ is computed once on the full-data model
(positive τ = training on m makes the completion more likely, so it predicts a higher log-prob).
The reported LDS is the mean over queries. Trained subset models and their query log-probs are
cached under --work, so reruns (and larger M) reuse them.

    python scripts/eval/lds.py --models 50 --out eval-out/lds.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import stats  # noqa: E402

from attrib.data import query_sequence, special_prefix  # noqa: E402
from attrib.synthetic import train_causal_lm  # noqa: E402
from common import (Attributor, Setup, build_setup, default_work, log,  # noqa: E402
                     markdown_table, prefilter_scores, write_json)


@torch.no_grad()
def completion_log_probs(model, tokenizer, queries) -> list[float]:
    prefix = special_prefix(tokenizer)
    out = []
    for q in queries:
        seq = query_sequence(tokenizer, q, 10**6, prefix)
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq.input_ids])).logits[0].double(), -1)
        out.append(float(sum(logp[t, y] for t, y in enumerate(seq.targets) if y >= 0)))
    return out


def subset_model(att: Attributor, setup: Setup, work: Path, j: int) -> tuple[list[str], list[float]]:
    """Train (or load from cache) subset model j; returns its document ids and the queries' log-probs."""
    directory = work / f"lds-{setup.name()}" / f"subset-{j:03d}"
    cached = directory / "result.json"
    if cached.is_file():
        data = json.loads(cached.read_text())
        return data["docs"], data["log_probs"]
    rng = random.Random(1000 + j)
    docs = sorted(rng.sample(att.doc_ids, len(att.doc_ids) // 2))
    texts = {json.loads(line)["id"]: json.loads(line)["text"] for line in open(att.setup_dir / "corpus.jsonl")}
    model = train_causal_lm(setup.arch, att.tokenizer, [texts[d] for d in docs], directory / "model",
                            hidden_size=setup.hidden, num_layers=setup.layers, steps=setup.steps,
                            seq_len=128, batch_size=setup.batch_size, lr=setup.lr, seed=1000 + j)
    log_probs = completion_log_probs(model, att.tokenizer, att.queries)
    directory.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"docs": docs, "log_probs": log_probs}))
    return docs, log_probs


def lds(scores: np.ndarray, masks: np.ndarray, actual: np.ndarray) -> dict:
    """scores [Q, D], masks [M, D] (1 = in subset), actual [M, Q] log-probs."""
    predicted = masks @ scores.T  # [M, Q]
    per_query = []
    for q in range(scores.shape[0]):
        rho = stats.spearmanr(predicted[:, q], actual[:, q])[0]
        per_query.append(float(rho) if np.isfinite(rho) else 0.0)
    return {"lds": float(np.mean(per_query)), "per_query": per_query}


def evaluate(setup: Setup, work: Path, num_models: int, methods=("ekfac", "kfac", "identity", "tfidf", "random"),
             random_draws: int = 20) -> dict:
    started = time.perf_counter()
    att = Attributor(build_setup(setup, work), work)
    t0 = time.perf_counter()
    subsets = [subset_model(att, setup, work, j) for j in range(num_models)]
    train_seconds = time.perf_counter() - t0
    masks = np.array([[1.0 if d in set(docs) else 0.0 for d in att.doc_ids] for docs, _ in subsets])
    actual = np.array([lp for _, lp in subsets])
    results = {}
    for method in methods:
        if method in ("ekfac", "kfac", "identity"):
            results[method] = lds(att.scores(att.fit(method)), masks, actual)
        elif method == "ekfac-empirical":
            results[method] = lds(att.scores(att.fit("ekfac", "empirical")), masks, actual)
        elif method == "tfidf":
            results[method] = lds(prefilter_scores(att, "tfidf", work), masks, actual)
        elif method == "random":
            rng = np.random.default_rng(0)
            draws = [lds(rng.standard_normal((len(att.queries), len(att.doc_ids))), masks, actual)["lds"]
                     for _ in range(random_draws)]
            results[method] = {"lds": float(np.mean(draws)), "std": float(np.std(draws)), "draws": draws}
    return {"setup": setup.__dict__, "shapes": att.shapes(), "num_models": num_models,
            "subset_training_seconds": round(train_seconds, 1), "methods": results,
            "actual_log_prob_std_over_models": float(actual.std(0).mean()),
            "seconds": round(time.perf_counter() - started, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", type=int, default=None, help="M, the number of subset models (default 50; quick 8)")
    parser.add_argument("--archs", default="llama")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(default_work()), help="cache of models, subset models and factors (default $ATTRIB_CACHE_DIR/eval)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    m = args.models or (8 if args.quick else 50)
    base = dict(n_facts=6, n_filler=14, steps=60) if args.quick else dict(n_facts=10, n_filler=30, steps=150)
    results = []
    for arch in args.archs.split(","):
        setup = Setup(arch=arch, seed=args.seed, **base)
        log(f"LDS: {setup.name()}, M={m}")
        results.append(evaluate(setup, Path(args.work), m))
    rows = []
    for r in results:
        name = f"{r['shapes']['model_type']} ({r['shapes']['documents']} docs, M={r['num_models']})"
        for method, v in r["methods"].items():
            spread = f" ± {v['std']:.3f}" if "std" in v else ""
            rows.append([name, method, f"{v['lds']:.3f}{spread}"])
    print(markdown_table(["setup", "method", "LDS (mean Spearman over queries)"], rows))
    for r in results:
        print(f"\n{r['shapes']}, subset training {r['subset_training_seconds']} s, total {r['seconds']} s")
    write_json(args.out, {"evaluation": "lds", "quick": args.quick, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
