#!/usr/bin/env python
"""Benchmark influence scoring against a plain forward+backward of the same candidate tokens (issue 5).

One process, one random-init Llama-style model of realistic width (built from a config,
saved, loaded with attrib's loader), a synthetic corpus (or `--text`: real paragraphs) in a temp JSONL:

1. fit EK-FAC factors on `--fit-sequences` sequences (not timed here; see bench_fit.py)
   or use `--strategy identity` (the scoring cost does not depend on the strategy);
2. full-rank preconditioned query gradients for `--queries` real queries
   (`compute_query_gradients`, query_rank 0); rank-r sets are their truncations (the SVD
   is sorted, so truncation equals `--query-rank r`). Q = 64 reuses the real queries
   tiled (the scoring cost depends only on the shapes, not on the values);
3. times `Scorer.score` over every candidate batch for Q = 1, 16, 64 at rank 32 and full
   rank, against a plain forward+backward (all parameters requiring grad,
   `loss.backward()`) of the same batches, measured before and after;
4. `score_documents_and_tokens` (what `attrib query` runs) end to end (Parquet output) for Q = 16, rank 32;
5. Spearman / Pearson correlation of rank-8/32/128 sequence scores with full rank.

Peak RSS per configuration: VmHWM after resetting it (/proc/self/clear_refs = 5).

    python scripts/bench_query.py           # default, a few minutes on 2 cores
    python scripts/bench_query.py --quick   # under a minute
    python scripts/bench_query.py --hidden 96 --intermediate 256 --layers 2 --heads 6 --vocab 512 --queries 40 \
        --q-values 40 --ranks 0 --corr-ranks 32 --candidates 1000 --text /usr/share/common-licenses  # issue 22's narrow model
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from attrib.synthetic import train_tokenizer  # noqa: E402
from bench_corpus import synthetic_texts  # noqa: E402
from bench_precision import read_paragraphs  # noqa: E402


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plain_forward_backward(model, batches) -> tuple[list[float], float]:
    """Wall seconds per batch of forward + loss.backward() with every parameter requiring grad, and the
    process CPU seconds of all of them (with one thread, the figure a loaded machine does not inflate)."""
    from attrib.capture import summed_nll

    model.requires_grad_(True)
    times = []
    cpu_started = time.process_time()
    for input_ids, mask, targets in batches:
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        summed_nll(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, targets).backward()
        times.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_started
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return times, cpu


def truncate(gradients, rank: int, queries: int):
    """The first `queries` queries at rank `rank` (0 = as stored), tiled when more are asked for."""
    import torch

    from attrib.preconditioned_gradients import QueryGradients

    have = len(gradients.query_ids)
    index = torch.arange(queries) % have
    cut = (lambda t: t[..., :rank]) if rank > 0 else (lambda t: t)
    return QueryGradients(
        [f"q{i}" for i in range(queries)],
        gradients.layer_names,
        [cut(u[index]).contiguous() for u in gradients.left],
        [cut(s[index]).contiguous() for s in gradients.sigma],
        [cut(v[index]).contiguous() for v in gradients.right],
    )


def time_scoring(model, layers, gradients, sequence_batches, pad_id, tokens=True) -> tuple[float, float, float, "torch.Tensor"]:
    """Wall and CPU seconds of Scorer.score over all candidate batches, peak RSS, and per-sequence scores [N, Q].

    `tokens=False` asks for document and layer scores only (each layer takes the cheaper contraction)."""
    import torch

    from attrib.scoring import Scorer

    scorer = Scorer(model, layers, gradients, "cpu")
    scorer.score(sequence_batches[0][:2], pad_id, "cpu")  # warm-up
    reset_peak_rss()
    totals = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for sequences in sequence_batches:
        _, per_layer = scorer.score(sequences, pad_id, "cpu", tokens=tokens)
        totals.append(per_layer.sum(-1))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return elapsed, cpu, peak_rss_mib(), torch.cat(totals)


def rank_correlation(x, y) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    return float(spearmanr(x, y).statistic), float(pearsonr(x, y).statistic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=None, help="default 4 × hidden")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=64, help="candidate documents (≈ one sequence each)")
    parser.add_argument("--queries", type=int, default=8, help="real queries (Q = 64 tiles them)")
    parser.add_argument("--q-values", default="1,16,64")
    parser.add_argument("--ranks", default="32,0", help="ranks to time (0 = full)")
    parser.add_argument("--full-batch-limit", type=int, default=1,
                        help="time full rank at Q >= 64 on this many candidate batches only (its cost is ~Q·min(d_in, d_out))")
    parser.add_argument("--corr-ranks", default="8,32,128")
    parser.add_argument("--strategy", default="ekfac", choices=("ekfac", "kfac", "identity"))
    parser.add_argument("--fit-sequences", type=int, default=64)
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on this shared 2-core machine 2 OpenMP threads are slower and noisier)")
    parser.add_argument("--text", action="append", type=Path,
                        help="real text (files or directories, e.g. /usr/share/common-licenses): its paragraphs are "
                             "the candidates, fit texts and queries, instead of synthetic text")
    parser.add_argument("--quick", action="store_true", help="hidden 256, 16 candidates of 128 tokens, 4 queries")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.heads, args.seq_len, args.candidates = 256, 4, 128, 16
        args.queries, args.fit_sequences, args.corr_ranks = 4, 32, "8,32"
    intermediate = args.intermediate or 4 * args.hidden

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attrib.data import CorpusSpec, Query, collate, iter_sequence_parts, pack_batches
    from attrib.distributed import World
    from attrib.curvature import load_curvature
    from attrib.stages.fit import FitSettings, fit_factors
    from attrib.models import find_tracked_layers, load_model, model_record
    from attrib.preconditioned_gradients import compute_query_gradients
    from attrib.scoring import ScoreSettings, score_documents_and_tokens
    from attrib.storage import StageDir

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    if args.text:  # real paragraphs: candidates first, then fit texts, then queries (each text's two halves)
        paragraphs = read_paragraphs(args.text)
        candidate_texts = paragraphs[: args.candidates]
        fit_texts = paragraphs[args.candidates : args.candidates + args.fit_sequences]
        query_texts = [p for p in paragraphs[args.candidates + args.fit_sequences :] if 10 <= len(p.split()) <= 60]
        query_texts = query_texts[: args.queries]
    else:
        paragraphs = synthetic_texts(1500, 200, seed=2)
        words = int(args.seq_len * 0.4)  # ≈ one sequence of ≤ seq_len tokens per document
        candidate_texts = synthetic_texts(args.candidates, words, seed=3)
        fit_texts = synthetic_texts(args.fit_sequences, words, seed=4)
        query_texts = synthetic_texts(args.queries, 30, seed=5)
    tokenizer = train_tokenizer(paragraphs, args.vocab, work / "model")
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "model")
    model, tokenizer = load_model(str(work / "model"), dtype="float32", device="cpu")
    layers = find_tracked_layers(model)
    record = model_record(str(work / "model"), model, layers)
    params = sum(p.numel() for p in model.parameters())
    tracked = sum(layer.num_params for layer in layers)
    pad_id = tokenizer.pad_token_id

    write_jsonl(work / "candidates.jsonl", ({"id": f"c{i}", "text": t} for i, t in enumerate(candidate_texts)))
    write_jsonl(work / "fit.jsonl", ({"id": f"f{i}", "text": t} for i, t in enumerate(fit_texts)))
    cuts = [min(20, len(t.split()) // 2) for t in query_texts]
    queries = [Query(f"q{i}", " ".join(t.split()[:cut]), " " + " ".join(t.split()[cut:]))
               for i, (t, cut) in enumerate(zip(query_texts, cuts))]
    write_jsonl(work / "queries.jsonl", (q.as_row() for q in queries))

    corpus = CorpusSpec(str(work / "candidates.jsonl"))
    sequences = [seq for part in iter_sequence_parts(corpus, tokenizer, args.seq_len, 2000) for _, seq in part.sequences]
    batch_rows = pack_batches(sequences, args.tokens_per_batch)
    sequence_batches = [[sequences[i] for i in rows] for rows in batch_rows]
    collated = [collate(batch, pad_id) for batch in sequence_batches]
    tokens = sum(len(s) for s in sequences)
    shape = (f"Llama hidden {args.hidden}, MLP {intermediate}, {args.layers} layers, {args.heads} heads, "
             f"vocab {args.vocab}; {params / 1e6:.1f}M params, {len(layers)} tracked layers ({tracked / 1e6:.1f}M params)")
    print(f"# bench_query  torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads, float32")
    print(f"- model: {shape}")
    print(f"- candidates: {len(sequences)} sequences, {tokens} tokens "
          f"({sum(b[0].numel() for b in collated)} padded) in {len(collated)} batches of ≤{args.tokens_per_batch} tokens",
          flush=True)

    # Factors. The eigendecomposition runs on one thread: multi-threaded MKL eigh is pathologically
    # slow on this loaded 2-core machine (see docs/benchmarks.md); the fit is not what is timed here.
    started = time.perf_counter()
    settings = FitSettings(strategy=args.strategy, max_length=args.seq_len, tokens_per_batch=args.tokens_per_batch)
    stage = StageDir(work / "factors", "fit-factors", vars(settings), record, overwrite=True)
    torch.set_num_threads(1)
    fit_factors(model, tokenizer, layers, CorpusSpec(str(work / "fit.jsonl")), stage, settings, World())
    torch.set_num_threads(args.threads)
    fit_seconds = time.perf_counter() - started
    curvature = load_curvature(str(work / "factors"), layers, None, record["fingerprint"])
    print(f"- factors: {args.strategy} on {args.fit_sequences} sequences ({fit_seconds:.1f} s, eigh on 1 thread)")

    started = time.perf_counter()
    full = compute_query_gradients(model, tokenizer, layers, queries, curvature, 0, args.seq_len,
                                   args.tokens_per_batch, "cpu")
    query_seconds = time.perf_counter() - started
    print(f"- query gradients: {args.queries} queries at full rank in {query_seconds:.1f} s "
          f"({query_seconds / args.queries:.2f} s/query, SVD included)", flush=True)

    plain_forward_backward(model, collated[:1])  # warm-up
    reset_peak_rss()
    first_baseline, first_cpu = plain_forward_backward(model, collated)
    baseline_batches, baseline_cpu = [first_baseline], [first_cpu]
    baseline_rss = peak_rss_mib()
    rows = []
    scores_by_rank = {}
    q_values = [int(q) for q in args.q_values.split(",")]
    for rank in [int(r) for r in args.ranks.split(",")]:
        for q in q_values:
            gradients = truncate(full, rank, q)
            limit = args.full_batch_limit if rank == 0 and q >= 64 else len(sequence_batches)
            for per_token in (True, False):
                seconds, cpu, rss, scores = time_scoring(model, layers, gradients, sequence_batches[:limit], pad_id,
                                                         per_token)
                effective = gradients.left[0].shape[-1]
                if limit == len(sequence_batches):
                    scores_by_rank.setdefault(rank, scores)
                rows.append({"q": q, "rank": rank, "effective_rank": effective, "seconds": seconds, "cpu": cpu,
                             "rss": rss, "batches": limit,
                             "tokens": sum(len(s) for b in sequence_batches[:limit] for s in b),
                             "path": "per token" if per_token else "documents only"})
                print(f"  Q={q:3d} rank={rank or 'full'} {rows[-1]['path']}: {seconds:.2f} s "
                      f"({cpu:.2f} s CPU) on {limit} batch(es)", flush=True)
    last_baseline, last_cpu = plain_forward_backward(model, collated)
    baseline_batches.append(last_baseline)
    baseline_cpu.append(last_cpu)
    baseline = [sum(run) for run in baseline_batches]
    base = sum(baseline) / 2
    base_cpu = sum(baseline_cpu) / 2

    def base_of(limit: int) -> float:
        return sum(sum(run[:limit]) for run in baseline_batches) / 2

    # Correlation of low-rank with full-rank sequence scores, per query.
    real = min(args.queries, len(full.query_ids))
    if 0 in scores_by_rank and scores_by_rank[0].shape[1] >= real:
        full_scores = scores_by_rank[0][:, :real]  # tiled runs start with the real queries
    else:
        *_, full_scores = time_scoring(model, layers, truncate(full, 0, real), sequence_batches, pad_id)
    correlations = []
    for rank in [int(r) for r in args.corr_ranks.split(",")]:
        *_, low = time_scoring(model, layers, truncate(full, rank, real), sequence_batches, pad_id)
        per_query = [rank_correlation(low[:, q].double().numpy(), full_scores[:, q].double().numpy()) for q in range(real)]
        spearman = np.array([s for s, _ in per_query])
        pearson = np.array([p for _, p in per_query])
        overlap = np.mean([
            len(set(np.argsort(-low[:, q].numpy())[:10]) & set(np.argsort(-full_scores[:, q].numpy())[:10])) / 10
            for q in range(real)
        ])
        correlations.append((rank, spearman.mean(), spearman.min(), pearson.mean(), pearson.min(), overlap))

    # End to end through score_documents_and_tokens (Parquet parts, token tables), Q = 16, rank 32.
    e2e_q = min(16, max(q_values))
    gradients = truncate(full, 32, e2e_q)
    score_settings = ScoreSettings(max_length=args.seq_len, tokens_per_batch=args.tokens_per_batch)
    stage = StageDir(work / "scores", "query", vars(score_settings), record, overwrite=True)
    reset_peak_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    score_documents_and_tokens(model, tokenizer, layers, gradients, corpus, stage, score_settings, World())
    e2e_seconds, e2e_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    e2e_rss = peak_rss_mib()

    print()
    print(f"plain forward+backward of the candidates: {base:.2f} s (runs {baseline[0]:.2f} / {baseline[1]:.2f}), "
          f"CPU {base_cpu:.2f} s (runs {baseline_cpu[0]:.2f} / {baseline_cpu[1]:.2f}), {tokens / base:.0f} tokens/s, "
          f"peak RSS {baseline_rss:.0f} MiB; load avg {os.getloadavg()[0]:.1f}")
    print()
    print("CPU ratio: process CPU seconds of scoring / of the plain forward+backward (load-independent with one "
          "thread; with several threads the wall ratio is the figure). Its baseline is over all batches, so it is "
          "given for rows timed on every batch.")
    print()
    print("| Q | query rank | scores | candidate tokens | scoring s | fwd+bwd s | scoring / fwd+bwd | CPU ratio | tokens/s "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        rank = f"{row['rank']}" if row["rank"] else f"full ({row['effective_rank']})"
        row_base = base_of(row["batches"])
        cpu_ratio = f"**{row['cpu'] / base_cpu:.2f}×**" if row["batches"] == len(sequence_batches) else "–"
        print(f"| {row['q']} | {rank} | {row['path']} | {row['tokens']} | {row['seconds']:.2f} | {row_base:.2f} | "
              f"{row['seconds'] / row_base:.2f}× | {cpu_ratio} | {row['tokens'] / row['seconds']:.0f} | {row['rss']:.0f} |")
    print(f"| {e2e_q} | 32 | `attrib query`'s two passes (Parquet out, tokens of the top 100) | {tokens} | {e2e_seconds:.2f} | "
          f"{base:.2f} | {e2e_seconds / base:.2f}× | {e2e_cpu / base_cpu:.2f}× | {tokens / e2e_seconds:.0f} | {e2e_rss:.0f} |")
    print()
    print(f"Agreement with full rank over {len(sequences)} candidate sequences, {real} queries "
          f"(per-query correlation; mean and worst query):")
    print()
    print("| query rank | Spearman mean | Spearman min | Pearson mean | Pearson min | top-10 overlap |")
    print("|---|---|---|---|---|---|")
    for rank, s_mean, s_min, p_mean, p_min, overlap in correlations:
        print(f"| {rank} | {s_mean:.3f} | {s_min:.3f} | {p_mean:.3f} | {p_min:.3f} | {overlap:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "baseline": baseline_batches, "baseline_cpu": baseline_cpu,
                                               "correlations": correlations,
                                               "e2e_seconds": e2e_seconds, "tokens": tokens}, indent=2, default=float))


if __name__ == "__main__":
    main()
