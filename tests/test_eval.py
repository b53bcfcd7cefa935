"""Fast variants of the attribution-quality evaluations in scripts/eval (issue 7).

They assert only what must hold on tiny models; the bounds were measured on 2026-11-29
(2 CPU cores, float64) and set with a wide margin, since training a model from scratch
is not bit-reproducible across thread counts. Full runs and their numbers:
docs/benchmarks.md, "Attribution quality".
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "eval"))

import exact_influence  # noqa: E402
import fact_tracing  # noqa: E402
import lds  # noqa: E402
import realtext  # noqa: E402
from common import Setup, exact_influence as dense_influence  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("eval-work")


# Measured: ekfac vs exact (full empirical Fisher, λ = 0.1 × mean eigenvalue per layer) mean Pearson
# 0.66–0.70 (llama, 6144 tracked params) and 0.47 (gpt2, 4256), identity 0.43 / 0.37. Bounds: about
# 0.2 below the measurement, and ekfac must beat the gradient dot product (identity).
@pytest.mark.parametrize("arch, bound", [("llama", 0.45), ("gpt2", 0.3)])
def test_ekfac_agrees_with_exact_influence(work, arch, bound):
    setup = Setup(arch=arch, n_facts=8, n_filler=24, steps=120)
    result = exact_influence.evaluate(setup, work, [0], [0.1], [], [], 0, strategies=("ekfac", "identity"))
    by = {(r["group"], r["method"], r["reference"]): r for r in result["rows"]}
    ekfac = by[("strategy", "ekfac", "full F")]["pearson"]
    identity = by[("strategy", "identity", "full F")]["pearson"]
    assert ekfac > bound, result["rows"]
    assert ekfac > identity


@pytest.mark.parametrize("block_diagonal", [False, True], ids=["full", "block-diagonal"])
def test_exact_influence_is_the_per_layer_damped_dense_solve(block_diagonal):
    """The dense reference vᵀ (F + diag(λ_l))⁻¹ g, F with cross-layer blocks (zeroed when block-diagonal) and layer
    scales 100× apart, λ_l = 0.1 × tr(F_ll)/P_l, against torch.linalg.solve of the matrix built here
    (float64: 1e-10). One damping for all layers, or the cross-layer blocks kept or dropped wrongly, is off by
    more than 10%."""
    import torch

    generator = torch.Generator().manual_seed(0)
    slices = [slice(0, 4), slice(4, 10)]
    root = torch.randn(10, 30, dtype=torch.float64, generator=generator)
    root[4:] *= 10  # the second layer's curvature is 100× the first's
    fisher = root @ root.T / 30
    V, D = torch.randn(3, 10, dtype=torch.float64, generator=generator), torch.randn(5, 10, dtype=torch.float64,
                                                                                      generator=generator)
    matrix = fisher.clone()
    if block_diagonal:
        matrix[slices[0], slices[1]] = 0
        matrix[slices[1], slices[0]] = 0
    damping = torch.cat([torch.full((s.stop - s.start,), 0.1 * float(torch.diagonal(fisher)[s].mean()), dtype=torch.float64)
                         for s in slices])
    expected = V @ torch.linalg.solve(matrix + torch.diag(damping), D.T)
    got = dense_influence(V, D, fisher, slices, scale=0.1, block_diagonal=block_diagonal)
    assert got == pytest.approx(expected.numpy(), rel=1e-10, abs=1e-10 * float(expected.abs().max()))
    other_masking = fisher if block_diagonal else torch.block_diag(*(fisher[s, s] for s in slices))
    wrong = [V @ torch.linalg.solve(matrix + 0.1 * float(torch.diagonal(fisher).mean()) * torch.eye(10, dtype=torch.float64), D.T),
             V @ torch.linalg.solve(other_masking + torch.diag(damping), D.T)]
    for mistake in wrong:  # one damping for every layer; the cross-layer blocks kept or dropped the other way
        assert float((mistake - expected).abs().max()) > 0.1 * float(expected.abs().max())


# Measured: recall@10 = MRR = 1.0 for ekfac (8 facts among 32 documents). The planted document is
# the only one holding the completion's invented name, so this is a floor, not a hard test.
def test_fact_tracing_finds_the_planted_document(work):
    setup = Setup(arch="llama", n_facts=8, n_filler=24, steps=120)
    result = fact_tracing.evaluate(setup, work, methods=("ekfac",))
    metrics = result["metrics"]["ekfac"]
    assert metrics["recall_at_10"] >= 0.75
    assert metrics["mrr"] >= 0.5


# Distractors repeat each fact's prompt words and object without stating it, so lexical search
# ranks them above the source. Measured on GPT-2 (8 facts, 40 documents): MRR ekfac 0.85, TF-IDF 0.52,
# TF-IDF recall@1 0.25 (the full-size run agrees: 0.85 vs 0.50). Llama is left out: at full size its
# ekfac MRR is below TF-IDF's (docs/benchmarks.md, fact tracing), so no bound must hold there.
def test_fact_tracing_with_distractors_influence_beats_tfidf(work):
    setup = Setup(arch="gpt2", **fact_tracing.QUICK)
    result = fact_tracing.evaluate(setup, work, methods=("ekfac", "tfidf"))
    ekfac, tfidf = result["metrics"]["ekfac"], result["metrics"]["tfidf"]
    assert tfidf["recall_at_1"] <= 0.25  # the corpus is hard for lexical search
    assert ekfac["mrr"] > tfidf["mrr"] + 0.1


# Measured with M = 8 subset models of a 20-document corpus (6 fact + 4 generic queries): LDS ekfac
# 0.76, random scores −0.05 ± 0.10 (20 draws). Asserted: ekfac is clearly better than chance.
def test_lds_of_ekfac_beats_random_scores(work):
    setup = Setup(arch="llama", n_facts=6, n_filler=14, steps=60, generic=4)
    result = lds.evaluate(setup, work, 8, jobs=2, methods=("ekfac",))
    by = {row["method"]: row for row in result["rows"]}
    assert set(by["ekfac"]) >= {"fact", "generic"}
    assert by["ekfac"]["lds"] > 0.4
    assert by["ekfac"]["lds"] > by["random"]["lds"] + 0.3


SAMPLE_FORTUNES = """\
A clash of doctrine is not a disaster -- it is an opportunity, said the man who had
	never once been in a clash of doctrine himself.
%
Too short.
%
Genetics explains why you look like your father, and if you don't, why you should.
		-- a wall in Cambridge
%
A clash of doctrine is not a disaster -- it is an opportunity, said the man who had never once been in a clash of doctrine himself.
%
Never put off till tomorrow what you can do the day after tomorrow, because by then it may no longer need doing.
%
The best way to predict the future is to invent it, and the second best way is to be told it by the inventor.
%
""" + "Long " * 80 + "\n%\nThe last fortune of a file needs no closing percent line, as in the real strfile sources."


def test_realtext_corpus_splits_fortunes_into_documents_and_held_out_queries():
    fortunes = realtext.split_fortunes(SAMPLE_FORTUNES)
    assert fortunes[0].startswith("A clash of doctrine") and "\t" not in fortunes[0] and "  " not in fortunes[0]
    assert fortunes[0] == fortunes[3]  # the same text once wrapped, once on one line
    assert fortunes[-1].endswith("real strfile sources.")
    documents, queries = realtext.split_corpus(fortunes, num_docs=3, num_queries=2, seed=0)
    kept = {d["text"] for d in documents} | {q["prompt"] + q["completion"] for q in queries}
    assert len(kept) == 5  # the duplicate, the 9-character and the 400-character fortunes dropped
    assert all(realtext.MIN_CHARS <= len(t) <= realtext.MAX_CHARS for t in kept)
    for q in queries:
        assert q["completion"].startswith(" ") and q["prompt"] and not q["prompt"].endswith(" ")
        assert q["prompt"] + q["completion"] not in {d["text"] for d in documents}  # held out
        assert abs(len(q["prompt"].split()) - len(q["completion"].split())) <= 1
    assert (documents, queries) == realtext.split_corpus(fortunes, 3, 2, seed=0)  # reproducible
    assert (documents, queries) != realtext.split_corpus(fortunes, 3, 2, seed=1)  # the seed shuffles
    with pytest.raises(ValueError, match="only 5 fortunes"):
        realtext.split_corpus(fortunes, num_docs=5, num_queries=1)


def test_bootstrap_interval_covers_the_mean_and_shrinks_to_it_without_spread():
    per_query = np.linspace(0.0, 1.0, 41)
    low, high = realtext.bootstrap(per_query)
    assert low < 0.5 < high and high - low < 0.3  # std of the mean 0.047: about ±0.09
    assert realtext.bootstrap(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))


def test_realtext_cg_iterates_are_attribs_pcg_iterates():
    """cg_iterates reads x_k of one PCG run; each must equal attrib.solve.preconditioned_cg run for k steps."""
    import torch

    from attrib.solve import preconditioned_cg

    generator = torch.Generator().manual_seed(0)
    root = torch.randn(2, 24, 24, dtype=torch.float64, generator=generator)
    A = root @ root.mT / 24 + 0.1 * torch.eye(24, dtype=torch.float64)  # one SPD block per "layer" of 4 x 6
    M = torch.diag_embed(torch.diagonal(A, dim1=-2, dim2=-1))  # Jacobi preconditioner

    def apply(matrices, vectors):
        return [(m @ v.reshape(v.shape[0], -1).T).T.reshape(v.shape) for m, v in zip(matrices, vectors)]

    b = [torch.randn(3, 4, 6, dtype=torch.float64, generator=generator) for _ in range(2)]
    iterates, residuals = realtext.cg_iterates(lambda v: apply(A, v), lambda v: apply(torch.linalg.inv(M), v),
                                               b, (0, 1, 3, 7))
    assert residuals.shape == (8, 3)
    for k, x in iterates.items():
        expected, _ = preconditioned_cg(lambda v: apply(A, v), lambda v: apply(torch.linalg.inv(M), v), b, k)
        for got, want in zip(x, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
