#!/usr/bin/env python
"""Relative error of float32 preconditioning against float64 (issue 22, item 3).

The query-gradients stage preconditions each layer's dense query gradients V [d_out, d_in]
with `LayerCurvature.inverse_times` in float32 on factors stored in float32 (float64
eigendecompositions cast down, attrib/fit.py). This script fits EK-FAC factors on real text
(the licence texts every Debian system ships in /usr/share/common-licenses, or `--text`)
through one model, then for real queries' gradients compares, per layer:

* `float32`: exactly that path, `LayerCurvature(Λ, Q_S, Q_A, λ).inverse_times(V)` in float32;
* `float64 on float32 factors`: the same stored factors, the arithmetic in float64;
* the reference: float64 eigenvectors (never rounded to float32), float64 arithmetic;

as ‖P − P_ref‖_F / ‖P_ref‖_F at λ = c × mean(Λ) for each `--scales` c. Λ is the same
(float32, as fitted) in all three, so only the preconditioning differs. The statistics
follow the defaults (empirical Fisher: the data's labels). Per layer it also prints the
spread that drives the error: (max Λ + λ) / λ, the condition number of Λ + λ.

    python scripts/bench_precision.py                                  # one 7B-wide block (hidden 4096, MLP 11008), random init
    python scripts/bench_precision.py --hidden 256 --train-steps 400  # a small Llama trained on the text first

At 7B widths each 11008² float64 eigendecomposition takes minutes on one core and each
query's float64 rotations about a minute per layer; `--modules` picks the layers
(up_proj has gate_proj's shapes and input). At 7B widths: two 11008² float64 eigendecompositions
(≈ 7 min each on an idle core), then ≈ 10 min per query and layer for the float64 rotations
(1.4 TFLOP each); peak memory ≈ 6.3 GiB in the eigendecompositions, ≈ 8 GiB while comparing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LICENCES = Path("/usr/share/common-licenses")


def read_paragraphs(directories: list[Path]) -> list[str]:
    """Paragraphs (blank-line separated, whitespace collapsed) of every file, each file once."""
    seen, paragraphs = set(), []
    for directory in directories:
        for path in sorted(directory.iterdir()) if directory.is_dir() else [directory]:
            real = path.resolve()
            if real in seen or not real.is_file():
                continue
            seen.add(real)
            text = real.read_text(encoding="utf-8", errors="replace")
            paragraphs += [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 8]
    return paragraphs


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=None, help="default 11008 at hidden 4096, else 4 × hidden")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=0, help="train the model on the text first (0: random init)")
    parser.add_argument("--modules", default=r"\.0\.mlp\.(gate|down)_proj$", help="regex of the layers to measure")
    parser.add_argument("--fit-sequences", type=int, default=16, help="sequences of --seq-len tokens the factors are fitted on")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--queries", type=int, default=2)
    parser.add_argument("--scales", default="0.001,0.1")
    parser.add_argument("--text", action="append", type=Path, help=f"text files or directories (default {LICENCES})")
    args = parser.parse_args()
    intermediate = args.intermediate or (11008 if args.hidden == 4096 else 4 * args.hidden)
    scales = [float(c) for c in args.scales.split(",")]

    import json

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from attrib.capture import Capture, summed_nll
    from attrib.data import CorpusSpec, Query, collate, iter_sequence_parts, query_sequence, special_prefix
    from attrib.factors import CorrectionSums, CovarianceSums, LayerCurvature, default_damping, symmetric_eigh
    from attrib.models import find_tracked_layers
    from attrib.synthetic import train_causal_lm, train_tokenizer

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    paragraphs = read_paragraphs(args.text or [LICENCES])
    tokenizer = train_tokenizer(paragraphs, args.vocab, work / "tokenizer")
    heads = max(1, args.hidden // 128) if args.hidden >= 1024 else max(1, args.hidden // 16)
    torch.manual_seed(0)
    if args.train_steps:
        if args.intermediate:
            parser.error("--train-steps trains attrib.synthetic's Llama, whose MLP is 4 × hidden")
        model = train_causal_lm("llama", tokenizer, paragraphs, work / "model", hidden_size=args.hidden,
                                num_layers=args.layers, steps=args.train_steps, seq_len=128, batch_size=16, lr=1e-3, seed=0)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=intermediate,
            num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=args.seq_len, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.eval().requires_grad_(False)
    layers = find_tracked_layers(model, args.modules)
    pad_id = tokenizer.pad_token_id

    # Fit sequences from the first paragraphs; queries from paragraphs the fit never sees.
    with open(work / "fit.jsonl", "w") as handle:
        for i, text in enumerate(paragraphs[: len(paragraphs) // 2]):
            handle.write(json.dumps({"id": f"p{i}", "text": text}) + "\n")
    sequences = [s for part in iter_sequence_parts(CorpusSpec(str(work / "fit.jsonl")), tokenizer, args.seq_len, 10**6)
                 for _, s in part.sequences]
    sequences = sorted(sequences, key=len, reverse=True)[: args.fit_sequences]
    batches = [collate(sequences[i : i + 4], pad_id) for i in range(0, len(sequences), 4)]
    long_paragraphs = [p for p in paragraphs[len(paragraphs) // 2 :] if 30 <= len(p.split()) <= 80]
    prefix = special_prefix(tokenizer)
    queries = []
    for i, text in enumerate(long_paragraphs[:: max(1, len(long_paragraphs) // args.queries)][: args.queries]):
        words = text.split(" ")
        cut = len(words) // 2
        queries.append(query_sequence(tokenizer, Query(f"q{i}", " ".join(words[:cut]), " " + " ".join(words[cut:])),
                                      args.seq_len, prefix))
    tokens = sum(len(s) for s in sequences)
    params = sum(p.numel() for p in model.parameters())
    print(f"# bench_precision  torch {torch.__version__}, 1 thread")
    print(f"- model: Llama hidden {args.hidden}, MLP {intermediate}, {args.layers} layer(s), {heads} heads, vocab "
          f"{len(tokenizer)}, {params / 1e6:.0f}M params, "
          + (f"trained {args.train_steps} steps on the text" if args.train_steps else "random init"))
    print(f"- text: {len(paragraphs)} paragraphs of {', '.join(str(p) for p in args.text or [LICENCES])}; factors "
          f"(EK-FAC, empirical Fisher) on {len(sequences)} sequences, {tokens} tokens; {len(queries)} queries "
          f"({', '.join(str(sum(t >= 0 for t in q.targets)) for q in queries)} completion tokens)", flush=True)

    def run(capture, batch):
        input_ids, mask, targets = batch
        capture.run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])

    # Pass 1: covariances (float32 sums, as fit-factors' default --stats-dtype).
    started = time.perf_counter()
    covariances = [CovarianceSums(layer.d_in_folded, layer.d_out, torch.float32, "cpu") for layer in layers]
    capture = Capture(model, layers, lambda i, a: covariances[i].add_activations(a),
                      lambda i, _, g: covariances[i].add_gradients(g))
    for batch in batches:
        run(capture, batch)
    print(f"- covariances: {time.perf_counter() - started:.0f} s", flush=True)

    # Eigenbases in float64 (one at a time); the float64 vectors wait on disk for the reference.
    started = time.perf_counter()
    bases32 = []
    for i, covariance in enumerate(covariances):
        pair = []
        for side, matrix in (("gradient", covariance.gradient), ("activation", covariance.activation)):
            _, vectors = symmetric_eigh(matrix)
            vectors_t = vectors.mT if vectors.mT.is_contiguous() else vectors.mT.contiguous()  # LAPACK's are column-major
            save_file({"vectors_t": vectors_t}, str(work / f"{i}-{side}.safetensors"))
            del vectors_t
            pair.append(vectors.float())
            del vectors
        bases32.append(tuple(pair))
        covariances[i] = None
    print(f"- eigendecompositions (float64): {time.perf_counter() - started:.0f} s, peak RSS {peak_rss_gib():.1f} GiB",
          flush=True)

    # Pass 2: Λ with the float32 bases, as fit-factors computes it.
    started = time.perf_counter()
    corrections = [CorrectionSums(qa, qs, l.d_in_folded, l.d_out, torch.float32, "cpu")
                   for (qs, qa), l in zip(bases32, layers)]
    capture = Capture(model, layers, lambda i, a: corrections[i].rotate_activations(a),
                      lambda i, kept, g: corrections[i].add_gradients(kept, g))
    for batch in batches:
        run(capture, batch)
    eigenvalues = [c.squares.div_(len(sequences)) for c in corrections]
    del corrections
    print(f"- eigenvalue correction: {time.perf_counter() - started:.0f} s", flush=True)

    # Pass 3: each query's dense gradient per layer, preconditioned three ways.
    started = time.perf_counter()
    errors: dict[tuple[int, float], list[tuple[float, float]]] = {}

    def relative(p, reference):
        return float(torch.linalg.norm(p.double() - reference) / torch.linalg.norm(reference))

    def compare(i, a, g):
        gradient = torch.bmm(g.mT, a)  # [1, d_out, d_in] float32, as query-gradients forms it
        qs32, qa32 = bases32[i]
        qs64 = load_file(str(work / f"{i}-gradient.safetensors"))["vectors_t"].mT
        qa64 = load_file(str(work / f"{i}-activation.safetensors"))["vectors_t"].mT
        rotated = qs64.T @ gradient.double() @ qa64
        for c in scales:
            damping = default_damping(eigenvalues[i], c)
            reference = qs64 @ (rotated / (eigenvalues[i].double() + damping)) @ qa64.T
            single = LayerCurvature(eigenvalues[i], qs32, qa32, damping).inverse_times(gradient)
            split = float("nan")
            if c == scales[0]:  # where the error comes from: the stored factors or the float32 arithmetic
                split = relative(LayerCurvature(eigenvalues[i].double(), qs32.double(), qa32.double(), damping)
                                 .inverse_times(gradient.double()), reference)
            errors.setdefault((i, c), []).append((relative(single, reference), split))
            del reference, single

    capture = Capture(model, layers, lambda i, a: a, compare)
    for query in queries:
        run(capture, collate([query], pad_id))
    print(f"- preconditioning {len(queries)} queries three ways: {time.perf_counter() - started:.0f} s, "
          f"peak RSS {peak_rss_gib():.1f} GiB")
    print()
    print("| layer | d_out × d_in | c | (max Λ + λ) / λ | Λ entries < λ | float32 (attrib) | float64 on float32 factors |")
    print("|---|---|---|---|---|---|---|")
    for (i, c), pairs in sorted(errors.items()):
        damping = default_damping(eigenvalues[i], c)
        spread = (float(eigenvalues[i].max()) + damping) / damping
        below = float((eigenvalues[i] < damping).double().mean())
        worst32, worst64 = max(p[0] for p in pairs), max(p[1] for p in pairs)
        split = "–" if worst64 != worst64 else f"{worst64:.1e}"
        print(f"| {layers[i].name} | {layers[i].d_out} × {layers[i].d_in_folded} | {c:g} | {spread:.2e} | {below:.2%} | "
              f"**{worst32:.1e}** | {split} |")
    print("\n(error: ‖P − P_ref‖_F / ‖P_ref‖_F, the worst of the queries; P_ref in float64 from float64 eigenvectors)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
