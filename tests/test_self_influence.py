"""Self-influence against a dense float64 oracle, on planted documents, and through the CLI (DESIGN.md §6)."""

from __future__ import annotations

import json
import random
from dataclasses import asdict

import pyarrow.parquet as pq
import pytest
import torch

from attrib.data import CorpusSpec, SequenceCaps, iter_sequence_parts
from attrib.distributed import World
from attrib.fit import FitSettings, fit_factors
from attrib.models import find_tracked_layers, load_model, model_record
from attrib.self_influence import SelfInfluenceSettings, run_self_influence
from attrib.storage import StageDir
from tests.conftest import run_cli, write_jsonl
from tests.oracle import describe_difference, sequence_gradient

MAX_LENGTH = 24  # the corpus_file fixture's longer documents become two or three chunks


def fitted_model(tmp_path, model_dir, corpus_file, strategy):
    """A float64 model and its factors fitted on `corpus_file` with the empirical Fisher."""
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.double()
    layers = find_tracked_layers(model)
    settings = FitSettings(strategy=strategy, fisher="empirical", max_length=MAX_LENGTH, stats_dtype="float64")
    factors = StageDir(tmp_path / "factors", "fit-factors", asdict(settings), model_record("m", model, layers))
    fit_factors(model, tokenizer, layers, CorpusSpec(str(corpus_file)), factors, settings, World())
    return model, tokenizer, layers, factors.path


def dense_inverse(curvature) -> torch.Tensor | None:
    """(H + λ)⁻¹ of one layer built explicitly (torch.kron of the bases, row-major vec) and inverted densely;
    None for the identity strategy."""
    if curvature.eigenvalues is None:
        return None
    diagonal = torch.diag(curvature.eigenvalues.reshape(-1) + curvature.damping)
    if curvature.gradient_basis is None:  # diagonal: the identity basis
        return torch.linalg.inv(diagonal)
    basis = torch.kron(curvature.gradient_basis, curvature.activation_basis)
    return torch.linalg.inv(basis @ diagonal @ basis.T)


@pytest.mark.parametrize("arch, strategy", [("gpt2", "ekfac"), ("llama", "kfac"), ("gpt2", "diagonal"),
                                            ("llama", "identity")])
def test_self_influence_equals_the_dense_oracle_and_tokens_sum_to_it(tmp_path, model_dirs, corpus_file, arch, strategy):
    """gᵀ (H + λ)⁻¹ g per sequence and layer, H the fitted EK-FAC/K-FAC/diagonal matrix (identity: gᵀg).

    Everything runs in float64, but the stored eigenvectors are float32 and orthogonal only to ~1e-7,
    so the factored Q (Λ + λ)⁻¹ Qᵀ and the dense inverse of Q (Λ + λ) Qᵀ differ at that level (measured
    up to 3e-8 relative): rel 1e-6, as in tests/test_query.py. Without bases (diagonal, identity)
    they agree to rounding. Per-token scores are stored in float32, so their sum matches to rel 1e-5.
    The loss column is the summed next-token cross-entropy, computed here with torch's own.
    """
    from attrib.curvature import load_curvature

    model, tokenizer, layers, factors = fitted_model(tmp_path, model_dirs[arch], corpus_file, strategy)
    settings = SelfInfluenceSettings(max_length=MAX_LENGTH, tokens_per_batch=64, docs_per_part=5, token_scores_top=-1)
    manifest = run_self_influence(tmp_path / "self", "m", model, tokenizer, layers, str(factors),
                                  CorpusSpec(str(corpus_file)), settings)
    assert manifest["status"] == "complete" and manifest["strategy"] == strategy
    rows = {(r["doc_id"], r["chunk"]): r for r in pq.read_table(tmp_path / "self" / "self_influence.parquet").to_pylist()}

    curvature = load_curvature(str(factors), layers, None)
    inverses = [dense_inverse(curvature[index]) for index in range(len(layers))]
    sequences = [s for part in iter_sequence_parts(CorpusSpec(str(corpus_file)), tokenizer, MAX_LENGTH, 100, SequenceCaps())
                 for _, s in part.sequences]
    assert len(rows) == len(sequences) > 12  # every chunk of every document, some documents chunked
    for sequence in sequences:
        gradients = sequence_gradient(model, layers, sequence)
        expected = []
        for layer, inverse in zip(layers, inverses):
            g = gradients[layer.name].reshape(-1)
            expected.append(float(g @ g) if inverse is None else float(g @ inverse @ g))
        row = rows[(sequence.doc_id, sequence.chunk)]
        actual, wanted = torch.tensor(row["layer_scores"], dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
        assert torch.allclose(actual, wanted, rtol=1e-6, atol=0), describe_difference(actual, wanted)
        assert row["score"] == pytest.approx(sum(expected), rel=1e-6)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sequence.input_ids])).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(sequence.input_ids[1:]), reduction="sum")
        assert row["tokens"] == len(sequence) and row["loss"] == pytest.approx(float(loss), rel=1e-9)
    ranked = sorted(rows.values(), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranked] == list(range(1, len(rows) + 1))
    assert all(a["score"] >= b["score"] for a, b in zip(ranked, ranked[1:]))

    tokens = pq.read_table(tmp_path / "self" / "tokens").to_pylist()
    assert len(tokens) == len(rows) and {t["query_id"] for t in tokens} == {"self"}
    for token_row in tokens:
        row = rows[(token_row["doc_id"], token_row["chunk"])]
        assert len(token_row["token_scores"]) == row["tokens"]
        assert sum(token_row["token_scores"]) == pytest.approx(row["score"], rel=1e-5)
