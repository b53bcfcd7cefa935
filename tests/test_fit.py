"""EK-FAC fitting against dense float64 oracles, exact K-FAC cases, sampling, resume (docs/design.md §6)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from attrib.data import CorpusSpec, SequenceCaps, iter_sequence_parts
from attrib.distributed import World
from attrib.factors import CorrectionSums, CovarianceSums, LayerCurvature, kfac_eigenvalues, symmetric_eigh
from attrib.curvature import load_curvature
from attrib.stages.fit import FitSettings, fit_factors
from attrib.models import find_tracked_layers, load_model, model_record
from attrib.storage import StageDir, load_tensors
from tests.oracle import dense_curvature, describe_difference, sequence_gradient, token_statistics


def fit(tmp_path, model_dir, corpus_file, name="factors", dtype=torch.float64, modules=None, checkpoint_every=0.0,
        world=None, **settings):
    model, tokenizer = load_model(str(model_dir), "float32", "cpu")
    model.to(dtype)
    layers = find_tracked_layers(model, modules)
    fit_settings = FitSettings(max_length=24, stats_dtype="float64", **settings)
    stage = StageDir(tmp_path / name, "fit-factors", asdict(fit_settings), model_record("m", model, layers))
    spec = CorpusSpec(str(corpus_file))
    fit_factors(model, tokenizer, layers, spec, stage, fit_settings, world or World(), checkpoint_every=checkpoint_every)
    return model, tokenizer, layers, stage.path


def corpus_sequences(tokenizer, corpus_file, max_length=24):
    parts = iter_sequence_parts(CorpusSpec(str(corpus_file)), tokenizer, max_length, 1000, SequenceCaps())
    return [seq for part in parts for _, seq in part.sequences]


def assert_close(actual, expected, rtol):
    assert torch.allclose(actual.double(), expected, rtol=rtol, atol=rtol * float(expected.abs().max())), describe_difference(
        actual.double(), expected
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ekfac_matches_dense_oracle(tmp_path, model_dirs, corpus_file, arch):
    """A, S, eigenbases and Λ from the hooked, padded, batched code equal naive float64 sums."""
    model, tokenizer, layers, out = fit(
        tmp_path, model_dirs[arch], corpus_file, fisher="empirical", tokens_per_batch=96
    )
    sequences = corpus_sequences(tokenizer, corpus_file)
    covariance = load_tensors(out / "covariance.safetensors")
    eigen = load_tensors(out / "eigen.safetensors")
    lambdas = load_tensors(out / "lambda.safetensors")
    stats = [token_statistics(model, layers, seq) for seq in sequences]
    grads = [sequence_gradient(model, layers, seq) for seq in sequences]
    tokens = sum(len(seq) for seq in sequences)
    labelled = sum(seq.num_loss_tokens for seq in sequences)  # S averages over positions that have a label
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["covariance_tokens"] == tokens and manifest["counts"]["covariance_labelled_tokens"] == labelled
    assert not any(key.startswith("count") for key in covariance)  # counts live in the manifest, not in tensors
    alias = manifest["activation_alias"]
    if arch == "llama":  # gate and up read one input: one A, stored under gate's name
        assert alias == {f"model.layers.{i}.mlp.up_proj": f"model.layers.{i}.mlp.gate_proj" for i in range(2)}
        assert not any(".up_proj.activation" in key for key in [*covariance, *eigen])
    else:
        assert alias == {}
    for layer in layers:
        a_name = alias.get(layer.name, layer.name)
        a_sum = sum(s[layer.name][0].T @ s[layer.name][0] for s in stats) / tokens
        g_sum = sum(s[layer.name][1].T @ s[layer.name][1] for s in stats) / labelled
        # the oracle's own consistency: Σ_t g_t a_tᵀ is the autograd weight gradient
        assert_close(stats[0][layer.name][1].T @ stats[0][layer.name][0], grads[0][layer.name], 1e-9)
        # float32 storage of the factors bounds the agreement at ~1e-6 relative
        assert_close(covariance[f"{a_name}.activation_covariance"], a_sum, 1e-6)
        assert_close(covariance[f"{layer.name}.gradient_covariance"], g_sum, 1e-6)
        q_a = eigen[f"{a_name}.activation_eigenvectors"].double()
        q_s = eigen[f"{layer.name}.gradient_eigenvectors"].double()
        assert_close(q_a @ torch.diag(eigen[f"{a_name}.activation_eigenvalues"].double()) @ q_a.T, a_sum, 1e-5)
        assert_close(q_s.T @ q_s, torch.eye(q_s.shape[0], dtype=torch.float64), 1e-5)
        expected = torch.stack([(q_s.T @ g[layer.name] @ q_a) ** 2 for g in grads]).mean(0)
        assert_close(lambdas[f"{layer.name}.lambda"], expected, 1e-5)


def test_padding_does_not_change_factors(tmp_path, model_dirs, corpus_file):
    """One sequence per batch (no padding) and wide padded batches give the same factors."""
    _, _, layers, padded = fit(tmp_path, model_dirs["gpt_neox"], corpus_file, "padded", fisher="empirical", tokens_per_batch=200)
    _, _, _, single = fit(tmp_path, model_dirs["gpt_neox"], corpus_file, "single", fisher="empirical", tokens_per_batch=24)
    for name in ("covariance", "lambda"):
        a, b = load_tensors(padded / f"{name}.safetensors"), load_tensors(single / f"{name}.safetensors")
        for key in a:
            assert_close(a[key], b[key].double(), 1e-9)


def test_true_fisher_is_seeded_and_batch_invariant(tmp_path, model_dirs, corpus_file):
    """Sampled labels come from per-sequence seeds: same seed → same factors, whatever the batching."""
    _, _, _, first = fit(tmp_path, model_dirs["llama"], corpus_file, "a", seed=3, tokens_per_batch=200, fisher="true")
    _, _, _, second = fit(tmp_path, model_dirs["llama"], corpus_file, "b", seed=3, tokens_per_batch=48, fisher="true")
    _, _, _, other = fit(tmp_path, model_dirs["llama"], corpus_file, "c", seed=4, tokens_per_batch=200, fisher="true")
    a, b, c = (load_tensors(p / "lambda.safetensors") for p in (first, second, other))
    key = next(k for k in a if k.endswith(".lambda"))
    assert_close(a[key], b[key].double(), 1e-9)
    assert not torch.allclose(a[key], c[key])


def test_sampled_fisher_approaches_softmax_expectation(tmp_path, model_dirs, tokenizer):
    """Tracking the output layer, g = p − e_y with y ~ p, so E_y[g gᵀ] = diag(p) − p pᵀ.

    The Monte-Carlo error of every entry is compared with its exact standard deviation:
    the mean squared standardised error is ~1 for a correct sampler and far larger for
    a wrong distribution (e.g. the data's labels, or a mis-weighted average of samples).
    """
    corpus = tmp_path / "one.jsonl"
    corpus.write_text(json.dumps({"text": "The capital of Vorlia"}) + "\n")
    samples = 100
    model, tokenizer, layers, out = fit(
        tmp_path, model_dirs["gpt2"], corpus, modules=r"^lm_head$", fisher="true", fisher_samples=samples
    )
    sequence = corpus_sequences(tokenizer, corpus)[0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([sequence.input_ids])).logits[0].double(), -1)
    positions = [t for t, target in enumerate(sequence.targets) if target >= 0]
    tokens = len(positions)  # S averages over positions that have a label
    expected = sum(torch.diag(probs[t]) - torch.outer(probs[t], probs[t]) for t in positions) / tokens
    variance = torch.zeros_like(expected)
    for t in positions:
        deviations = probs[t][None, :] - torch.eye(len(probs[t]), dtype=torch.float64)  # row y: p − e_y
        second_moment = (deviations**2).T @ (probs[t][:, None] * deviations**2)
        mean = torch.diag(probs[t]) - torch.outer(probs[t], probs[t])
        variance += (second_moment - mean**2) / samples / tokens**2
    actual = load_tensors(out / "covariance.safetensors")["lm_head.gradient_covariance"].double()
    standardised = float(((actual - expected) ** 2 / variance).mean())
    assert 0.5 < standardised < 1.5, standardised


def test_kfac_exact_case_equals_dense_damped_inverse():
    """One layer, one token per sequence, inputs and gradients independent (all pairs): F = A ⊗ S exactly."""
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(5, 3, dtype=torch.float64, generator=generator)
    grads = torch.randn(4, 2, dtype=torch.float64, generator=generator)
    pairs = [(a, g) for a in inputs for g in grads]
    cov = CovarianceSums(3, 2, torch.float64, "cpu")
    for a, g in pairs:
        cov.add_activations(a[None])
        cov.add_gradients(g[None])
    values_a, basis_a = symmetric_eigh(cov.activation / len(pairs))
    values_s, basis_s = symmetric_eigh(cov.gradient / len(pairs))
    correction = CorrectionSums(basis_a, basis_s, 3, 2, torch.float64, "cpu")
    for a, g in pairs:
        correction.add_gradients(correction.rotate_activations(a[None, None]), g[None, None])
    ekfac_lambda = correction.squares / len(pairs)
    kfac_lambda = kfac_eigenvalues(values_s, values_a, tokens_per_sequence=1.0)
    assert_close(ekfac_lambda, kfac_lambda, 1e-10)
    fisher = dense_curvature([torch.outer(g, a) for a, g in pairs])
    damping = 0.3
    vector = torch.randn(2, 3, dtype=torch.float64, generator=generator)
    dense = torch.linalg.solve(fisher + damping * torch.eye(6, dtype=torch.float64), vector.reshape(-1)).reshape(2, 3)
    for eigenvalues in (kfac_lambda, ekfac_lambda):
        factored = LayerCurvature(eigenvalues, basis_s, basis_a, damping).inverse_times(vector)
        assert_close(factored, dense, 1e-10)


@pytest.mark.parametrize("strategy", ["kfac", "diagonal", "identity"])
def test_baseline_strategies(tmp_path, model_dirs, corpus_file, strategy):
    """K-FAC uses the covariance spectra; diagonal has no rotation; identity fits nothing."""
    model, tokenizer, layers, out = fit(tmp_path, model_dirs["gpt2"], corpus_file, strategy=strategy, fisher="empirical")
    curvature = load_curvature(str(out), layers, None)
    manifest = curvature.manifest
    assert manifest["settings"]["strategy"] == strategy
    if strategy == "identity":
        assert not (out / "lambda.safetensors").exists()
        vector = torch.randn(layers[0].d_out, layers[0].d_in_folded, dtype=torch.float64)
        assert torch.equal(curvature[0].inverse_times(vector), vector)
        return
    lambdas = load_tensors(out / "lambda.safetensors")
    if strategy == "diagonal":
        sequences = corpus_sequences(tokenizer, corpus_file)
        grads = [sequence_gradient(model, layers, seq) for seq in sequences]
        expected = torch.stack([g[layers[0].name] ** 2 for g in grads]).mean(0)
        assert_close(lambdas[f"{layers[0].name}.lambda"], expected, 1e-5)
        assert not (out / "eigen.safetensors").exists()
    else:
        eigen = load_tensors(out / "eigen.safetensors")
        counts = manifest["counts"]
        per_sequence = counts["covariance_labelled_tokens"] / counts["covariance_sequences"]
        expected = per_sequence * torch.outer(
            eigen[f"{layers[0].name}.gradient_eigenvalues"].double(), eigen[f"{layers[0].name}.activation_eigenvalues"].double()
        )
        assert_close(lambdas[f"{layers[0].name}.lambda"], expected, 1e-5)


def test_resume_after_kill_gives_identical_files(tmp_path, model_dirs, corpus_file, monkeypatch):
    """A run killed in the middle of pass 2 and rerun writes the same bytes as an uninterrupted run."""
    import attrib.factors as factors_module

    _, _, _, whole = fit(tmp_path, model_dirs["gpt2"], corpus_file, "whole", docs_per_part=3, dtype=torch.float32)
    calls = {"n": 0}
    original = factors_module.CorrectionSums.add_gradients

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:  # 4 layers × 1 batch per part: dies in the third of four parts
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(factors_module.CorrectionSums, "add_gradients", dying)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, model_dirs["gpt2"], corpus_file, "resumed", docs_per_part=3, dtype=torch.float32)
    resumed = tmp_path / "resumed"
    assert (resumed / "covariance.safetensors").exists() and not (resumed / "lambda.safetensors").exists()
    assert json.loads((resumed / "manifest.json").read_text())["status"] == "running"
    assert (resumed / "checkpoints" / "correction-g000.safetensors").exists()
    monkeypatch.setattr(factors_module.CorrectionSums, "add_gradients", original)
    fit(tmp_path, model_dirs["gpt2"], corpus_file, "resumed", docs_per_part=3, dtype=torch.float32)
    for name in ("covariance", "eigen", "lambda"):
        assert (whole / f"{name}.safetensors").read_bytes() == (resumed / f"{name}.safetensors").read_bytes()
    assert not (resumed / "checkpoints").exists()


@pytest.mark.parametrize("length", [1, 200])
def test_correction_is_the_same_whichever_order_is_cheaper(length):
    """Short sequences rotate a and g first, long ones rotate G_n = gᵀa afterwards: same Λ."""
    generator = torch.Generator().manual_seed(1)
    d_in, d_out = 6, 9
    basis_a = torch.linalg.qr(torch.randn(d_in, d_in, dtype=torch.float64, generator=generator))[0]
    basis_s = torch.linalg.qr(torch.randn(d_out, d_out, dtype=torch.float64, generator=generator))[0]
    a = torch.randn(3, length, d_in, dtype=torch.float64, generator=generator)
    g = torch.randn(3, length, d_out, dtype=torch.float64, generator=generator)
    correction = CorrectionSums(basis_a, basis_s, d_in, d_out, torch.float64, "cpu")
    kept = correction.rotate_activations(a)
    assert kept[0] == (length == 1)  # rotated first
    correction.add_gradients(kept, g)
    expected = sum((basis_s.T @ (g[n].T @ a[n]) @ basis_a) ** 2 for n in range(3))
    assert_close(correction.squares, expected, 1e-10)


def factor_tensors(out):
    """Every tensor of the files the manifest lists, by name (whatever the file layout)."""
    manifest = json.loads((out / "manifest.json").read_text())
    tensors = {}
    for name in manifest["files"]:
        for key, value in load_tensors(out / name).items():
            assert key not in tensors, f"{key} is in two files"
            tensors[key] = value
    for layer, owner in manifest.get("activation_alias", {}).items():  # a shared A, under each layer's name
        for kind in ("activation_covariance", "activation_eigenvalues", "activation_eigenvectors"):
            assert f"{layer}.{kind}" not in tensors
            if f"{owner}.{kind}" in tensors:
                tensors[f"{layer}.{kind}"] = tensors[f"{owner}.{kind}"]
    return manifest, tensors


@pytest.mark.parametrize("strategy", ["ekfac", "kfac"])
def test_layer_groups_give_identical_factors(tmp_path, model_dirs, corpus_file, strategy):
    """--layers-per-pass 1 and 2 write the same tensors, bit for bit, as one pass over all layers:
    the hooks do not change the model's computation and labels are seeded per sequence. One pass
    shares gate's A with up, groups of one layer cannot: shared A equals each layer's own, bit for bit."""
    fits = {}
    for layers_per_pass in (None, 2, 1):
        name = f"lpp{layers_per_pass}"
        _, _, layers, out = fit(tmp_path, model_dirs["llama"], corpus_file, name, dtype=torch.float32,
                                strategy=strategy, tokens_per_batch=48, layers_per_pass=layers_per_pass)
        fits[layers_per_pass] = factor_tensors(out)
    whole_manifest, whole = fits[None]
    assert whole_manifest["files"] == ["covariance.safetensors", "eigen.safetensors", "lambda.safetensors"]
    assert len(layers) == 6
    assert len(whole_manifest["activation_alias"]) == 2 and fits[1][0]["activation_alias"] == {}
    for layers_per_pass in (2, 1):
        manifest, tensors = fits[layers_per_pass]
        groups = -(-len(layers) // layers_per_pass)
        assert len(manifest["files"]) == 3 * groups and "lambda-g000.safetensors" in manifest["files"]
        assert [len(group) for group in manifest["layer_groups"]] == [layers_per_pass] * groups
        assert manifest["counts"] == whole_manifest["counts"]
        assert set(tensors) == set(whole)
        for key in whole:
            assert torch.equal(tensors[key], whole[key]), key


@pytest.mark.parametrize("every", ["each part", "every third part", "never"])
def test_interval_checkpoints_resume_to_identical_files(tmp_path, model_dirs, corpus_file, monkeypatch, every):
    """Checkpoints on a wall-clock interval (a fake clock that ticks once per part): a run killed
    in pass 1 resumes from the last checkpoint (or from the start) and writes the same bytes."""
    import attrib.factors as factors_module
    import attrib.stages.fit as fit_module

    seconds = {"each part": 0.0, "every third part": 1.5, "never": 1e9}[every]
    clock = {"now": 0.0}

    def tick():
        clock["now"] += 0.5  # read twice per part: at the pass start or last checkpoint, and at each part's end
        return clock["now"]

    monkeypatch.setattr(fit_module.time, "monotonic", tick)
    _, _, _, whole = fit(tmp_path, model_dirs["gpt2"], corpus_file, "whole", docs_per_part=2, dtype=torch.float32,
                         checkpoint_every=seconds)
    calls = {"n": 0}
    original = factors_module.CovarianceSums.add_gradients

    def dying(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 * 5 + 1:  # 4 layers × 1 batch per part: dies in the sixth of six parts
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(factors_module.CovarianceSums, "add_gradients", dying)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, model_dirs["gpt2"], corpus_file, "resumed", docs_per_part=2, dtype=torch.float32, checkpoint_every=seconds)
    checkpoint = tmp_path / "resumed" / "checkpoints" / "covariance-g000.safetensors"
    if every == "never":
        assert not checkpoint.exists()
    else:
        from attrib.storage import tensor_metadata

        assert int(tensor_metadata(checkpoint)["parts_done"]) == {"each part": 5, "every third part": 3}[every]
    monkeypatch.setattr(factors_module.CovarianceSums, "add_gradients", original)
    fit(tmp_path, model_dirs["gpt2"], corpus_file, "resumed", docs_per_part=2, dtype=torch.float32, checkpoint_every=seconds)
    for name in ("covariance", "eigen", "lambda"):
        assert (whole / f"{name}.safetensors").read_bytes() == (tmp_path / "resumed" / f"{name}.safetensors").read_bytes()


def test_non_finite_statistics_stop_the_run_naming_layer_and_part(tmp_path, model_dirs, corpus_file, monkeypatch):
    import attrib.factors as factors_module
    from attrib.errors import RunError

    original = factors_module.CovarianceSums.add_gradients
    calls = {"n": 0}

    def poisoned(self, g, weight=1.0):
        calls["n"] += 1
        original(self, g * (float("inf") if calls["n"] == 4 * 3 + 2 else 1.0), weight)  # part 3, second layer hooked

    monkeypatch.setattr(factors_module.CovarianceSums, "add_gradients", poisoned)
    with pytest.raises(RunError, match=r"covariance pass: the running sums of layer transformer\.h\.\d\.mlp\.c_\w+ are not finite after part 3"):
        fit(tmp_path, model_dirs["gpt2"], corpus_file, docs_per_part=2, dtype=torch.float32)


def tf32_round(tensor: torch.Tensor) -> torch.Tensor:
    """float32 with the low 13 mantissa bits cleared: the inputs a TF32 tensor core multiplies."""
    return (tensor.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32).to(tensor.dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def test_reduced_precision_statistics_agree_with_float32(tmp_path, model_dirs, corpus_file, monkeypatch):
    """The GPU defaults against a float32 fit (empirical Fisher, so both see the same labels):
    statistics from bf16 model compute (accumulated in float32) stay within 5e-2 relative
    (Frobenius) of float32 for A, S and Λ (measured 1e-3–4e-3 for A and S, 7e-3–1.7e-2 for Λ);
    TF32 inputs to the statistics matmuls (mantissas truncated to 10 bits, emulated on CPU; CUDA
    does this in hardware) within 5e-3 (measured 7e-4 for A and S, 1.6e-3 for Λ)."""
    import attrib.factors as factors_module

    def factors(name, dtype):
        _, _, _, out = fit(tmp_path, model_dirs["llama"], corpus_file, name, dtype=dtype, fisher="empirical",
                           tokens_per_batch=96)
        return factor_tensors(out)[1]

    reference = factors("float32", torch.float32)
    bf16 = factors("bf16", torch.bfloat16)
    original_a, original_g = factors_module.CovarianceSums.add_activations, factors_module.CovarianceSums.add_gradients
    original_c = factors_module.CorrectionSums.add_gradients
    monkeypatch.setattr(factors_module.CovarianceSums, "add_activations", lambda self, a: original_a(self, tf32_round(a)))
    monkeypatch.setattr(factors_module.CovarianceSums, "add_gradients",
                        lambda self, g, weight=1.0: original_g(self, tf32_round(g), weight))
    monkeypatch.setattr(factors_module.CorrectionSums, "add_gradients",
                        lambda self, kept, g, weight=1.0: original_c(self, (kept[0], tf32_round(kept[1])), tf32_round(g), weight))
    tf32 = factors("tf32", torch.float32)
    for key, expected in reference.items():
        if key.endswith(("_covariance", ".lambda")):
            assert relative_error(bf16[key], expected) < 5e-2, (key, relative_error(bf16[key], expected))
            assert relative_error(tf32[key], expected) < 5e-3, (key, relative_error(tf32[key], expected))


def test_covariances_from_a_token_sample_and_the_correction_from_all(tmp_path, model_dirs, corpus_file):
    """--covariance-max-tokens: A and S are the oracle's over the first sequences within the cap
    (whole sequences, in corpus order); Λ still averages over every sequence in those bases."""
    cap = 60
    model, tokenizer, layers, out = fit(tmp_path, model_dirs["llama"], corpus_file, fisher="empirical",
                                        covariance_max_tokens=cap)
    sequences = corpus_sequences(tokenizer, corpus_file)
    sample, used = [], 0
    for seq in sequences:
        if used + len(seq) > cap:
            break
        sample.append(seq)
        used += len(seq)
    assert 0 < len(sample) < len(sequences)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["covariance_tokens"] == used and counts["correction_sequences"] == len(sequences)
    _, factors = factor_tensors(out)
    stats = [token_statistics(model, layers, seq) for seq in sample]
    grads = [sequence_gradient(model, layers, seq) for seq in sequences]
    labelled = sum(seq.num_loss_tokens for seq in sample)
    for layer in layers:
        a_sum = sum(s[layer.name][0].T @ s[layer.name][0] for s in stats) / used
        g_sum = sum(s[layer.name][1].T @ s[layer.name][1] for s in stats) / labelled
        assert_close(factors[f"{layer.name}.activation_covariance"], a_sum, 1e-6)
        assert_close(factors[f"{layer.name}.gradient_covariance"], g_sum, 1e-6)
        q_a = factors[f"{layer.name}.activation_eigenvectors"].double()
        q_s = factors[f"{layer.name}.gradient_eigenvectors"].double()
        expected = torch.stack([(q_s.T @ g[layer.name] @ q_a) ** 2 for g in grads]).mean(0)
        assert_close(factors[f"{layer.name}.lambda"], expected, 1e-5)
