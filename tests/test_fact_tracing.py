"""Fact tracing on the demo's trained model: the planted document ranks at the top (docs/design.md §6)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_cli


@pytest.fixture(scope="module")
def demo():
    from attrib.synthetic import cached_demo

    return cached_demo("tiny")


def recall_and_mrr(scores_dir, queries_file, k=10):
    truth = {}
    for line in open(queries_file, encoding="utf-8"):
        row = json.loads(line)
        truth[row["id"]] = row["source_doc"]
    table = pq.read_table(scores_dir / "documents.parquet").to_pandas()
    planted = table[[truth[q] == d for q, d in zip(table["query_id"], table["doc_id"])]]
    assert len(planted) == len(truth)
    return float((planted["rank"] <= k).mean()), float((1 / planted["rank"]).mean())


@pytest.mark.slow
@pytest.mark.parametrize("strategy, bound", [("ekfac", 0.9), ("identity", 0.8)])
def test_planted_documents_rank_in_the_top_10(tmp_path, capsys, demo, strategy, bound):
    """Measured on the tiny demo (40 facts, 190 documents): recall@10 = 1.0 for both; MRR 1.0 (ekfac), 0.97 (identity)."""
    corpus = ["--corpus", demo.corpus, "--id-field", "id"]
    code, _, err = run_cli(capsys, "--quiet", "fit-factors", "--model", demo.llama, *corpus,
                           "--out", tmp_path / "factors", "--strategy", strategy)
    assert code == 0, err
    code, _, err = run_cli(capsys, "--quiet", "query", "--model", demo.llama, "--factors", tmp_path / "factors",
                           "--queries", demo.queries, *corpus, "--out", tmp_path / "scores", "--token-scores-top", "1")
    assert code == 0, err
    recall, mrr = recall_and_mrr(tmp_path / "scores", demo.queries)
    print(f"{strategy}: recall@10 {recall:.2f}, MRR {mrr:.2f}")
    assert recall >= bound, (recall, mrr)
