"""attrib.memory's predictions against measured peaks; `attrib inspect` without weights (docs/design.md §3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attrib import memory
from tests.conftest import run_cli, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def test_inspect_needs_only_the_config(tmp_path, capsys, tokenizer):
    """A directory with config.json and the tokenizer (no weights) is enough to size a run."""
    from transformers import LlamaConfig

    directory = tmp_path / "config-only"
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert not list(directory.glob("*.safetensors"))
    code, out, err = run_cli(capsys, "inspect", "--model", directory, "--max-memory", "80GiB", "--tokens-per-batch", "8192")
    assert code == 0, err
    assert "model.layers.31.mlp.down_proj" in out and "model parameters: 6,738,415,616" in out
    assert "predicted peak memory" in out and "--max-memory 80GiB: fit-factors --layers-per-pass" in out
    # the index at 7B widths (96 layers): by default a 128 × 128 Kronecker projection per layer, in bfloat16
    assert "index (kronecker 128x128 or the layer's width, bfloat16): 3,072.0 KiB per sequence; 10,000,000 " \
           "sequences: 28.61 TiB" in out and "query --index" in out
    code, out, err = run_cli(capsys, "inspect", "--model", directory, "--representation", "lowrank")
    assert code == 0, err  # rank 8 stores 8 × (4096 + 11008) values per layer and sequence
    assert "index (lowrank rank 8, bfloat16): 22,656.0 KiB per sequence; 10,000,000 sequences: 211.00 TiB" in out
    code, out, err = run_cli(capsys, "inspect", "--model", directory, "--representation", "kronecker", "--dims", "32",
                             "--sequences", "1000000")
    assert code == 0, err
    assert "index (kronecker 32x32, bfloat16): 192.0 KiB per sequence; 1,000,000 sequences: 0.18 TiB" in out
    code, _, err = run_cli(capsys, "inspect", "--model", directory, "--representation", "sketch")
    assert code == 2 and err.startswith("error: --representation")
    code, out, err = run_cli(capsys, "inspect", "--model", directory, "--max-memory", "1GiB", "--device", "cpu")
    assert code == 0 and "does not fit" in out
    code, _, err = run_cli(capsys, "inspect", "--model", directory, "--max-memory", "lots")
    assert code == 2 and err.startswith("error: --max-memory")


def test_more_layers_per_pass_never_need_less_memory():
    """The model's peak grows with the group, and --max-memory picks the largest group that fits."""
    model = memory.ModelShape(parameters=6_738_415_616, hidden=4096, intermediate=11008, blocks=32, vocab=32000)
    layers = [memory.LayerShape(f"l{i}", *(4096, 11008) if i % 3 < 2 else (11008, 4096)) for i in range(96)]

    def predict(layers_per_pass):
        return memory.fit_factors(model, layers, tokens_per_batch=4096, dtype="bfloat16", device="cuda",
                                  layers_per_pass=layers_per_pass)

    peaks = [predict(n).device for n in (1, 3, 12, 48, None)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    budget = (predict(12).device + predict(13).device) // 2
    assert memory.choose_layers_per_pass(budget, predict, 96, "cuda") == 12
    assert memory.choose_layers_per_pass(10**15, predict, 96, "cuda") is None
    with pytest.raises(ValueError):
        memory.choose_layers_per_pass(10**9, predict, 96, "cuda")


def test_fit_factors_max_memory_chooses_the_groups(tmp_path, capsys, model_dirs, corpus_file):
    base = ["fit-factors", "--model", model_dirs["gpt2"], "--corpus", corpus_file, "--max-length", "24", "--quiet"]
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "tiny", "--max-memory", "1MiB")
    assert code == 2 and err.startswith("error: --max-memory") and err.count("\n") == 1
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "both", "--max-memory", "1GiB", "--layers-per-pass", "1")
    assert code == 2 and "not both" in err
    code, _, err = run_cli(capsys, *base, "--out", tmp_path / "fits", "--max-memory", "64GiB")
    assert code == 0, err
    manifest = json.loads((tmp_path / "fits" / "manifest.json").read_text())
    assert manifest["settings"]["layers_per_pass"] is None and manifest["files"][0] == "covariance.safetensors"


def probe(model_dir, corpus, out, step, layers_per_pass, tokens) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "tests.memory_probe", str(model_dir), str(corpus), str(out), step,
                             str(layers_per_pass), str(tokens)], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_seven_billion_wide_block_stays_within_the_predicted_peak(tmp_path, tokenizer):
    """One Llama block of real 7B widths (hidden 4096, MLP 11008; vocabulary 320, random init,
    float32, CPU): the covariance pass of fit-factors, and a whole diagonal fit, each in a fresh
    process, peak (VmHWM) below what attrib.memory predicts for that step, and
    `--layers-per-pass 1` peaks ≥ 0.6 GiB below one pass over all three layers: the two other
    layers' sums take 0.97 GiB (gate and up share one 4096² A in one pass), and the allocator keeps
    0.15-0.3 GiB of slack that differs between the runs (measured: 0.81 GiB apart).

    Why not the whole EK-FAC fit: its eigendecomposition step solves three 11008 × 11008 float64
    eigenproblems, about 5 minutes each on one core of the CI machine (4096: 16 s measured; 11008
    scales by (11008/4096)³), beyond CI's 15 minutes. The steps here hold every large buffer of
    the fit except the eigensolver's (covariance sums, Λ sums, the per-sequence gradients); the
    eigendecomposition step's prediction is checked by scripts/bench_fit.py --seven-b-block
    (docs/benchmarks.md).
    """
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_dir = tmp_path / "llama-7b-block"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = "The capital of Vorlia is Quendar. Rivers run to the sea and the sea does not fill. " * 4
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": text} for _ in range(4)])
    results = {}
    for step, layers_per_pass in (("covariance", "all"), ("covariance", 1), ("correction", "all")):
        results[step, layers_per_pass] = result = probe(model_dir, corpus, tmp_path / f"out-{step}-{layers_per_pass}",
                                                        step, layers_per_pass, 64)
        print(step, layers_per_pass, f"peak {result['peak_rss'] / 2**30:.2f} GiB, predicted {result['predicted_host'] / 2**30:.2f} GiB")
        assert result["peak_rss"] <= result["predicted_host"], result
    whole, single = results["covariance", "all"]["peak_rss"], results["covariance", 1]["peak_rss"]
    assert whole - single >= 0.6 * 2**30, (whole, single)


def _ekfac_model(root: Path, tokenizer, hidden: int, intermediate: int):
    """A two-block Llama of the given widths beside EK-FAC factors whose bases are signed permutations (orthogonal,
    dense, free to build: the stages' memory does not depend on the values), 4 queries and an 8-document corpus;
    returns the directory and the shapes attrib.memory predicts from."""
    import torch

    from attrib.models import model_record
    from attrib.storage import StageDir, save_tensors
    from tests.memory_probe import saved_llama, write_query_inputs

    model, _, layers = saved_llama(root, tokenizer, hidden=hidden, intermediate=intermediate, blocks=2, heads=16,
                                   context=64)

    def basis(size):
        return torch.eye(size)[torch.randperm(size)] * (torch.randint(0, 2, (size, 1)) * 2 - 1)

    stage = StageDir(root / "factors", "fit-factors", {"strategy": "ekfac"}, model_record("m", model, layers))
    save_tensors(stage.file("eigen.safetensors"), {
        key: basis(size) for l in layers
        for key, size in ((f"{l.name}.gradient_eigenvectors", l.d_out), (f"{l.name}.activation_eigenvectors", l.d_in_folded))})
    save_tensors(stage.file("lambda.safetensors"),
                 {f"{l.name}.lambda": torch.rand(l.d_out, l.d_in_folded) + 0.5 for l in layers})
    stage.complete({}, ["eigen.safetensors", "lambda.safetensors"])
    write_query_inputs(root, 4)
    from attrib import memory

    return root, (memory.model_shape(model), memory.layer_shapes(layers))


def _start(args) -> subprocess.Popen:
    """`attrib ARGS` in a fresh process that prints its own peak RSS (VmHWM: see tests/memory_probe.py). glibc's
    mmap threshold is fixed at its initial 128 KiB, so that freed large tensors go back to the system rather than
    stay in the heap when the dynamic threshold has grown past them: the peak is then what was alive together."""
    from tests.memory_probe import PEAK_RSS_CODE

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", PEAK_RSS_CODE, "--quiet", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def _peak(process: subprocess.Popen) -> int:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-2000:]
    return int(out.strip().splitlines()[-1]) * 1024


@pytest.mark.slow
def test_ekfac_query_stages_and_self_influence_track_their_predicted_peaks(tmp_path, tokenizer):
    """query-gradients, query and self-influence with EK-FAC factors, each run on a two-block Llama of hidden 1024 /
    MLP 2816 (factors 0.27 GiB, dense query gradients 44 MiB per layer for 4 queries) and of hidden 64 / MLP 128,
    in fresh processes side by side. The tiny model's peak is the process (torch, kernels paged in, allocator);
    the difference of the two peaks is what grows with the model, and is compared with the difference of the
    predicted device terms (`attrib inspect`; on the CPU host = device + PROCESS_HOST):

    * both peaks ≤ the predicted host peak (the contract);
    * the process: the tiny peaks (measured 0.40–0.50 GiB) ≤ PROCESS_HOST (1 GiB);
    * what grows: predicted / measured within [0.8, 1.25] (measured: query-gradients 1.02, query 0.96,
      self-influence 1.14). A term counted for one layer that the stage holds for every layer, or one counted
      twice, falls outside: query counted one layer's dense P_q while scoring keeps every layer's that fits
      DENSE_BYTES, 0.49 before attrib.memory.dense_query_bytes.

    With glibc's default (dynamic) mmap threshold the same runs peak higher, by what the heap keeps of freed
    tensors: query-gradients 808 MiB instead of 757 (0.89), and with 2 queries 873 MiB instead of 691 (0.56),
    which attrib.memory does not model; at these widths PROCESS_HOST covers it. About 50 CPU seconds (six fresh
    processes, two at a time).
    """
    from attrib import memory

    built = {"wide": _ekfac_model(tmp_path / "wide", tokenizer, 1024, 2816),
             "tiny": _ekfac_model(tmp_path / "tiny", tokenizer, 64, 128)}
    models = {size: root for size, (root, _) in built.items()}
    settings = dict(tokens_per_batch=256, dtype="float32")

    def common(root):
        return ["--model", root / "model", "--factors", root / "factors", "--max-length", 32, "--tokens-per-batch", 256]

    def run(stage, extra):
        processes = {size: _start([stage, *common(root), *extra(root), "--out", root / stage])
                     for size, root in models.items()}
        return {size: _peak(process) for size, process in processes.items()}

    measured = {
        "query-gradients": run("query-gradients", lambda root: ["--queries", root / "queries.jsonl"]),
        "query": run("query", lambda root: ["--query-gradients", root / "query-gradients", "--corpus",
                                            root / "corpus.jsonl", "--docs-per-part", 4]),
        "self-influence": run("self-influence", lambda root: ["--corpus", root / "corpus.jsonl", "--docs-per-part", 4]),
    }
    predict = {
        "query-gradients": lambda shape, layers: memory.query_gradients(shape, layers, rank=32, queries_per_batch=4,
                                                                        max_length=32, rotates=True, **settings),
        "query": lambda shape, layers: memory.query(shape, layers, rank=32, queries_per_pass=4, docs_per_part=4,
                                                    max_length=32, **settings),
        "self-influence": lambda shape, layers: memory.self_influence(shape, layers, rotates=True, **settings),
    }
    report = {}
    for stage, peaks in measured.items():
        predicted = {size: predict[stage](*shapes) for size, (_, shapes) in built.items()}
        grows = (predicted["wide"].device - predicted["tiny"].device) / (peaks["wide"] - peaks["tiny"])
        report[stage] = {"peaks_mib": {s: p / 2**20 for s, p in peaks.items()},
                         "predicted_host_mib": {s: p.host / 2**20 for s, p in predicted.items()}, "grows": grows}
        print(stage, json.dumps(report[stage]))
        for size in models:
            assert peaks[size] <= predicted[size].host, (stage, size, report[stage])
        assert peaks["tiny"] <= memory.PROCESS_HOST["cpu"], (stage, report[stage])
        assert 0.8 <= grows <= 1.25, (stage, report[stage], predicted["wide"].terms)
