"""The query path at scale changes how work is organised, not what is computed (issue 12).

Float32 preconditioning against float64, the randomized compression against the exact
rank-r SVD, query passes / query batches / candidate-aware column selection against one
pass over everything, and rank-split query gradients against one process.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch

from attrib.curvature import load_curvature
from attrib.data import CorpusSpec, Query
from attrib.distributed import World
from attrib.stages.fit import FitSettings, fit_factors
from attrib.models import find_tracked_layers, load_model, model_record
from attrib.preconditioned_gradients import (compute_query_gradients, gram_is_cheaper, gram_low_rank, low_rank,
                                             randomized_low_rank)
from attrib.storage import StageDir
from tests.conftest import TEXTS, build_model, run_cli, write_jsonl

QUERIES = [
    Query("q1", "The capital of Vorlia", " is Quendar."),
    Query("q2", "Rivers run to", " the sea and the sea"),
    Query("q3", "Influence", " functions"),
]


def fitted(tmp_path, model_dir, corpus_file, dtype=torch.float64):
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.to(dtype)
    layers = find_tracked_layers(model)
    settings = FitSettings(fisher="empirical", max_length=24, stats_dtype="float64")
    stage = StageDir(tmp_path / "factors", "fit-factors", asdict(settings), model_record("m", model, layers))
    fit_factors(model, tokenizer, layers, CorpusSpec(str(corpus_file)), stage, settings, World())
    return model, tokenizer, layers, stage.path


def test_float32_preconditioning_is_within_its_bound_of_float64(tmp_path, model_dirs, corpus_file):
    """H⁻¹V in float32 differs from float64 by at most c·ε₃₂·κ relative (κ = max(Λ+λ)/min(Λ+λ)).

    The bases are orthogonal, so the rotations lose ~ε√d; the division by Λ + λ can
    amplify that by at most κ. c = 10·√d covers both with margin.
    """
    _, _, layers, factors = fitted(tmp_path, model_dirs["llama"], corpus_file)
    curvature = load_curvature(str(factors), layers, None)
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(layers):
        exact, single = curvature.layer(index, "cpu", torch.float64), curvature.layer(index, "cpu", torch.float32)
        assert single.eigenvalues.dtype == torch.float32
        vectors = torch.randn(3, layer.d_out, layer.d_in_folded, dtype=torch.float64, generator=generator)
        expected = exact.inverse_times(vectors)
        actual = single.inverse_times(vectors.float()).double()
        shifted = exact.eigenvalues + exact.damping
        kappa = float(shifted.max() / shifted.min())
        bound = 10 * max(layer.d_out, layer.d_in_folded) ** 0.5 * torch.finfo(torch.float32).eps * kappa
        error = float((actual - expected).norm() / expected.norm())
        assert error <= bound, (layer.name, error, bound)
        assert error < 1e-4


def test_randomized_compression_matches_the_exact_truncated_svd():
    """On matrices with a decaying spectrum, the randomized rank-r factors reconstruct within
    1% of the exact rank-r error (Eckart–Young optimum), and their σ within 1e-3 relative."""
    generator = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(4, 300, 120, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(4, 200, 120, generator=generator)).Q
    spectrum = 0.8 ** torch.arange(120, dtype=torch.float32)
    matrices = left @ torch.diag_embed(spectrum.expand(4, -1)) @ right.mT  # [4, 300, 200]
    rank = 16
    u, sigma, v = randomized_low_rank(matrices, rank)
    optimum = float(spectrum[rank:].square().sum().sqrt())
    for n in range(4):
        error = float((matrices[n] - u[n] @ torch.diag(sigma[n]) @ v[n].T).norm())
        assert error <= 1.01 * optimum, (error, optimum)
    assert torch.allclose(sigma, spectrum[:rank].expand(4, -1), rtol=1e-3)
    # the seeded probe makes it deterministic
    again = randomized_low_rank(matrices, rank)
    assert all(torch.equal(a, b) for a, b in zip((u, sigma, v), again))


@pytest.mark.parametrize("shape", [(300, 64), (64, 300)], ids=["tall", "wide"])
def test_gram_compression_matches_the_exact_truncated_svd(shape):
    """The narrow side's Gram subspace iteration (the index build's path for narrow layers): on matrices with a
    decaying spectrum its rank-r factors reconstruct within 1% of the exact rank-r error and their σ within 1e-3
    relative, as the randomized finder's; its singular vectors are orthonormal; a zero or rank-1 matrix gives
    finite factors that reconstruct it (to 1e-6 of its norm, float32)."""
    d_out, d_in = shape
    generator = torch.Generator().manual_seed(5)
    width = min(shape)
    left = torch.linalg.qr(torch.randn(4, d_out, width, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(4, d_in, width, generator=generator)).Q
    spectrum = 0.8 ** torch.arange(width, dtype=torch.float32)
    matrices = left @ torch.diag_embed(spectrum.expand(4, -1)) @ right.mT
    rank = 8
    assert rank * 4 < width and gram_is_cheaper(d_out, d_in, rank)  # low_rank(gram=True) takes this path
    u, sigma, v = low_rank(matrices, rank, gram=True)
    optimum = float(spectrum[rank:].square().sum().sqrt())
    for n in range(4):
        error = float((matrices[n] - u[n] @ torch.diag(sigma[n]) @ v[n].T).norm())
        assert error <= 1.01 * optimum, (error, optimum)
    assert torch.allclose(sigma, spectrum[:rank].expand(4, -1), rtol=1e-3)
    eye = torch.eye(rank).expand(4, -1, -1)
    assert torch.allclose(u.mT @ u, eye, atol=1e-5) and torch.allclose(v.mT @ v, eye, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip((u, sigma, v), low_rank(matrices, rank, gram=True)))
    rank_one = torch.randn(d_out, 1, generator=generator) @ torch.randn(1, d_in, generator=generator)
    degenerate = torch.stack([torch.zeros(shape), rank_one])
    u, sigma, v = gram_low_rank(degenerate, rank)
    assert all(torch.isfinite(t).all() for t in (u, sigma, v))
    rebuilt = u @ torch.diag_embed(sigma) @ v.mT
    assert float((rebuilt - degenerate).norm()) <= 1e-6 * float(degenerate.norm())


def test_compressed_query_gradients_match_the_exact_svd_on_a_model(tmp_path, tokenizer, corpus_file):
    """On a model wide enough for the randomized path (rank 8 on 64-wide layers), each layer's
    rank-8 factors reconstruct the preconditioned gradient within 1% of the exact rank-8 error."""
    model_dir = build_model(tmp_path / "wide", "llama", tokenizer, hidden=64)
    model, tokenizer, layers, factors = fitted(tmp_path, model_dir, corpus_file)
    curvature = load_curvature(str(factors), layers, None)
    assert all(8 * 4 < min(l.d_out, l.d_in_folded) for l in layers)  # the randomized path is taken
    full = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 0, 24, 4096, "cpu")
    compressed = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 8, 24, 4096, "cpu")
    for index in range(len(layers)):
        dense = full.left[index] @ torch.diag_embed(full.sigma[index]) @ full.right[index].mT
        exact_u, exact_s, exact_v = low_rank(dense, 0)
        optimum = (exact_s[:, 8:].square().sum(-1)).sqrt()
        approx = compressed.left[index] @ torch.diag_embed(compressed.sigma[index]) @ compressed.right[index].mT
        errors = (dense - approx).flatten(1).norm(dim=1)
        assert (errors <= 1.01 * optimum + 1e-12 * dense.flatten(1).norm(dim=1)).all(), (errors, optimum)


def test_query_batches_of_one_equal_one_batch(tmp_path, model_dirs, corpus_file):
    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["gpt2"], corpus_file)
    curvature = load_curvature(str(factors), layers, None)
    together = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 0, 24, 4096, "cpu")
    alone = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 0, 24, 4096, "cpu", max_queries_per_batch=1)
    for index in range(len(layers)):
        # compare U diag(σ) Vᵀ: singular vectors of (near-)zero singular values are arbitrary
        a, b = (g.left[index] @ torch.diag_embed(g.sigma[index]) @ g.right[index].mT for g in (together, alone))
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * float(a.abs().max()))


@pytest.fixture
def cli_setup(tmp_path, capsys, model_dirs):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"id": f"doc{i}", "text": TEXTS[i % 5] + f" Item {i}."}
                                                      for i in range(15)])
    factors = tmp_path / "factors"
    code, _, err = run_cli(capsys, "--quiet", "fit-factors", "--model", model_dirs["llama"], "--corpus", corpus,
                           "--out", factors, "--max-length", "24")
    assert code == 0, err
    queries = write_jsonl(tmp_path / "q.jsonl", [q.as_row() for q in QUERIES])
    base = ["--quiet", "query", "--model", model_dirs["llama"], "--factors", factors, "--queries", queries,
            "--corpus", corpus, "--max-length", "24", "--docs-per-part", "4", "--token-scores-top", "2"]
    return {"corpus": corpus, "queries": queries, "base": base}


def _scores(directory):
    table = pq.read_table(directory / "documents.parquet").to_pylist()
    return {(r["query_id"], r["doc_id"]): r for r in table}


def _plan(directory) -> tuple[int, int, int, int]:
    """(queries per pass, passes over the corpus, queries per batch, query-gradient batches) of a query run,
    as its manifest records them and as its token parts (`part-qNNNN-…`: one pass number each) and
    query-gradient parts show they were carried out."""
    manifest = json.loads((directory / "manifest.json").read_text())
    passes = {p.name.split("-")[1] for p in (directory / "tokens").glob("part-*.parquet")}
    batches = list((directory / "query-gradients").glob("query_gradients-*.safetensors"))
    return (manifest["settings"]["queries_per_pass"], len(passes),
            manifest["settings"]["query_gradients"]["queries_per_batch"], len(batches))


@pytest.mark.parametrize("flags, plan", [
    (["--queries-per-pass", "1"], (1, 3, 3, 1)),
    (["--queries-per-pass", "2"], (2, 2, 3, 1)),
    (["--max-memory", "1KB"], (1, 3, 1, 3)),
], ids=["one per pass", "two per pass", "one per batch and pass"])
def test_query_passes_and_batches_change_nothing(tmp_path, capsys, cli_setup, flags, plan):
    """One query per pass, two per pass, or a budget that forces one query per batch and pass:
    the same scores as one pass over all queries (float32 model: 1e-5 relative, from summation order).
    The split run must really have been split: its manifest and parts show the passes and batches."""
    code, _, err = run_cli(capsys, *cli_setup["base"], "--out", tmp_path / "all")
    assert code == 0, err
    assert _plan(tmp_path / "all") == (3, 1, 3, 1)  # the default budget holds every query in one pass and batch
    code, _, err = run_cli(capsys, *cli_setup["base"], *flags, "--out", tmp_path / "split")
    assert code == 0, err
    assert _plan(tmp_path / "split") == plan
    whole, split = _scores(tmp_path / "all"), _scores(tmp_path / "split")
    assert whole.keys() == split.keys()
    scale = max(abs(r["score"]) for r in whole.values())
    for key, row in whole.items():
        assert split[key]["score"] == pytest.approx(row["score"], rel=1e-5, abs=1e-6 * scale)
        assert split[key]["rank"] == row["rank"] or abs(split[key]["score"] - row["score"]) < 1e-5 * scale
    tokens = pq.read_table(tmp_path / "split" / "tokens").to_pandas()
    assert len(tokens.groupby(["query_id", "doc_id"])) == 2 * len(QUERIES)


def test_candidates_score_only_their_pairs_with_the_full_scores(tmp_path, capsys, cli_setup, model_dirs):
    """With candidates, each batch is contracted only with the queries that want its documents:
    exactly the candidate pairs are written, with the scores of an unrestricted run, and token scores that
    come with the one pass are the oracle's."""
    candidates = tmp_path / "candidates"
    code, _, err = run_cli(capsys, "--quiet", "prefilter", "--corpus", cli_setup["corpus"], "--queries",
                           cli_setup["queries"], "--top-k", "4", "--out", candidates)
    assert code == 0, err
    code, _, err = run_cli(capsys, *cli_setup["base"], "--out", tmp_path / "all")
    assert code == 0, err
    code, _, err = run_cli(capsys, *cli_setup["base"], "--candidates", candidates, "--out", tmp_path / "picked")
    assert code == 0, err
    wanted = pq.read_table(candidates / "candidates.parquet").to_pylist()
    whole, picked = _scores(tmp_path / "all"), _scores(tmp_path / "picked")
    assert set(picked) == {(r["query_id"], r["doc_id"]) for r in wanted}
    scale = max(abs(r["score"]) for r in whole.values())
    for key, row in picked.items():
        assert row["score"] == pytest.approx(whole[key]["score"], rel=1e-5, abs=1e-6 * scale)
        assert row["prefilter_rank"] == next(r["rank"] for r in wanted if (r["query_id"], r["doc_id"]) == key)
    for query_id in {q for q, _ in picked}:
        ranks = sorted(r["rank"] for (q, _), r in picked.items() if q == query_id)
        assert ranks == list(range(1, len(ranks) + 1))
    manifest = json.loads((tmp_path / "picked" / "manifest.json").read_text())
    assert manifest["counts"]["unscored_candidate_documents"] == 0
    # no more candidates per query than --token-scores-top: token scores come with the one pass, for every pair
    code, _, err = run_cli(capsys, *cli_setup["base"], "--candidates", candidates, "--token-scores-top", "4",
                           "--out", tmp_path / "one-pass")
    assert code == 0, err
    tokens = pq.read_table(tmp_path / "one-pass" / "tokens").to_pandas()
    assert set(map(tuple, tokens[["query_id", "doc_id"]].drop_duplicates().values)) == set(picked)
    _check_tokens_against_the_oracle(tokens.to_dict("records"), model_dirs["llama"], tmp_path / "factors",
                                     cli_setup["corpus"])
    for (query_id, doc_id), rows in tokens.groupby(["query_id", "doc_id"]):
        total = sum(float(sum(scores)) for scores in rows["token_scores"])
        assert total == pytest.approx(picked[(query_id, doc_id)]["score"], rel=1e-4, abs=1e-5 * scale)


def test_candidates_of_another_corpus_are_reported(tmp_path, capsys, cli_setup):
    """Candidate documents that the corpus does not hold are counted and warned about, not silently dropped."""
    candidates = tmp_path / "candidates"
    code, _, err = run_cli(capsys, "--quiet", "prefilter", "--corpus", cli_setup["corpus"], "--queries",
                           cli_setup["queries"], "--top-k", "3", "--out", candidates)
    assert code == 0, err
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": f"doc{i}", "text": TEXTS[i % 5]} for i in range(3)])
    args = [a if a != cli_setup["corpus"] else other for a in cli_setup["base"] if a != "--quiet"]
    code, _, err = run_cli(capsys, *args, "--candidates", candidates, "--out", tmp_path / "scores")
    assert code == 0, err
    assert "candidate documents were not found in the corpus" in err
    counts = json.loads((tmp_path / "scores" / "manifest.json").read_text())["counts"]
    scored = {d for _, d in _scores(tmp_path / "scores")}
    wanted = {r["doc_id"] for r in pq.read_table(candidates / "candidates.parquet").to_pylist()}
    assert counts["unscored_candidate_documents"] == len(wanted - scored) > 0


def test_query_gradients_flags_that_conflict_with_given_gradients_are_refused(tmp_path, capsys, cli_setup, model_dirs):
    base = cli_setup["base"]
    gradients = tmp_path / "qg"
    model, factors = base[base.index("--model") + 1], base[base.index("--factors") + 1]
    code, _, err = run_cli(capsys, "--quiet", "query-gradients", "--model", model, "--factors", factors,
                           "--queries", cli_setup["queries"], "--max-length", "24", "--query-rank", "4", "--out", gradients)
    assert code == 0, err
    args = [a for a in base if a not in ("--queries", str(cli_setup["queries"]), cli_setup["queries"])]
    code, _, err = run_cli(capsys, *args, "--query-gradients", gradients, "--query-rank", "8", "--out", tmp_path / "s")
    assert code == 2 and "conflicts with --query-gradients" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()
    code, _, err = run_cli(capsys, *args, "--query-gradients", gradients, "--out", tmp_path / "s")
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["query_gradients_settings"]["query_rank"] == 4


def test_document_scores_by_sequence_gradient_equal_the_low_rank_contraction(tmp_path, model_dirs, corpus_file):
    """On narrow layers ⟨P_q, Σ_t g_t a_tᵀ⟩ is cheaper than Σ_k σ_k (g_tᵀu_k)(v_kᵀa_t); both give the
    same layer scores (float64: 1e-10 relative), for all queries and for each sequence's own queries,
    which equal the matching columns of the all-queries scores."""
    from attrib.scoring import Scorer
    from tests.test_query import training_sequences

    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["llama"], corpus_file)
    curvature = load_curvature(str(factors), layers, None)
    gradients = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 0, 24, 4096, "cpu")  # full rank
    scorer = Scorer(model, layers, gradients, "cpu")
    sequences = training_sequences(tokenizer, corpus_file)[:6]
    width = max(len(s) for s in sequences)
    assert all(scorer._gradient_is_cheaper(i, width, len(QUERIES)) for i in range(len(layers)))
    rows = len(sequences)
    for selection in (None, [[2, 0]] * rows, [[i % 3] for i in range(rows)]):  # all, the same two, one each
        per_token, by_tokens = scorer.score(sequences, 0, "cpu", selection, tokens=True)
        none, by_gradient = scorer.score(sequences, 0, "cpu", selection, tokens=False)
        assert none is None
        assert torch.allclose(by_gradient, by_tokens, rtol=1e-10, atol=1e-10 * float(by_tokens.abs().max()))
        assert torch.allclose(per_token.sum(1), by_tokens.sum(-1), rtol=1e-10, atol=1e-12)
        if selection is not None:  # each row's columns are its own queries' scores
            _, every = scorer.score(sequences, 0, "cpu", None, tokens=True)
            expected = every.gather(1, torch.tensor(selection)[:, :, None].expand(-1, -1, every.shape[-1]))
            assert torch.allclose(by_tokens, expected, rtol=1e-10, atol=1e-10 * float(every.abs().max()))


def _check_tokens_against_the_oracle(tokens, model_dir, factors, corpus):
    """Each token score of each row of a CLI run (float32, default damping) against the dense float64 oracle:
    measured ≤ 1.4e-6 of the row's largest |score|, asserted 1e-5."""
    from tests.oracle import assert_token_scores, token_influence
    from tests.test_query import oracle_preconditioned, training_sequences

    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.double()
    layers = find_tracked_layers(model)
    preconditioned = oracle_preconditioned(model, tokenizer, layers, load_curvature(str(factors), layers, None),
                                           queries=QUERIES)
    sequences = {(s.doc_id, s.chunk): s for s in training_sequences(tokenizer, corpus)}
    assert tokens
    for row in tokens:
        sequence = sequences[(row["doc_id"], row["chunk"])]
        assert list(row["token_ids"]) == sequence.input_ids
        assert_token_scores(row["token_scores"], token_influence(model, layers, sequence, preconditioned[row["query_id"]]),
                            1e-5, f"{row['query_id']}/{row['doc_id']}/{row['chunk']}")


def test_token_scores_of_the_top_documents_sum_to_their_document_scores(tmp_path, capsys, cli_setup, model_dirs):
    """The second pass (per-token scores of the top K per query) adds up to the first pass's scores, and each
    token's score is the dense float64 oracle's g_tᵀ H⁻¹V_q a_t at the default damping (a score moved to the next
    token or spread over the row is off by far more than the tolerance)."""
    code, _, err = run_cli(capsys, *cli_setup["base"], "--out", tmp_path / "scores")
    assert code == 0, err
    documents = _scores(tmp_path / "scores")
    tokens = pq.read_table(tmp_path / "scores" / "tokens").to_pylist()
    _check_tokens_against_the_oracle(tokens, model_dirs["llama"], tmp_path / "factors", cli_setup["corpus"])
    sums: dict = {}
    for row in tokens:
        key = (row["query_id"], row["doc_id"])
        sums[key] = sums.get(key, 0.0) + sum(row["token_scores"])
    assert set(sums) == {key for key, row in documents.items() if row["rank"] <= 2}
    scale = max(abs(r["score"]) for r in documents.values())
    for key, total in sums.items():
        assert total == pytest.approx(documents[key]["score"], rel=1e-4, abs=1e-5 * scale)  # float32 token scores


def test_without_candidates_documents_keep_both_tails_at_their_ranks_and_a_summary(tmp_path, model_dirs, corpus_file):
    """Keeping each query's K most positive and K most negative documents (the default without
    candidates, K = 1,000) keeps exactly those rows of the full table, at the same ranks, and
    summary.parquet has the count, mean, std and positive mass of all scores."""
    from attrib.scoring import ScoreSettings, score_corpus, write_documents

    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["gpt2"], corpus_file)
    gradients = compute_query_gradients(model, tokenizer, layers, QUERIES, load_curvature(str(factors), layers, None),
                                        4, 24, 4096, "cpu")
    tables = {}
    for top in (0, 3):
        settings = ScoreSettings(max_length=24, docs_per_part=5, token_scores_top=0, documents_top=top)
        stage = StageDir(tmp_path / f"scores-{top}", "query", asdict(settings), model_record("m", model, layers))
        score_corpus(model, tokenizer, layers, gradients, CorpusSpec(str(corpus_file)), stage, settings, World())
        write_documents(stage, gradients.query_ids, None, top)
        tables[top] = (pq.read_table(stage.path / "documents.parquet").to_pylist(),
                       pq.read_table(stage.path / "summary.parquet").to_pylist())
    (every, every_summary), (tails, tails_summary) = tables[0], tables[3]
    for a, b in zip(every_summary, tails_summary):  # Arrow sums parts in any order: equal to rounding
        assert a["query_id"] == b["query_id"] and a["documents"] == b["documents"]
        assert all(a[k] == pytest.approx(b[k], rel=1e-12) for k in ("mean", "std", "positive_sum"))
    for query in QUERIES:
        full = [r for r in every if r["query_id"] == query.query_id]
        kept = [r for r in tails if r["query_id"] == query.query_id]
        expected = [r for r in full if r["rank"] <= 3 or r["rank"] > len(full) - 3]
        assert [(r["doc_id"], r["rank"]) for r in kept] == [(r["doc_id"], r["rank"]) for r in expected]
        scores = torch.tensor([r["score"] for r in full], dtype=torch.float64)
        summary = next(s for s in tails_summary if s["query_id"] == query.query_id)
        assert summary["documents"] == len(full) == 12
        assert summary["mean"] == pytest.approx(float(scores.mean()), rel=1e-9)
        assert summary["std"] == pytest.approx(float(scores.std(unbiased=False)), rel=1e-6)
        assert summary["positive_sum"] == pytest.approx(float(scores.clamp(min=0).sum()), rel=1e-9)


def test_candidates_of_which_none_is_in_the_corpus_are_one_line_and_leave_nothing(tmp_path, capsys, model_dirs):
    """A candidate set from another corpus (or a wrong --id-field) scores nothing: an input error, not an
    empty table or a crash, and the run's directory is removed."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"id": f"doc{i}", "text": TEXTS[i % 5]} for i in range(6)])
    other = write_jsonl(tmp_path / "o.jsonl", [{"id": f"x{i}", "text": TEXTS[i % 5]} for i in range(6)])
    q = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "prompt": "The capital of", "completion": " Vorlia"}])
    assert run_cli(capsys, "--quiet", "fit-factors", "--model", model_dirs["llama"], "--corpus", corpus,
                   "--out", tmp_path / "f", "--max-length", "24")[0] == 0
    assert run_cli(capsys, "--quiet", "prefilter", "--corpus", other, "--queries", q, "--top-k", "3",
                   "--out", tmp_path / "cand")[0] == 0
    code, out, err = run_cli(capsys, "--quiet", "query", "--model", model_dirs["llama"], "--factors", tmp_path / "f",
                             "--queries", q, "--corpus", corpus, "--candidates", tmp_path / "cand",
                             "--max-length", "24", "--out", tmp_path / "s")
    assert code == 2 and err.startswith("error: nothing was scored: none of the 3 candidate documents"), err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()  # the failed run removed what it created
