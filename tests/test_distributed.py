"""Two CPU processes (torchrun, gloo) give the results of one process (DESIGN.md §4, §6)."""

from __future__ import annotations

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
                                "--out", scores, "--max-length", "24", "--docs-per-part", "5", "--token-scores-top", "all"], processes)
        assert query.returncode == 0, query.stderr[-3000:]
        results[processes] = (factors, scores)
    (one_factors, one_scores), (two_factors, two_scores) = results[1], results[2]
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
