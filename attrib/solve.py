"""`--solver cg`: H⁻¹∇L_q refined by preconditioned conjugate gradients (docs/design.md §2, "Solve").

EK-FAC is block-diagonal by layer and Kronecker-factored within one. CG instead solves
(G + D) x = b over the tracked weights of all layers together, cross-layer terms
included: b the query gradients, G the Gauss-Newton matrix of the summed sequence loss
averaged over a fixed sample of the fitting corpus, D the per-layer damping λ_l (the one
the EK-FAC query path uses, so D is block-diagonal: λ_l I on layer l). The fitted
curvature M = EK-FAC + D is the preconditioner and x₀ = M⁻¹ b, so zero iterations
return today's EK-FAC gradient exactly.

Scale: fit-factors divides Λ by the number of sequences, the Fisher of a sequence's
summed loss; G is normalised the same way (Σ over the sample's sequences of Jᵀ H_out J,
divided by their number), so λ means the same in both.

G V for the Q directions of a batch of queries shares each pass over the sample:
`torch.func.vjp` gives the logits and the reverse map once per sample batch, the
forward-mode `jvp` is vmapped over the Q directions, and so is the reverse map. The
sample is packed into batches of about tokens_per_batch / Q tokens, so the Q stacked
tangents take about the memory of one query batch's forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from attrib.data import CorpusSpec, SequenceCaps, iter_sequence_parts
from attrib.errors import InputError
from attrib.models import TrackedLayer
from attrib.runtime import flag


@dataclass
class SolveSample:
    """The first `tokens` tokens of a corpus as token tensors, one per sequence, chunked like the fit."""

    input_ids: list[torch.Tensor]  # each [length], int64, on the host
    tokens: int
    labelled: int

    @property
    def sequences(self) -> int:
        return len(self.input_ids)

    @classmethod
    def read(cls, spec: CorpusSpec, tokenizer, max_length: int, tokens: int) -> SolveSample:
        """The corpus's first sequences in file order up to `tokens` tokens (deterministic)."""
        ids = []
        for part in iter_sequence_parts(spec, tokenizer, max_length, 1000, SequenceCaps(max_tokens=tokens)):
            ids += [torch.tensor(sequence.input_ids, dtype=torch.long) for _, sequence in part.sequences]
        if not ids:
            raise InputError(f"{flag('solve_corpus', spec.source)} yields no sequence of at least 2 tokens within "
                             f"{flag('solve_tokens', tokens)}")
        return cls(ids, sum(len(i) for i in ids), sum(len(i) - 1 for i in ids))

    def batches(self, tokens_per_batch: int, pad_id: int, device):
        """(input_ids, attention_mask, targets) [batch, seq] of at most `tokens_per_batch` padded tokens
        (one sequence at least), in sample order."""
        start = 0
        while start < len(self.input_ids):
            stop = start + 1
            width = len(self.input_ids[start])
            while stop < len(self.input_ids):
                wider = max(width, len(self.input_ids[stop]))
                if (stop - start + 1) * wider > tokens_per_batch:
                    break
                stop, width = stop + 1, wider
            rows = self.input_ids[start:stop]
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            targets = torch.full((len(rows), width), -1, dtype=torch.long)
            for row, ids in enumerate(rows):
                input_ids[row, : len(ids)] = ids
                mask[row, : len(ids)] = 1
                targets[row, : len(ids) - 1] = ids[1:]
            yield input_ids.to(device), mask.to(device), targets.to(device)
            start = stop


class GaussNewton:
    """V ↦ G V over a sample: G = (1/N) Σ_n J_nᵀ H_n J_n, J_n the Jacobian of sequence n's logits
    with respect to the tracked weights, H_n the softmax Hessian diag(p) − p pᵀ at each labelled
    position. Directions are per layer [Q, d_out, d_in(+1)] (bias folded, docs/design.md §2)."""

    def __init__(self, model, layers: list[TrackedLayer], sample: SolveSample, tokens_per_batch: int, pad_id: int,
                 device):
        self.model, self.layers, self.sample = model, layers, sample
        self.tokens_per_batch, self.pad_id, self.device = tokens_per_batch, pad_id, device
        named = dict(model.named_parameters())
        self.weights = {}  # in the order of _tangents: the transforms match them by structure
        for layer in layers:
            for kind in ("weight", "bias") if layer.has_bias else ("weight",):
                self.weights[f"{layer.name}.{kind}"] = named[f"{layer.name}.{kind}"]

    def _tangents(self, directions: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Folded directions as tangents of the modules' own weight (and bias) tensors."""
        tangents = {}
        for layer, direction in zip(self.layers, directions):
            weight = self.weights[f"{layer.name}.weight"]
            part = direction[..., : layer.d_in]
            tangents[f"{layer.name}.weight"] = (part.mT if layer.transposed else part).to(weight.dtype).contiguous()
            if layer.has_bias:
                tangents[f"{layer.name}.bias"] = direction[..., layer.d_in].to(weight.dtype).contiguous()
        return tangents

    def _folded(self, gradients: dict[str, torch.Tensor], dtype) -> list[torch.Tensor]:
        out = []
        for layer in self.layers:
            weight = gradients[f"{layer.name}.weight"]
            weight = weight.mT if layer.transposed else weight
            if layer.has_bias:
                weight = torch.cat([weight, gradients[f"{layer.name}.bias"][..., None]], dim=-1)
            out.append(weight.to(dtype))
        return out

    def times(self, directions: list[torch.Tensor]) -> list[torch.Tensor]:
        """C V for V per layer [Q, d_out, d_in(+1)]; one pass over the sample for all Q."""
        from torch.func import functional_call, jvp, vjp, vmap

        queries = directions[0].shape[0]
        dtype = directions[0].dtype
        tangents = self._tangents(directions)
        total = [torch.zeros_like(d) for d in directions]
        with torch.no_grad(), _autodiff_attention():
            for input_ids, mask, targets in self.sample.batches(max(1, self.tokens_per_batch // queries), self.pad_id,
                                                                self.device):
                def logits_of(weights, input_ids=input_ids, mask=mask):
                    return functional_call(self.model, weights, (),
                                           {"input_ids": input_ids, "attention_mask": mask, "use_cache": False},
                                           strict=False).logits

                logits, pullback = vjp(logits_of, self.weights)
                jv = vmap(lambda t: jvp(logits_of, (self.weights,), (t,))[1])(tangents)  # [Q, batch, seq, vocab]
                compute = torch.promote_types(logits.dtype, torch.float32)
                cotangents = self._output_curvature_times(logits.to(compute), targets, jv.to(compute))
                del jv
                (gradients,) = vmap(pullback)(cotangents.to(logits.dtype))
                for index, product in enumerate(self._folded(gradients, dtype)):
                    total[index] += product
        return [t / self.sample.sequences for t in total]

    @staticmethod
    def _output_curvature_times(logits, targets, jv):
        """H J v per labelled position, H = diag(p) − p pᵀ (the expectation over labels drawn from p)."""
        probs = torch.softmax(logits, -1)
        return probs * (jv - (probs * jv).sum(-1, keepdim=True)) * (targets >= 0)[..., None]


class EmpiricalFisher(GaussNewton):
    """V ↦ F V over a sample: F = (1/N) Σ_n g_n g_nᵀ, g_n sequence n's summed-loss gradient with the
    data's labels, the curvature that `--fisher empirical` factors approximate (cross-token terms
    included, as in their Λ). g_nᵀ v = Σ_t r_tᵀ J_t v with r_t = p_t − e_{y_t}, so F v is the pullback
    of (g_nᵀ v) r_t: the same passes as the Gauss-Newton product."""

    @staticmethod
    def _output_curvature_times(logits, targets, jv):
        residuals = torch.softmax(logits, -1)  # r_t = ∂ loss / ∂ logits_t [batch, seq, vocab]
        residuals.scatter_add_(-1, targets.clamp(min=0)[..., None], -torch.ones_like(residuals[..., :1]))
        residuals = residuals * (targets >= 0)[..., None]
        projections = (residuals * jv).sum(dim=(-2, -1))  # g_nᵀ v [Q, batch]
        return projections[..., None, None] * residuals


# The curvature CG solves (QuerySettings.solve_system). Gauss-Newton for every kind of factors: on the
# planted-fact kits at the default damping the exact damped empirical-Fisher inverse scores far below
# EK-FAC (its rank is at most the sample's sequence count, so solving it fits the query gradient by
# the sample's own gradients), and so does every CG iterate on it, preconditioned by empirical factors
# too (LDS 0.60 → 0.04 in 3 iterations; docs/benchmarks.md, "CG solve: which curvature, at the default
# damping"). EmpiricalFisher stays for that measurement (scripts/eval/realtext.py).
SYSTEMS = {"gauss-newton": GaussNewton, "empirical-fisher": EmpiricalFisher}
DEFAULT_SYSTEM = "gauss-newton"  # QuerySettings.solve_system's default, spelt there without importing torch


@contextlib.contextmanager
def _autodiff_attention():
    """Fused attention kernels lack forward-mode derivatives; the math kernel has them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def _dot(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Per query [Q]: Σ over layers of ⟨x_l, y_l⟩ (Frobenius)."""
    return sum((x * y).sum(dim=(-2, -1), dtype=torch.float64) for x, y in zip(xs, ys))


def _axpy(alpha: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """ys + alpha · xs with one alpha per query."""
    return [y + alpha.to(y.dtype)[:, None, None] * x for x, y in zip(xs, ys)]


def preconditioned_cg(system, precondition, b: list[torch.Tensor], iterations: int, on_iterate=None):
    """x after `iterations` steps of PCG on A x = b from x₀ = M⁻¹ b, for Q right-hand sides at once.

    `system(V)` is A V, `precondition(V)` is M⁻¹ V, both on lists of [Q, …] per layer. Returns x and
    the relative residuals ‖b − A x_k‖ / ‖b‖, [iterations + 1, Q] (k = 0 … iterations); with zero
    iterations x is M⁻¹ b unchanged and nothing else is computed (no residual). `on_iterate(k, x_k)`,
    if given, sees every iterate from x₀ on (the evaluation reads several iteration counts from one run).
    """
    x = precondition(b)
    if on_iterate is not None:
        on_iterate(0, x)
    if iterations == 0:
        return x, torch.zeros(0, b[0].shape[0], dtype=torch.float64)
    b_norm = _dot(b, b).sqrt()
    safe = lambda d: torch.where(d == 0, torch.ones_like(d), d)  # a zero query gradient stays zero
    r = [bi - ai for bi, ai in zip(b, system(x))]
    residuals = [_dot(r, r).sqrt() / safe(b_norm)]
    z = precondition(r)
    p = z
    rz = _dot(r, z)
    for step in range(iterations):
        ap = system(p)
        curvature = _dot(p, ap)
        alpha = torch.where(curvature > 0, rz / safe(curvature), torch.zeros_like(rz))
        x = _axpy(alpha, p, x)
        if on_iterate is not None:
            on_iterate(step + 1, x)
        r = _axpy(-alpha, ap, r)
        residuals.append(_dot(r, r).sqrt() / safe(b_norm))
        if step == iterations - 1:
            break
        z = precondition(r)
        rz_next = _dot(r, z)
        beta = torch.where(rz != 0, rz_next / safe(rz), torch.zeros_like(rz))
        p = _axpy(beta, p, z)
        rz = rz_next
    return x, torch.stack(residuals)


class CGSolver:
    """Preconditioned gradients of a batch of queries: (C + D)⁻¹ b by `iterations` steps of PCG, C the
    sample's curvature (`product`: GaussNewton or EmpiricalFisher), EK-FAC (or whatever the factors
    hold) + D as the preconditioner."""

    def __init__(self, curvature, product: GaussNewton | None, iterations: int, device, dtype):
        self.curvature, self.product, self.iterations = curvature, product, iterations
        self.device, self.dtype = device, dtype

    def _precondition(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.curvature.layer(i, self.device, self.dtype).inverse_times(v) for i, v in enumerate(vectors)]

    def _system(self, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
        products = self.product.times(vectors)
        return [gv + self.curvature.damping_of(i) * v for i, (gv, v) in enumerate(zip(products, vectors))]

    def sample_counts(self) -> dict:
        """The solve sample's size, for the manifest (nothing when no iteration runs)."""
        if self.product is None:
            return {}
        sample = self.product.sample
        return {"sample_sequences": sample.sequences, "sample_tokens": sample.tokens}

    def solve(self, gradients: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(preconditioned gradients per layer, relative residuals [iterations + 1, Q])."""
        return preconditioned_cg(self._system, self._precondition, gradients, self.iterations)


class CGRefinement:
    """`--solver cg` in the query-gradients stage: what it needs from the factors, the solver of a run
    (built on the first batch a process computes, so a resumed run with every part done, or a rank
    with no batch, reads no sample) and what the manifest records."""

    def __init__(self, settings, factors_manifest: dict):
        if factors_manifest["settings"]["strategy"] == "identity":
            raise InputError(f"{flag('solver', 'cg')} needs fitted curvature as its preconditioner and damping; "
                             "these factors are 'identity': fit ekfac, kfac or diagonal factors")
        self.settings, self.factors_manifest = settings, factors_manifest
        self.sample_spec: CorpusSpec | None = None  # set by the stage when iterations run
        self.built = None

    def solver(self, lm, tokenizer, layers, curvature, world) -> CGRefinement:
        self.build = lambda: self._cg_solver(lm, tokenizer, layers, curvature, world)
        return self

    def solve(self, gradients):
        if self.built is None:
            self.built = self.build()
        return self.built.solve(gradients)

    def sample_counts(self) -> dict:
        return self.built.sample_counts()

    def _cg_solver(self, lm, tokenizer, layers, curvature, world) -> CGSolver:
        """The first `solve_tokens` tokens of the solve corpus, chunked like the fit, and CG over them."""
        settings = self.settings
        compute = torch.promote_types(next(lm.parameters()).dtype, torch.float32)
        product = None
        if settings.solves:
            sample = SolveSample.read(self.sample_spec, tokenizer, self.factors_manifest["settings"]["max_length"],
                                      settings.solve_tokens)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            product = SYSTEMS[settings.solve_system](lm, layers, sample, settings.tokens_per_batch, pad_id,
                                                     world.device)
        return CGSolver(curvature, product, settings.solve_iterations, world.device, compute)

    def record(self, part_paths: list) -> dict:
        from attrib.preconditioned_gradients import solve_records

        return {"solver": "cg", "iterations": self.settings.solve_iterations, "system": self.settings.solve_system,
                "factors_fisher": self.factors_manifest["settings"].get("fisher"),
                "corpus": self.sample_spec.source if self.sample_spec is not None else None,
                **solve_records(part_paths)}


REFINEMENTS = {"cg": CGRefinement}  # --solver ekfac refines nothing: H⁻¹∇L_q from the fitted curvature alone
