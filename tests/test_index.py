"""The gradient index (attrib/stages/index.py) against dense float64 oracles, its invariants and bad input (DESIGN.md §6)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch

from attrib.curvature import load_curvature
from attrib.data import CorpusSpec
from attrib.distributed import World
from attrib.errors import InputError
from attrib.models import TrackedLayer, find_tracked_layers, load_model, model_record
from attrib.stages.fit import FitSettings, fit_factors
from attrib.stages.index import IndexScoreSettings, IndexSettings, build_index, make_projections, score_index
from attrib.stages.query_gradients import QuerySettings
from attrib.storage import StageDir
from tests.conftest import run_cli, write_jsonl
from tests.oracle import describe_difference, sequence_gradient
from tests.test_query import QUERIES, oracle_scores, training_sequences

MAX_LENGTH = 24  # the corpus_file fixture's longer documents become two or three chunks
DAMPING_SCALE = 0.1  # as tests/test_query.py: the dense oracle inverts B (Λ + λ) Bᵀ with B stored in float32


def fitted(tmp_path, model_dir, corpus_file):
    """A float64 model and its EK-FAC factors fitted on `corpus_file` (empirical Fisher)."""
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.double()
    layers = find_tracked_layers(model)
    settings = FitSettings(strategy="ekfac", fisher="empirical", max_length=MAX_LENGTH, stats_dtype="float64")
    factors = StageDir(tmp_path / "factors", "fit-factors", asdict(settings), model_record("m", model, layers))
    fit_factors(model, tokenizer, layers, CorpusSpec(str(corpus_file)), factors, settings, World())
    return model, tokenizer, layers, str(factors.path)


def index_settings(**overrides) -> IndexSettings:
    return IndexSettings(**{"storage_dtype": "float64", "max_length": MAX_LENGTH, "docs_per_part": 5,
                            "damping_scale": DAMPING_SCALE, **overrides})


def query_settings() -> QuerySettings:
    return QuerySettings(query_rank=0, damping_scale=DAMPING_SCALE, max_length=MAX_LENGTH)


def documents(directory) -> dict:
    return {(r["query_id"], r["doc_id"]): r for r in pq.read_table(directory / "documents.parquet").to_pylist()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("overrides", [dict(representation="lowrank", rank=0),
                                       dict(representation="kronecker", projection="eigen", dims=[0, 0])],
                         ids=["lowrank full rank", "kronecker eigenbasis full dims"])
def test_uncompressed_index_scores_equal_dense_ekfac(tmp_path, model_dirs, corpus_file, arch, overrides):
    """Full rank / full dims: index scores are exact EK-FAC influence Σ_l vec(V_q)ᵀ H_l⁻¹ vec(G_m), summed over a
    document's chunks (float64 throughout). Tolerance 1e-6 of the largest score: the index adds one Q Qᵀ to the
    exact path, and the stored float32 eigenvectors are orthogonal to ~1e-7 (measured: at most 5e-8 of the scale,
    1e-6 relative only on a score 50× below the largest)."""
    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs[arch], corpus_file)
    manifest = build_index(tmp_path / "index", "m", model, tokenizer, layers, factors, CorpusSpec(str(corpus_file)),
                           index_settings(**overrides))
    assert manifest["status"] == "complete" and manifest["counts"]["documents"] == 12
    assert manifest["counts"]["sequences"] > 12  # some documents are chunked
    scores = score_index(tmp_path / "scores", str(tmp_path / "index"), "m", model, tokenizer, layers, QUERIES,
                         query_settings(), IndexScoreSettings(documents_top=0))
    assert scores["scores_from"] == "index" and scores["index"]["representation"].startswith(overrides["representation"])
    curvature = load_curvature(factors, layers, None, damping_scale=DAMPING_SCALE)
    expected = oracle_scores(model, tokenizer, layers, curvature, corpus_file)
    rows = documents(tmp_path / "scores")
    assert len(rows) == len(expected) == 24
    scale = max(abs(v) for v in expected.values())
    for key, want in expected.items():
        assert rows[key]["score"] == pytest.approx(want, rel=1e-6, abs=1e-6 * scale), key
        assert sum(rows[key]["layer_scores"]) == pytest.approx(rows[key]["score"], rel=1e-9, abs=1e-12 * scale)
    for query in QUERIES:
        ranked = sorted((r for r in rows.values() if r["query_id"] == query.query_id), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranked] == list(range(1, 13))
        assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:]))


def _shard_tensors(directory):
    """Every stored tensor of an index, concatenated over its shards, with (doc_id, chunk) per row."""
    from safetensors.torch import load_file

    manifest = json.loads((directory / "manifest.json").read_text())
    tensors, keys = {}, []
    for name in (n for n in manifest["files"] if n.startswith("shards/")):
        loaded = load_file(str(directory / name))
        for key, tensor in loaded.items():
            tensors.setdefault(key, []).append(tensor)
    rows = pq.read_table(directory / "sequences.parquet").to_pylist()
    keys = [(r["doc_id"], r["chunk"]) for r in rows]
    return {k: torch.cat(v) for k, v in tensors.items()}, keys


@pytest.mark.parametrize("overrides", [dict(representation="lowrank", rank=5),
                                       dict(representation="kronecker", projection="random", dims=[4, 6], seed=3),
                                       dict(representation="kronecker", projection="eigen", dims=[5, 3])],
                         ids=["lowrank rank 5", "kronecker random 4x6", "kronecker eigen 5x3"])
def test_compressed_forms_equal_their_definitions_on_the_dense_gradient(tmp_path, model_dirs, corpus_file, overrides):
    """Each stored form is its definition applied to the oracle's dense per-sequence gradient G (autograd, float64):
    lowrank L Rᵀ = the best rank-r approximation of W = (Q_Sᵀ G Q_A) ⊘ √(Λ + λ); kronecker P_Sᵀ G P_A with the
    stored projections (random: Gaussian of variance 1/k; eigen: the top eigenvectors). The index scores of the
    compressed forms are Σ_l ⟨T(P_q), stored⟩ with P_q = H⁻¹V_q formed densely from the oracle's V_q. Agreement to
    1e-9 of the largest value (rounding in float64)."""
    from attrib.data import query_sequence
    from attrib.storage import load_tensors

    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["gpt2"], corpus_file)
    settings = index_settings(**overrides)
    build_index(tmp_path / "index", "m", model, tokenizer, layers, factors, CorpusSpec(str(corpus_file)), settings)
    stored, keys = _shard_tensors(tmp_path / "index")
    curvature = load_curvature(factors, layers, None, damping_scale=DAMPING_SCALE)
    projections = load_tensors(tmp_path / "index" / "projections.safetensors") if settings.representation == "kronecker" else {}
    by_key = {(s.doc_id, s.chunk): s for s in training_sequences(tokenizer, corpus_file)}
    assert sorted(keys) == sorted(by_key)

    def compressed(layer_index, layer, gradient):
        """The definition of the stored form of a dense gradient [d_out, d_in]."""
        if settings.representation == "kronecker":
            return projections[f"{layer.name}.gradient"].double().T @ gradient @ projections[f"{layer.name}.activation"].double()
        c = curvature[layer_index]
        whitened = (c.gradient_basis.T @ gradient @ c.activation_basis) / (c.eigenvalues + c.damping).sqrt()
        u, sigma, vh = torch.linalg.svd(whitened)
        return (u[:, : settings.rank] * sigma[: settings.rank]) @ vh[: settings.rank]

    expected_forms = {}
    for row, key in enumerate(keys):
        gradients = sequence_gradient(model, layers, by_key[key])
        for index, layer in enumerate(layers):
            want = compressed(index, layer, gradients[layer.name])
            expected_forms[(key, layer.name)] = want
            if settings.representation == "kronecker":
                got = stored[f"{layer.name}.projected"][row]
            else:
                got = stored[f"{layer.name}.left"][row] @ stored[f"{layer.name}.right"][row].T
            assert torch.allclose(got, want, rtol=0, atol=1e-9 * want.abs().max()), describe_difference(got, want)

    if settings.representation == "lowrank":  # curvature read from disk in each hook: the same shards
        import attrib.memory

        original, attrib.memory.default_budget = attrib.memory.default_budget, lambda device: 0
        try:
            build_index(tmp_path / "lazy", "m", model, tokenizer, layers, factors, CorpusSpec(str(corpus_file)), settings)
        finally:
            attrib.memory.default_budget = original
        for name in (tmp_path / "index" / "shards").iterdir():
            assert name.read_bytes() == (tmp_path / "lazy" / "shards" / name.name).read_bytes()

    scores = score_index(tmp_path / "scores", str(tmp_path / "index"), "m", model, tokenizer, layers, QUERIES,
                         query_settings(), IndexScoreSettings(documents_top=0))
    assert scores["index"]["shapes"][layers[0].name] == settings.shape(layers[0])
    rows = documents(tmp_path / "scores")
    for query in QUERIES:
        query_gradient = sequence_gradient(model, layers, query_sequence(tokenizer, query, MAX_LENGTH, []))
        totals = {}
        for index, layer in enumerate(layers):
            c = curvature[index]
            v = query_gradient[layer.name]
            preconditioned = c.inverse_times(v)  # the factored H⁻¹V_q of query-gradients, in float64
            if settings.representation == "kronecker":
                transformed = compressed(index, layer, preconditioned)
            else:
                transformed = (c.gradient_basis.T @ preconditioned @ c.activation_basis) * (c.eigenvalues + c.damping).sqrt()
            for key in keys:
                totals[key[0]] = totals.get(key[0], 0.0) + float((transformed * expected_forms[(key, layer.name)]).sum())
        scale = max(abs(v) for v in totals.values())
        for doc_id, want in totals.items():
            assert rows[(query.query_id, doc_id)]["score"] == pytest.approx(want, rel=1e-9, abs=1e-9 * scale)


def test_auto_projection_is_eigen_with_eigenbases_and_random_without(tmp_path, model_dirs, corpus_file):
    """`--projection auto` (the default) records what it chose: eigen on EK-FAC factors, random on diagonal ones."""
    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["llama"], corpus_file)
    settings = FitSettings(strategy="diagonal", fisher="empirical", max_length=MAX_LENGTH, stats_dtype="float64")
    diagonal = StageDir(tmp_path / "diagonal", "fit-factors", asdict(settings), model_record("m", model, layers))
    fit_factors(model, tokenizer, layers, CorpusSpec(str(corpus_file)), diagonal, settings, World())
    for source, chosen in ((factors, "eigen"), (str(diagonal.path), "random")):
        manifest = build_index(tmp_path / chosen, "m", model, tokenizer, layers, source, CorpusSpec(str(corpus_file)),
                               index_settings(representation="kronecker", dims=[4, 4]))
        assert manifest["settings"]["projection"] == chosen and manifest["representation"] == f"kronecker {chosen} 4x4"


def test_lowrank_on_a_wider_model_is_within_its_bound_of_the_best_rank_r(tmp_path, tokenizer, corpus_file):
    """On layers wide enough for the fast path (rank 8 of 128 × 64: attrib.preconditioned_gradients.gram_low_rank),
    each stored L Rᵀ reconstructs the whitened gradient W of the oracle's dense G within 1% of the best rank-8
    error (Eckart–Young, float64), the bound the randomized query compression is held to."""
    from attrib.preconditioned_gradients import EXACT_SVD_FRACTION, gram_is_cheaper
    from tests.conftest import build_model

    model, tokenizer, layers, factors = fitted(tmp_path, build_model(tmp_path / "wide", "llama", tokenizer, hidden=64),
                                               corpus_file)
    rank = 8
    assert all(rank * EXACT_SVD_FRACTION < min(l.d_out, l.d_in_folded) and gram_is_cheaper(l.d_out, l.d_in_folded, rank)
               for l in layers)
    build_index(tmp_path / "index", "m", model, tokenizer, layers, factors, CorpusSpec(str(corpus_file)),
                index_settings(representation="lowrank", rank=rank))
    stored, keys = _shard_tensors(tmp_path / "index")
    curvature = load_curvature(factors, layers, None, damping_scale=DAMPING_SCALE)
    by_key = {(s.doc_id, s.chunk): s for s in training_sequences(tokenizer, corpus_file)}
    for row, key in enumerate(keys):
        gradients = sequence_gradient(model, layers, by_key[key])
        for index, layer in enumerate(layers):
            c = curvature[index]
            rotated = c.gradient_basis.T @ gradients[layer.name] @ c.activation_basis
            whitened = rotated / (c.eigenvalues + c.damping).sqrt()
            optimum = torch.linalg.svdvals(whitened)[rank:].square().sum().sqrt()
            error = (whitened - stored[f"{layer.name}.left"][row] @ stored[f"{layer.name}.right"][row].T).norm()
            assert error <= 1.01 * optimum + 1e-9 * whitened.norm(), (key, layer.name, float(error / optimum))


@pytest.mark.parametrize("value, overflows", [(65504.0, False), (65519.0, False), (65520.0, True),
                                               (float("nan"), True), (float("-inf"), True)])
def test_a_value_that_storage_cannot_hold_is_refused(value, overflows):
    """float16 storage: values that round to ±inf (≥ 65520 in magnitude), NaN and ±inf stop the build with a
    RunError; the largest that rounds to a finite value (65519 → 65504) is kept, and so is an empty tensor."""
    from types import SimpleNamespace

    from attrib.errors import RunError
    from attrib.stages.index import IndexBuilder

    builder = SimpleNamespace(storage=torch.float16, settings=SimpleNamespace(storage_dtype="float16"))
    tensor = torch.tensor([[1.0, -2.0], [value, 3.0]])
    if overflows:
        with pytest.raises(RunError, match="overflows"):
            IndexBuilder._store(builder, tensor)
    else:
        assert torch.equal(IndexBuilder._store(builder, tensor), tensor.to(torch.float16))
        assert IndexBuilder._store(builder, torch.zeros(0, 2)).shape == (0, 2)  # nothing to check, nothing refused


def test_random_projection_inner_products_are_unbiased_over_seeds():
    """E over seeds of ⟨P_Sᵀ X P_A, P_Sᵀ Y P_A⟩ = ⟨X, Y⟩ for Gaussian P of variance 1/k (P_S, P_A independent).

    Over 2,000 seeds the mean lies within 4 standard errors of the exact value, for a pair with a small cosine
    (the regime of influence: |cos| ≪ 1) and for X = Y; one seed is reproducible and another differs.
    """
    layer = TrackedLayer("layer", None, d_in=24, d_out=20, has_bias=False, transposed=False)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20, 24, generator=generator, dtype=torch.float64)
    y = 0.2 * x + torch.randn(20, 24, generator=generator, dtype=torch.float64)
    for first, second in ((x, y), (x, x)):
        exact = float((first * second).sum())
        estimates = []
        for seed in range(2000):
            random = IndexSettings(representation="kronecker", projection="random", dims=[4, 5], seed=seed)
            (p_s, p_a), = make_projections([layer], None, random, torch.float64)
            estimates.append(float(((p_s.T @ first @ p_a) * (p_s.T @ second @ p_a)).sum()))
        estimates = torch.tensor(estimates)
        error = float(estimates.std()) / len(estimates) ** 0.5
        assert abs(float(estimates.mean()) - exact) < 4 * error, (float(estimates.mean()), exact, error)

    def seeded(seed):
        return make_projections([layer], None, IndexSettings(representation="kronecker", projection="random", dims=[4, 5],
                                                             seed=seed))

    again, same, other = seeded(7), seeded(7), seeded(8)
    assert torch.equal(again[0][0], same[0][0]) and not torch.equal(again[0][0], other[0][0])


def test_resume_after_a_kill_equals_an_uninterrupted_build(tmp_path, model_dirs, corpus_file):
    """A build killed after its first shard resumes there (finished shards are not recomputed) and ends with
    the same shards, byte for byte, as an uninterrupted one."""
    import attrib.stages.index as stage

    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["llama"], corpus_file)
    settings = index_settings(representation="lowrank", rank=2, storage_dtype="bfloat16", docs_per_part=4)
    spec = CorpusSpec(str(corpus_file))
    whole = build_index(tmp_path / "a", "m", model, tokenizer, layers, factors, spec, settings)
    original, calls = stage._build_part, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    stage._build_part = dying
    try:
        with pytest.raises(KeyboardInterrupt):
            build_index(tmp_path / "b", "m", model, tokenizer, layers, factors, spec, settings)
    finally:
        stage._build_part = original
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "running"
    assert len(list((tmp_path / "b" / "shards").glob("*.safetensors"))) == 1
    calls["n"] = 0
    stage._build_part = lambda *a, **k: (calls.__setitem__("n", calls["n"] + 1), original(*a, **k))[1]
    try:
        resumed = build_index(tmp_path / "b", "m", model, tokenizer, layers, factors, spec, settings)
    finally:
        stage._build_part = original
    assert calls["n"] == 2  # 12 documents in parts of 4: the first was kept
    assert resumed["files"] == whole["files"] and resumed["counts"] == whole["counts"]
    for name in whole["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert build_index(tmp_path / "b", "m", model, tokenizer, layers, factors, spec, settings) is None  # complete


def test_tail_members_are_the_tables_tails_including_ties():
    """The running tails choose exactly the rows attrib.scoring._tails keeps (score descending, then document
    order), on random scores and on scores with many ties at the thresholds."""
    import numpy as np

    from attrib.scoring import _tails
    from attrib.stages.index import _tail_members

    generator = np.random.default_rng(0)
    checked = 0
    for trial in range(300):
        queries, count, top = 3, int(generator.integers(5, 40)), int(generator.integers(1, 5))
        if count <= 2 * top:
            continue
        scores = (generator.integers(-3, 3, (queries, count)).astype(float) if trial % 2
                  else generator.standard_normal((queries, count)))
        doc = np.stack([generator.permutation(100)[:count] for _ in range(queries)])
        kept = _tails(np.repeat(np.arange(queries), count), doc.reshape(-1), scores.reshape(-1), top)
        expected = np.zeros(queries * count, bool)
        expected[kept] = True
        assert (_tail_members(scores, doc, top).reshape(-1) == expected).all(), trial
        checked += 1
    assert checked > 200


def test_kept_tails_equal_all_scores_and_resume_after_a_kill(tmp_path, model_dirs, corpus_file, monkeypatch):
    """Scores kept as each query's top and bottom K (running tails over the shards, in groups of a few sequences)
    are exactly the rows of all scores at those ranks, with the same summary; a pass killed after its first shard
    resumes from the saved tails (that shard is not scored again) and ends with the same tables."""
    import attrib.stages.index as stage

    model, tokenizer, layers, factors = fitted(tmp_path, model_dirs["llama"], corpus_file)
    build_index(tmp_path / "index", "m", model, tokenizer, layers, factors, CorpusSpec(str(corpus_file)),
                index_settings(representation="lowrank", rank=2))  # 12 documents in 3 shards
    monkeypatch.setattr(stage, "SCORES_BYTES", 8 * len(QUERIES) * len(layers) * 2)  # groups of 2 sequences

    def scored(name, top):
        score_index(tmp_path / name, str(tmp_path / "index"), "m", model, tokenizer, layers, QUERIES, query_settings(),
                    IndexScoreSettings(documents_top=top))
        return documents(tmp_path / name), pq.read_table(tmp_path / name / "summary.parquet").to_pylist()

    every, every_summary = scored("all", 0)
    tails, tails_summary = scored("tails", 2)
    assert len(every) == 24 and len(tails) == 2 * 4
    assert tails == {key: row for key, row in every.items() if row["rank"] <= 2 or row["rank"] >= 11}
    assert len(tails_summary) == len(every_summary) == len(QUERIES)
    for kept, whole in zip(tails_summary, every_summary):
        assert kept["query_id"] == whole["query_id"] and kept["documents"] == whole["documents"] == 12
        for column in ("mean", "std", "positive_sum"):
            assert kept[column] == pytest.approx(whole[column], rel=1e-12, abs=1e-12), column

    monkeypatch.setattr(stage, "TAILS_SAVE_SECONDS", 0)
    original, calls = stage._score_shard, []

    def dying(reader, name, *args, **kwargs):
        calls.append(name)
        if len(calls) > 1:
            raise KeyboardInterrupt
        yield from original(reader, name, *args, **kwargs)

    monkeypatch.setattr(stage, "_score_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        scored("resumed", 2)
    assert list((tmp_path / "resumed" / "parts").glob("tails-q0000-r000.safetensors"))
    calls.clear()
    monkeypatch.setattr(stage, "_score_shard",
                        lambda reader, name, *a, **k: (calls.append(name), original(reader, name, *a, **k))[1])
    resumed, resumed_summary = scored("resumed", 2)
    assert len(calls) == 2 and calls[0].endswith("p00001.safetensors")  # the first shard came from the saved tails
    assert resumed == tails and resumed_summary == tails_summary
    assert not list((tmp_path / "resumed").glob("parts"))  # parts are discarded once complete


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys, model_dirs, corpus_file):
    """Factors of another model, dims or rank beyond a layer, an empty corpus: exit 2, one `error:` line, no --out.
    A changed corpus (or other settings) is refused on resume, and the index is left as it was; an index whose
    factors changed since is refused by the scoring."""
    import attrib

    factors = tmp_path / "factors"
    attrib.fit_factors(str(model_dirs["gpt2"]), str(corpus_file), out=factors, max_length=MAX_LENGTH)
    other = tmp_path / "other-factors"
    attrib.fit_factors(str(model_dirs["llama"]), str(corpus_file), out=other, max_length=MAX_LENGTH)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": "a", "text": "  "}, {"id": "b", "text": ""}])
    one_token = write_jsonl(tmp_path / "one-token.jsonl", [{"id": "a", "text": "a"}, {"id": "b", "text": "b"}])
    base = ["--quiet", "index", "--model", model_dirs["gpt2"], "--max-length", MAX_LENGTH]
    capsys.readouterr()
    cases = {
        "another model": ["--factors", other, "--corpus", corpus_file],
        "dims": ["--factors", factors, "--corpus", corpus_file, "--representation", "kronecker", "--dims", "8x999"],
        "rank": ["--factors", factors, "--corpus", corpus_file, "--representation", "lowrank", "--rank", "17"],
        "empty corpus": ["--factors", factors, "--corpus", empty],
        "no sequence of 2 tokens": ["--factors", factors, "--corpus", one_token],
        "representation": ["--factors", factors, "--corpus", corpus_file, "--representation", "sketch"],
    }
    for name, args in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code, _, err = run_cli(capsys, *base, *args, "--out", out)
        assert code == 2, (name, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
        assert not out.exists(), name

    out = tmp_path / "index"
    code, _, err = run_cli(capsys, *base, "--factors", factors, "--corpus", corpus_file,
                           "--representation", "lowrank", "--rank", "2", "--out", out)
    assert code == 0, err
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    corpus_file.write_text(corpus_file.read_text() + json.dumps({"id": "new", "text": "A new document."}) + "\n")
    code, _, err = run_cli(capsys, *base, "--factors", factors, "--corpus", corpus_file,
                           "--representation", "lowrank", "--rank", "2", "--out", out)
    assert code == 2 and "other inputs (corpus changed" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    attrib.fit_factors(str(model_dirs["gpt2"]), str(corpus_file), out=factors, max_length=MAX_LENGTH, max_docs=6,
                       overwrite=True)  # the index's factors are refitted on other data
    with pytest.raises(InputError, match="changed since"):
        attrib.query(str(model_dirs["gpt2"]), None, [q.as_row() for q in QUERIES], None, tmp_path / "scores",
                     index=out, max_length=MAX_LENGTH)
    assert not (tmp_path / "scores").exists()


def test_index_candidates_feed_query_unchanged(tmp_path, capsys, model_dirs, corpus_file):
    """The index's top K per query as a prefilter stage (method "index"): `query --candidates` reads it as it
    reads TF-IDF's, scores exactly those documents, and its scores equal the full corpus's exact scores."""
    import attrib

    queries = [q.as_row() for q in QUERIES]
    model = str(model_dirs["llama"])
    factors = attrib.fit_factors(model, str(corpus_file), out=tmp_path / "factors", max_length=MAX_LENGTH)
    built = attrib.index(model, factors, str(corpus_file), tmp_path / "index", representation="lowrank", rank=2,
                         max_length=MAX_LENGTH)
    assert built.manifest["bytes_per_sequence"] == 2 * 2 * 2 * ((32 + 16) + (32 + 16) + (16 + 32))  # bf16, rank 2, 2 blocks
    candidates = attrib.prefilter(None, queries, tmp_path / "candidates", index=built, model=model, top_k=4,
                                  max_length=MAX_LENGTH)
    table = candidates.documents()
    assert candidates.manifest["settings"]["method"] == "index" and table.num_rows == 8
    assert table.schema.names == ["query_id", "doc_id", "chunk", "score", "rank"]
    index_scores = attrib.query(model, None, queries, None, tmp_path / "index-scores", index=built,
                                max_length=MAX_LENGTH, keep_all_scores=True).documents().to_pylist()
    for row in table.to_pylist():  # the candidates are the index's own top 4
        match = [r for r in index_scores if (r["query_id"], r["doc_id"]) == (row["query_id"], row["doc_id"])]
        assert match[0]["rank"] == row["rank"] and match[0]["score"] == pytest.approx(row["score"], rel=1e-12)

    code, out, err = run_cli(capsys, "top", tmp_path / "index-scores", "--top-k", 2)  # index scores read as query's
    assert code == 0 and "q1" in out, err

    rescored = attrib.query(model, factors, queries, str(corpus_file), out=tmp_path / "rescored", candidates=candidates,
                            max_length=MAX_LENGTH)
    exact = attrib.query(model, factors, queries, str(corpus_file), out=tmp_path / "exact", max_length=MAX_LENGTH,
                         keep_all_scores=True)
    exact_scores = {(r["query_id"], r["doc_id"]): r["score"] for r in exact.documents().to_pylist()}
    rows = rescored.documents().to_pylist()
    assert {(r["query_id"], r["doc_id"]) for r in rows} == {(r["query_id"], r["doc_id"]) for r in table.to_pylist()}
    for row in rows:
        assert row["prefilter_rank"] is not None
        assert row["score"] == pytest.approx(exact_scores[(row["query_id"], row["doc_id"])], rel=1e-5)


@pytest.mark.slow
def test_two_processes_build_and_score_the_index_of_one(tmp_path, model_dirs, corpus_file):
    """Under torchrun the ranks split the documents, each writing its own shards; scored in one process or in
    two (each rank its shards' tails), the two-process index gives the one-process index's scores (float32 arithmetic in batches of other sizes:
    agreement to 1e-5 of the largest score)."""
    import attrib
    from tests.test_distributed import attrib_command

    model, factors = model_dirs["gpt2"], tmp_path / "factors"
    fit = attrib_command(["fit-factors", "--model", model, "--corpus", corpus_file, "--out", factors,
                          "--max-length", MAX_LENGTH], 1)
    assert fit.returncode == 0, fit.stderr[-3000:]
    scores = {}
    for processes in (1, 2):
        out = tmp_path / f"index{processes}"
        built = attrib_command(["index", "--model", model, "--factors", factors, "--corpus", corpus_file, "--out", out,
                                "--max-length", MAX_LENGTH, "--docs-per-part", 3,
                                "--storage-dtype", "float32"], processes)
        assert built.returncode == 0, built.stderr[-3000:]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["documents"] == 12
        ranks = {name.split("/")[1][:4] for name in manifest["files"] if name.startswith("shards/")}
        assert ranks == ({"r000"} if processes == 1 else {"r000", "r001"})
        result = attrib.query(str(model), None, [q.as_row() for q in QUERIES], None, tmp_path / f"scores{processes}",
                              index=out, keep_all_scores=True, max_length=MAX_LENGTH)
        scores[processes] = {(r["query_id"], r["doc_id"]): r["score"] for r in result.documents().to_pylist()}
    queries = write_jsonl(tmp_path / "queries.jsonl", [q.as_row() for q in QUERIES])
    scored = attrib_command(["query", "--model", model, "--index", tmp_path / "index2", "--queries", queries,
                             "--out", tmp_path / "scored2", "--max-length", MAX_LENGTH], 2)
    assert scored.returncode == 0, scored.stderr[-3000:]  # each rank keeps the tails of its own shards
    scores["scored by 2"] = {(r["query_id"], r["doc_id"]): r["score"]
                             for r in pq.read_table(tmp_path / "scored2" / "documents.parquet").to_pylist()}
    scale = max(abs(v) for v in scores[1].values())
    for processes in (2, "scored by 2"):
        assert scores[1].keys() == scores[processes].keys() and len(scores[1]) == 24
        for key, value in scores[1].items():
            assert scores[processes][key] == pytest.approx(value, abs=1e-5 * scale), key
