"""Two CPU processes (torchrun, gloo) give the results of one process (docs/design.md §4, §6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from attrib.storage import load_tensors
from tests.conftest import write_jsonl


def attrib_command(args, processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "attrib", "--quiet", *map(str, args)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                   "-m", "attrib", "--quiet", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, model_dirs, corpus_file):
    model = model_dirs["gpt2"]
    queries = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "q1", "prompt": "The capital of Vorlia", "completion": " is Quendar."},
        {"id": "q2", "prompt": "Rivers run", "completion": " to the sea"},
    ])
    results = {}
    for processes in (1, 2):
        factors, scores = tmp_path / f"factors{processes}", tmp_path / f"scores{processes}"
        fit = attrib_command(["fit-factors", "--model", model, "--corpus", corpus_file, "--out", factors,
                              "--max-length", "24", "--docs-per-part", "5", "--tokens-per-batch", "48"], processes)
        assert fit.returncode == 0, fit.stderr[-3000:]
        query = attrib_command(["query", "--model", model, "--factors", factors, "--queries", queries, "--corpus", corpus_file,
                                "--out", scores, "--max-length", "24", "--docs-per-part", "5", "--token-scores-top", "all",
                                # a budget that fits nothing: one query per batch (the ranks split them) and per pass
                                "--max-memory", "1MiB"], processes)
        assert query.returncode == 0, query.stderr[-3000:]
        results[processes] = (factors, scores)
    (one_factors, one_scores), (two_factors, two_scores) = results[1], results[2]
    # one query per batch: two parts, computed by rank 0 and rank 1
    assert sorted(p.name for p in (two_scores / "query-gradients").glob("query_gradients-*.safetensors")) == [
        "query_gradients-00000.safetensors", "query_gradients-00001.safetensors"]
    for name in ("covariance", "lambda"):
        one, two = load_tensors(one_factors / f"{name}.safetensors"), load_tensors(two_factors / f"{name}.safetensors")
        assert one.keys() == two.keys()
        for key in one:
            # float32 sums in another order differ by ~1e-7 relative
            assert torch.allclose(one[key], two[key], rtol=1e-5, atol=1e-6 * float(one[key].abs().max())), key
    one = pq.read_table(one_scores / "documents.parquet").to_pandas()
    two = pq.read_table(two_scores / "documents.parquet").to_pandas()
    assert list(one["doc_id"]) == list(two["doc_id"]) and list(one["rank"]) == list(two["rank"])
    assert ((one["score"] - two["score"]).abs() <= 1e-4 * one["score"].abs().max()).all()
    token_files = sorted(p.name for p in (two_scores / "tokens").glob("part-*.parquet"))
    assert any("-r001-" in name for name in token_files)  # rank 1 wrote its own parts
    assert pq.read_table(two_scores / "tokens").num_rows == pq.read_table(one_scores / "tokens").num_rows


@pytest.mark.slow
def test_two_processes_with_layer_groups_equal_one(tmp_path, model_dirs, corpus_file):
    """Two groups of layers, checkpoints after every part, eigendecompositions spread over the
    ranks (layer i on rank i mod 2): the factors equal one process's, and each eigenbasis is
    bit for bit what one process computes from the same covariance file."""
    from attrib.stages.fit import decompose_layer
    from attrib.models import find_tracked_layers, load_model

    outs = {}
    for processes in (1, 2):
        out = tmp_path / f"factors{processes}"
        fit = attrib_command(["fit-factors", "--model", model_dirs["gpt2"], "--corpus", corpus_file, "--out", out,
                              "--max-length", "24", "--docs-per-part", "3", "--tokens-per-batch", "48",
                              "--layers-per-pass", "3", "--checkpoint-every", "0"], processes)
        assert fit.returncode == 0, fit.stderr[-3000:]
        outs[processes] = out
    files = ["covariance-g000.safetensors", "covariance-g001.safetensors", "eigen-g000.safetensors",
             "eigen-g001.safetensors", "lambda-g000.safetensors", "lambda-g001.safetensors"]
    for out in outs.values():
        assert sorted(json.loads((out / "manifest.json").read_text())["files"]) == files
        assert not (out / "checkpoints").exists() and not (out / "eigen-parts").exists()
    for name in files:
        one, two = load_tensors(outs[1] / name), load_tensors(outs[2] / name)
        assert one.keys() == two.keys()
        for key in one:
            if key.endswith("eigenvectors"):
                continue  # bases of nearly equal eigenvalues may rotate; checked below against the same input
            assert torch.allclose(one[key], two[key], rtol=1e-4, atol=1e-5 * float(one[key].abs().max())), key
    model, _ = load_model(str(model_dirs["gpt2"]), "float32", "cpu")
    layers = find_tracked_layers(model)
    eigen = {**load_tensors(outs[2] / files[2]), **load_tensors(outs[2] / files[3])}
    for index, layer in enumerate(layers):
        decompose_layer(outs[2] / files[index // 3], layer, tmp_path / "again.safetensors", "cpu")
        for key, value in load_tensors(tmp_path / "again.safetensors").items():
            assert torch.equal(value, eigen[key]), key
