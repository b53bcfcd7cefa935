"""Hooks that hand each tracked layer's inputs `a` and output gradients `g` to a consumer.

The model's weights stay frozen; each tracked layer's input is made to require grad, so
that backward reaches every tracked layer without computing any weight gradient (that
is the costly half of a plain backward that attrib never needs) and stops there.
Inputs get the bias column of ones appended; padded positions are zeroed in both
`a` and `g`, so they contribute nothing to any statistic or score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from attrib.models import TrackedLayer
from attrib.runtime import flag

# (layer index, a [batch, seq, d_in_folded]) -> what to keep for that layer until backward
ForwardHandler = Callable[[int, torch.Tensor], Any]
# (layer index, what the forward handler kept, g [batch, seq, d_out])
BackwardHandler = Callable[[int, Any, torch.Tensor], None]


class Capture:
    """Runs forward/backward passes whose tracked layers call the handlers with matched (a, g).

    `on_forward(i, a)` returns whatever layer i needs in backward (a itself, a projection
    of it, or None); `on_backward(i, kept, g)` receives it with the layer's output gradient.
    The capture owns the padding mask and the kept objects of one `run`.

    `shared_inputs` maps a layer to another that reads the same input tensor (see
    models.shared_activation_sources): the pair calls `on_forward` once, with the source's
    index, and both layers keep its result; a pair whose inputs differ stops the run.
    """

    def __init__(
        self,
        model,
        layers: list[TrackedLayer],
        on_forward: ForwardHandler | None = None,
        on_backward: BackwardHandler | None = None,
        shared_inputs: dict[int, int] | None = None,
    ):
        self.model = model
        self.layers = layers
        self.on_forward = on_forward
        self.on_backward = on_backward
        self._mask: torch.Tensor | None = None  # [batch, seq], 1 at real tokens
        self._kept: dict[int, Any] = {}
        self._handles: list = []
        self._calls: dict[int, int] = {}  # tracked layer index -> calls in the current forward pass
        self.shared_inputs = shared_inputs or {}
        self._sources = set(self.shared_inputs.values())
        self._inputs: dict[int, torch.Tensor] = {}  # source index -> the input its pair saw in this forward

    def _forward_hook(self, index: int, layer: TrackedLayer):
        def hook(module, inputs, output):
            self._check_input(index, layer, inputs[0])
            mask = self._mask[..., None].to(output.dtype)
            source = self.shared_inputs.get(index, index)
            if source in self._inputs:  # the other layer of a shared pair ran first in this forward
                self._check_shared(index, source, inputs[0])
                self._kept[index] = self._kept[source]
            else:
                a = inputs[0].detach()
                if layer.has_bias:
                    a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
                a = a * mask
                self._kept[index] = self._kept[source] = self.on_forward(source, a) if self.on_forward is not None else None
                if source in self._sources:
                    self._inputs[source] = inputs[0]
            if self.on_backward is not None and output.requires_grad:
                def backward(grad):  # returns None: the gradient flowing on is never replaced
                    self.on_backward(index, self._kept[index], grad.detach() * mask)

                output.register_hook(backward)

        return hook

    def run(self, input_ids: torch.Tensor, mask: torch.Tensor, losses: Callable[[torch.Tensor], list[torch.Tensor]]):
        """One forward of `input_ids` [batch, seq]; then backward of each loss `losses(logits)` returns.

        Several losses share the forward (e.g. several sampled labels per position); the
        handlers' kept objects live until the last backward has run.
        """
        self._mask = mask
        try:
            with self:
                logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                to_backpropagate = losses(logits)
                for number, loss in enumerate(to_backpropagate):
                    loss.backward(retain_graph=number < len(to_backpropagate) - 1)
        finally:
            self._kept.clear()
            self._inputs.clear()
            self._mask = None

    def _check_shared(self, index: int, source: int, x: torch.Tensor) -> None:
        if x is not self._inputs[source]:
            from attrib.errors import InputError

            names = f"{self.layers[source].name} and {self.layers[index].name}"
            raise InputError(
                f"{names} do not read the same input tensor, so they cannot share one activation covariance; "
                f"this model's MLP is not a standard gated MLP: choose its layers with {flag('modules')}"
            )

    def _check_input(self, index: int, layer: TrackedLayer, x: torch.Tensor) -> None:
        """A tracked module must see [batch, seq, d] like the mask, once per forward; else its sums are wrong."""
        from attrib.errors import InputError

        self._calls[index] = self._calls.get(index, 0) + 1
        if self._calls[index] > 1:
            raise InputError(
                f"module {layer.name} is called more than once per forward pass; attrib can track only layers "
                f"that see each token once: leave it out of {flag('modules')}"
            )
        if x.dim() != 3 or tuple(x.shape[:2]) != tuple(self._mask.shape):
            raise InputError(
                f"module {layer.name} sees inputs of shape {list(x.shape)}, not [batch, seq, d] with [batch, seq] = "
                f"{list(self._mask.shape)} (mixture-of-experts layers see routed tokens); leave it out of {flag('modules')}"
            )

    def __enter__(self) -> Capture:
        self._handles.append(self.model.register_forward_pre_hook(lambda module, args: self._new_forward()))
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_pre_hook(_backward_stops_at_input))
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(index, layer)))
        return self

    def _new_forward(self) -> None:
        self._calls.clear()
        self._inputs.clear()

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _backward_stops_at_input(module, args) -> None:
    """Make a tracked layer's input require grad unless something below it already does.

    Backward then starts its way down at the lowest tracked layers' inputs: it never runs
    through the blocks below them (block 0's attention for MLP layers) nor the embeddings.
    """
    if not args[0].requires_grad:
        args[0].requires_grad_(True)


class _LabelNLL(torch.autograd.Function):
    """−log p(label) per position from logits [N, vocab], in chunks of at least float32.

    Only the logits (already alive as the model's output) are saved for backward; the
    softmax is recomputed chunk by chunk there, so no [N, vocab] float32 tensor is kept.
    """

    @staticmethod
    def forward(ctx, logits, labels, chunk):
        compute = torch.promote_types(logits.dtype, torch.float32)
        out = torch.zeros(labels.shape, dtype=compute, device=logits.device)
        for start in range(0, logits.shape[0], chunk):
            rows = logits[start : start + chunk].to(compute)
            picked = labels[start : start + chunk].clamp(min=0)
            nll = torch.logsumexp(rows, -1) - rows.gather(-1, picked[:, None])[:, 0]
            out[start : start + chunk] = nll * (labels[start : start + chunk] >= 0)
        ctx.save_for_backward(logits, labels)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            stop = start + ctx.chunk
            probs = torch.softmax(logits[start:stop].to(grad_out.dtype), -1)
            valid = labels[start:stop] >= 0
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, labels[start:stop].clamp(min=0)] -= 1.0
            grad[start:stop] = (probs * (grad_out[start:stop] * valid)[:, None]).to(grad.dtype)
        return grad, None, None


def label_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_tokens: int = 2048) -> torch.Tensor:
    """−log p(label) at every position [batch, seq] (float32, or float64 for a float64 model), 0 where labels < 0."""
    flat = _LabelNLL.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), chunk_tokens)
    return flat.view(labels.shape)


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over positions with a label (>= 0) of −log p(label): the loss of docs/design.md §2."""
    return label_nll(logits, labels).sum()


def sample_labels(
    logits: torch.Tensor, targets: torch.Tensor, lengths: list[int], seeds: list[int], chunk_positions: int = 256
) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (true Fisher), where targets >= 0.

    Gumbel-max: argmax(logit − log E) with E ~ Exp(1) is a draw from softmax(logits).
    Each sequence's noise comes from its own generator seeded by `seeds[row]`, over its
    own `lengths[row]` positions in fixed chunks, so draws do not depend on batching,
    padding or sharding, and nothing waits on the device between rows.
    """
    labels = torch.full_like(targets, -1)
    generator = torch.Generator(device=logits.device)
    with torch.no_grad():
        for row, (length, seed) in enumerate(zip(lengths, seeds)):
            generator.manual_seed(seed)
            for start in range(0, length, chunk_positions):
                stop = min(start + chunk_positions, length)
                noise = torch.empty(stop - start, logits.shape[-1], dtype=torch.float32, device=logits.device)
                noise.exponential_(generator=generator)
                labels[row, start:stop] = (logits[row, start:stop].float() - noise.log_()).argmax(-1)
    return torch.where(targets >= 0, labels, torch.full_like(labels, -1))


def sequence_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from the run seed and integer keys (pass, sequence index, sample)."""
    value = seed & 0xFFFFFFFF
    for key in keys:
        value = (value * 6364136223846793005 + key + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    return value
