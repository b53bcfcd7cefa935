"""Query gradients and influence scores against dense float64 oracles (docs/design.md §6)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch

from attrib.data import CorpusSpec, Query, SequenceCaps, iter_sequence_parts, query_sequence
from attrib.distributed import World
from attrib.curvature import load_curvature
from attrib.stages.fit import FitSettings, fit_factors
from attrib.models import find_tracked_layers, load_model, model_record
from attrib.preconditioned_gradients import compute_query_gradients
from attrib.scoring import ScoreSettings, score_documents_and_tokens
from attrib.storage import StageDir
from tests.conftest import run_cli, write_jsonl
from tests.oracle import assert_token_scores, sequence_gradient, token_influence

QUERIES = [
    Query("q1", "The capital of Vorlia", " is Quendar."),
    Query("q2", "Rivers run to", " the sea and the sea"),
]


def pipeline(tmp_path, model_dir, corpus_file, strategy="ekfac", rank=0, tokens_per_batch=4096, name="run", damping=None):
    """fit-factors → query-gradients → scoring through the Python API, all in float64."""
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.double()
    layers = find_tracked_layers(model)
    record = model_record("m", model, layers)
    fit_settings = FitSettings(strategy=strategy, fisher="empirical", max_length=24, stats_dtype="float64")
    factors = StageDir(tmp_path / f"{name}-factors", "fit-factors", asdict(fit_settings), record)
    if not factors.already_complete:
        fit_factors(model, tokenizer, layers, CorpusSpec(str(corpus_file)), factors, fit_settings, World())
    # damping scale 0.1, not the default 0.001: the oracle inverts B (Λ + λ) Bᵀ densely, and B, stored in
    # float32, is orthogonal only to ~1e-7, an error that κ = max(Λ+λ)/min(Λ+λ) amplifies (agreement 1e-6
    # at 0.1, 2e-5 at 0.001)
    curvature = load_curvature(str(factors.path), layers, damping, damping_scale=0.1)
    gradients = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, rank, 24, 4096, "cpu")
    settings = ScoreSettings(max_length=24, tokens_per_batch=tokens_per_batch, docs_per_part=5, token_scores_top=-1)
    scores = StageDir(tmp_path / f"{name}-scores", "query", asdict(settings), record)
    _, counts, files = score_documents_and_tokens(model, tokenizer, layers, gradients, CorpusSpec(str(corpus_file)),
                                                  scores, settings, World())
    scores.complete(counts, files, layers=[l.name for l in layers])
    documents = pq.read_table(scores.path / "documents.parquet").to_pylist()
    tokens = pq.read_table(scores.path / "tokens").to_pylist()
    return model, tokenizer, layers, curvature, documents, tokens


def training_sequences(tokenizer, corpus_file):
    parts = iter_sequence_parts(CorpusSpec(str(corpus_file)), tokenizer, 24, 1000, SequenceCaps())
    return [seq for part in parts for _, seq in part.sequences]


def dense_inverse(curvature, layer) -> torch.Tensor:
    """The damped EK-FAC matrix of one layer, built explicitly with torch.kron and inverted densely."""
    basis = torch.kron(curvature.gradient_basis, curvature.activation_basis)  # row-major vec
    matrix = basis @ torch.diag(curvature.eigenvalues.reshape(-1) + curvature.damping) @ basis.T
    return torch.linalg.inv(matrix)


def oracle_preconditioned(model, tokenizer, layers, curvature, identity=False, queries=QUERIES):
    """P_q,l = H_l⁻¹ V_q,l [d_out, d_in(+1)] by query id and layer name, with dense float64 algebra."""
    result = {}
    for query in queries:
        gradient = sequence_gradient(model, layers, query_sequence(tokenizer, query, 24, []))
        result[query.query_id] = {
            layer.name: gradient[layer.name] if identity else
            (dense_inverse(c, layer) @ gradient[layer.name].reshape(-1)).reshape(gradient[layer.name].shape)
            for c, layer in zip(curvature, layers)}
    return result


def oracle_scores(model, tokenizer, layers, curvature, corpus_file, identity=False):
    """I(q, m) = Σ_l vec(P_q,l)ᵀ vec(G_m) with dense float64 algebra, by (query, doc)."""
    preconditioned = oracle_preconditioned(model, tokenizer, layers, curvature, identity)
    expected = {}
    for seq in training_sequences(tokenizer, corpus_file):
        train_grad = sequence_gradient(model, layers, seq)
        for query_id, p in preconditioned.items():
            total = sum(float(p[layer.name].reshape(-1) @ train_grad[layer.name].reshape(-1)) for layer in layers)
            key = (query_id, seq.doc_id)
            expected[key] = expected.get(key, 0.0) + total
    return expected


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_document_scores_equal_dense_ekfac_oracle(tmp_path, model_dirs, corpus_file, arch):
    model, tokenizer, layers, curvature, documents, tokens = pipeline(tmp_path, model_dirs[arch], corpus_file)
    expected = oracle_scores(model, tokenizer, layers, curvature, corpus_file)
    assert len(documents) == len(expected)
    for row in documents:
        want = expected[(row["query_id"], row["doc_id"])]
        assert row["score"] == pytest.approx(want, rel=1e-6, abs=1e-9 * max(abs(v) for v in expected.values()))


def test_decompositions_and_ranks(tmp_path, model_dirs, corpus_file):
    """Each token's score is the oracle's g_tᵀ P_q a_t (float32 storage: 1e-5 of the row's largest |score|),
    Σ per-token = document score, Σ per-layer = document score, ranks ordered by score."""
    model, tokenizer, layers, curvature, documents, tokens = pipeline(tmp_path, model_dirs["gpt2"], corpus_file)
    preconditioned = oracle_preconditioned(model, tokenizer, layers, curvature)
    sequences = {(s.doc_id, s.chunk): s for s in training_sequences(tokenizer, corpus_file)}
    assert len(tokens) == len(QUERIES) * len(sequences)  # token_scores_top=-1: every chunk of every document
    for row in tokens:
        sequence = sequences[(row["doc_id"], row["chunk"])]
        assert row["token_ids"] == sequence.input_ids
        assert_token_scores(row["token_scores"], token_influence(model, layers, sequence, preconditioned[row["query_id"]]),
                            1e-5, f"{row['query_id']}/{row['doc_id']}/{row['chunk']}")
    token_sums = {}
    for row in tokens:
        key = (row["query_id"], row["doc_id"])
        token_sums[key] = token_sums.get(key, 0.0) + sum(row["token_scores"])
        assert len(row["token_scores"]) == len(row["token_ids"]) == len(row["tokens"])
        assert all(row["text"][s:e] == t for s, e, t in zip(row["token_start"], row["token_end"], row["tokens"]))
    for row in documents:
        assert sum(row["layer_scores"]) == pytest.approx(row["score"], rel=1e-9, abs=1e-12)
        # per-token scores are stored in float32
        assert token_sums[(row["query_id"], row["doc_id"])] == pytest.approx(row["score"], rel=1e-5, abs=1e-6)
    for query_id in {r["query_id"] for r in documents}:
        mine = sorted((r for r in documents if r["query_id"] == query_id), key=lambda r: r["rank"])
        assert [r["rank"] for r in mine] == list(range(1, len(mine) + 1))
        assert all(a["score"] >= b["score"] for a, b in zip(mine, mine[1:]))


def test_low_rank_converges_to_full_rank(tmp_path, model_dirs, corpus_file):
    """Rank = min(d_out, d_in) reproduces full rank; rank 1 is an approximation that differs."""
    *_, full, _ = pipeline(tmp_path, model_dirs["gpt2"], corpus_file, rank=0, name="full")
    *_, capped, _ = pipeline(tmp_path, model_dirs["gpt2"], corpus_file, rank=17, name="capped")
    *_, rank1, _ = pipeline(tmp_path, model_dirs["gpt2"], corpus_file, rank=1, name="r1")
    by_key = lambda rows: {(r["query_id"], r["doc_id"]): r["score"] for r in rows}
    full_scores, capped_scores, rank1_scores = by_key(full), by_key(capped), by_key(rank1)
    scale = max(abs(v) for v in full_scores.values())
    for key, value in full_scores.items():
        assert capped_scores[key] == pytest.approx(value, rel=1e-6, abs=1e-9 * scale)
    assert max(abs(rank1_scores[k] - v) for k, v in full_scores.items()) > 1e-6 * scale


def test_padding_and_batching_do_not_change_scores(tmp_path, model_dirs, corpus_file):
    *_, padded, _ = pipeline(tmp_path, model_dirs["llama"], corpus_file, tokens_per_batch=4096, name="wide")
    *_, single, _ = pipeline(tmp_path, model_dirs["llama"], corpus_file, tokens_per_batch=24, name="one")
    single_scores = {(r["query_id"], r["doc_id"]): r["score"] for r in single}
    for row in padded:
        assert row["score"] == pytest.approx(single_scores[(row["query_id"], row["doc_id"])], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("strategy", ["ekfac", "identity"])
def test_sign_and_scale_by_a_small_step(tmp_path, model_dirs, corpus_file, strategy):
    """θ ← θ − ε H⁻¹∇L_m changes log p(completion) by ε·I(q, m) to first order (SGD for identity)."""
    model, tokenizer, layers, curvature, documents, _ = pipeline(tmp_path, model_dirs["gpt2"], corpus_file, strategy)
    query = QUERIES[0]
    query_seq = query_sequence(tokenizer, query, 24, [])
    sequences = training_sequences(tokenizer, corpus_file)
    mine = sorted((r for r in documents if r["query_id"] == query.query_id), key=lambda r: r["rank"])

    def log_prob():
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([query_seq.input_ids])).logits[0].double()
            log_probs = torch.log_softmax(logits, -1)
        return sum(float(log_probs[t, target]) for t, target in enumerate(query_seq.targets) if target >= 0)

    base = log_prob()
    for row in (mine[0], mine[-1]):  # the most positive and the most negative document
        chunks = [sequence_gradient(model, layers, seq) for seq in sequences if seq.doc_id == row["doc_id"]]
        gradient = {layer.name: sum(chunk[layer.name] for chunk in chunks) for layer in layers}
        steps = {layer.name: c.inverse_times(gradient[layer.name]) for layer, c in zip(layers, curvature)}
        # ε relative to the step's size: the damped inverse can make H⁻¹∇L_m far larger than θ
        step_norm = sum(float(s.square().sum()) for s in steps.values()) ** 0.5
        weight_norm = sum(float(l.weight_matrix().square().sum()) for l in layers) ** 0.5
        errors = []
        for epsilon in (1e-4 * weight_norm / step_norm, 1e-5 * weight_norm / step_norm):
            originals = [layer.weight_matrix().clone() for layer in layers]
            with torch.no_grad():
                for layer in layers:
                    _apply(layer, layer.weight_matrix() - epsilon * steps[layer.name])
            change = log_prob() - base
            with torch.no_grad():
                for layer, original in zip(layers, originals):
                    _apply(layer, original)
            errors.append(abs(change / epsilon - row["score"]) / abs(row["score"]))
            assert (change > 0) == (row["score"] > 0)
        assert errors[1] < 0.01 and errors[1] < errors[0], errors  # first order: the error shrinks with ε


def _apply(layer, folded):
    """Write a folded [d_out, d_in(+1)] matrix back into the module's weight (and bias)."""
    weight = folded[:, : layer.d_in]
    layer.module.weight.copy_(weight.t() if layer.transposed else weight)
    if layer.has_bias:
        layer.module.bias.copy_(folded[:, -1])


def test_identity_strategy_is_the_gradient_dot_product(tmp_path, model_dirs, corpus_file):
    model, tokenizer, layers, curvature, documents, _ = pipeline(tmp_path, model_dirs["gpt_neox"], corpus_file, "identity")
    expected = oracle_scores(model, tokenizer, layers, curvature, corpus_file, identity=True)
    for row in documents:
        assert row["score"] == pytest.approx(expected[(row["query_id"], row["doc_id"])], rel=1e-6)


# --- the command line ---------------------------------------------------------


@pytest.fixture
def cli_run(tmp_path, capsys, model_dirs, corpus_file):
    """A fitted factors directory and a queries file for CLI tests."""
    factors = tmp_path / "factors"
    code, _, err = run_cli(capsys, "--quiet", "fit-factors", "--model", model_dirs["llama"], "--corpus", corpus_file,
                           "--out", factors, "--max-length", "24")
    assert code == 0, err
    queries = write_jsonl(tmp_path / "q.jsonl", [q.as_row() for q in QUERIES])
    return {"model": model_dirs["llama"], "factors": factors, "queries": queries, "corpus": corpus_file}


def test_query_cli_end_to_end_resume_and_determinism(tmp_path, capsys, cli_run):
    args = ["query", "--model", cli_run["model"], "--factors", cli_run["factors"], "--queries", cli_run["queries"],
            "--corpus", cli_run["corpus"], "--max-length", "24", "--docs-per-part", "4", "--token-scores-top", "2"]
    code, out, err = run_cli(capsys, "--quiet", *args, "--out", tmp_path / "a")
    assert code == 0, err
    assert "top documents" in out
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and [q["id"] for q in manifest["queries"]] == ["q1", "q2"]
    documents = pq.read_table(tmp_path / "a" / "documents.parquet").to_pandas()
    assert len(documents) == 2 * 12 and documents["prefilter_rank"].isna().all()
    tokens = pq.read_table(tmp_path / "a" / "tokens").to_pandas()
    assert set(map(tuple, tokens[["query_id", "doc_id"]].drop_duplicates().values)) == {
        (r.query_id, r.doc_id) for r in documents.itertuples() if r.rank <= 2
    }
    # a run killed after its first part resumes to the same result
    import attrib.scoring as scoring

    original = scoring.Scorer.score
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(self, *a, **k)

    scoring.Scorer.score = dying
    try:
        code, _, err = run_cli(capsys, "--quiet", *args, "--out", tmp_path / "b", "--tokens-per-batch", "4096")
    finally:
        scoring.Scorer.score = original
    assert code == 130, (code, err, calls)
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "running"
    code, _, err = run_cli(capsys, "--quiet", *args, "--out", tmp_path / "b", "--tokens-per-batch", "4096")
    assert code == 0, err
    resumed = pq.read_table(tmp_path / "b" / "documents.parquet").to_pandas()
    assert resumed[["query_id", "doc_id", "rank"]].equals(documents[["query_id", "doc_id", "rank"]])
    assert (resumed["score"] - documents["score"]).abs().max() <= 1e-5 * documents["score"].abs().max()


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"queries": [{"id": "q", "prompt": "p", "completion": ""}]}, "'completion' is empty"),
        ({"queries": [{"id": "q", "prompt": "The capital", "completion": " of Vorlia" * 40}]}, "more than --max-length"),
        ({"candidates": "missing-dir"}, "--candidates"),
        ({"other_model": True}, "another model"),
    ],
)
def test_query_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, cli_run, model_dirs, change, fragment):
    queries = cli_run["queries"]
    if "queries" in change:
        queries = write_jsonl(tmp_path / "bad.jsonl", change["queries"])
    model = model_dirs["gpt2"] if change.get("other_model") else cli_run["model"]
    args = ["query", "--model", model, "--factors", cli_run["factors"], "--queries", queries,
            "--corpus", cli_run["corpus"], "--max-length", "24", "--out", tmp_path / "scores"]
    if "candidates" in change:
        args += ["--candidates", tmp_path / change["candidates"]]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert fragment in err
    assert not (tmp_path / "scores").exists()


def test_damping_scale_sets_each_layers_damping_relative_to_its_eigenvalues(tmp_path, capsys, cli_run):
    """--damping-scale c gives λ_l = c × mean(Λ_l); --damping gives one λ; both together are refused."""
    from attrib.storage import load_tensors

    lambdas = load_tensors(str(cli_run["factors"] / "lambda.safetensors"))
    base = ["query-gradients", "--model", cli_run["model"], "--factors", cli_run["factors"],
            "--queries", cli_run["queries"], "--max-length", "24"]
    for flags, expected in (([], 0.001), (["--damping-scale", "0.01"], 0.01)):
        out = tmp_path / f"qg-{expected}"
        code, _, err = run_cli(capsys, "--quiet", *base, *flags, "--out", out)
        assert code == 0, err
        damping = json.loads((out / "manifest.json").read_text())["damping"]
        for name, value in damping.items():
            assert value == pytest.approx(expected * float(lambdas[f"{name}.lambda"].double().mean()), rel=1e-12)
    code, _, err = run_cli(capsys, "--quiet", *base, "--damping", "0.5", "--out", tmp_path / "qg-abs")
    assert code == 0, err
    assert set(json.loads((tmp_path / "qg-abs" / "manifest.json").read_text())["damping"].values()) == {0.5}
    code, _, err = run_cli(capsys, *base, "--damping", "0.5", "--damping-scale", "0.01", "--out", tmp_path / "qg-both")
    assert code == 2 and err.startswith("error:") and "not both" in err
    assert not (tmp_path / "qg-both").exists()
