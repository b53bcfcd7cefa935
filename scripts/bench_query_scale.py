#!/usr/bin/env python
"""Benchmark the query path at scale (issue 12), against a plain forward+backward and against older code.

Rows (each optional, `--rows 1,2,3,4`):

1. corpus size does not matter, candidates do: `attrib query` (CLI, subprocess) with 1,000 candidate
   documents read from a large corpus (`--corpus-docs`, default 1,000,000) against the same run on a
   corpus holding only those 1,000 documents;
2. narrow model, many queries: a Llama of hidden 96 / MLP 256 with 40 queries; `Scorer.score` over
   every candidate batch at full rank and at rank 32 / a plain forward+backward of the same batches;
3. many queries: 1,000 queries × 10 candidate documents each (10,000 pairs) on the bench model
   (hidden 512, MLP 2048, 4 layers); `attrib query`'s scoring passes: time per scored candidate
   token / a plain forward+backward of those tokens, and peak RSS;
4. peak RSS of `attrib query-gradients` and `attrib query` (CLI, subprocess, rusage of the child)
   on one block of real 7B widths (hidden 4096, MLP 11008, vocab 1024, random init).

Every row runs once per code tree given with `--tree NAME=PATH` (default: this worktree as "after");
a tree's code is imported in a subprocess with PYTHONPATH=PATH, so `--tree before=/path/at/90848be`
measures today's code in the same run. Fixtures (models, factors, corpora, candidates, query factors)
are built once, with this worktree's code; formats both versions read.

Factors are *identity-basis* EK-FAC files (eigenvectors = I, Λ = 1, strategy "ekfac"): timing and
memory depend on the shapes only, and fitting three 11008 × 11008 eighs takes too long here. Query
factors for rows 2–3 are computed from 8 real queries and tiled (cost depends on shapes only).

    PYTHONPATH=. python scripts/bench_query_scale.py --tree after=. --tree before=../wt-before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

SCRIPT = Path(__file__).resolve()
DATE = "2026-11-29"


# --- helpers shared by the parent and the workers ------------------------------------------------


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def texts(num_docs: int, words: int, seed: int) -> list[str]:
    """Zipf-distributed invented words (as bench_corpus.synthetic_texts), vectorised for large corpora."""
    import numpy as np

    from bench_corpus import synthetic_texts

    lexicon = sorted(set(" ".join(synthetic_texts(40, 500, seed=99)).replace(".", "").lower().split()))
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    cumulative = np.cumsum(weights) / weights.sum()
    picks = np.searchsorted(cumulative, rng.random((num_docs, words)))
    words_array = np.array(lexicon, dtype=object)
    return [" ".join(words_array[row]).capitalize() + "." for row in picks]


def write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def plain_forward_backward(model, batches) -> float:
    """Seconds of forward + loss.backward() (every parameter requiring grad) over the collated batches."""
    from attrib.capture import summed_nll

    model.requires_grad_(True)
    started = time.perf_counter()
    for input_ids, mask, targets in batches:
        model.zero_grad(set_to_none=True)
        summed_nll(model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits, targets).backward()
    elapsed = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return elapsed


def load_gradients(path: str, query_ids: list[str], rank: int):
    """Query factors from a plain safetensors file (U/sigma/V per layer), truncated to `rank` (0 = as stored)."""
    from safetensors.torch import load_file

    from attrib.preconditioned_gradients import QueryGradients

    meta = json.loads(Path(path + ".json").read_text())
    tensors = load_file(path)
    index = [i % meta["queries"] for i in range(len(query_ids))]
    cut = (lambda t: t[..., :rank]) if rank else (lambda t: t)
    names = meta["layers"]

    def stacked(t):
        # [Q, d, r] as a view of a contiguous [d, Q, r]: the Scorer's permute + reshape is then a view, so
        # the harness and the scorer share one copy of the factors (Q = 1,000 at rank 32: 3.9 GB here).
        return cut(t[index]).permute(1, 0, 2).contiguous().permute(1, 0, 2)

    return QueryGradients(
        query_ids, names,
        [stacked(tensors[f"{n}.U"]) for n in names],
        [cut(tensors[f"{n}.sigma"][index]).contiguous() for n in names],
        [stacked(tensors[f"{n}.V"]) for n in names],
    )


# --- workers: run under PYTHONPATH=<tree> --------------------------------------------------------


def worker_narrow(spec: dict) -> dict:
    """Row 2: Scorer.score over every candidate batch, full rank and rank 32, against fwd+bwd."""
    from attrib.data import CorpusSpec, collate, iter_sequence_parts, pack_batches
    from attrib.models import find_tracked_layers, load_model
    from attrib.scoring import Scorer

    model, tokenizer = load_model(spec["model"], dtype="float32", device="cpu")
    layers = find_tracked_layers(model)
    pad_id = tokenizer.pad_token_id
    parts = iter_sequence_parts(CorpusSpec(spec["corpus"]), tokenizer, spec["max_length"], 100000)
    sequences = [seq for part in parts for _, seq in part.sequences]
    batches = [[sequences[i] for i in rows] for rows in pack_batches(sequences, spec["tokens_per_batch"])]
    collated = [collate(batch, pad_id) for batch in batches]
    query_ids = [f"q{i}" for i in range(spec["queries"])]
    plain_forward_backward(model, collated[:1])
    base = [plain_forward_backward(model, collated)]
    out = {"tokens": sum(len(s) for s in sequences), "sequences": len(sequences), "batches": len(batches), "rows": []}
    import inspect

    # since the cheaper contraction: document and layer scores alone (what `attrib query`'s first pass
    # computes) beside per-token scores; before it, only per-token scores existed
    paths = [True, False] if "tokens" in inspect.signature(Scorer.score).parameters else [True]
    for rank in spec["ranks"]:
        gradients = load_gradients(spec["gradients"], query_ids, rank)
        scorer = Scorer(model, layers, gradients, "cpu")
        for tokens in paths:
            options = {} if len(paths) == 1 else {"tokens": tokens}
            scorer.score(batches[0][:2], pad_id, "cpu", **options)  # warm-up
            reset_peak_rss()
            started = time.perf_counter()
            for batch in batches:
                scorer.score(batch, pad_id, "cpu", **options)
            seconds = time.perf_counter() - started
            out["rows"].append({"rank": rank, "effective": gradients.left[0].shape[-1], "seconds": seconds,
                                "rss": peak_rss_mib(), "scores": "per token" if tokens else "documents and layers"})
    base.append(plain_forward_backward(model, collated))
    out["fwd_bwd"] = base
    return out


class _ViewStore:
    """A QueryGradientStore stand-in over factors in memory: `load` hands out views, not copies."""

    def __init__(self, gradients):
        self.query_ids, self.layer_names = gradients.query_ids, gradients.layer_names
        self.gradients = gradients

    def load(self, layer_name: str, query_ids: list[str], device="cpu", dtype=None):
        index = self.layer_names.index(layer_name)
        g = self.gradients
        if query_ids != self.query_ids:
            rows = [self.query_ids.index(q) for q in query_ids]
            return g.left[index][rows], g.sigma[index][rows], g.right[index][rows]
        return g.left[index], g.sigma[index], g.right[index]


def worker_many(spec: dict) -> dict:
    """Row 3: score_corpus + finalize_scores of the candidate pairs; fwd+bwd of the scored tokens."""
    import shutil

    import pyarrow.parquet as pq

    from attrib.data import CorpusSpec, collate, iter_sequence_parts, pack_batches
    from attrib.distributed import World
    from attrib.models import find_tracked_layers, load_model, model_record
    import attrib.scoring as scoring
    from attrib.scoring import ScoreSettings
    from attrib.storage import StageDir

    model, tokenizer = load_model(spec["model"], dtype="float32", device="cpu")
    layers = find_tracked_layers(model)
    record = model_record(spec["model"], model, layers)
    query_ids = [f"q{i}" for i in range(spec["queries"])]
    gradients = load_gradients(spec["gradients"], query_ids, spec["rank"])
    import attrib

    # Probe the tree itself: the venv's editable install would resolve a module missing from an old tree
    # (attrib/candidates.py) to the main checkout.
    new = (Path(attrib.__file__).parent / "candidates.py").exists()
    if new:  # after 77111c6: an index of arrays over the query order
        from attrib.candidates import open_candidates

        candidates = open_candidates(spec["candidates"], query_ids)
    else:  # before: a Python object per pair
        from attrib.stages.prefilter import load_candidates
        from attrib.scoring import Candidates

        loaded = load_candidates(spec["candidates"])
        candidates = Candidates({q: {(c.doc_id, c.chunk): c.rank for c in items} for q, items in loaded.items()})
    settings = ScoreSettings(max_length=spec["max_length"], tokens_per_batch=spec["tokens_per_batch"])
    out_dir = Path(spec["out"])
    shutil.rmtree(out_dir, ignore_errors=True)
    stage = StageDir(out_dir, "query", {k: v for k, v in vars(settings).items()}, record, overwrite=True)
    reset_peak_rss()
    started = time.perf_counter()
    source = _ViewStore(gradients) if new else gradients  # after: read per pass as from a query-gradients store
    corpus = CorpusSpec(spec["corpus"], id_field="id")
    if hasattr(scoring, "score_documents_and_tokens"):  # what `attrib query` runs since its two passes
        _, counts, _ = scoring.score_documents_and_tokens(model, tokenizer, layers, source, corpus, stage, settings,
                                                          World(), candidates)
        result = {"counts": counts}
    else:
        scoring.score_corpus(model, tokenizer, layers, source, corpus, stage, settings, World(), candidates)
        result = scoring.finalize_scores(stage, query_ids, settings, candidates)
    seconds = time.perf_counter() - started
    rss = peak_rss_mib()
    rows = pq.read_table(stage.file("documents.parquet")).num_rows
    # The scored tokens: every candidate document once, in the same batch size.
    wanted = set(pq.read_table(Path(spec["candidates"]) / "candidates.parquet", columns=["doc_id"])["doc_id"].to_pylist())
    sequences = [seq for part in iter_sequence_parts(CorpusSpec(spec["corpus"], id_field="id"), tokenizer,
                                                     spec["max_length"], 100000)
                 for _, seq in part.sequences if seq.doc_id in wanted]
    collated = [collate([sequences[i] for i in rows_], tokenizer.pad_token_id)
                for rows_ in pack_batches(sequences, spec["tokens_per_batch"])]
    # Batches are alike (short documents, same batch size): time the first `fwd_bwd_fraction` of them.
    timed = collated[: max(1, round(len(collated) * spec.get("fwd_bwd_fraction", 1.0)))]
    plain_forward_backward(model, collated[:1])
    base = plain_forward_backward(model, timed)
    timed_tokens = sum(int(batch[1].sum()) for batch in timed)
    tokens = sum(len(s) for s in sequences)
    return {"seconds": seconds, "rss": rss, "rows": rows, "counts": result["counts"], "new": new,
            "tokens": tokens, "sequences": len(sequences), "fwd_bwd": base * tokens / timed_tokens,
            "fwd_bwd_measured": base, "fwd_bwd_tokens": timed_tokens}


def run_worker(tree: str, kind: str, spec: dict, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{tree}:{SCRIPT.parent}", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, str(SCRIPT), "--worker", kind, json.dumps(spec)], env=env,
                            capture_output=True, text=True, cwd=tree)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"rc {result.returncode}",
                "returncode": result.returncode}
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_tree(tree: str) -> None:
    """Refuse to measure a tree whose `attrib` is not the one imported (cwd, editable installs)."""
    env = {**os.environ, "PYTHONPATH": tree}
    found = subprocess.run([sys.executable, "-c", "import attrib, attrib.commands.stages as q; print(attrib.__file__, q.__file__)"],
                           env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.split()
    if not all(Path(f).resolve().is_relative_to(Path(tree).resolve()) for f in found):
        raise SystemExit(f"tree {tree} imports attrib from {found}")


def run_cli_rss(tree: str, args: list[str], threads: int, memory_limit: int | None = None,
                timeout: float | None = None) -> dict:
    """`python -m attrib ARGS` under PYTHONPATH=tree: wall s, exit code and the child's peak RSS (wait4).

    `memory_limit` caps the child's address space (RLIMIT_AS); after `timeout` seconds the child is
    killed and its peak RSS so far is reported (a lower bound).
    """
    import resource
    import signal
    import threading

    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def limit():
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    started = time.perf_counter()
    killed = []
    with open(os.devnull, "w") as devnull, tempfile.TemporaryFile("w+") as err:
        # cwd = the tree: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
        proc = subprocess.Popen([sys.executable, "-m", "attrib", *args], env=env, stdout=devnull, stderr=err,
                                preexec_fn=limit, cwd=tree)
        timer = None
        if timeout:
            def kill():
                killed.append(True)
                os.kill(proc.pid, signal.SIGKILL)

            timer = threading.Timer(timeout, kill)
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if timer is not None:
            timer.cancel()
        seconds = time.perf_counter() - started
        err.seek(0)
        tail = [line for line in err.read().splitlines() if line.strip()][-2:]
    return {"seconds": seconds, "returncode": proc.returncode, "rss": usage.ru_maxrss / 1024, "stderr": tail,
            "timed_out": bool(killed)}


# --- fixtures (this worktree's code) -------------------------------------------------------------


def build_model(directory: Path, hidden: int, intermediate: int, layers: int, heads: int, vocab: int,
                max_positions: int, dtype: str = "float32") -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attrib.synthetic import train_tokenizer

    train_tokenizer(texts(3000, 60, seed=1), vocab, directory)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.to(getattr(torch, dtype)).save_pretrained(directory)


def write_identity_factors(directory: Path, model_dir: Path, strategy: str = "ekfac") -> None:
    """A fit-factors directory with eigenvectors = I and Λ = 1 per tracked layer (strategy ekfac or diagonal)."""
    import torch

    from attrib.models import find_tracked_layers, load_model, model_record
    from attrib.storage import StageDir, save_tensors

    model, _ = load_model(str(model_dir), dtype="float32", device="cpu")
    layers = find_tracked_layers(model)
    record = model_record(str(model_dir), model, layers)
    del model
    stage = StageDir(directory, "fit-factors", {"strategy": strategy, "identity_basis_benchmark": True}, record,
                     overwrite=True)
    lambdas = {f"{l.name}.lambda": torch.ones(l.d_out, l.d_in_folded) for l in layers}
    save_tensors(stage.file("lambda.safetensors"), lambdas)
    files = ["lambda.safetensors"]
    if strategy == "ekfac":
        eigen = {}
        for layer in layers:
            eigen[f"{layer.name}.gradient_eigenvectors"] = torch.eye(layer.d_out)
            eigen[f"{layer.name}.activation_eigenvectors"] = torch.eye(layer.d_in_folded)
        save_tensors(stage.file("eigen.safetensors"), eigen)
        files.insert(0, "eigen.safetensors")
    stage.complete({"sequences": 0, "tokens": 0}, files)


def write_candidates(directory: Path, pairs: list[tuple[str, str]], query_ids: list[str]) -> None:
    """A prefilter directory holding `pairs` (query_id, doc_id), ranked in the given order per query."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attrib.storage import StageDir, atomic_path

    stage = StageDir(directory, "prefilter", {"benchmark": True}, None, {}, overwrite=True)
    rank: dict[str, int] = {}
    ranks = []
    for query_id, _ in pairs:
        rank[query_id] = rank.get(query_id, 0) + 1
        ranks.append(rank[query_id])
    table = pa.table({
        "query_id": pa.array([q for q, _ in pairs], pa.string()),
        "doc_id": pa.array([d for _, d in pairs], pa.string()),
        "chunk": pa.nulls(len(pairs), pa.int32()),
        "score": pa.array([1.0 / r for r in ranks], pa.float64()),
        "rank": pa.array(ranks, pa.int32()),
    })
    with atomic_path(stage.file("candidates.parquet")) as tmp:
        pq.write_table(table, tmp)
    stage.complete({"candidates": len(pairs), "queries": len(query_ids)}, ["candidates.parquet"], backend_used="benchmark",
                   query_ids=query_ids, queries_without_candidates=[])


def write_queries(path: Path, count: int, seed: int) -> list:
    from attrib.data import Query

    rows = texts(count, 24, seed)
    queries = [Query(f"q{i}", " ".join(t.split()[:16]), " " + " ".join(t.split()[16:])) for i, t in enumerate(rows)]
    write_jsonl(path, (q.as_row() for q in queries))
    return queries


def write_query_factors(path: Path, model_dir: Path, factors: Path, queries: list, rank: int, max_length: int) -> None:
    """Query factors of `queries` (this worktree's code) in a plain safetensors file + a JSON sidecar."""
    from attrib.curvature import Curvature
    from attrib.models import find_tracked_layers, load_model
    from attrib.preconditioned_gradients import compute_query_gradients
    from attrib.storage import save_tensors

    model, tokenizer = load_model(str(model_dir), dtype="float32", device="cpu")
    layers = find_tracked_layers(model)
    gradients = compute_query_gradients(model, tokenizer, layers, queries, Curvature(str(factors), layers), rank,
                                        max_length, 4096, "cpu")
    save_tensors(path, gradients.tensors())
    Path(str(path) + ".json").write_text(json.dumps({"queries": len(queries), "layers": gradients.layer_names}))


# --- rows ----------------------------------------------------------------------------------------


def row_corpus(args, work: Path, trees: dict[str, str]) -> list[str]:
    import numpy as np

    root = work / "row1"
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    build_model(model_dir, 128, 512, 2, 8, 2048, 128)
    write_identity_factors(root / "factors", model_dir)
    queries = write_queries(root / "queries.jsonl", 10, seed=5)
    query_ids = [q.query_id for q in queries]
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(args.corpus_docs, 1000, replace=False))
    chosen_set = set(chosen.tolist())
    block = 100_000
    with open(root / "large.jsonl", "w") as large, open(root / "small.jsonl", "w") as small:
        for first in range(0, args.corpus_docs, block):
            for offset, text in enumerate(texts(min(block, args.corpus_docs - first), args.words, seed=1000 + first)):
                line = json.dumps({"id": f"d{first + offset}", "text": text}) + "\n"
                large.write(line)
                if first + offset in chosen_set:
                    small.write(line)
    corpus_seconds = time.perf_counter() - started
    pairs = [(query_ids[i % len(query_ids)], f"d{doc}") for i, doc in enumerate(chosen.tolist())]
    pairs.sort(key=lambda p: query_ids.index(p[0]))
    write_candidates(root / "candidates", pairs, query_ids)
    size_mb = (root / "large.jsonl").stat().st_size / 1e6
    print(f"- row 1 fixtures: corpus of {args.corpus_docs} documents ({size_mb:.0f} MB JSONL, {args.words} words each) "
          f"written in {corpus_seconds:.0f} s", flush=True)
    results = {}
    variants = dict(trees)
    if "after" in trees and args.one_part:
        # Parts bounded by wanted documents instead of corpus documents, emulated with one part for the
        # whole corpus: the 1,000 candidates are batched together as in the small corpus.
        variants["after, one part"] = trees["after"]
    for name, tree in variants.items():
        for corpus in ("small", "large"):
            out = root / f"scores-{name.replace(', ', '-').replace(' ', '-')}-{corpus}"
            command = ["query", "--model", str(model_dir), "--factors", str(root / "factors"),
                       "--queries", str(root / "queries.jsonl"), "--corpus", str(root / f"{corpus}.jsonl"),
                       "--id-field", "id", "--candidates", str(root / "candidates"), "--out", str(out),
                       "--overwrite", "--max-length", "128"]
            if name.endswith("one part"):
                command += ["--docs-per-part", str(args.corpus_docs)]
            result = run_cli_rss(tree, command, args.threads)
            manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
            result["stage_seconds"] = manifest.get("timings", {}).get("total_seconds")
            result["rows"] = manifest.get("counts", {}).get("rows")
            results[(name, corpus)] = result
            print(f"  {name} {corpus}: {result['seconds']:.1f} s wall, stage {result['stage_seconds']} s, "
                  f"rc {result['returncode']}, rows {result['rows']}, peak RSS {result['rss']:.0f} MiB "
                  f"{result['stderr'] if result['returncode'] else ''}", flush=True)
    lines = [
        f"Row 1 — `attrib query --candidates` (1,000 candidate documents, 10 queries × 100) from a corpus of "
        f"{args.corpus_docs:,} documents vs. one of exactly those 1,000 (JSONL, {args.words} words ≈ "
        f"{round(args.words * 1.6)} tokens per document). Model: Llama hidden 128, MLP 512, 2 layers, vocab 2048, "
        f"identity-basis EK-FAC factors; {args.threads} thread(s); date {DATE}.",
        "",
        "| code | corpus documents | `attrib query` wall s | stage s (manifest) | peak RSS MiB | large / small (wall) | large / small (stage) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in variants:
        small, large = results[(name, "small")], results[(name, "large")]
        for corpus, r in (("small", small), ("large", large)):
            docs = 1000 if corpus == "small" else args.corpus_docs
            ratio = ratio_stage = ""
            if corpus == "large" and not r["returncode"] and not small["returncode"]:
                ratio = f"**{r['seconds'] / small['seconds']:.2f}×**"
                if r["stage_seconds"] and small["stage_seconds"]:
                    ratio_stage = f"{r['stage_seconds'] / small['stage_seconds']:.2f}×"
            lines.append(f"| {name} | {docs:,} | {r['seconds']:.1f} | {r['stage_seconds']} | {r['rss']:.0f} | {ratio} | "
                         f"{ratio_stage} |")
    return lines


def row_narrow(args, work: Path, trees: dict[str, str]) -> list[str]:
    root = work / "row2"
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    build_model(model_dir, 96, 256, 2, 6, 512, 128)
    write_identity_factors(root / "factors", model_dir)
    write_jsonl(root / "corpus.jsonl", ({"id": f"c{i}", "text": t} for i, t in enumerate(texts(args.narrow_docs, 60, 7))))
    queries = write_queries(root / "queries.jsonl", 40, seed=6)
    write_query_factors(root / "q.safetensors", model_dir, root / "factors", queries, 0, 128)
    spec = {"model": str(model_dir), "corpus": str(root / "corpus.jsonl"), "gradients": str(root / "q.safetensors"),
            "queries": 40, "ranks": [0, 32], "max_length": 128, "tokens_per_batch": 4096}
    lines = [
        f"Row 2 — `Scorer.score` over every candidate batch, 40 queries, against a plain forward+backward "
        f"(all parameters requiring grad) of the same batches (mean of one run before and one after). Model: "
        f"Llama hidden 96, MLP 256, 2 layers, 6 heads, vocab 512 (the demo's width); identity-basis EK-FAC; "
        f"{args.narrow_docs} synthetic documents of 60 words; {args.threads} thread(s); date {DATE}.",
        "",
        "| code | query rank | scores | candidate tokens | scoring s | fwd+bwd s | scoring / fwd+bwd | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, tree in trees.items():
        result = run_worker(tree, "narrow", spec, args.threads)
        if "error" in result:
            lines.append(f"| {name} | – | – | – | – | – | failed: {result['error']} | – |")
            continue
        base = sum(result["fwd_bwd"]) / 2
        for row in result["rows"]:
            rank = f"full ({row['effective']})" if row["rank"] == 0 else str(row["rank"])
            lines.append(f"| {name} | {rank} | {row.get('scores', 'per token')} | {result['tokens']} | "
                         f"{row['seconds']:.2f} | {base:.2f} | **{row['seconds'] / base:.2f}×** | {row['rss']:.0f} |")
        print("  " + lines[-1], flush=True)
    lines.append("")
    lines.append("kronfluence beside it: not measured in this run.")
    return lines


def row_many(args, work: Path, trees: dict[str, str]) -> list[str]:
    import numpy as np

    root = work / "row3"
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    build_model(model_dir, 512, 2048, 4, 8, 4096, 256)
    write_identity_factors(root / "factors", model_dir)
    docs = args.many_queries * 10
    write_jsonl(root / "corpus.jsonl", ({"id": f"c{i}", "text": t} for i, t in enumerate(texts(docs, args.many_words, 8))))
    real = write_queries(root / "queries.jsonl", 8, seed=9)
    write_query_factors(root / "q.safetensors", model_dir, root / "factors", real, 32, 256)
    query_ids = [f"q{i}" for i in range(args.many_queries)]
    rng = np.random.default_rng(1)
    order = rng.permutation(docs)  # each query's 10 candidates: distinct documents spread over the corpus
    pairs = [(query_ids[i // 10], f"c{order[i]}") for i in range(docs)]
    write_candidates(root / "candidates", pairs, query_ids)
    subset_queries = max(1, args.many_before_queries)
    write_candidates(root / "candidates-subset", pairs[: subset_queries * 10], query_ids)
    lines = [
        f"Row 3 — {args.many_queries:,} queries × 10 candidates each (distinct documents, {docs:,} pairs) on the bench "
        f"model (Llama hidden 512, MLP 2048, 4 layers, vocab 4096); rank 32 (query factors of 8 real queries, tiled); "
        f"`score_corpus` + `finalize_scores` in one process, then a plain forward+backward of the candidate "
        f"documents' tokens in the same batch size ({args.many_tpb} tokens; timed on the first "
        f"{args.many_fwd_bwd_fraction:.0%} of the batches, scaled per token); {args.threads} thread(s); date {DATE}.",
        "",
        "| code | pairs scored | candidate tokens | scoring s | fwd+bwd s | per token: scoring / fwd+bwd | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tree in trees.items():
        subset = name != "after" and args.many_before_queries < args.many_queries
        spec = {"model": str(model_dir), "corpus": str(root / "corpus.jsonl"), "gradients": str(root / "q.safetensors"),
                "queries": args.many_queries, "rank": 32, "max_length": 256, "tokens_per_batch": args.many_tpb,
                "candidates": str(root / ("candidates-subset" if subset else "candidates")),
                "out": str(root / f"scores-{name}"),
                "fwd_bwd_fraction": args.many_fwd_bwd_fraction}
        result = run_worker(tree, "many", spec, args.threads)
        if "error" in result:
            lines.append(f"| {name} | – | – | – | – | failed: {result['error']} | – |")
            continue
        pairs_scored = result["rows"]
        lines.append(f"| {name} | {pairs_scored:,}{' (first ' + str(subset_queries) + ' queries’ candidates, all ' + str(args.many_queries) + ' queries loaded)' if subset else ''} | "
                     f"{result['tokens']:,} | {result['seconds']:.1f} | {result['fwd_bwd']:.1f} | "
                     f"**{result['seconds'] / result['fwd_bwd']:.2f}×** | {result['rss']:.0f} |")
        print("  " + lines[-1], flush=True)
    return lines


def _status(result: dict) -> str:
    if result["timed_out"]:
        return f"stopped after {result['seconds']:.0f} s (peak so far: a lower bound)"
    if result["returncode"] == 0:
        return "ok"
    return f"failed (exit {result['returncode']}: {' '.join(result['stderr'])[-200:]})"


def row_7b(args, work: Path, trees: dict[str, str]) -> list[str]:
    root = work / "row4"
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        build_model(model_dir, 4096, 11008, 1, 32, 1024, 512)
    runs = [("diagonal", args.big_queries), ("ekfac", args.big_ekfac_queries)]
    for strategy, count in runs:
        if count and not (root / f"factors-{strategy}" / "manifest.json").exists():
            write_identity_factors(root / f"factors-{strategy}", model_dir, strategy)
        write_queries(root / f"queries-{count}.jsonl", count, seed=11)
    write_jsonl(root / "corpus.jsonl", ({"id": f"c{i}", "text": t} for i, t in enumerate(texts(16, 60, 12))))
    limit = int(args.memory_limit_gib * 2**30)
    lines = [
        f"Row 4 — peak RSS of the query stages (CLI subprocess, `wait4` rusage of the child) on one block of 7B "
        f"widths: Llama hidden 4096, MLP 11008, 1 layer, 32 heads, vocab 1024, random init, float32 "
        f"(210M params, 3 tracked layers of 45M); factors are identity-basis files written by the script, no fit "
        f"(`diagonal`: Λ = 1 only; `ekfac`: eigenvectors = I and Λ = 1, so the 11008 × 11008 rotations are "
        f"computed at full cost); query rank 32; `attrib query --query-gradients` scores 16 documents of 60 words; "
        f"each process capped at {args.memory_limit_gib:g} GiB of address space (RLIMIT_AS) and "
        f"{args.big_timeout} s, to protect this shared 23 GiB machine; {args.threads} thread(s); date {DATE}.",
        "",
        "| code | factors | queries | stage | wall s | peak RSS MiB | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, tree in trees.items():
        for strategy, count in runs:
            if not count:
                continue
            factors = root / f"factors-{strategy}"
            grads = root / f"qg-{name}-{strategy}"
            result = run_cli_rss(tree, ["query-gradients", "--model", str(model_dir), "--factors", str(factors),
                                        "--queries", str(root / f"queries-{count}.jsonl"), "--out", str(grads),
                                        "--overwrite", "--max-length", "128"], args.threads, limit, args.big_timeout)
            lines.append(f"| {name} | {strategy} (identity basis) | {count} | query-gradients | {result['seconds']:.0f} | "
                         f"{result['rss']:.0f} | {_status(result)} |")
            print("  " + lines[-1], flush=True)
            if result["returncode"] == 0:
                result = run_cli_rss(tree, ["query", "--model", str(model_dir), "--factors", str(factors),
                                            "--query-gradients", str(grads), "--corpus", str(root / "corpus.jsonl"),
                                            "--out", str(root / f"scores-{name}-{strategy}"), "--overwrite",
                                            "--max-length", "128"], args.threads, limit, args.big_timeout)
                lines.append(f"| {name} | {strategy} (identity basis) | {count} | query (scoring) | "
                             f"{result['seconds']:.0f} | {result['rss']:.0f} | {_status(result)} |")
                print("  " + lines[-1], flush=True)
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(SCRIPT.parent))
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = {"narrow": worker_narrow, "many": worker_many}[sys.argv[2]](json.loads(sys.argv[3]))
        print(json.dumps(result, default=float))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,2,3,4")
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a code tree (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", help="fixture directory (default: a new temporary one)")
    parser.add_argument("--corpus-docs", type=int, default=1_000_000)
    parser.add_argument("--words", type=int, default=24)
    parser.add_argument("--one-part", action=argparse.BooleanOptionalAction, default=True,
                        help="row 1: also run 'after' with --docs-per-part = corpus size")
    parser.add_argument("--narrow-docs", type=int, default=200)
    parser.add_argument("--many-queries", type=int, default=1000)
    parser.add_argument("--many-words", type=int, default=8)
    parser.add_argument("--many-tpb", type=int, default=2048)
    parser.add_argument("--many-fwd-bwd-fraction", type=float, default=0.25,
                        help="time the plain forward+backward on this fraction of the candidate batches (per token)")
    parser.add_argument("--many-before-queries", type=int, default=20,
                        help="trees other than 'after' score only the first N queries' candidates (all queries loaded)")
    parser.add_argument("--big-queries", type=int, default=16)
    parser.add_argument("--big-ekfac-queries", type=int, default=2,
                        help="queries for the identity-basis ekfac run (each costs ≈ 1.4 TFLOP per layer; 0 = skip)")
    parser.add_argument("--big-timeout", type=int, default=300, help="seconds per row-4 command before it is killed")
    parser.add_argument("--memory-limit-gib", type=float, default=16)
    parser.add_argument("--out", help="also write the tables here (markdown)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    trees = dict(item.split("=", 1) for item in args.tree) or {"after": str(SCRIPT.parent.parent)}
    trees = {name: str(Path(path).resolve()) for name, path in trees.items()}
    for tree in trees.values():
        check_tree(tree)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-query-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"# bench_query_scale  torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} thread(s); "
          f"trees {trees}; work {work}", flush=True)
    rows = {"1": row_corpus, "2": row_narrow, "3": row_many, "4": row_7b}
    output = []
    for row in args.rows.split(","):
        started = time.perf_counter()
        lines = rows[row](args, work, trees)
        lines.append("")
        lines.append(f"(row {row}: {time.perf_counter() - started:.0f} s in all; load average "
                     f"{os.getloadavg()[0]:.1f})")
        print("\n" + "\n".join(lines) + "\n", flush=True)
        output += lines + [""]
        if args.out:
            Path(args.out).write_text("\n".join(output))


if __name__ == "__main__":
    main()
