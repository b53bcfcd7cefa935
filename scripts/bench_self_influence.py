#!/usr/bin/env python
"""Self-influence on planted documents (issue 15): do corrupted and duplicated documents rank at the top?

On the demo's trained Llama (`attrib.synthetic.cached_demo`, the tiny size by default: 190
documents it has memorised), the corpus gets planted documents:

* `--shuffled N` shuffled-word copies of documents of median length (the same words, corrupted text);
* one document of median length repeated `--duplicates K` times (exact duplicates; the model was
  trained on one copy).

Then `attrib fit-factors` on the planted corpus and `attrib self-influence` with each strategy,
through the CLI as a user runs them; prints each planted document's rank among all sequences,
its score against the highest original document's, and the stage's wall time. With `--retrain`
the same is measured on a Llama trained here on the planted corpus itself (the demo's tokenizer,
size and steps), so that the corrupted copies and the duplicates are training data it has seen.

    python scripts/bench_self_influence.py                 # tiny demo: 4 minutes on a busy 2-core machine
    python scripts/bench_self_influence.py --retrain       # also trains a model on the planted corpus
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def attrib(*args) -> float:
    """Run one attrib command; returns its wall time."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attrib", "--quiet", *map(str, args)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def planted_corpus(corpus: Path, out: Path, shuffled: int, duplicates: int, seed: int) -> tuple[list[str], list[str], str]:
    """The corpus plus planted rows; returns (shuffled ids, duplicate ids, the duplicated document's id)."""
    documents = [json.loads(line) for line in open(corpus, encoding="utf-8")]
    rng = random.Random(seed)
    median = sorted(len(d["text"].split()) for d in documents)[len(documents) // 2]
    typical = [d for d in documents if abs(len(d["text"].split()) - median) <= 2]
    chosen = rng.sample(typical, shuffled + 1)
    rows = list(documents)
    for k, document in enumerate(chosen[:shuffled]):
        words = document["text"].split()
        rng.shuffle(words)
        rows.append({"id": f"shuffled-{k}", "text": " ".join(words)})
    rows += [{"id": f"duplicate-{k}", "text": chosen[-1]["text"]} for k in range(duplicates)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [f"shuffled-{k}" for k in range(shuffled)], [f"duplicate-{k}" for k in range(duplicates)], chosen[-1]["id"]


def retrained(demo, size: str, corpus: Path, out: Path, seed: int) -> Path:
    """A Llama trained on the planted corpus with the demo's tokenizer and training settings."""
    from transformers import AutoTokenizer

    from attrib.synthetic import DEMO_SIZES, fact_accuracy, train_causal_lm

    settings = DEMO_SIZES[size]
    tokenizer = AutoTokenizer.from_pretrained(demo.root / "tokenizer")
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    started = time.perf_counter()
    model = train_causal_lm("llama", tokenizer, texts, out, hidden_size=settings.hidden_size,
                            num_layers=settings.num_layers, steps=settings.steps, seq_len=settings.seq_len,
                            batch_size=settings.batch_size, lr=settings.lr, seed=seed)
    queries = [json.loads(line) for line in open(demo.queries, encoding="utf-8")]
    print(f"trained a Llama on the planted corpus in {time.perf_counter() - started:.0f} s "
          f"(fact accuracy {fact_accuracy(model, tokenizer, queries):.2f})")
    return out


def measure(name: str, model: Path, strategy: str, corpus: Path, run: Path, shuffled: list[str], duplicates: list[str],
            original: str) -> None:
    """fit-factors and self-influence on the planted corpus; prints the planted documents' ranks."""
    import pyarrow.parquet as pq

    fit = attrib("fit-factors", "--model", model, "--corpus", corpus, "--out", run / "factors", "--strategy", strategy)
    score = attrib("self-influence", "--model", model, "--factors", run / "factors", "--corpus", corpus,
                   "--out", run / "self", "--token-scores-top", "10")
    table = pq.read_table(run / "self" / "self_influence.parquet").to_pandas().set_index("doc_id")
    best_original = table.drop(index=shuffled + duplicates)["score"].max()
    duplicate_ranks = table.loc[duplicates, "rank"]
    print(f"{name}, {strategy}: fit {fit:.1f} s, self-influence {score:.1f} s | shuffled copies: ranks "
          f"{sorted(table.loc[shuffled, 'rank'].tolist())} of {len(table)}, lowest score / best original "
          f"{table.loc[shuffled, 'score'].min() / best_original:.1f}× | duplicates: ranks {duplicate_ranks.min()}–"
          f"{duplicate_ranks.max()} (their original: rank {table.loc[original, 'rank']}), score / best original "
          f"{table.loc[duplicates, 'score'].max() / best_original:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--shuffled", type=int, default=3)
    parser.add_argument("--duplicates", type=int, default=20)
    parser.add_argument("--strategies", default="ekfac,kfac,identity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="also train a Llama on the planted corpus")
    args = parser.parse_args()

    from attrib.synthetic import cached_demo

    demo = cached_demo(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-self-influence-"))
    corpus = work / "planted.jsonl"
    shuffled, duplicates, original = planted_corpus(demo.corpus, corpus, args.shuffled, args.duplicates, args.seed)
    rows = sum(1 for _ in open(corpus, encoding="utf-8"))
    print(f"demo {args.size}: {rows} documents ({args.shuffled} shuffled copies, {original} repeated "
          f"{args.duplicates} times more)")
    models = {"demo model": demo.llama}
    if args.retrain:
        models["trained on the planted corpus"] = retrained(demo, args.size, corpus, work / "llama-planted", args.seed)
    try:
        for number, (name, model) in enumerate(models.items()):
            for strategy in args.strategies.split(","):
                measure(name, model, strategy, corpus, work / f"model{number}-{strategy}", shuffled, duplicates,
                        original)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
