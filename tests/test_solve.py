"""`--solver cg` against dense float64 oracles (docs/design.md §6): the Gauss-Newton product, the CG
solution, its residuals, zero iterations, sign and scale, and the CLI."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from attrib.curvature import load_curvature
from attrib.data import CorpusSpec, Query, Sequence, query_sequence
from attrib.distributed import World
from attrib.stages.fit import FitSettings, fit_factors
from attrib.models import find_tracked_layers, load_model, model_record
from attrib.preconditioned_gradients import compute_query_gradients
from attrib.options import DEFAULT_SOLVE_ITERATIONS
from attrib.solve import (
    CGSolver,
    EmpiricalFisher,
    GaussNewton,
    SolveSample,
    preconditioned_cg,
)
from attrib.storage import StageDir
from tests.conftest import TEXTS, build_model, run_cli, write_jsonl
from tests.oracle import dense_gauss_newton, describe_difference, sequence_gradient
from tests.test_query import _apply

MAX_LENGTH = 12
QUERY_LENGTH = 24
SOLVE_TOKENS = 120  # about 11 sequences of the corpus: the dense oracle forms a Jacobian per sequence
QUERIES = [Query("q1", "The capital of", " Vorlia is"), Query("q2", "Rivers run", " to the sea")]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def setup(request, tmp_path_factory, tokenizer):
    """A float64 model narrow enough for a dense GN matrix (hidden 8: 1,104 GPT-2, 768 Llama tracked
    weights), EK-FAC factors fitted on the solve sample (true Fisher, 32 sampled labels per position,
    so that EK-FAC approximates the same G) and the dense G of the sample."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"solve-{arch}")
    rows = [{"id": f"doc{i}", "text": " ".join(TEXTS[i % 5 : i % 5 + 1 + i % 2])} for i in range(8)]
    corpus = write_jsonl(root / "corpus.jsonl", rows)
    model_dir = build_model(root / "model", arch, tokenizer, hidden=8)
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.double()
    layers = find_tracked_layers(model)
    settings = FitSettings(fisher="true", fisher_samples=32, max_length=MAX_LENGTH, max_tokens=SOLVE_TOKENS, stats_dtype="float64")
    stage = StageDir(root / "factors", "fit-factors", asdict(settings), model_record("m", model, layers))
    fit_factors(model, tokenizer, layers, CorpusSpec(str(corpus)), stage, settings, World())
    sample = SolveSample.read(CorpusSpec(str(corpus)), tokenizer, MAX_LENGTH, SOLVE_TOKENS)
    return dict(model=model, tokenizer=tokenizer, layers=layers, sample=sample, corpus=corpus, model_dir=model_dir,
                dense=dense_gauss_newton(model, layers, sample.input_ids), factors=str(stage.path),
                dense_empirical=_dense_empirical_fisher(model, layers, sample.input_ids))


def _dense_empirical_fisher(model, layers, sequences) -> torch.Tensor:
    """(1/N) Σ_n g_n g_nᵀ over the tracked weights of all layers, g_n sequence n's summed-loss gradient
    with its own labels (plain autograd, float64)."""
    rows = []
    for ids in sequences:
        gradient = sequence_gradient(model, layers, Sequence("d", 0, ids.tolist(), [], ids[1:].tolist() + [-1]))
        rows.append(torch.cat([gradient[layer.name].reshape(-1) for layer in layers]))
    rows = torch.stack(rows)
    return rows.T @ rows / len(sequences)


# The damping scale of these tests (the default until the LDS study set 0.001): at 0.001 these random
# models' G + D has condition numbers far beyond what a test's 30-40 iterations can solve.
DAMPING_SCALE = 0.1


def _solver(setup, layers, iterations, damping=None):
    """(CGSolver over `layers`, the dense system G + D over them) with --damping `damping` (default:
    DAMPING_SCALE × mean Λ per layer)."""
    curvature = load_curvature(setup["factors"], layers, damping, damping_scale=DAMPING_SCALE)
    gauss_newton = GaussNewton(setup["model"], layers, setup["sample"], tokens_per_batch=4096,
                               pad_id=setup["tokenizer"].pad_token_id, device="cpu")
    positions = _positions(setup["layers"], layers)
    diagonal = torch.cat([torch.full((l.d_out * l.d_in_folded,), curvature.damping_of(i), dtype=torch.float64)
                          for i, l in enumerate(layers)])
    system = setup["dense"][positions][:, positions] + torch.diag(diagonal)
    return CGSolver(curvature, gauss_newton, iterations, "cpu", torch.float64), system


def _positions(all_layers, layers) -> torch.Tensor:
    """Indices of `layers`' weights in the oracle's vector over `all_layers`."""
    starts, start = {}, 0
    for layer in all_layers:
        starts[layer.name] = start
        start += layer.d_out * layer.d_in_folded
    return torch.cat([torch.arange(starts[l.name], starts[l.name] + l.d_out * l.d_in_folded) for l in layers])


def _split(vectors: torch.Tensor, layers) -> list[torch.Tensor]:
    """[Q, P] → per layer [Q, d_out, d_in(+1)] (row-major, the oracle's order)."""
    out, start = [], 0
    for layer in layers:
        size = layer.d_out * layer.d_in_folded
        out.append(vectors[:, start : start + size].reshape(-1, layer.d_out, layer.d_in_folded))
        start += size
    return out


def _flat(per_layer: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in per_layer], dim=1)


def _query_gradients(setup) -> torch.Tensor:
    """Dense raw query gradients ∇_W(−log p(completion | prompt)) [Q, P], plain autograd."""
    tokenizer, layers = setup["tokenizer"], setup["layers"]
    rows = []
    for query in QUERIES:
        gradient = sequence_gradient(setup["model"], layers, query_sequence(tokenizer, query, QUERY_LENGTH, []))
        rows.append(torch.cat([gradient[layer.name].reshape(-1) for layer in layers]))
    return torch.stack(rows)


def test_gauss_newton_product_equals_dense_matrix(setup):
    """G V equals the explicit (1/N) Σ Jᵀ H J V over all tracked layers; three directions at once
    equal each one alone. rtol 1e-8 for GPT-2 (float64 sums in another order); 1e-6 for Llama, whose
    RMSNorm computes in float32 even in a float64 model (transformers' LlamaRMSNorm)."""
    layers = setup["layers"]
    solver, _ = _solver(setup, layers, 0)
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(3, setup["dense"].shape[0], generator=generator, dtype=torch.float64)
    batched = _flat(solver.product.times(_split(directions, layers)))
    expected = directions @ setup["dense"]
    rtol = RTOL[setup["model"].config.model_type]
    assert torch.allclose(batched, expected, rtol=rtol, atol=rtol * float(expected.abs().max())), \
        describe_difference(batched, expected)
    for row in range(3):
        single = _flat(solver.product.times(_split(directions[row : row + 1], layers)))
        assert torch.allclose(single[0], batched[row], rtol=1e-10, atol=1e-12 * float(expected.abs().max()))


def test_empirical_fisher_product_equals_dense_matrix(setup):
    """F V equals the explicit (1/N) Σ g_n g_nᵀ V (data labels, plain autograd per sequence), the matrix
    that `--fisher empirical` factors approximate; tolerances as for the Gauss-Newton product."""
    layers = setup["layers"]
    product = EmpiricalFisher(setup["model"], layers, setup["sample"], 4096, setup["tokenizer"].pad_token_id, "cpu")
    directions = torch.randn(3, setup["dense"].shape[0], generator=torch.Generator().manual_seed(1),
                             dtype=torch.float64)
    actual = _flat(product.times(_split(directions, layers)))
    expected = directions @ setup["dense_empirical"]
    rtol = RTOL[setup["model"].config.model_type]
    assert torch.allclose(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max())), \
        describe_difference(actual, expected)
    gauss_newton = directions @ setup["dense"]  # not the same matrix: the test can tell them apart
    assert (gauss_newton - expected).norm() > 0.1 * expected.norm()


def test_gauss_newton_has_the_scale_of_the_fitted_curvature(setup):
    """tr(G_l) ≈ Σ Λ_l per layer: G is averaged over sequences like Λ (fit.py divides it by the number of
    sequences), so λ means the same in both. Λ is a Monte Carlo estimate (32 sampled labels per
    position on the same sample): 10% tolerance; normalising G by labelled positions instead would be
    off by the ~10 labelled tokens per sequence."""
    layers = setup["layers"]
    curvature = load_curvature(setup["factors"], layers, None)
    for index, layer in enumerate(layers):
        positions = _positions(layers, [layer])
        trace = float(setup["dense"][positions, positions].sum())
        assert float(curvature[index].eigenvalues.sum()) == pytest.approx(trace, rel=0.1), layer.name


def _iterations_to(residuals: torch.Tensor, tolerance: float) -> int:
    """The first k with every query's ‖r_k‖/‖b‖ below `tolerance` (len(residuals) if none)."""
    below = (residuals < tolerance).all(dim=1).nonzero()
    return int(below[0]) if len(below) else residuals.shape[0]


def _error_norms(solver, b: torch.Tensor, system: torch.Tensor, iterations: int) -> torch.Tensor:
    """‖x_k − x*‖_A [iterations + 1, Q]: the quantity PCG provably decreases at every step."""
    exact = torch.linalg.solve(system, b.T).T
    norms = []
    for k in range(iterations + 1):
        solver.iterations = k
        error = _flat(solver.solve(_split(b, solver.curvature.layers))[0]) - exact
        norms.append(((error @ system) * error).sum(1).sqrt())
    return torch.stack(norms)


RTOL = {"gpt2": 1e-8, "llama": 1e-6}  # Llama's RMSNorm runs in float32 (see the GN product test)
# Absolute damping per architecture for the convergence test: DAMPING_SCALE × mean Λ per layer
# leaves these random 2-block models with cond(G + D) of 1e3–1e5, where neither preconditioned nor
# plain CG converges within a test's time; with these, cond(G + D) is about 150 (GPT-2) and 2 (Llama).
CONVERGED_DAMPING = {"gpt2": 0.1, "llama": 1e-3}


def test_cg_converges_to_dense_damped_gn_inverse(setup):
    """All tracked layers, cross-layer terms included: 40 iterations reach (G + D)⁻¹ b (b the query
    gradients) to 1e-6 of its scale; the first recorded residual is the true ‖b − A M⁻¹ b‖/‖b‖."""
    layers = setup["layers"]
    solver, system = _solver(setup, layers, 40, CONVERGED_DAMPING[setup["model"].config.model_type])
    b = _query_gradients(setup)
    expected = torch.linalg.solve(system, b.T).T
    solution, residuals = solver.solve(_split(b, layers))
    solution = _flat(solution)
    assert torch.allclose(solution, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())), \
        describe_difference(solution, expected)
    assert residuals.shape == (41, len(QUERIES))
    x0 = _flat(solver._precondition(_split(b, layers)))
    assert torch.allclose(residuals[0], (b - x0 @ system).norm(dim=1) / b.norm(dim=1), rtol=1e-8)
    # later ones are CG's recursive residuals, which leave the true ones once those reach round-off
    assert (residuals[-1] < 1e-6).all()


def _dense_preconditioner(curvature, layers) -> torch.Tensor:
    """(EK-FAC + D)⁻¹ as a dense block-diagonal matrix: per layer (Q_S ⊗ Q_A) diag(1/(Λ + λ)) (Q_S ⊗ Q_A)ᵀ,
    built from the stored factors with torch.kron (row-major vec, the oracle's order)."""
    blocks = []
    for index, _ in enumerate(layers):
        layer = curvature[index]
        basis = torch.kron(layer.gradient_basis, layer.activation_basis)
        blocks.append(basis @ torch.diag(1 / (layer.eigenvalues.reshape(-1) + layer.damping)) @ basis.T)
    return torch.block_diag(*blocks)


def _dense_pcg(system: torch.Tensor, inverse_preconditioner: torch.Tensor, b: torch.Tensor, iterations: int):
    """Textbook preconditioned CG on dense float64 matrices, one right-hand side per row of b, from
    x₀ = M⁻¹ b: the reference the solver's recurrences are checked against."""
    x = b @ inverse_preconditioner
    r = b - x @ system
    z = r @ inverse_preconditioner
    p, rz = z, (r * z).sum(1)
    for _ in range(iterations):
        ap = p @ system
        alpha = rz / (p * ap).sum(1)
        x, r = x + alpha[:, None] * p, r - alpha[:, None] * ap
        z = r @ inverse_preconditioner
        rz_next = (r * z).sum(1)
        p, rz = z + (rz_next / rz)[:, None] * p, rz_next
    return x


def test_default_iterations_equal_dense_pcg(setup):
    """The default solve (DEFAULT_SOLVE_ITERATIONS steps, default damping 0.001 × mean Λ, all layers)
    equals an independent dense PCG with the kron-built EK-FAC preconditioner on the dense G + D,
    to 1e-6 of its scale (Llama's float32 RMSNorm, amplified by the system's conditioning)."""
    layers = setup["layers"]
    curvature = load_curvature(setup["factors"], layers, None)
    product = GaussNewton(setup["model"], layers, setup["sample"], 4096, setup["tokenizer"].pad_token_id, "cpu")
    solver = CGSolver(curvature, product, DEFAULT_SOLVE_ITERATIONS, "cpu", torch.float64)
    diagonal = torch.cat([torch.full((l.d_out * l.d_in_folded,), curvature.damping_of(i), dtype=torch.float64)
                          for i, l in enumerate(layers)])
    b = _query_gradients(setup)
    expected = _dense_pcg(setup["dense"] + torch.diag(diagonal), _dense_preconditioner(curvature, layers), b,
                          DEFAULT_SOLVE_ITERATIONS)
    actual = _flat(solver.solve(_split(b, layers))[0])
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())), \
        describe_difference(actual, expected)
    x0 = b @ _dense_preconditioner(curvature, layers)
    assert (actual - x0).norm() > 0.01 * x0.norm()  # the iterations moved x: the comparison is not of x₀ alone


@pytest.mark.parametrize("system", ["gauss-newton", "empirical-fisher"])
def test_query_stage_solves_the_recorded_system(setup, system):
    """The query stage's solver multiplies by the curvature its settings name (default Gauss-Newton):
    its 2-iteration result equals the dense PCG on that dense matrix + D, and not on the other one."""
    from attrib.solve import CGRefinement
    from attrib.stages.query_gradients import QuerySettings
    from attrib.storage import read_manifest

    layers = setup["layers"]
    settings = QuerySettings(solver="cg", solve_iterations=2, solve_tokens=SOLVE_TOKENS, solve_system=system)
    assert QuerySettings().solve_system == "gauss-newton"
    curvature = load_curvature(setup["factors"], layers, None)
    refinement = CGRefinement(settings, read_manifest(setup["factors"]))
    refinement.sample_spec = CorpusSpec(str(setup["corpus"]))
    solver = refinement.solver(setup["model"], setup["tokenizer"], layers, curvature, World())
    b = _query_gradients(setup)
    actual = _flat(solver.solve(_split(b, layers))[0])
    diagonal = torch.diag(torch.cat([torch.full((l.d_out * l.d_in_folded,), curvature.damping_of(i), dtype=torch.float64)
                                     for i, l in enumerate(layers)]))
    preconditioner = _dense_preconditioner(curvature, layers)
    dense = {"gauss-newton": setup["dense"], "empirical-fisher": setup["dense_empirical"]}
    expected = _dense_pcg(dense.pop(system) + diagonal, preconditioner, b, 2)
    other = _dense_pcg(dense.popitem()[1] + diagonal, preconditioner, b, 2)
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())), \
        describe_difference(actual, expected)
    assert (other - expected).norm() > 0.01 * expected.norm()


def test_ekfac_preconditioner_needs_fewer_iterations(setup):
    """One tracked layer at DAMPING_SCALE: with the EK-FAC preconditioner ‖x_k − x*‖_A falls at
    every step and ‖r‖/‖b‖ < 1e-5 takes at least 10 iterations fewer than plain CG (from x₀ = b).

    Measured here (printed with -s): GPT-2 block 1 c_fc, 18 iterations with EK-FAC against 47
    without; Llama block 1 gate_proj, 29 against 43 (plain CG is run to 120, so both counts are known). The 2-norm residual that the manifest
    records is not monotone in either (PCG minimises the A-norm of the error, not ‖r‖); with all layers
    of these random models, whose blocks couple strongly, EK-FAC as preconditioner helps little or not
    at all (docs/benchmarks.md, "CG solve").
    """
    layer = setup["layers"][len(setup["layers"]) // 2]  # block 1's first MLP projection
    solver, system = _solver(setup, [layer], 30)
    b = _query_gradients(setup)[:, _positions(setup["layers"], [layer])]
    _, residuals = solver.solve(_split(b, [layer]))
    with_ekfac = _iterations_to(residuals, 1e-5)
    _, plain_residuals = preconditioned_cg(solver._system, lambda v: v, _split(b, [layer]), 120)
    without = _iterations_to(plain_residuals, 1e-5)
    print(f"{layer.name}: ‖r‖/‖b‖ < 1e-5 after {with_ekfac} iterations with the EK-FAC preconditioner, "
          f"{without} without (of 120)")
    assert with_ekfac <= 30 and without - with_ekfac >= 10
    errors = _error_norms(solver, b, system, 12)
    assert (errors[1:] <= errors[:-1] * (1 + 1e-9)).all(), errors


def test_zero_iterations_is_exactly_ekfac(setup):
    """The cg path with no iteration returns the EK-FAC preconditioned gradients bit for bit."""
    model, tokenizer, layers = setup["model"], setup["tokenizer"], setup["layers"]
    solver, _ = _solver(setup, layers, 0)
    curvature = solver.curvature
    ekfac = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 0, QUERY_LENGTH, 4096, "cpu")
    cg = compute_query_gradients(model, tokenizer, layers, QUERIES, curvature, 0, QUERY_LENGTH, 4096, "cpu",
                                 solver=solver)
    for field in ("left", "sigma", "right"):
        for a, b in zip(getattr(ekfac, field), getattr(cg, field)):
            assert torch.equal(a, b)
    assert cg.residuals.shape == (0, len(QUERIES))


def test_cg_batch_of_queries_equals_one_query_at_a_time(setup):
    """Each query has its own CG scalars: a batch of two gives what each query alone gives (float64,
    1e-8: the sample is packed into other batches, so sums run in another order)."""
    model, tokenizer, layers = setup["model"], setup["tokenizer"], setup["layers"]
    solver, _ = _solver(setup, layers, 3)
    together = compute_query_gradients(model, tokenizer, layers, QUERIES, solver.curvature, 0, QUERY_LENGTH, 4096,
                                       "cpu", solver=solver)
    alone = compute_query_gradients(model, tokenizer, layers, QUERIES, solver.curvature, 0, QUERY_LENGTH, 4096, "cpu",
                                    max_queries_per_batch=1, solver=solver)
    full = lambda g: torch.cat([((u * s[:, None, :]) @ v.mT).reshape(len(QUERIES), -1)  # noqa: E731
                                for u, s, v in zip(g.left, g.sigma, g.right)], dim=1)
    a, b = full(together), full(alone)
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-8 * float(b.abs().max())), describe_difference(a, b)
    assert torch.allclose(together.residuals, alone.residuals, rtol=1e-8)


def test_sign_and_scale_with_dense_gn_inverse_and_cg(setup):
    """θ ← θ − ε A⁻¹∇L_m (A = G + D, dense) changes log p(completion) by ε·I(q, m) to first order, with
    I(q, m) = ⟨P_q, ∇L_m⟩ and P_q the cg solver's converged preconditioned query gradient: the sign and
    scale test of tests/test_query.py with H⁻¹ replaced by the damped Gauss-Newton inverse."""
    model, tokenizer, layers = setup["model"], setup["tokenizer"], setup["layers"]
    solver, system = _solver(setup, layers, 40, CONVERGED_DAMPING[model.config.model_type])
    gradients = compute_query_gradients(model, tokenizer, layers, QUERIES[:1], solver.curvature, 0, QUERY_LENGTH, 4096,
                                        "cpu", solver=solver)
    preconditioned = torch.cat([((u * s[:, None, :]) @ v.mT)[0].reshape(-1)
                                for u, s, v in zip(gradients.left, gradients.sigma, gradients.right)])
    query_seq = query_sequence(tokenizer, QUERIES[0], QUERY_LENGTH, [])

    def log_prob():
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([query_seq.input_ids])).logits[0].double(), -1)
        return sum(float(log_probs[t, target]) for t, target in enumerate(query_seq.targets) if target >= 0)

    base = log_prob()
    weight_norm = sum(float(l.weight_matrix().square().sum()) for l in layers) ** 0.5
    for ids in setup["sample"].input_ids[:3]:
        train = sequence_gradient(model, layers, Sequence("d", 0, ids.tolist(), [], ids[1:].tolist() + [-1]))
        train = torch.cat([train[layer.name].reshape(-1) for layer in layers])
        score = float(preconditioned @ train)
        step = torch.linalg.solve(system, train)
        errors = []
        for epsilon in (1e-3 * weight_norm / float(step.norm()), 1e-4 * weight_norm / float(step.norm())):
            originals = [layer.weight_matrix().clone() for layer in layers]
            with torch.no_grad():
                for layer, part in zip(layers, _split(step[None], layers)):
                    _apply(layer, layer.weight_matrix() - epsilon * part[0])
            change = log_prob() - base
            with torch.no_grad():
                for layer, original in zip(layers, originals):
                    _apply(layer, original)
            errors.append(abs(change / epsilon - score) / abs(score))
            assert (change > 0) == (score > 0)
        # first order: the error shrinks with ε. Llama's RMSNorm runs in float32, whose round-off in log p
        # dominates at the smaller ε, so there only the larger ε is held to 1%.
        if model.config.model_type == "llama":
            assert errors[0] < 0.01, errors
        else:
            assert errors[1] < 0.01 and errors[1] < errors[0], errors


def test_cli_cg_writes_parts_and_records_residuals(tmp_path, capsys, model_dirs, corpus_file):
    """`query-gradients --solver cg --solve-iterations 3` end to end: parts written, each query's four
    relative residuals (k = 0 … 3) and the sample (the fit's corpus by default) in the manifest."""
    factors = tmp_path / "factors"
    code, _, err = run_cli(capsys, "--quiet", "fit-factors", "--model", model_dirs["gpt2"], "--corpus", corpus_file,
                           "--max-length", "24", "--out", factors)
    assert code == 0, err
    queries = write_jsonl(tmp_path / "queries.jsonl", [q.as_row() for q in QUERIES])
    base = ["--quiet", "query-gradients", "--model", model_dirs["gpt2"], "--factors", factors, "--queries", queries,
            "--max-length", "24", "--query-rank", "4"]
    code, _, err = run_cli(capsys, *base, "--solver", "cg", "--solve-iterations", "3", "--solve-tokens", "100",
                           "--out", tmp_path / "qg")
    assert code == 0, err
    manifest = json.loads((tmp_path / "qg" / "manifest.json").read_text())
    assert manifest["settings"]["solver"] == "cg" and manifest["settings"]["solve_iterations"] == 3
    solve = manifest["solve"]
    assert solve["corpus"] == str(corpus_file.resolve()) and 0 < solve["sample_tokens"] <= 100
    # the curvature solved and the factors' Fisher (the default, empirical) are on record
    assert solve["system"] == manifest["settings"]["solve_system"] == "gauss-newton"
    assert solve["factors_fisher"] == "empirical"
    assert sorted(solve["relative_residuals"]) == ["q1", "q2"]
    for residuals in solve["relative_residuals"].values():
        assert len(residuals) == 4 and all(0 < r < float("inf") for r in residuals)
    assert any(name.startswith("query_gradients-") for name in manifest["files"])
    for flags, fragment in (
        (["--solve-iterations", "3"], "--solver cg only"),
        (["--solver", "cg", "--solve-iterations", "-1"], "--solve-iterations -1 must be at least 0"),
        (["--solver", "cg", "--solve-tokens", "0"], "--solve-tokens"),
        (["--solver", "newton"], "--solver newton is not one of"),
    ):
        code, _, err = run_cli(capsys, *base, *flags, "--out", tmp_path / "bad")
        assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and fragment in err, err
        assert not (tmp_path / "bad").exists()
    # `attrib query` computes cg query gradients itself; given ones are checked against its flags
    scored = ["--quiet", "query", "--model", model_dirs["gpt2"], "--factors", factors, "--corpus", corpus_file,
              "--max-length", "24", "--query-rank", "4"]
    code, _, err = run_cli(capsys, *scored, "--queries", queries, "--solver", "cg", "--solve-iterations", "1",
                           "--solve-tokens", "100", "--out", tmp_path / "scores")
    assert code == 0, err
    inner = json.loads((tmp_path / "scores" / "query-gradients" / "manifest.json").read_text())
    assert inner["settings"]["solver"] == "cg" and all(len(r) == 2 for r in inner["solve"]["relative_residuals"].values())
    code, _, err = run_cli(capsys, *scored, "--query-gradients", tmp_path / "qg", "--solver", "ekfac",
                           "--out", tmp_path / "bad")
    assert code == 2 and "--solver ekfac conflicts with --query-gradients" in err, err
    assert not (tmp_path / "bad").exists()
