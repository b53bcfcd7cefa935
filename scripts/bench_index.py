"""Gradient index (issue 20) on the synthetic planted-fact kit: how much of exact EK-FAC's top 10 the index finds.

For each representation and size (attrib.stages.index): the share of each query's 10 most influential
documents under exact EK-FAC (attrib's own scores over the whole corpus, float64, full-rank query
gradients, the default damping 0.001 × mean Λ and empirical Fisher) that are among the index's top
1 %, 5 % and 10 % of the corpus, next to TF-IDF's (`attrib prefilter`) on the same kit; the Spearman
correlation of index and exact scores over all documents; bytes per document; and the build time per
token as a ratio to a plain forward+backward (weight gradients) over the same batches, measured in
the same run in float32 on one thread.

    python scripts/bench_index.py [--corpus plain|distractors|large] --out scripts/eval/results/index.json
    python scripts/bench_index.py --corpus large --timing-only [--hidden 512 --intermediate 2048] [--join 120]

`--timing-only` measures only the build time; `--hidden/--intermediate` time it on a random-init Llama of that
width (the kit's tokenizer, depth and heads; EK-FAC factors fitted on the kit's corpus), where the per-call
overheads of the kit's hidden-64 model no longer hide the products; `--join N` times it on the kit's documents
joined into documents of up to N tokens (the kit's own average about 40), as long as real chunks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "eval"))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    MAX_LENGTH,
    Attributor,
    Setup,
    build_setup,
    default_work,
    log,
    markdown_table,
    prefilter_scores,
    write_json,
)
from lds import CORPORA, MODEL  # noqa: E402
from scipy import stats  # noqa: E402

from attrib.capture import summed_nll  # noqa: E402
from attrib.data import CorpusSpec, collate, iter_sequence_parts, pack_batches  # noqa: E402
from attrib.distributed import World  # noqa: E402
from attrib.models import find_tracked_layers, load_model  # noqa: E402
from attrib.stages.index import IndexScoreSettings, IndexSettings, build_index, score_index  # noqa: E402
from attrib.stages.query_gradients import QuerySettings, run_query_gradients  # noqa: E402

# lds.py's two kits (200 documents: 1 % is 2 documents) and a larger one from the same generator
KITS = {**CORPORA, "large": dict(n_facts=100, n_filler=900, seed=0, generic=20)}
SHARES = (0.01, 0.05, 0.10)
TOP = 10
CONFIGS = ([("lowrank", dict(rank=r)) for r in (1, 2, 4, 8, 16)]
           + [("kronecker", dict(projection="random", dims=[k, k])) for k in (8, 16, 32, 64)]
           + [("kronecker", dict(projection="eigen", dims=[k, k])) for k in (8, 16, 32, 64)]
           + [("lowrank", dict(rank=8, storage_dtype="float32"))])
TIMED = [("lowrank", dict(rank=8)), ("kronecker", dict(projection="random", dims=[16, 16]))]


def recall(scores: np.ndarray, exact: np.ndarray, candidates: int, positive_only: bool = False) -> float:
    """Mean over queries of |exact top 10 ∩ top `candidates` of `scores`| / 10 (ties: corpus order)."""
    found = []
    for predicted, reference in zip(scores, exact):
        best = set(np.argsort(-reference, kind="stable")[:TOP])
        order = np.argsort(-predicted, kind="stable")
        if positive_only:  # the prefilter keeps only documents sharing a term with the query
            order = order[predicted[order] > 0]
        found.append(len(best & set(order[:candidates])) / TOP)
    return float(np.mean(found))


def spearman(scores: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([stats.spearmanr(p, r)[0] for p, r in zip(scores, exact)]))


def index_scores(att: Attributor, factors: Path, gradients: Path, work: Path, representation: str,
                 options: dict) -> tuple[np.ndarray, dict]:
    """Index scores [queries, documents] of one configuration and the index's manifest."""
    model, layers = att.model, att.layers
    settings = IndexSettings(representation=representation, max_length=MAX_LENGTH, docs_per_part=10**6,
                             **{"storage_dtype": "bfloat16", **options})
    index_dir, scores_dir = work / "index", work / "scores"
    shutil.rmtree(index_dir, ignore_errors=True)
    shutil.rmtree(scores_dir, ignore_errors=True)
    manifest = build_index(index_dir, att.record["spec"], model, att.tokenizer, layers, str(factors), att.corpus, settings)
    score_index(scores_dir, str(index_dir), att.record["spec"], model, att.tokenizer, layers, None, None,
                IndexScoreSettings(documents_top=0), query_gradients=str(gradients))
    table = pq.read_table(scores_dir / "documents.parquet", columns=["query_id", "doc_id", "score"]).to_pylist()
    position = {q.query_id: i for i, q in enumerate(att.queries)}
    scores = np.zeros((len(att.queries), len(att.doc_ids)))
    for row in table:
        scores[position[row["query_id"]], att.doc_index[row["doc_id"]]] = row["score"]
    return scores, manifest


def build_seconds(att: Attributor, factors: Path, work: Path, representation: str, options: dict, model,
                  layers) -> tuple[float, float, str]:
    """Wall and CPU seconds of one index build (reading, tokenizing, encoding, writing) and its label."""
    settings = IndexSettings(representation=representation, max_length=MAX_LENGTH, docs_per_part=10**6,
                             **{"storage_dtype": "bfloat16", **options})
    shutil.rmtree(work, ignore_errors=True)
    wall, cpu = time.perf_counter(), time.process_time()
    manifest = build_index(work, att.record["spec"], model, att.tokenizer, layers, str(factors), att.corpus, settings)
    return time.perf_counter() - wall, time.process_time() - cpu, manifest["representation"]


def wide_model(att: Attributor, work: Path, hidden: int, intermediate: int) -> Path:
    """A random-init copy of the kit's model at another width (same depth, heads, vocab, tokenizer), cached."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = work / f"{att.setup_dir.name}-wide-h{hidden}-i{intermediate}" / "model"
    if (directory / "config.json").is_file():
        return directory
    config = AutoConfig.from_pretrained(att.model_dir)
    config.hidden_size, config.intermediate_size = hidden, intermediate
    config.head_dim = hidden // config.num_attention_heads
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    att.tokenizer.save_pretrained(directory)
    return directory


def join_documents(att: Attributor, work: Path, tokens: int) -> None:
    """Point `att` at a corpus of the kit's documents joined in order into documents of at most `tokens` tokens
    (as counted alone, plus one each for the joins), so that sequences are as long as real chunks: the
    per-sequence work of an index build is then spread over more tokens."""
    rows, texts, count = [], [], 0
    for line in Path(att.corpus.source).read_text(encoding="utf-8").splitlines():
        text = json.loads(line)["text"]
        length = len(att.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        if texts and count + length > tokens:
            rows.append({"id": f"joined{len(rows)}", "text": " ".join(texts)})
            texts, count = [], 0
        texts.append(text)
        count += length
    rows.append({"id": f"joined{len(rows)}", "text": " ".join(texts)})
    path = work / f"joined-{tokens}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    att.corpus = CorpusSpec(str(path), id_field="id")
    att.sequences = [seq for part in iter_sequence_parts(att.corpus, att.tokenizer, MAX_LENGTH, 10**9)
                     for _, seq in part.sequences]


def build_timings(att: Attributor, factors: Path, work: Path, repeats: int) -> tuple[tuple, dict[str, tuple]]:
    """(wall, CPU) seconds of a plain forward+backward over the kit and of each TIMED build, each the best of
    `repeats`, float32. CPU time (the process's, all threads) is what a shared, loaded machine measures well."""
    model, _ = load_model(str(att.model_dir), "float32", "cpu")
    layers = find_tracked_layers(model)
    runs = [plain_step_seconds(model, att.tokenizer, att.sequences) for _ in range(repeats)]
    plain = (min(r[0] for r in runs), min(r[1] for r in runs))
    timings = {}
    for representation, options in TIMED:
        runs = [build_seconds(att, factors, work / "timed", representation, options, model, layers)
                for _ in range(repeats)]
        timings[runs[0][2]] = (min(r[0] for r in runs), min(r[1] for r in runs))
    return plain, timings


def plain_step_seconds(model, tokenizer, sequences) -> tuple[float, float]:
    """Wall and CPU seconds of one forward and backward (weight gradients, as in training) over every sequence,
    in 4,096-token batches."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.requires_grad_(True)
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in pack_batches(sequences, 4096):
        input_ids, mask, targets = collate([sequences[i] for i in batch], pad_id)
        summed_nll(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, targets).backward()
        model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return time.perf_counter() - wall, time.process_time() - cpu


def score_rate(work: Path, queries: int = 1000, sequences: int = 2000, repeats: int = 5) -> list[dict]:
    """Index scoring throughput (attrib.stages.index._score_shard over a memory-mapped shard of random bfloat16
    values, the kit's six layer shapes) as a share of this machine's float32 matrix-product rate (2048³),
    both measured here. Operations counted: the products and, for lowrank, forming W_n = L Rᵀ (forming the
    query side, per group of sequences for lowrank, is timed but not counted)."""
    from types import SimpleNamespace

    from attrib.models import TrackedLayer
    from attrib.stages.index import QuerySide, _score_shard
    from attrib.storage import save_tensors

    square = torch.randn(2048, 2048)
    started = time.perf_counter()
    for _ in range(repeats):
        square @ square
    peak = 2 * 2048**3 * repeats / (time.perf_counter() - started)
    layers = [TrackedLayer(f"layer{i}", None, d_in, d_out, False, False)
              for i, (d_out, d_in) in enumerate([(256, 64), (256, 64), (64, 256)] * 2)]
    results = []
    for representation, options in (("lowrank", dict(rank=8)), ("kronecker", dict(dims=[64, 64]))):
        settings = IndexSettings(representation=representation, **options)
        shapes = [settings.shape(layer) for layer in layers]
        tensors = {f"{layer.name}.{kind}": torch.randn(sequences, *shape).to(torch.bfloat16)
                   for layer, shape in zip(layers, shapes) for kind, shape in shape.items()}
        tensors["doc_index"] = torch.arange(sequences)
        save_tensors(work / "shard.safetensors", tensors)
        del tensors
        sides = []  # a rank-32 query side per layer, formed once (kronecker) or per layer as it is scored (lowrank)
        for layer, shape in zip(layers, shapes):
            rows, columns = shape.get("projected", (layer.d_out, layer.d_in))
            left, right = torch.randn(queries, rows, 32), torch.randn(queries, columns, 32)
            sides.append(QuerySide(left, right, lambda: None, None if representation == "lowrank" else left @ right.mT))
        operations = sum(2 * queries * sequences * side.left.shape[1] * side.right.shape[1]
                         for side in sides)
        if representation == "lowrank":
            operations += sum(2 * sequences * l.d_out * l.d_in * settings.rank for l in layers)
        reader = SimpleNamespace(settings=settings, directory=work)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in _score_shard(reader, "shard.safetensors", layers, sides, torch.float32):
                pass
            best = min(best, time.perf_counter() - started)
        results.append({"representation": representation, "queries": queries, "sequences": sequences,
                        "seconds": best, "rate": operations / best, "peak": peak})
    return results


def report_timings(plain: tuple, timings: dict[str, tuple], tokens: int) -> None:
    print(f"\nbuild time per token (float32, 1 thread), wall / CPU: plain forward+backward "
          f"{plain[0] / tokens * 1e6:.1f} / {plain[1] / tokens * 1e6:.1f} µs/token")
    for label, (wall, cpu) in timings.items():
        print(f"  {label}: {wall / tokens * 1e6:.1f} / {cpu / tokens * 1e6:.1f} µs/token = "
              f"{wall / plain[0]:.2f}× / {cpu / plain[1]:.2f}× plain")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="plain", choices=sorted(KITS))
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--work", default=str(default_work()))
    parser.add_argument("--repeats", type=int, default=3, help="timings: the best of this many runs")
    parser.add_argument("--out", default=None)
    parser.add_argument("--score-rate", action="store_true", help="only the scoring throughput against the matrix-product rate")
    parser.add_argument("--timing-only", action="store_true",
                        help="only the build time against a plain forward+backward")
    parser.add_argument("--hidden", type=int, default=None, help="time a random-init model of this width instead")
    parser.add_argument("--intermediate", type=int, default=None, help="its MLP width (default 4 × --hidden)")
    parser.add_argument("--join", type=int, default=None,
                        help="time on the kit's documents joined into documents of up to this many tokens")
    args = parser.parse_args(argv)
    if (args.hidden is not None or args.join is not None) and not args.timing_only:
        parser.error("--hidden and --join need --timing-only: they change what the recall was measured on")
    torch.set_num_threads(1)
    if args.score_rate:
        with tempfile.TemporaryDirectory() as tmp:
            rates = score_rate(Path(tmp))
        for r in rates:
            print(f"{r['representation']}: {r['queries']} queries × {r['sequences']} sequences in {r['seconds']:.2f} s = "
                  f"{r['rate'] / 1e9:.1f} GFLOP/s, {r['rate'] / r['peak']:.0%} of the float32 product rate "
                  f"({r['peak'] / 1e9:.1f} GFLOP/s); {r['sequences'] / r['seconds']:,.0f} sequences/s for all queries")
        write_json(args.out, {"benchmark": "index score rate", "rows": rates})
        return 0
    setup = Setup(arch=args.arch, **KITS[args.corpus], **MODEL)
    att = Attributor(build_setup(setup, Path(args.work)), Path(args.work))
    if args.hidden is not None:
        intermediate = args.intermediate or 4 * args.hidden
        att = Attributor(att.setup_dir, Path(args.work), wide_model(att, Path(args.work), args.hidden, intermediate))
    log(f"index benchmark on {setup.name()}: {att.shapes()}")
    factors = att.fit("ekfac", fisher="empirical")
    tokens = sum(len(s) for s in att.sequences)
    if args.timing_only:
        with tempfile.TemporaryDirectory() as tmp:
            if args.join is not None:
                join_documents(att, Path(tmp), args.join)
                tokens = sum(len(s) for s in att.sequences)
            plain, timings = build_timings(att, factors, Path(tmp), args.repeats)
        print(f"\n{att.model_dir}, {att.corpus.source}: {len(att.sequences)} sequences, {tokens:,} tokens "
              f"({tokens / len(att.sequences):.0f} per sequence); tracked {att.shapes()['layers']}")
        report_timings(plain, timings, tokens)
        write_json(args.out, {"benchmark": "index build time", "setup": setup.__dict__, "model": str(att.model_dir),
                              "shapes": att.shapes(), "corpus": att.corpus.source, "sequences": len(att.sequences),
                              "plain_seconds": plain, "build_seconds": timings, "seconds": "[wall, cpu]",
                              "tokens": tokens})
        return 0
    exact = att.scores(factors, rank=0)
    tfidf = prefilter_scores(att, "tfidf", att.work)
    documents = len(att.doc_ids)
    budgets = [max(1, round(share * documents)) for share in SHARES]
    rows, results = [], []
    reference = {"tfidf": [recall(tfidf, exact, k, positive_only=True) for k in budgets]}
    rows.append(["TF-IDF (attrib prefilter)", "—", "—"] + [f"{v:.2f}" for v in reference["tfidf"]] + [
        f"{spearman(tfidf, exact):.2f}"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gradients = work / "query-gradients"
        run_query_gradients(gradients, att.record["spec"], att.model, att.tokenizer, att.layers, str(factors),
                            att.queries, QuerySettings(query_rank=0, max_length=MAX_LENGTH), World(), record=att.record)
        for representation, options in CONFIGS:
            started = time.perf_counter()
            scores, manifest = index_scores(att, factors, gradients, work, representation, options)
            per_document = manifest["bytes_per_sequence"] * manifest["counts"]["sequences"] / manifest["counts"]["documents"]
            shares = [recall(scores, exact, k) for k in budgets]
            dtype = options.get("storage_dtype", "bfloat16")
            label = manifest["representation"] + ("" if dtype == "bfloat16" else f", {dtype}")
            results.append({"representation": label, "values_per_sequence": manifest["values_per_sequence"],
                            "bytes_per_document": per_document, "recall": shares, "spearman": spearman(scores, exact)})
            rows.append([label, f"{manifest['values_per_sequence']:,}", f"{per_document:,.0f}"]
                        + [f"{v:.2f}" for v in shares] + [f"{results[-1]['spearman']:.2f}"])
            log(f"{label}: {shares} ({time.perf_counter() - started:.1f} s)")
        plain, timings = build_timings(att, factors, work, args.repeats)  # float32 on one thread, in the same run
    headers = ["representation", "values per sequence", "bytes per document (bf16)"] + [
        f"top {share:.0%} ({k} docs)" for share, k in zip(SHARES, budgets)] + ["Spearman vs exact"]
    print(f"\n{setup.name()}: {documents} documents, {len(att.sequences)} sequences, {tokens:,} tokens, "
          f"{len(att.queries)} queries; tracked {att.shapes()['layers']}")
    print(f"share of exact EK-FAC's top {TOP} in each method's top share of the corpus (ceiling at 1 %: "
          f"{min(budgets[0], TOP) / TOP:.2f})\n")
    print(markdown_table(headers, rows))
    report_timings(plain, timings, tokens)
    write_json(args.out, {"benchmark": "index", "setup": setup.__dict__, "shapes": att.shapes(), "budgets": budgets,
                          "tfidf": reference["tfidf"], "rows": results, "plain_seconds": plain,
                          "build_seconds": timings, "seconds": "[wall, cpu]", "tokens": tokens})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
