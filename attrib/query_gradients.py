"""Preconditioned, low-rank query gradients (DESIGN.md §2).

For each query, V_q = ∇_W(−log p(completion | prompt)) per tracked layer, then
P_q = H⁻¹ V_q with the fitted curvature, kept as U diag(σ) Vᵀ of rank r. One set
serves many scoring runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrib.capture import Capture, summed_nll
from attrib.data import Query, collate, pack_batches, query_sequence, special_prefix
from attrib.factors import LayerCurvature, low_rank
from attrib.models import TrackedLayer
from attrib.progress import progress

GRADIENTS_FILE = "query_gradients.safetensors"


@dataclass
class QueryGradients:
    """Per layer, the stacked factors of all queries: U [Q, d_out, r], σ [Q, r], V [Q, d_in, r]."""

    query_ids: list[str]
    layer_names: list[str]
    left: list[torch.Tensor]
    sigma: list[torch.Tensor]
    right: list[torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, u, s, v in zip(self.layer_names, self.left, self.sigma, self.right):
            out[f"{name}.U"], out[f"{name}.sigma"], out[f"{name}.V"] = u, s, v
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, query_ids: list[str], layer_names: list[str]) -> QueryGradients:
        return cls(
            query_ids,
            layer_names,
            [tensors[f"{n}.U"] for n in layer_names],
            [tensors[f"{n}.sigma"] for n in layer_names],
            [tensors[f"{n}.V"] for n in layer_names],
        )


def per_sequence_gradients(model, layers: list[TrackedLayer], sequences, pad_id: int, device) -> list[torch.Tensor]:
    """G_n = Σ_t g_t a_tᵀ for each sequence of one batch, per layer: [batch, d_out, d_in]."""
    gradients: list[torch.Tensor | None] = [None] * len(layers)
    compute = torch.promote_types(next(model.parameters()).dtype, torch.float32)

    def form_gradient(index, a, g):
        gradients[index] = torch.bmm(g.to(compute).transpose(1, 2), a.to(compute))

    input_ids, mask, targets = collate(sequences, pad_id, device)
    Capture(model, layers, lambda index, a: a, form_gradient).run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])
    return gradients


def compute_query_gradients(
    model,
    tokenizer,
    layers: list[TrackedLayer],
    queries: list[Query],
    curvature: list[LayerCurvature],
    rank: int,
    max_length: int,
    tokens_per_batch: int,
    device,
) -> QueryGradients:
    """Gradients of every query, preconditioned and compressed, in the model's precision (≥ float32)."""
    prefix = special_prefix(tokenizer)
    sequences = [query_sequence(tokenizer, query, max_length, prefix) for query in queries]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    store = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    left: list[list] = [[None] * len(queries) for _ in layers]
    sigma: list[list] = [[None] * len(queries) for _ in layers]
    right: list[list] = [[None] * len(queries) for _ in layers]
    with progress("query gradients", total=len(queries), unit="query") as bar:
        for batch in pack_batches(sequences, tokens_per_batch):
            gradients = per_sequence_gradients(model, layers, [sequences[i] for i in batch], pad_id, device)
            for layer_index, layer_gradients in enumerate(gradients):
                preconditioned = curvature[layer_index].inverse_times(layer_gradients.double())
                u, s, v = low_rank(preconditioned, rank)  # the whole batch of queries at once
                for row, query_index in enumerate(batch):
                    left[layer_index][query_index] = u[row].to(store).cpu()
                    sigma[layer_index][query_index] = s[row].to(store).cpu()
                    right[layer_index][query_index] = v[row].to(store).cpu()
            bar.advance(len(batch), tokens=sum(len(sequences[i]) for i in batch))
    return QueryGradients(
        [q.query_id for q in queries],
        [layer.name for layer in layers],
        [torch.stack(items) for items in left],
        [torch.stack(items) for items in sigma],
        [torch.stack(items) for items in right],
    )
