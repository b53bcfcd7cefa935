"""`attrib combine` against a dense float64 oracle on two checkpoints, its invariants and hostile inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import attrib
from attrib.curvature import load_curvature
from attrib.models import find_tracked_layers, load_model
from attrib.stages import combine as combine_stage
from tests.conftest import TEXTS, run_cli, write_jsonl
from tests.test_query import QUERIES, oracle_scores

LEARNING_RATES = {"ckpt-10": 3e-3, "ckpt-20": 1e-3}
SCORE_OPTIONS = {"max_length": 24, "damping_scale": 0.1, "query_rank": 0, "keep_all_scores": True,
                 "token_scores_top": "all", "docs_per_part": 5}


def trainer_state(directory, step: int, learning_rate: float) -> None:
    """A Hugging Face Trainer's trainer_state.json as it lies in a checkpoint-N folder."""
    history = [{"step": s, "learning_rate": learning_rate * (1 + (step - s) / 10), "loss": 1.0} for s in (5, step)]
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))


def float64_model(directory):
    model, tokenizer = load_model(str(directory), "float32", "cpu")
    return model.double(), tokenizer


def score(model, tokenizer, root, name: str, corpus, queries, **changes):
    """fit-factors and query through the API on a float64 model: an ordinary scores directory."""
    factors = attrib.fit_factors(model, corpus, root / f"{name}-factors", tokenizer=tokenizer, stats_dtype="float64",
                                 max_length=24)
    options = {**SCORE_OPTIONS, **changes}
    return attrib.query(model, factors, queries, corpus, root / name, tokenizer=tokenizer, **options)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model_dirs):
    """Two checkpoints (the tiny Llama and a copy with perturbed weights), each scored, and their oracles."""
    root = tmp_path_factory.mktemp("combine")
    corpus = write_jsonl(root / "corpus.jsonl",
                         [{"id": f"doc{i}", "text": " ".join(TEXTS[i % 5 : i % 5 + 1 + i % 3])} for i in range(12)])
    queries = write_jsonl(root / "queries.jsonl", [q.as_row() for q in QUERIES])
    runs = {}
    for step, name in enumerate(LEARNING_RATES, start=1):
        directory = root / name
        shutil.copytree(model_dirs["llama"], directory)
        model, tokenizer = float64_model(directory)
        if step == 2:
            torch.manual_seed(1)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.3 * parameter.std() * torch.randn_like(parameter))
            model.float().save_pretrained(directory)
            model, tokenizer = float64_model(directory)
        trainer_state(directory, 10 * step, LEARNING_RATES[name])
        scores = score(model, tokenizer, root, f"{name}-scores", corpus, queries)
        layers = find_tracked_layers(model)
        curvature = load_curvature(str(root / f"{name}-scores-factors"), layers, None, damping_scale=0.1)
        runs[name] = {"scores": scores.out, "model": model, "tokenizer": tokenizer,
                      "oracle": oracle_scores(model, tokenizer, layers, curvature, corpus)}
    return {"root": root, "corpus": corpus, "queries": queries, "runs": runs}


def documents(path):
    return pq.read_table(path / "documents.parquet").to_pandas().sort_values(["query_id", "rank"], ignore_index=True)


def tokens(path):
    return pq.read_table(path / "tokens").to_pandas().sort_values(["query_id", "doc_id", "chunk"], ignore_index=True)


def test_one_input_gives_back_its_scores(tmp_path, checkpoints):
    source = checkpoints["runs"]["ckpt-10"]["scores"]
    result = attrib.combine([source], tmp_path / "one")
    assert result.stage == "query" and result.manifest["combine"][0]["weight"] == 1.0
    mine, theirs = documents(tmp_path / "one"), documents(source)
    assert mine[["query_id", "doc_id", "rank"]].equals(theirs[["query_id", "doc_id", "rank"]])
    assert (mine["score"] == theirs["score"]).all()
    assert all(np.array_equal(a, b) for a, b in zip(mine["layer_scores"], theirs["layer_scores"]))
    mine_tokens, their_tokens = tokens(tmp_path / "one"), tokens(source)
    assert all(np.array_equal(a, b) for a, b in zip(mine_tokens["token_scores"], their_tokens["token_scores"]))
    summary = pq.read_table(tmp_path / "one" / "summary.parquet").to_pandas()
    expected = pq.read_table(source / "summary.parquet").to_pandas()
    assert summary["documents"].tolist() == expected["documents"].tolist()
    assert np.allclose(summary[["mean", "std", "positive_sum"]], expected[["mean", "std", "positive_sum"]], rtol=1e-9)


@pytest.mark.parametrize("weights, expected", [("equal", (0.5, 0.5)), ("lr", (0.75, 0.25)), ("1,3", (0.25, 0.75)),
                                              ([1, 3], (0.25, 0.75))],
                         ids=["equal", "lr-from-trainer-state", "given", "given-as-a-list"])
def test_weights_applied_as_stated_against_dense_oracle(tmp_path, checkpoints, weights, expected):
    """Combined score = Σ_c w_c I_c with I_c the dense float64 EK-FAC oracle of checkpoint c."""
    runs = checkpoints["runs"]
    result = attrib.combine([runs["ckpt-10"]["scores"], runs["ckpt-20"]["scores"]], tmp_path / "c", weights=weights)
    assert [r["weight"] for r in result.manifest["combine"]] == pytest.approx(expected, rel=1e-12)
    oracle = {key: sum(w * runs[name]["oracle"][key] for w, name in zip(expected, runs))
              for key in runs["ckpt-10"]["oracle"]}
    scale = max(abs(v) for v in oracle.values())
    table = documents(tmp_path / "c")
    assert len(table) == len(oracle)
    for row in table.itertuples():  # eigenvectors are stored in float32: agreement to 1e-8 of the largest score
        assert row.score == pytest.approx(oracle[(row.query_id, row.doc_id)], rel=1e-6, abs=1e-8 * scale)
    for query_id, mine in table.groupby("query_id"):
        assert mine["rank"].tolist() == list(range(1, len(mine) + 1)) and mine["score"].is_monotonic_decreasing


def test_order_of_inputs_does_not_matter(tmp_path, checkpoints):
    a, b = (checkpoints["runs"][name]["scores"] for name in LEARNING_RATES)
    attrib.combine([a, b], tmp_path / "ab", weights="1,3")
    attrib.combine([b, a], tmp_path / "ba", weights="3,1")
    for name in ("documents.parquet", "summary.parquet", "tokens"):
        assert pq.read_table(tmp_path / "ab" / name).equals(pq.read_table(tmp_path / "ba" / name)), name


def test_token_and_layer_scores_still_sum_to_document_scores(tmp_path, checkpoints):
    runs = checkpoints["runs"]
    attrib.combine([runs[name]["scores"] for name in runs], tmp_path / "c", weights="lr")
    table = documents(tmp_path / "c").set_index(["query_id", "doc_id"])
    token_sums = tokens(tmp_path / "c").groupby(["query_id", "doc_id"])["token_scores"].apply(
        lambda rows: sum(float(np.sum(r, dtype=np.float64)) for r in rows))
    assert len(token_sums) == len(table)
    scale = table["score"].abs().max()
    for key, row in table.iterrows():
        assert sum(row["layer_scores"]) == pytest.approx(row["score"], rel=1e-9, abs=1e-12 * scale)
        assert token_sums[key] == pytest.approx(row["score"], rel=1e-5, abs=1e-6 * scale)  # tokens are float32


def test_cli_combine_then_top_and_report(tmp_path, capsys, checkpoints):
    a, b = (checkpoints["runs"][name]["scores"] for name in LEARNING_RATES)
    code, _, err = run_cli(capsys, "--quiet", "combine", a, b, "--out", tmp_path / "c", "--weights", "lr")
    assert code == 0, err
    code, out, err = run_cli(capsys, "top", tmp_path / "c", "--format", "csv", "--top-k", "2")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1 + 2 * len(QUERIES)
    code, _, err = run_cli(capsys, "--quiet", "report", tmp_path / "c", "--out", tmp_path / "r.html")
    assert code == 0 and (tmp_path / "r.html").stat().st_size > 0, err
    # a finished run is left as it is; other weights into the same --out are refused
    code, _, err = run_cli(capsys, "--quiet", "combine", a, b, "--out", tmp_path / "c", "--weights", "lr")
    assert code == 0, err
    code, _, err = run_cli(capsys, "combine", a, b, "--out", tmp_path / "c")
    assert code == 2 and "other settings" in err and "--overwrite" in err


@pytest.fixture(scope="module")
def index_scores(checkpoints):
    """Each checkpoint's own index (over its own factors) of the same corpus, scored for the same queries."""
    root, made = checkpoints["root"], {}
    for name in LEARNING_RATES:
        model = str(root / name)
        index = attrib.index(model, root / f"{name}-scores-factors", checkpoints["corpus"], root / f"{name}-index",
                             rank=2, max_length=24)
        made[name] = attrib.query(model, None, checkpoints["queries"], None, root / f"{name}-index-scores",
                                  index=index, max_length=24, keep_all_scores=True).out
    return made


def test_index_scores_combine_to_the_weighted_sum_of_their_scores(tmp_path, index_scores):
    """Two checkpoints' index scores (stage "query", scores_from "index") add as exact scores do."""
    result = attrib.combine(list(index_scores.values()), tmp_path / "c", weights="1,3")
    weights = dict(zip(index_scores, (0.25, 0.75)))
    assert [r["weight"] for r in result.manifest["combine"]] == [0.25, 0.75]
    inputs = {name: documents(path).set_index(["query_id", "doc_id"]) for name, path in index_scores.items()}
    table = documents(tmp_path / "c")
    assert len(table) == len(inputs["ckpt-10"]) == 12 * len(QUERIES)
    for row in table.itertuples():
        key = (row.query_id, row.doc_id)
        expected = sum(w * inputs[name].loc[key, "score"] for name, w in weights.items())
        layers = sum(w * np.asarray(inputs[name].loc[key, "layer_scores"]) for name, w in weights.items())
        assert row.score == pytest.approx(expected, rel=1e-12, abs=1e-15)
        np.testing.assert_allclose(row.layer_scores, layers, rtol=1e-12, atol=1e-15)
    for query_id, mine in table.groupby("query_id"):
        assert mine["rank"].tolist() == list(range(1, len(mine) + 1)) and mine["score"].is_monotonic_decreasing


def test_index_scores_and_exact_scores_are_not_combined(tmp_path, capsys, checkpoints, index_scores):
    exact = checkpoints["runs"]["ckpt-10"]["scores"]
    code, _, err = run_cli(capsys, "combine", exact, index_scores["ckpt-20"], "--out", tmp_path / "c")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "other scores source (exact, or --index)" in err, err
    assert not (tmp_path / "c").exists()


def test_index_scores_of_another_corpus_with_the_same_ids_are_refused(tmp_path, capsys, checkpoints, index_scores):
    """The index scores' manifest records the indexed corpus, so equal ids and queries are not enough."""
    root, model = checkpoints["root"], str(checkpoints["root"] / "ckpt-20")
    other_corpus = write_jsonl(tmp_path / "other.jsonl", [{"id": f"doc{i}", "text": TEXTS[(i + 1) % 5]}
                                                           for i in range(12)])
    index = attrib.index(model, root / "ckpt-20-scores-factors", other_corpus, tmp_path / "index", rank=2,
                         max_length=24)
    other = attrib.query(model, None, checkpoints["queries"], None, tmp_path / "scores", index=index, max_length=24,
                         keep_all_scores=True).out
    capsys.readouterr()
    code, _, err = run_cli(capsys, "combine", index_scores["ckpt-10"], other, "--out", tmp_path / "c")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "other corpus" in err, err
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def mismatched(checkpoints):
    """Scores of checkpoint ckpt-10 that differ from the reference in one thing each."""
    run, root = checkpoints["runs"]["ckpt-10"], checkpoints["root"]
    model, tokenizer, corpus = run["model"], run["tokenizer"], checkpoints["corpus"]
    other_corpus = write_jsonl(root / "other.jsonl", [{"id": f"doc{i}", "text": TEXTS[i % 5]} for i in range(12)])
    one_query = write_jsonl(root / "one-query.jsonl", [QUERIES[0].as_row()])
    made = {
        "queries": score(model, tokenizer, root, "m-queries", corpus, one_query),
        "corpus": score(model, tokenizer, root, "m-corpus", other_corpus, checkpoints["queries"]),
        "chunking": score(model, tokenizer, root, "m-chunking", corpus, checkpoints["queries"], max_length=22),
    }
    return {name: result.out for name, result in made.items()}


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("queries", "other queries"),
        ("corpus", "other corpus"),
        ("chunking", "other chunking"),
        ("lr-without-trainer-state", "with a logged learning rate"),
        ("weights-count", "3 numbers for 2"),
        ("negative-weight", "non-negative"),
        ("same-twice", "given twice"),
        ("missing", "does not exist"),
    ],
)
def test_mismatched_inputs_are_refused_in_one_line_and_nothing_is_written(tmp_path, capsys, checkpoints, mismatched,
                                                                         monkeypatch, case, fragment):
    reference = checkpoints["runs"]["ckpt-10"]["scores"]
    other, weights = checkpoints["runs"]["ckpt-20"]["scores"], "equal"
    if case in mismatched:
        other = mismatched[case]
    elif case == "lr-without-trainer-state":
        weights = "lr"
        monkeypatch.setattr(combine_stage, "TRAINER_STATE", "absent.json")
    elif case == "weights-count":
        weights = "1,2,3"
    elif case == "negative-weight":
        weights = "1,-1"
    elif case == "same-twice":
        other = reference
    elif case == "missing":
        other = tmp_path / "nowhere"
    code, _, err = run_cli(capsys, "combine", reference, other, "--out", tmp_path / "c", "--weights", weights)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "c").exists()


def test_truncated_documents_table_is_refused(tmp_path, checkpoints):
    """documents.parquet holding fewer rows than summary.parquet counts (the 1,000 tails of `attrib query`
    without --keep-all-scores, here one row short)."""
    source = tmp_path / "tails"
    shutil.copytree(checkpoints["runs"]["ckpt-10"]["scores"], source)
    table = pq.read_table(source / "documents.parquet")
    pq.write_table(table.slice(0, len(table) - 1), source / "documents.parquet")
    with pytest.raises(attrib.InputError, match="keep-all-scores"):
        attrib.combine([source, checkpoints["runs"]["ckpt-20"]["scores"]], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_resume_after_a_kill_finishes_the_same_result(tmp_path, checkpoints, monkeypatch, capsys):
    a, b = (checkpoints["runs"][name]["scores"] for name in LEARNING_RATES)
    attrib.combine([a, b], tmp_path / "whole", weights="lr")
    rows = pq.read_table(a / "summary.parquet")["documents"].to_pylist()
    assert len(rows) == 2 and rows[0] == rows[1]
    layers = len(json.loads((a / "manifest.json").read_text())["layers"])
    row_bytes = combine_stage.group_row_bytes(2, layers)
    monkeypatch.setattr(combine_stage, "GROUP_BYTES", rows[0] * row_bytes)  # room for one query: two parts
    original, calls = combine_stage._combined_documents, []

    def dying(*args):
        calls.append(args[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(combine_stage, "_combined_documents", dying)
    code, _, err = run_cli(capsys, "--quiet", "combine", a, b, "--out", tmp_path / "c", "--weights", "lr")
    assert code == 130, err
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["status"] == "running"
    assert not (tmp_path / "c" / "documents.parquet").exists()
    code, _, err = run_cli(capsys, "--quiet", "combine", a, b, "--out", tmp_path / "c", "--weights", "lr")
    assert code == 0, err
    assert calls == [["q1"], ["q2"], ["q2"]]  # the finished part was not combined again
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["status"] == "complete"
    assert not (tmp_path / "c" / "parts").exists()
    for name in ("documents.parquet", "summary.parquet", "tokens"):
        assert pq.read_table(tmp_path / "c" / name).equals(pq.read_table(tmp_path / "whole" / name)), name
