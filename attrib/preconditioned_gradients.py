"""Preconditioned, low-rank query gradients (docs/design.md §2).

For each query, V_q = ∇_W(−log p(completion | prompt)) per tracked layer, then
P_q = H⁻¹ V_q with the fitted curvature, kept as U diag(σ) Vᵀ of rank r. All of it
happens inside the backward hook of one layer at a time: that layer's dense gradients
for the queries of the batch are formed, preconditioned with that layer's curvature
(read from disk just then), compressed and freed, so at most one layer's dense
`[queries, d_out, d_in]` block exists at once. One set serves many scoring runs.
`--solver cg` (attrib/solve.py) is the exception: it solves all layers together, so it
keeps the batch's dense gradients of every layer, then compresses them the same way.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from attrib.capture import Capture, summed_nll
from attrib.curvature import Curvature
from attrib.data import Query, collate, pack_batches, query_sequence, special_prefix
from attrib.models import TrackedLayer
from attrib.progress import progress
from attrib.runtime import flag

PART_PREFIX = "query_gradients-"
EXACT_SVD_FRACTION = 4  # rank r ≥ min(d_out, d_in) / 4: the exact SVD costs about as much as the randomized one


@dataclass
class QueryGradients:
    """Per layer, the stacked factors of some queries: U [Q, d_out, r], σ [Q, r], V [Q, d_in, r]."""

    query_ids: list[str]
    layer_names: list[str]
    left: list[torch.Tensor]
    sigma: list[torch.Tensor]
    right: list[torch.Tensor]
    residuals: torch.Tensor | None = None  # --solver cg: ‖r_k‖/‖b‖ [iterations + 1, queries], float64
    sample: dict | None = None  # --solver cg: the solve sample's sequences and tokens (none at 0 iterations)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, u, s, v in zip(self.layer_names, self.left, self.sigma, self.right):
            out[f"{name}.U"], out[f"{name}.sigma"], out[f"{name}.V"] = u, s, v
        return out


def randomized_low_rank(matrices: torch.Tensor, rank: int, oversample: int = 10, power_iterations: int = 2, seed: int = 0):
    """Rank-r SVD of matrices [n, d_out, d_in] by a seeded randomized range finder (Halko et al. 2011).

    With power iterations the error is within a small factor of the exact rank-r error
    for the decaying spectra of preconditioned gradients (tests/test_query_gradients.py
    states the bound); it costs O(d_out · d_in · (r + oversample)) per iteration.
    """
    n, d_out, d_in = matrices.shape
    width = min(rank + oversample, d_out, d_in)
    generator = torch.Generator(device=matrices.device).manual_seed(seed)
    probe = torch.randn(d_in, width, generator=generator, device=matrices.device, dtype=matrices.dtype)
    basis = torch.linalg.qr(matrices @ probe).Q  # [n, d_out, width]
    for _ in range(power_iterations):
        basis = torch.linalg.qr(matrices.mT @ basis).Q  # [n, d_in, width]
        basis = torch.linalg.qr(matrices @ basis).Q
    small_u, sigma, vh = torch.linalg.svd(basis.mT @ matrices, full_matrices=False)  # [n, width, d_in]
    u = basis @ small_u
    return u[..., :rank], sigma[..., :rank], vh[..., :rank, :].mT


def gram_low_rank(matrices: torch.Tensor, rank: int, oversample: int = 10, iterations: int = 3, seed: int = 0):
    """Rank-r SVD of matrices [n, d_out, d_in] by subspace iteration on the narrow side's Gram matrix.

    One product forms the s × s Gram matrix of the narrow side s; each iteration is then a product of
    s² · (r + oversample), one narrow QR, and a Rayleigh–Ritz eigh of (r + oversample)² ends it. Where s is
    small this replaces the randomized finder's products with the whole matrix and its wide QRs and SVD,
    which cost more in calls than in arithmetic. Three iterations equal the randomized finder's two power
    iterations (σ⁶ against σ⁵); tests/test_query_scale.py states the bound. Squaring the condition number
    loses nothing kept: float32 blurs only directions below √ε of σ₁.
    """
    d_out, d_in = matrices.shape[-2:]
    tall = d_out >= d_in
    gram = matrices.mT @ matrices if tall else matrices @ matrices.mT  # [n, s, s]
    side = gram.shape[-1]
    width = min(rank + oversample, side)
    generator = torch.Generator(device=matrices.device).manual_seed(seed)
    basis = torch.randn(side, width, generator=generator, device=matrices.device, dtype=matrices.dtype)
    for _ in range(iterations):
        basis = torch.linalg.qr(gram @ basis).Q  # [n, s, width]
    _, ritz = torch.linalg.eigh(basis.mT @ gram @ basis)  # ascending eigenvalues
    narrow = basis @ ritz[..., -rank:].flip(-1)  # [n, s, r]: the top singular vectors of the narrow side
    wide = matrices @ narrow if tall else matrices.mT @ narrow  # the other side's singular vectors times σ
    sigma = wide.norm(dim=-2)  # [n, r]
    wide = wide / torch.where(sigma > 0, sigma, 1)[:, None, :]
    return (wide, sigma, narrow) if tall else (narrow, sigma, wide)


def gram_is_cheaper(d_out: int, d_in: int, rank: int, oversample: int = 10, power_iterations: int = 2) -> bool:
    """Whether the narrow side's Gram matrix (2 · d_out · d_in · s operations) costs less than the randomized
    finder's 2 · power_iterations + 2 products with (r + oversample) vectors."""
    return min(d_out, d_in) <= (2 * power_iterations + 2) * (rank + oversample)


def low_rank(matrices: torch.Tensor, rank: int, gram: bool = False):
    """Rank-r factors U [n, d_out, r], σ [n, r], V [n, d_in, r]; rank 0 keeps the full rank.

    The exact SVD where r is a large fraction of the width, the randomized one otherwise; with `gram`
    (the index build) the narrow side's Gram subspace iteration instead where that is cheaper. Query
    gradients keep the randomized finder, so that their stored sets do not change.
    """
    d_out, d_in = matrices.shape[-2:]
    if rank == 0 or rank * EXACT_SVD_FRACTION >= min(d_out, d_in):
        u, sigma, vh = torch.linalg.svd(matrices, full_matrices=False)
        if rank > 0:
            u, sigma, vh = u[..., :rank], sigma[..., :rank], vh[..., :rank, :]
        v = vh.mT
    elif gram and gram_is_cheaper(d_out, d_in, rank):
        u, sigma, v = gram_low_rank(matrices, rank)
    else:
        u, sigma, v = randomized_low_rank(matrices, rank)
    return u.contiguous(), sigma.contiguous(), v.contiguous()


def iter_query_gradient_batches(
    model,
    tokenizer,
    layers: list[TrackedLayer],
    queries: list[Query],
    curvature: Curvature,
    rank: int,
    max_length: int,
    tokens_per_batch: int,
    max_queries_per_batch: int,
    device,
    owns=lambda batch_number: True,
    solver=None,
) -> Iterator[tuple[int, list[int], QueryGradients | None]]:
    """(batch number, query indices, factors of those queries on the host) per batch of queries.

    Batches are fixed by the queries and the settings, so a resumed run sees the same
    batches; `owns(batch_number)` selects this process's share (factors None otherwise).
    Without `solver` each layer is preconditioned with its own curvature and compressed
    inside its backward hook; with an attrib.solve.CGSolver the dense gradients of every
    layer are collected first, solved together, then compressed the same way (the batch's
    relative CG residuals [iterations + 1, queries] are then in `QueryGradients.residuals`).
    """
    prefix = special_prefix(tokenizer)
    sequences = [query_sequence(tokenizer, query, max_length, prefix) for query in queries]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    compute = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    batches = [
        packed[start : start + max_queries_per_batch]
        for packed in pack_batches(sequences, tokens_per_batch)
        for start in range(0, len(packed), max_queries_per_batch)
    ]

    def compress(preconditioned: torch.Tensor) -> tuple:
        return tuple(t.cpu() for t in low_rank(preconditioned, rank))

    with progress("query gradients", total=len(queries), unit="query") as bar:
        for number, batch in enumerate(batches):
            if not owns(number):
                yield number, batch, None
                continue
            factors: list[tuple | None] = [None] * len(layers)
            dense: list[torch.Tensor | None] = [None] * len(layers)

            def on_backward(index, a, g):
                per_query = torch.bmm(g.to(compute).mT, a)  # [batch, d_out, d_in]
                if solver is not None:
                    dense[index] = per_query
                    return
                preconditioned = curvature.layer(index, device, compute).inverse_times(per_query)
                del per_query
                factors[index] = compress(preconditioned)

            input_ids, mask, targets = collate([sequences[i] for i in batch], pad_id, device)
            capture = Capture(model, layers, lambda index, a: a.to(compute), on_backward)
            capture.run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])
            residuals = sample = None
            if solver is not None:
                preconditioned, residuals = solver.solve(dense)
                del dense
                factors = [compress(p) for p in preconditioned]
                del preconditioned
                sample = solver.sample_counts()
            yield number, batch, QueryGradients(
                [queries[i].query_id for i in batch],
                [layer.name for layer in layers],
                [f[0] for f in factors],
                [f[1] for f in factors],
                [f[2] for f in factors],
                residuals,
                sample,
            )
            bar.advance(len(batch), tokens=sum(len(sequences[i]) for i in batch))


def compute_query_gradients(model, tokenizer, layers: list[TrackedLayer], queries: list[Query], curvature: Curvature,
                            rank: int, max_length: int, tokens_per_batch: int, device, max_queries_per_batch: int = 64,
                            solver=None) -> QueryGradients:
    """Every query's factors in memory, in query order (for small models, tests and evaluations)."""
    order, parts = [], []
    for _, batch, factors in iter_query_gradient_batches(
        model, tokenizer, layers, queries, curvature, rank, max_length, tokens_per_batch, max_queries_per_batch, device,
        solver=solver,
    ):
        order += batch
        parts.append(factors)
    position = torch.argsort(torch.tensor(order))

    def stacked(field: str) -> list[torch.Tensor]:
        return [torch.cat([getattr(p, field)[i] for p in parts])[position] for i in range(len(layers))]

    residuals = torch.cat([p.residuals for p in parts], dim=1)[:, position] if solver is not None else None
    return QueryGradients([q.query_id for q in queries], [l.name for l in layers],
                          stacked("left"), stacked("sigma"), stacked("right"), residuals)


def part_name(batch_number: int) -> str:
    return f"{PART_PREFIX}{batch_number:05d}.safetensors"


def save_part(path: Path, factors: QueryGradients) -> None:
    """One batch's factors, with its query ids (and --solver cg's residuals) in the safetensors metadata."""
    from attrib.storage import save_tensors

    metadata = {"query_ids": json.dumps(factors.query_ids)}
    if factors.residuals is not None:
        metadata["solve"] = json.dumps({"relative_residuals": factors.residuals.T.tolist(), **(factors.sample or {})})
    save_tensors(path, factors.tensors(), metadata=metadata)


def solve_records(paths: list[Path]) -> dict:
    """The manifest's record of a cg solve, gathered from its parts: the sample's size and, per query,
    ‖r_k‖/‖b‖ for k = 0 … iterations (empty lists at 0 iterations)."""
    from attrib.storage import tensor_metadata

    record: dict = {"relative_residuals": {}}
    for path in paths:
        metadata = tensor_metadata(path)
        solve = json.loads(metadata["solve"])
        for query_id, residuals in zip(json.loads(metadata["query_ids"]), solve.pop("relative_residuals")):
            record["relative_residuals"][query_id] = residuals
        record.update(solve)
    return record


class QueryGradientStore:
    """The factors of a query-gradients directory, read per layer for any subset of queries."""

    def __init__(self, directory: str | Path, manifest: dict):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.layer_names: list[str] = manifest["layers"]
        self.query_ids: list[str] = [q["id"] for q in manifest["queries"]]
        self.location: dict[str, tuple[Path, int]] = {}
        for name in manifest["files"]:
            if not name.startswith(PART_PREFIX):
                continue
            path = self.directory / name
            with safe_open(str(path), framework="pt") as handle:
                for row, query_id in enumerate(json.loads(handle.metadata()["query_ids"])):
                    self.location[query_id] = (path, row)
        missing = [q for q in self.query_ids if q not in self.location]
        if missing:
            from attrib.errors import InputError

            raise InputError(f"{flag('query_gradients_dir', directory)} lacks the factors of queries {', '.join(missing[:3])}; recompute it")

    def load(self, layer_name: str, query_ids: list[str], device="cpu", dtype=None):
        """U [q, d_out, r], σ [q, r], V [q, d_in, r] of `query_ids` for one layer."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[int, int]]] = {}
        for position, query_id in enumerate(query_ids):
            path, row = self.location[query_id]
            by_file.setdefault(path, []).append((position, row))
        out: list[list] = [[None] * len(query_ids) for _ in range(3)]
        for path, rows in by_file.items():
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for slot, kind in enumerate(("U", "sigma", "V")):
                    tensor = handle.get_slice(f"{layer_name}.{kind}")
                    for position, row in rows:
                        out[slot][position] = tensor[row : row + 1]
        return tuple(torch.cat(items).to(dtype or items[0].dtype) for items in out)
