"""Chunked label log-probabilities and Gumbel-max label sampling against plain references (docs/design.md §2, §6)."""

from __future__ import annotations

import pytest
import torch

from attrib.capture import label_nll, sample_labels, summed_nll


def reference_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ −log softmax(logits)[label] over labelled positions, in float64 with plain autograd."""
    log_probs = torch.log_softmax(logits.double(), -1)
    picked = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * (labels >= 0)).sum()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [3, 2048], ids=["chunks-of-3", "one-chunk"])
def test_chunked_nll_equals_log_softmax_gather(dtype, tolerance, chunk):
    """Value within 1e-6 relative for float32 and bfloat16 logits (computed in float32 either way);
    gradient within 1e-6 (float32) or 1e-2 (bfloat16: the gradient is returned in the logits' dtype)
    of the largest entry. Unlabelled positions (-1) get no loss and no gradient."""
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 7, 50, generator=generator)).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (2, 7), generator=generator)
    labels[0, -1] = labels[1, 4:] = -1
    reference_logits = logits.detach().double().requires_grad_(True)
    expected = reference_nll(reference_logits, labels)
    expected.backward()
    flat = label_nll(logits, labels, chunk_tokens=chunk)
    assert flat.dtype == torch.float32 and float(flat.detach()[1, 4:].abs().max()) == 0.0
    actual = flat.sum()
    assert float(actual.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert torch.equal(summed_nll(logits, labels), label_nll(logits, labels).sum())
    actual.backward()
    scale = float(reference_logits.grad.abs().max())
    assert float((logits.grad.double() - reference_logits.grad).abs().max()) <= tolerance * scale
    assert float(logits.grad[1, 4:].abs().max()) == 0.0


def test_sampled_labels_do_not_depend_on_batching_or_padding():
    """A sequence's labels depend on its seed and logits only: alone, or padded in a batch."""
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 300, 1]
    logits = torch.randn(3, 300, 40, generator=generator)
    targets = torch.full((3, 300), -1)
    for row, length in enumerate(lengths):
        targets[row, : length - 1] = 0  # every position but the last has a label
    seeds = [11, 12, 13]
    together = sample_labels(logits, targets, lengths, seeds)
    for row, length in enumerate(lengths):
        alone = sample_labels(logits[row : row + 1, :length], targets[row : row + 1, :length], [length], [seeds[row]])
        assert torch.equal(alone[0], together[row, :length])
        assert (together[row, length - 1 :] == -1).all()
    assert not torch.equal(sample_labels(logits, targets, lengths, [21, 22, 23]), together)


def test_sampled_labels_follow_the_softmax():
    """20,000 draws (200 sequences × 100 positions sharing one distribution) against softmax(logits):
    Pearson's chi-square with 7 degrees of freedom stays below 24.3 (p = 0.001) — a sampler that
    ignored the temperature of the logits or drew uniformly would exceed it by far."""
    logits_row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 1.5])
    sequences, positions = 200, 100
    logits = logits_row.expand(sequences, positions, 8).contiguous()
    targets = torch.zeros(sequences, positions, dtype=torch.long)
    labels = sample_labels(logits, targets, [positions] * sequences, list(range(sequences)))
    observed = torch.bincount(labels.reshape(-1), minlength=8).double()
    expected = torch.softmax(logits_row.double(), -1) * sequences * positions
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 24.3, (chi_square, observed, expected)
    wrong = torch.softmax(2 * logits_row.double(), -1) * sequences * positions  # a sharper distribution
    assert float(((observed - wrong) ** 2 / wrong).sum()) > 100


def test_gate_and_up_share_one_forward_handler_call(model_dirs, monkeypatch):
    """A gated MLP's gate and up read one tensor: with `shared_inputs` the forward handler runs once
    for the pair (with gate's index) and both layers get its result in backward; an MLP that feeds
    up another tensor (here x.clone(), equal values) is refused rather than silently shared."""
    from attrib.capture import Capture
    from attrib.errors import InputError
    from attrib.models import find_tracked_layers, load_model, shared_activation_sources

    model, _ = load_model(str(model_dirs["llama"]), "float32", "cpu")
    layers = find_tracked_layers(model)
    names = [layer.name.rsplit(".", 1)[1] for layer in layers]
    assert names == ["gate_proj", "up_proj", "down_proj"] * 2
    assert shared_activation_sources(layers, [list(range(6))]) == {1: 0, 4: 3}
    assert shared_activation_sources(layers, [[0], [1, 2], [3, 4, 5]]) == {4: 3}  # only within a group of a pass
    input_ids = torch.randint(0, 100, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    calls, received = [], {}
    capture = Capture(model, layers, lambda i, a: calls.append(i) or a, lambda i, kept, g: received.setdefault(i, kept),
                      shared_inputs={1: 0, 4: 3})
    capture.run(input_ids, mask, lambda logits: [logits.float().logsumexp(-1).sum()])
    assert calls == [0, 2, 3, 5]
    assert received[1] is received[0] and received[4] is received[3] and received[2] is not received[0]
    mlp = model.model.layers[1].mlp
    monkeypatch.setattr(mlp, "forward", lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x.clone())))
    with pytest.raises(InputError, match="layers.1.mlp.gate_proj and model.layers.1.mlp.up_proj do not read the same input"):
        capture.run(input_ids, mask, lambda logits: [logits.float().logsumexp(-1).sum()])


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_backward_stops_at_the_lowest_tracked_input(model_dirs, arch):
    """Tracking only the second block's layers: every g equals plain autograd's (embeddings requiring
    grad, as before), exactly, while no module of the first block nor the embeddings runs backward."""
    from attrib.capture import Capture
    from attrib.models import find_tracked_layers, load_model

    model, _ = load_model(str(model_dirs[arch]), "float32", "cpu")
    layers = [layer for layer in find_tracked_layers(model) if ".1." in layer.name]
    assert layers
    input_ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    loss = lambda logits: [logits.float().logsumexp(-1).mul(mask).sum()]  # noqa: E731

    outputs, handles = {}, []
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True)))

    def keep_output(index, out):
        out.retain_grad()
        outputs[index] = out

    for index, layer in enumerate(layers):
        handles.append(layer.module.register_forward_hook(lambda m, i, out, index=index: keep_output(index, out)))
    loss(model(input_ids=input_ids, attention_mask=mask).logits)[0].backward()
    for handle in handles:
        handle.remove()
    expected = {index: out.grad * mask[..., None] for index, out in outputs.items()}

    below = {}
    embeddings = model.get_input_embeddings()

    def record(name, out) -> None:  # a forward hook's return value would replace the output
        below[name] = (out[0] if isinstance(out, tuple) else out).requires_grad

    handles = [module.register_forward_hook(lambda m, i, out, name=name: record(name, out))
               for name, module in model.named_modules() if ".0." in name or module is embeddings]
    received = {}
    Capture(model, layers, lambda i, a: None, lambda i, _, g: received.setdefault(i, g)).run(input_ids, mask, loss)
    for handle in handles:
        handle.remove()
    assert below and not any(below.values()), [name for name, flag in below.items() if flag]
    for index in expected:
        torch.testing.assert_close(received[index], expected[index], rtol=0, atol=0)
