"""Dense float64 references computed with plain autograd, independent of attrib's hooks (docs/design.md §6)."""

from __future__ import annotations

import torch


def sequence_gradient(model, layers, sequence, labels=None) -> dict[str, torch.Tensor]:
    """∇_W of the summed NLL of one unpadded sequence, per layer as [d_out, d_in(+1)] (bias folded)."""
    targets = torch.tensor([sequence.targets if labels is None else labels])
    params = []
    for layer in layers:
        params.append(layer.module.weight)
        if layer.has_bias:
            params.append(layer.module.bias)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    logits = model(input_ids=torch.tensor([sequence.input_ids])).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    valid = targets >= 0
    loss = -(log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid).sum()
    loss.backward()
    gradients = {}
    for layer in layers:
        weight_grad = layer.module.weight.grad
        weight_grad = weight_grad.t() if layer.transposed else weight_grad
        if layer.has_bias:
            weight_grad = torch.cat([weight_grad, layer.module.bias.grad[:, None]], dim=1)
        gradients[layer.name] = weight_grad.detach().double().clone()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return gradients


def token_statistics(model, layers, sequence) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token layer inputs a [T, d_in(+1)] and output gradients g [T, d_out] of one sequence."""
    stored = {}

    def hook_for(layer):
        def hook(module, inputs, output):
            output.retain_grad()
            stored[layer.name] = (inputs[0], output)

        return hook

    handles = [layer.module.register_forward_hook(hook_for(layer)) for layer in layers]
    embeddings = model.get_input_embeddings()
    handles.append(embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    targets = torch.tensor([sequence.targets])
    logits = model(input_ids=torch.tensor([sequence.input_ids])).logits
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    valid = targets >= 0
    (-(log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * valid).sum()).backward()
    for handle in handles:
        handle.remove()
    result = {}
    for layer in layers:
        a, out = stored[layer.name]
        a = a[0].detach().double()
        if layer.has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        result[layer.name] = (a, out.grad[0].detach().double())
    return result


def token_influence(model, layers, sequence, preconditioned: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token scores I_t = Σ_l g_{l,t}ᵀ P_l a_{l,t} [T] of one sequence (DESIGN.md §2), P_l [d_out, d_in(+1)]
    given densely in float64 (H⁻¹V_q for a query, H⁻¹G_m for self-influence)."""
    stats = token_statistics(model, layers, sequence)
    return sum(((g @ preconditioned[layer.name]) * a).sum(-1) for layer, (a, g) in
               ((layer, stats[layer.name]) for layer in layers))


def assert_token_scores(actual, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    """Each token's score equals the oracle's, relative to the row's largest |score|: a score moved to the next
    token or spread over the row fails, which a check of the sum cannot see."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(expected.abs().max())
    assert torch.allclose(actual, expected, rtol=0, atol=rtol * scale), f"{what}: {describe_difference(actual, expected)}"


def dense_curvature(gradients: list[torch.Tensor]) -> torch.Tensor:
    """The empirical Fisher E_n[vec G_n vec G_nᵀ] of one layer (row-major vec)."""
    flat = torch.stack([g.reshape(-1) for g in gradients])
    return flat.T @ flat / len(gradients)


def damped_factor_matrix(factors_dir, layer_name: str, damping_scale: float = 0.001,
                         damping: float | None = None) -> torch.Tensor:
    """One layer's damped curvature H + λI as a fit's files define it (DESIGN.md §2), dense float64 in row-major
    vec order, read with safetensors alone (not attrib's loader): EK-FAC (Q_S ⊗ Q_A) diag(Λ) (Q_S ⊗ Q_A)ᵀ from the
    eigenbases and Λ; K-FAC T̄ (S ⊗ A) from the covariances, T̄ the labelled tokens per sequence;
    λ = `damping`, or scale × mean(Λ)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(factors_dir)
    manifest = json.loads((directory / "manifest.json").read_text())
    a_name = manifest.get("activation_alias", {}).get(layer_name, layer_name)
    if manifest["settings"]["strategy"] == "kfac":
        covariance = load_file(str(directory / "covariance.safetensors"))
        counts = manifest["counts"]
        per_sequence = counts["covariance_labelled_tokens"] / counts["covariance_sequences"]
        matrix = per_sequence * torch.kron(covariance[f"{layer_name}.gradient_covariance"].double(),
                                           covariance[f"{a_name}.activation_covariance"].double())
        mean_eigenvalue = float(torch.diagonal(matrix).mean())  # tr(S ⊗ A)/P = mean of T̄ λ_S λ_Aᵀ
    else:
        eigen = load_file(str(directory / "eigen.safetensors"))
        eigenvalues = load_file(str(directory / "lambda.safetensors"))[f"{layer_name}.lambda"].double()
        basis = torch.kron(eigen[f"{layer_name}.gradient_eigenvectors"].double(),
                           eigen[f"{a_name}.activation_eigenvectors"].double())
        matrix = basis @ torch.diag(eigenvalues.reshape(-1)) @ basis.T
        mean_eigenvalue = float(eigenvalues.mean())
    damping = damping_scale * mean_eigenvalue if damping is None else damping
    return matrix + damping * torch.eye(matrix.shape[0], dtype=torch.float64)


def ekfac_inverse_times(factors_dir, layer_name: str, gradient: torch.Tensor, damping_scale: float = 0.001) -> torch.Tensor:
    """(H + λ)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ in float64 for a layer too wide to form H densely, from the
    EK-FAC files read with safetensors alone (DESIGN.md §2; λ = scale × mean(Λ))."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    directory = Path(factors_dir)
    a_name = json.loads((directory / "manifest.json").read_text()).get("activation_alias", {}).get(layer_name, layer_name)
    eigen = load_file(str(directory / "eigen.safetensors"))
    eigenvalues = load_file(str(directory / "lambda.safetensors"))[f"{layer_name}.lambda"].double()
    q_s, q_a = eigen[f"{layer_name}.gradient_eigenvectors"].double(), eigen[f"{a_name}.activation_eigenvectors"].double()
    rotated = q_s.T @ gradient.double() @ q_a
    return q_s @ (rotated / (eigenvalues + damping_scale * float(eigenvalues.mean()))) @ q_a.T


def describe_difference(actual: torch.Tensor, expected: torch.Tensor) -> str:
    """Where two tensors differ most, for failure messages."""
    difference = (actual - expected).abs()
    index = int(difference.argmax())
    return (
        f"max |diff| {float(difference.max()):.3e} at flat index {index} "
        f"(actual {float(actual.reshape(-1)[index]):.6e}, expected {float(expected.reshape(-1)[index]):.6e}); "
        f"scale {float(expected.abs().max()):.3e}"
    )


def flat_tracked_weights(layers) -> torch.Tensor:
    """The tracked weights as one vector: each layer's folded [d_out, d_in(+1)] matrix, row-major, in order."""
    return torch.cat([layer.weight_matrix().detach().reshape(-1) for layer in layers])


def logits_of_flat_weights(model, layers, input_ids):
    """f(w) = the logits [T, vocab] of one unpadded sequence with the tracked weights set to the vector w."""
    from torch.func import functional_call

    def logits(flat):
        weights, start = {}, 0
        for layer in layers:
            size = layer.d_out * layer.d_in_folded
            folded = flat[start : start + size].reshape(layer.d_out, layer.d_in_folded)
            start += size
            weight = folded[:, : layer.d_in]
            weights[f"{layer.name}.weight"] = weight.t() if layer.transposed else weight
            if layer.has_bias:
                weights[f"{layer.name}.bias"] = folded[:, -1]
        return functional_call(model, weights, (), {"input_ids": input_ids[None]}, strict=False).logits[0]

    return logits


def dense_gauss_newton(model, layers, sequences) -> torch.Tensor:
    """(1/N) Σ_n J_nᵀ H_n J_n over the tracked weights of all layers, formed explicitly.

    J_n [labelled positions, vocab, P] is the full Jacobian of sequence n's logits (forward mode,
    one column per weight through jacfwd), H_n the block-diagonal softmax Hessian diag(p) − p pᵀ per
    labelled position (all but the last)."""
    from torch.func import jacfwd
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flat = flat_tracked_weights(layers)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for ids in sequences:
        ids = torch.as_tensor(ids)
        f = logits_of_flat_weights(model, layers, ids)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            jacobian = jacfwd(f)(flat)[:-1].double()  # [T - 1, vocab, P]
            probs = torch.softmax(f(flat)[:-1].double(), -1)  # [T - 1, vocab]
        hessians = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]
        total += torch.einsum("tvp,tvw,twq->pq", jacobian, hessians, jacobian)
    return total / len(sequences)
