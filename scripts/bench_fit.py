#!/usr/bin/env python
"""Benchmark `fit_factors` against a plain forward+backward over the same tokens (issue 6).

For each model (built from a config, random init, saved to a temp dir and loaded with
attrib's own loader) and a synthetic corpus written to a temp JSONL, one worker process
measures, in this order:

1. a plain forward+backward (all parameters requiring grad, `loss.backward()`, summed
   token NLL) over exactly the sequences and batches the fit uses (same packing, same
   dtype), tokenised and collated beforehand, so the baseline is pure compute;
2. `fit_factors` (ekfac, true Fisher, 1 sample) end to end (tokenisation, two passes,
   eigendecompositions, file writes);
3. the plain forward+backward again.

The baseline is the mean of the two baseline runs (they bracket the fit, which evens out
load from other processes). Each is timed in wall-clock and in CPU time of the process: with one
torch thread the CPU-time ratio barely moves when other jobs load the machine, the wall ratio does. Peak RSS is `ru_maxrss` of the worker (one process per model).

    python scripts/bench_fit.py            # default, a few minutes on 2 cores
    python scripts/bench_fit.py --quick    # seconds
    python scripts/bench_fit.py --models llama-tiny --layers-per-pass all,3,1   # peak RSS vs layers per pass
    python scripts/bench_fit.py --eigh 4096,11008   # eigendecomposition time per layer at 7B widths
    python scripts/bench_fit.py --models llama-tiny --covariance-fractions 1,0.25   # A and S from a token sample
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from attrib.synthetic import train_tokenizer  # noqa: E402
from bench_corpus import synthetic_texts  # noqa: E402

# name -> (arch, hidden, intermediate, layers, heads, vocab)
MODELS = {
    "gpt2-tiny": ("gpt2", 256, 1024, 4, 4, 4096),
    "llama-tiny": ("llama", 256, 1024, 4, 4, 4096),
    "llama-100m": ("llama", 768, 2048, 12, 12, 8192),
    "gpt2-small": ("gpt2", 768, 3072, 12, 12, 50257),
}


def model_config(name: str, vocab: int, context: int):
    from transformers import GPT2Config, LlamaConfig

    arch, hidden, intermediate, layers, heads, _ = MODELS[name]
    special = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=hidden, n_inner=intermediate, n_layer=layers, n_head=heads,
                          n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=context,
                       tie_word_embeddings=False, **special)


def plain_forward_backward(model, batches) -> tuple[float, float]:
    """(wall, CPU) seconds for forward + loss.backward() with every parameter requiring grad."""
    import torch

    from attrib.capture import summed_nll

    model.requires_grad_(True)
    started, cpu_started = time.perf_counter(), time.process_time()
    for input_ids, mask, targets in batches:
        model.zero_grad(set_to_none=True)
        summed_nll(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, targets).backward()
    elapsed = time.perf_counter() - started, time.process_time() - cpu_started
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    torch.set_grad_enabled(True)
    return elapsed


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> dict:
    """One model: build, baseline, fit, baseline. Returns the measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    from attrib.data import CorpusSpec, SequenceCaps, collate, iter_sequence_parts, pack_batches
    from attrib.distributed import World
    from attrib.stages.fit import FitSettings, fit_factors
    from attrib.models import find_tracked_layers, load_model, model_record
    from attrib.storage import StageDir

    torch.set_num_threads(args.threads)
    name = args.worker
    vocab = MODELS[name][5]
    work = Path(tempfile.mkdtemp(prefix=f"bench-fit-{name}-"))
    # Enough text for N sequences of seq_len tokens (~1.6 tokens/word with this lexicon).
    words = int(args.seq_len * 0.75)
    texts = synthetic_texts(args.sequences + 8, words, seed=1)
    tokenizer_texts = synthetic_texts(4000 if vocab > 8192 else 1500, 200, seed=2)
    tokenizer = train_tokenizer(tokenizer_texts, min(vocab, 8192), work / "model")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(name, vocab, args.seq_len))
    model.save_pretrained(work / "model")
    del model
    corpus_path = work / "corpus.jsonl"
    with open(corpus_path, "w") as handle:
        for index, text in enumerate(texts):
            handle.write(json.dumps({"id": f"d{index}", "text": text}) + "\n")

    model, tokenizer = load_model(str(work / "model"), dtype=args.dtype, device="cpu")
    layers = find_tracked_layers(model)
    record = model_record(str(work / "model"), model, layers)
    settings = FitSettings(
        strategy="ekfac", fisher="true", fisher_samples=1, max_length=args.seq_len,
        tokens_per_batch=args.tokens_per_batch, max_sequences=args.sequences, seed=0,
        layers_per_pass=None if args.layers_per_pass in (None, "all") else int(args.layers_per_pass),
    )
    corpus = CorpusSpec(str(corpus_path))
    pad_id = tokenizer.pad_token_id
    sequences = [
        seq for part in iter_sequence_parts(corpus, tokenizer, settings.max_length, settings.docs_per_part,
                                            SequenceCaps(settings.max_sequences, settings.max_tokens))
        for _, seq in part.sequences
    ]
    batches = [collate([sequences[i] for i in rows], pad_id) for rows in pack_batches(sequences, settings.tokens_per_batch)]
    tokens = sum(len(s) for s in sequences)
    if args.covariance_fraction < 1:
        settings.covariance_max_tokens = int(args.covariance_fraction * tokens)
    padded = sum(b[0].numel() for b in batches)
    params = sum(p.numel() for p in model.parameters())
    tracked = sum(layer.num_params for layer in layers)

    plain_forward_backward(model, batches[:1])  # warm-up (allocator, kernels)
    rss_start = peak_rss_mib()
    baseline_1 = plain_forward_backward(model, batches)
    rss_baseline = peak_rss_mib()

    stage = StageDir(work / "factors", "fit-factors", vars(settings), record, overwrite=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    manifest = fit_factors(model, tokenizer, layers, corpus, stage, settings, World())
    fit_seconds, fit_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    rss_fit = peak_rss_mib()
    baseline_2 = plain_forward_backward(model, batches)

    profile = None
    if args.profile:
        profile = profile_fit(model, tokenizer, layers, corpus, settings, work)

    timings = manifest["timings"]
    return {
        "model": name,
        "shape": describe(name, model, params, tracked, layers),
        "sequences": len(sequences),
        "tokens": tokens,
        "padded_tokens": padded,
        "batches": len(batches),
        "baseline_seconds": [round(baseline_1[0], 3), round(baseline_2[0], 3)],
        "baseline_cpu_seconds": [round(baseline_1[1], 3), round(baseline_2[1], 3)],
        "fit_seconds": round(fit_seconds, 3),
        "fit_cpu_seconds": round(fit_cpu_seconds, 3),
        "covariance_fraction": args.covariance_fraction,
        "covariance_seconds": timings.get("covariance_seconds"),
        "eigendecomposition_seconds": timings.get("eigendecomposition_seconds"),
        "correction_seconds": timings.get("correction_seconds"),
        "rss_mib": {"start": round(rss_start), "baseline": round(rss_baseline), "fit": round(rss_fit)},
        "layers_per_pass": args.layers_per_pass or "all",
        "threads": args.threads,
        "dtype": args.dtype,
        "load_average": os.getloadavg()[0],
        "profile": profile,
    }


def describe(name, model, params, tracked, layers) -> str:
    arch, hidden, intermediate, num_layers, heads, vocab = MODELS[name]
    return (f"{arch} hidden {hidden}, MLP {intermediate}, {num_layers} layers, {heads} heads, vocab {vocab}; "
            f"{params / 1e6:.1f}M params, {len(layers)} tracked layers ({tracked / 1e6:.1f}M params)")


def profile_fit(model, tokenizer, layers, corpus, settings, work) -> str:
    """torch.profiler over a second fit of the same data (op table, self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    from attrib.distributed import World
    from attrib.stages.fit import fit_factors
    from attrib.models import model_record
    from attrib.storage import StageDir

    record = model_record("profile", model, layers)
    stage = StageDir(work / "factors-profile", "fit-factors", vars(settings), record, overwrite=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit_factors(model, tokenizer, layers, corpus, stage, settings, World())
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | layers per pass | A, S from | seqs × len | tokens | fwd+bwd s | fit s | fit / fwd+bwd | same, CPU time | pass 1 / fwd+bwd | eigh s | pass 2 / fwd+bwd | (pass 1 + pass 2) / fwd+bwd | fit tok/s | fwd+bwd tok/s | peak RSS fwd+bwd / fit (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base = sum(r["baseline_seconds"]) / 2
        cpu_base = sum(r["baseline_cpu_seconds"]) / 2
        cov, eig, cor = r["covariance_seconds"], r["eigendecomposition_seconds"], r["correction_seconds"]
        lines.append(
            f"| {r['model']} | {r.get('layers_per_pass', 'all')} | {r['covariance_fraction']:.0%} | {r['sequences']} × ≤{r['seq_len']} "
            f"| {r['tokens']} | {base:.2f} ({r['baseline_seconds'][0]:.2f}/{r['baseline_seconds'][1]:.2f}) | {r['fit_seconds']:.2f} | "
            f"**{r['fit_seconds'] / base:.2f}×** | {r['fit_cpu_seconds'] / cpu_base:.2f}× | {cov / base:.2f}× | {eig:.2f} | {cor / base:.2f}× | "
            f"{(cov + cor) / base:.2f}× | {r['tokens'] / r['fit_seconds']:.0f} | {r['tokens'] / base:.0f} | "
            f"{r['rss_mib']['baseline']} / {r['rss_mib']['fit']} |"
        )
    return "\n".join(lines)


def eigh_times(sizes: list[int]) -> list[dict]:
    """Seconds and peak RSS of attrib's float64 symmetric eigendecomposition of one n × n covariance."""
    import torch

    from attrib.factors import symmetric_eigh

    results = []
    for n in sizes:
        samples = torch.randn(n, n // 2 + 1)
        covariance = samples @ samples.T / samples.shape[1]
        del samples
        started = time.perf_counter()
        symmetric_eigh(covariance)
        results.append({"n": n, "seconds": round(time.perf_counter() - started, 2), "peak_rss_mib": round(peak_rss_mib())})
        print(f"- eigh {n} × {n} (float64): {results[-1]['seconds']} s, peak RSS {results[-1]['peak_rss_mib']} MiB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=None, help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--sequences", type=int, default=None, help="sequences per tiny model (default 128; quick 32)")
    parser.add_argument("--big-sequences", type=int, default=None, help="sequences for the ~100M models (default 32)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens-per-batch", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on this shared 2-core machine 2 OpenMP threads are slower and noisier)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--quick", action="store_true", help="tiny models only, 32 sequences of 128 tokens")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler op table of a second fit")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--layers-per-pass", default=None,
                        help="comma-separated values (e.g. all,3,1): one worker per value and model (peak RSS vs groups)")
    parser.add_argument("--covariance-fractions", default="1",
                        help="comma-separated fractions of the tokens A and S are fitted on (--covariance-max-tokens)")
    parser.add_argument("--covariance-fraction", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--eigh", default=None, help="comma-separated sizes: time symmetric_eigh only (one thread)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.eigh:
        import torch

        torch.set_num_threads(args.threads)
        eigh_times([int(n) for n in args.eigh.split(",")])
        return

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    if args.quick:
        args.models = args.models or "gpt2-tiny,llama-tiny"
        args.sequences = args.sequences or 32
        args.seq_len = 128 if args.seq_len == 256 else args.seq_len
    models = (args.models or "gpt2-tiny,llama-tiny,llama-100m").split(",")
    small, big = args.sequences or 128, args.big_sequences or 32
    import torch

    print(f"# bench_fit  torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads, {args.dtype}, "
          f"seq_len {args.seq_len}, tokens/batch {args.tokens_per_batch}", flush=True)
    results = []
    sweep = args.layers_per_pass.split(",") if args.layers_per_pass else [None]
    fractions = args.covariance_fractions.split(",")
    for name, layers_per_pass, fraction in [(n, v, f) for n in models for v in sweep for f in fractions]:
        n = big if MODELS[name][1] >= 768 else small
        command = [sys.executable, __file__, "--worker", name, "--sequences", str(n), "--seq-len", str(args.seq_len),
                   "--tokens-per-batch", str(args.tokens_per_batch), "--threads", str(args.threads), "--dtype", args.dtype,
                   "--covariance-fraction", fraction]
        if layers_per_pass is not None:
            command += ["--layers-per-pass", layers_per_pass]
        if args.profile:
            command.append("--profile")
        started = time.time()
        out = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"worker for {name} failed")
        result = json.loads(lines[-1][len("RESULT "):])
        result["seq_len"] = args.seq_len
        results.append(result)
        base = sum(result["baseline_seconds"]) / 2
        print(f"- {name}: {result['shape']}; {result['sequences']} sequences, {result['tokens']} tokens "
              f"({result['padded_tokens']} padded) in {result['batches']} batches; load avg {result['load_average']:.1f}; "
              f"fit/fwd+bwd {result['fit_seconds'] / base:.2f}× (CPU time "
              f"{result['fit_cpu_seconds'] / (sum(result['baseline_cpu_seconds']) / 2):.2f}×; {time.time() - started:.0f} s wall)",
              flush=True)
        if result["profile"]:
            print(result["profile"])
    print()
    print(markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
