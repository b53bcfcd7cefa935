"""Hooks that hand each tracked layer's inputs `a` and output gradients `g` to a consumer.

The model's weights stay frozen; the input embeddings are made to require grad so
that backward reaches every tracked layer without computing any weight gradient
(that is the costly half of a plain backward that attrib never needs).
Inputs get the bias column of ones appended; padded positions are zeroed in both
`a` and `g`, so they contribute nothing to any statistic or score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attrib.models import TrackedLayer

ActivationHandler = Callable[[int, torch.Tensor], None]  # (layer index, a [batch, seq, d_in_folded])
GradientHandler = Callable[[int, torch.Tensor], None]  # (layer index, g [batch, seq, d_out])


class Capture:
    """Context manager: while active, every forward/backward through the model calls the handlers."""

    def __init__(
        self,
        model,
        layers: list[TrackedLayer],
        on_activation: ActivationHandler | None,
        on_gradient: GradientHandler | None,
    ):
        self.model = model
        self.layers = layers
        self.on_activation = on_activation
        self.on_gradient = on_gradient
        self.mask: torch.Tensor | None = None  # [batch, seq], 1 at real tokens
        self._handles: list = []
        self._calls: dict[int, int] = {}  # tracked layer index -> calls in the current forward pass

    def _forward_hook(self, index: int, layer: TrackedLayer):
        def hook(module, inputs, output):
            self._check_input(index, layer, inputs[0])
            mask = self.mask[..., None].to(output.dtype)
            if self.on_activation is not None:
                a = inputs[0].detach()
                if layer.has_bias:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                self.on_activation(index, a * mask)
            if self.on_gradient is not None and output.requires_grad:
                output.register_hook(lambda grad: self.on_gradient(index, grad.detach() * mask))

        return hook

    def _check_input(self, index: int, layer: TrackedLayer, x: torch.Tensor) -> None:
        """A tracked module must see [batch, seq, d] like the mask, once per forward; else its sums are wrong."""
        from attrib.errors import InputError

        self._calls[index] = self._calls.get(index, 0) + 1
        if self._calls[index] > 1:
            raise InputError(
                f"module {layer.name} is called more than once per forward pass; attrib can track only layers "
                "that see each token once: leave it out of --modules"
            )
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(self.mask.shape):
            raise InputError(
                f"module {layer.name} sees inputs of shape {list(x.shape)}, not [batch, seq, d] with [batch, seq] = "
                f"{list(self.mask.shape)} (mixture-of-experts layers see routed tokens); leave it out of --modules"
            )

    def __enter__(self) -> Capture:
        self._handles.append(self.model.register_forward_pre_hook(lambda module, args: self._calls.clear()))
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_(True)))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(index, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def token_log_probs(model, input_ids, attention_mask) -> torch.Tensor:
    """log p(· | prefix) at every position, at least in float32: [batch, seq, vocab]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def summed_nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions with a label (>= 0) of −log p(label): the loss of DESIGN.md §2."""
    valid = labels >= 0
    picked = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * valid).sum()


def sample_labels(log_probs: torch.Tensor, targets: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (true Fisher), where targets >= 0.

    Each sequence draws from its own generator seeded by `seeds[row]`, so the draws do
    not depend on how sequences are batched or sharded over processes.
    """
    labels = torch.full_like(targets, -1)
    generator = torch.Generator(device=log_probs.device)
    for row, seed in enumerate(seeds):
        positions = (targets[row] >= 0).nonzero()[:, 0]
        if positions.numel() == 0:
            continue
        generator.manual_seed(seed)
        probs = log_probs[row, positions].detach().exp()
        labels[row, positions] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return labels


def sequence_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from the run seed and integer keys (pass, sequence index, sample)."""
    value = seed & 0xFFFFFFFF
    for key in keys:
        value = (value * 6364136223846793005 + key + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    return value
