#!/usr/bin/env python
"""Cost of `--solver cg` (issue 14): Gauss-Newton passes against a forward+backward and the scoring pass.

One process, one random-init Llama-style model built from a config, synthetic text:

1. EK-FAC factors fitted on the solve sample (`--solve-tokens` tokens of the fit corpus);
2. a plain forward+backward (every parameter requiring grad, `loss.backward()`) over the sample;
3. one Gauss-Newton product G V over the sample (attrib.solve.GaussNewton) for Q = 1 and Q = `--queries`
   directions: a CG iteration costs one such pass, and K iterations cost K + 1 (the first residual);
4. `compute_query_gradients` for `--queries` queries with `--solver ekfac` and cg at each of
   `--iterations`, seconds per query;
5. the scoring pass (attrib.scoring.Scorer.score, rank 32) of `--candidates` candidate documents for
   the same queries, which a solve is compared with.

    python scripts/bench_solve.py            # hidden 256, 16,384 sample tokens (not yet run here: long on 2 shared cores)
    python scripts/bench_solve.py --quick    # 1 CPU-minute (8 wall minutes on the loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from attrib.synthetic import train_tokenizer  # noqa: E402
from bench_corpus import synthetic_texts  # noqa: E402
from bench_query import plain_forward_backward, write_jsonl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--solve-tokens", type=int, default=16384)
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--iterations", default="1,3,10")
    parser.add_argument("--candidates", type=int, default=64, help="candidate documents (≈ one sequence each)")
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="hidden 128, 4096 solve tokens, iterations 1,3")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.solve_tokens, args.iterations, args.candidates = 128, 4096, "1,3", 16

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attrib.curvature import load_curvature
    from attrib.data import CorpusSpec, Query, collate, iter_sequence_parts, pack_batches
    from attrib.distributed import World
    from attrib.stages.fit import FitSettings, fit_factors
    from attrib.models import find_tracked_layers, load_model, model_record
    from attrib.preconditioned_gradients import compute_query_gradients
    from attrib.scoring import Scorer
    from attrib.solve import CGSolver, GaussNewton, SolveSample
    from attrib.storage import StageDir

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-solve-"))
    tokenizer = train_tokenizer(synthetic_texts(1500, 200, seed=2), args.vocab, work / "model")
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "model")
    model, tokenizer = load_model(str(work / "model"), dtype="float32", device="cpu")
    layers = find_tracked_layers(model)
    pad_id = tokenizer.pad_token_id
    words = int(args.seq_len * 0.4)
    documents = args.solve_tokens // (args.seq_len // 2) + 8
    write_jsonl(work / "fit.jsonl", ({"id": f"f{i}", "text": t} for i, t in enumerate(synthetic_texts(documents, words, seed=4))))
    write_jsonl(work / "candidates.jsonl",
                ({"id": f"c{i}", "text": t} for i, t in enumerate(synthetic_texts(args.candidates, words, seed=3))))
    texts = synthetic_texts(args.queries, 30, seed=5)
    queries = [Query(f"q{i}", " ".join(t.split()[:20]), " " + " ".join(t.split()[20:])) for i, t in enumerate(texts)]
    fit_corpus = CorpusSpec(str(work / "fit.jsonl"))

    settings = FitSettings(max_length=args.seq_len, tokens_per_batch=args.tokens_per_batch, max_tokens=args.solve_tokens)
    stage = StageDir(work / "factors", "fit-factors", asdict(settings), model_record("m", model, layers))
    fit_factors(model, tokenizer, layers, fit_corpus, stage, settings, World())
    curvature = load_curvature(str(stage.path), layers, None)
    sample = SolveSample.read(fit_corpus, tokenizer, args.seq_len, args.solve_tokens)
    gauss_newton = GaussNewton(model, layers, sample, args.tokens_per_batch, pad_id, "cpu")

    sequences = [s for part in iter_sequence_parts(fit_corpus, tokenizer, args.seq_len, 2000) for _, s in part.sequences]
    sample_batches = [collate([sequences[i] for i in rows], pad_id)
                      for rows in pack_batches(sequences[: sample.sequences], args.tokens_per_batch)]
    forward_backward = sum(plain_forward_backward(model, sample_batches))

    results: dict = {"sample_tokens": sample.tokens, "sample_sequences": sample.sequences,
                     "forward_backward_s": forward_backward}
    tracked = sum(layer.num_params for layer in layers)
    params = sum(p.numel() for p in model.parameters())
    results["shape"] = (f"Llama hidden {args.hidden}, MLP {4 * args.hidden}, {args.layers} layers, {args.heads} heads, "
                        f"vocab {args.vocab}; {params / 1e6:.1f}M params, {len(layers)} tracked layers "
                        f"({tracked / 1e6:.1f}M params)")
    for q in sorted({1, args.queries}):
        directions = [torch.randn(q, layer.d_out, layer.d_in_folded) for layer in layers]
        started = time.perf_counter()
        gauss_newton.times(directions)
        results[f"gn_pass_s_q{q}"] = time.perf_counter() - started

    started = time.perf_counter()
    compute_query_gradients(model, tokenizer, layers, queries, curvature, 32, args.seq_len, args.tokens_per_batch, "cpu")
    results["ekfac_s_per_query"] = (time.perf_counter() - started) / len(queries)
    for k in [int(v) for v in args.iterations.split(",")]:
        solver = CGSolver(curvature, gauss_newton, k, "cpu", torch.float32)
        started = time.perf_counter()
        gradients = compute_query_gradients(model, tokenizer, layers, queries, curvature, 32, args.seq_len,
                                            args.tokens_per_batch, "cpu", solver=solver)
        results[f"cg{k}_s_per_query"] = (time.perf_counter() - started) / len(queries)
        results[f"cg{k}_final_residual_mean"] = float(gradients.residuals[-1].mean())
        results[f"cg{k}_residuals_mean"] = [round(float(r), 4) for r in gradients.residuals.mean(1)]

    candidates = [s for part in iter_sequence_parts(CorpusSpec(str(work / "candidates.jsonl")), tokenizer, args.seq_len,
                                                    2000) for _, s in part.sequences]
    scorer = Scorer(model, layers, gradients, "cpu")
    started = time.perf_counter()
    for rows in pack_batches(candidates, args.tokens_per_batch):
        scorer.score([candidates[i] for i in rows], pad_id, "cpu")
    results["scoring_s"] = time.perf_counter() - started
    results["candidate_tokens"] = sum(len(s) for s in candidates)

    q, fb = args.queries, forward_backward
    print(f"model: {results['shape']}")
    print(f"solve sample: {sample.tokens} tokens, {sample.sequences} sequences; plain forward+backward {fb:.2f} s")
    print(f"one GN pass: Q=1 {results['gn_pass_s_q1']:.2f} s ({results['gn_pass_s_q1'] / fb:.2f}× fwd+bwd), "
          f"Q={q} {results[f'gn_pass_s_q{q}']:.2f} s ({results[f'gn_pass_s_q{q}'] / fb:.2f}× fwd+bwd, "
          f"{results[f'gn_pass_s_q{q}'] / q / fb:.2f}× per query)")
    print(f"scoring pass: {results['candidate_tokens']} candidate tokens, Q={q}, rank 32: {results['scoring_s']:.2f} s")
    print(f"query gradients per query: ekfac {results['ekfac_s_per_query']:.2f} s")
    for k in [int(v) for v in args.iterations.split(",")]:
        total = results[f"cg{k}_s_per_query"] * q
        print(f"  cg {k:>2}: {results[f'cg{k}_s_per_query']:.2f} s per query; batch of {q}: {total:.1f} s = "
              f"{total / fb:.1f}× fwd+bwd of the sample, {total / results['scoring_s']:.1f}× the scoring pass; "
              f"mean ‖r_k‖/‖b‖ {results[f'cg{k}_residuals_mean']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
