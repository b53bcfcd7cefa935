"""The gradient index (issue 20): every training sequence's gradient, compressed once, scored for any query.

One pass over the corpus, read exactly as `attrib query` reads it, stores per sequence n and
tracked layer a compressed form of G_n = Σ_t g_t a_tᵀ (DESIGN.md §2):

* `lowrank`: rank-r factors of the whitened gradient W_n = (Q_Sᵀ G_n Q_A) ⊘ √(Λ + λ), kept
  balanced as L = U√σ [d_out, r], R = V√σ [d_in, r], W_n ≈ L Rᵀ. For any query direction P
  (the preconditioned query gradient H⁻¹V_q, EK-FAC or CG), ⟨P, G_n⟩ = ⟨T(P), W_n⟩ with
  T(P) = (Q_Sᵀ P Q_A) ⊙ √(Λ + λ); full rank is exact, whatever damping the query used.
* `kronecker`: X_n = P_Sᵀ G_n P_A [k_out, k_in] = Σ_t (P_Sᵀ g_t)(P_Aᵀ a_t)ᵀ, from the projected
  a and g without forming G (LoGra). `random`: Gaussian with variance 1/k, so E[P Pᵀ] = I and
  ⟨P_Sᵀ P P_A, X_n⟩ is an unbiased estimate of ⟨P, G_n⟩ (P_S and P_A independent); `eigen`: the
  top-k eigenvectors of S and A (full width: the eigenbasis itself, exact).

Scores are ⟨T(P_q), stored⟩ per layer: a blocked matrix product over memory-mapped safetensors
shards, queries in passes, per-layer scores kept; documents.parquet and summary.parquet as
`attrib query` writes them. `index_candidates` turns an index's top K into a prefilter stage
(method "index") that `attrib query --candidates` re-scores exactly.

Files: shards/rRRR-pPPPPP.safetensors (per corpus part and rank: the layers' tensors, doc_index,
chunk and tokens, doc ids in the metadata), projections.safetensors (kronecker), sequences.parquet.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from attrib.capture import Capture, summed_nll
from attrib.curvature import Curvature
from attrib.data import CorpusSpec, RowStats, Sequence, collate, iter_sequence_parts, pack_batches
from attrib.distributed import World
from attrib.errors import InputError, RunError
from attrib.memory import SCORE_BLOCK_ELEMENTS, SCORES_BYTES, LayerShape, index_queries_per_pass, index_shape
from attrib.factors import LayerCurvature, correction_sequences_per_step
from attrib.models import TrackedLayer
from attrib.options import DEFAULT_DAMPING_SCALE, DEFAULT_INDEX_DIMS, parse_dims
from attrib.progress import message, progress
from attrib.results import StageResult
from attrib.runtime import flag
from attrib.scoring import PARTS_DIR, _write, documents_part, summary_part, summary_table
from attrib.storage import StageDir

STAGE = "index"
SHARDS_DIR = "shards"
PROJECTIONS_FILE = "projections.safetensors"
SEQUENCES_FILE = "sequences.parquet"
GRADIENTS_DIR = "query-gradients"  # where score_index computes the query gradients unless given
SCORES_DIR = "index-scores"  # index_candidates' scores, inside its prefilter stage
REPRESENTATIONS = ("lowrank", "kronecker")
PROJECTIONS = ("random", "eigen")
STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                  "float64": torch.float64}
TAILS_SAVE_SECONDS = 60  # a pass's running tails are saved at most this often


@dataclass
class IndexSettings:
    """Everything that changes the stored index; recorded in the manifest and checked on resume."""

    representation: str = "kronecker"  # or "lowrank"
    rank: int = 8  # lowrank: factors kept per sequence and layer (0: full rank, exact)
    dims: list[int] | None = None  # kronecker: [k_out, k_in] per layer (0: full width; None: DEFAULT_INDEX_DIMS or less)
    projection: str = "auto"  # kronecker: "random" (seeded Gaussian), "eigen" (top eigenvectors of S and A) or "auto"
    seed: int = 0
    storage_dtype: str = "bfloat16"  # scores accumulate in float32 (float64 for a float64 model) whatever this is
    damping: float | None = None  # lowrank's whitening √(Λ + λ); None: damping_scale × mean(Λ) per layer
    damping_scale: float = DEFAULT_DAMPING_SCALE
    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    world_size: int = 1

    @classmethod
    def of(cls, options, max_length: int, world_size: int) -> IndexSettings:
        chosen, reading = options.index, options.batch
        dims = None if chosen.dims is None else parse_dims(chosen.dims)
        return cls(chosen.representation, chosen.rank, dims, chosen.projection, chosen.seed,
                   chosen.storage_dtype, options.damping.damping, options.damping.scale, max_length,
                   reading.tokens_per_batch, reading.docs_per_part, world_size)

    def validate(self) -> None:
        """The checks of the command's options (attrib.options.IndexOptions), for callers of build_index."""
        from attrib.options import STAGES

        given = {**asdict(self), "dims": None if self.dims is None else "x".join(map(str, self.dims))}
        for resolved in ("world_size", "damping_scale" if self.damping is not None else "damping"):
            given.pop(resolved)
        STAGES["index"].parse(given)

    def shape(self, layer: TrackedLayer) -> dict[str, list[int]]:
        """The stored tensors of one sequence and layer, by name suffix; refuses sizes beyond the layer."""
        d_out, d_in = layer.d_out, layer.d_in_folded
        if self.representation == "lowrank":
            rank = self.rank or min(d_out, d_in)
            if rank > min(d_out, d_in):
                raise InputError(f"{flag('rank', self.rank)} exceeds layer {layer.name} ({d_out} × {d_in}); "
                                 "use at most its smaller side, or 0 for full rank")
        elif self.dims is not None:  # given sizes beyond the layer are refused; the default is clipped to it
            k_out, k_in = self.dims[0] or d_out, self.dims[1] or d_in
            if k_out > d_out or k_in > d_in:
                raise InputError(f"{flag('dims', k_out)}x{k_in} exceeds layer {layer.name} ({d_out} × {d_in}); "
                                 "use at most its size, or 0 for its full width")
        return index_shape(LayerShape(layer.name, d_in, d_out), self.representation, self.rank, self.dims)


# --- the maths of one layer: tensors in, tensors out --------------------------------------------


def whitened_low_rank(curvature: LayerCurvature, a: torch.Tensor, g: torch.Tensor, rank: int,
                      sequences_per_step: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-r factors L [b, d_out, r], R [b, d_in, r] of each sequence's whitened gradient
    W = (Q_Sᵀ G Q_A) ⊘ √(Λ + λ), G = Σ_t g_t a_tᵀ, with W ≈ L Rᵀ (rank 0: full).

    `a` [b, seq, d_in] and `g` [b, seq, d_out] are matched and zero at padding. Each side turns into
    its eigenbasis where that is cheaper for the batch's length: before G is formed (seq · width² per
    sequence) or after (width² · the other side's width). The top r come from attrib.preconditioned_gradients
    .low_rank with its narrow-side Gram path, the cheaper one for narrow layers.
    """
    from attrib.preconditioned_gradients import low_rank

    (batch, length, d_in), d_out = a.shape, g.shape[-1]
    rotates = curvature.gradient_basis is not None
    gradient_first, activation_first = rotates and length <= d_in, rotates and length <= d_out
    if gradient_first:
        g = g @ curvature.gradient_basis
    if activation_first:
        a = a @ curvature.activation_basis
    scale = None if curvature.eigenvalues is None else (curvature.eigenvalues + curvature.damping).rsqrt()
    step = sequences_per_step or correction_sequences_per_step(d_out, d_in)
    # one block reused by every step: a fresh one of this size is page-faulted in each time, which on a CPU
    # cost as much as the product that fills it
    block = torch.empty((min(step, batch), d_out, d_in), dtype=g.dtype, device=g.device)
    lefts, rights = [], []
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        gradient = torch.bmm(g[rows].mT, a[rows], out=block[: len(g[rows])])  # [step, d_out, d_in]
        if rotates and not gradient_first:
            gradient = curvature.gradient_basis.T @ gradient
        if rotates and not activation_first:
            gradient = gradient @ curvature.activation_basis
        if scale is not None:
            gradient = gradient.mul_(scale)
        u, sigma, v = low_rank(gradient, rank, gram=True)
        root = sigma.sqrt()[:, None, :]
        lefts.append(u * root)
        rights.append(v * root)
        del gradient
    return torch.cat(lefts), torch.cat(rights)


def kronecker_projection(projected_a: torch.Tensor, g: torch.Tensor, gradient_projection: torch.Tensor) -> torch.Tensor:
    """X = P_Sᵀ G P_A = Σ_t (P_Sᵀ g_t)(P_Aᵀ a_t)ᵀ per sequence [b, k_out, k_in], from `projected_a` = a P_A
    [b, seq, k_in] and g [b, seq, d_out]; G itself is never formed."""
    return torch.bmm((g @ gradient_projection).mT, projected_a)


@dataclass
class QuerySide:
    """One layer's T(P_q) for a pass of queries, such that ⟨T(P_q), stored form of G_n⟩ stands for ⟨P_q, G_n⟩.

    T = (left rightᵀ) ⊙ scale, from the query's factors P_q = U diag(σ) Vᵀ: kronecker left = P_Sᵀ U σ,
    right = P_Aᵀ V, no scale (T [q, k_out, k_in] is small, formed once); lowrank left = Q_Sᵀ U σ, right = Q_Aᵀ V,
    scale √(Λ + λ): T [q, d_out, d_in] and Λ are formed and read when the layer is scored and freed after, so
    a pass holds one layer's dense T and Λ, never every layer's, and P_q itself is never formed.
    """

    left: torch.Tensor  # [q, rows, r]
    right: torch.Tensor  # [q, columns, r]
    damped_eigenvalues: Callable[[], torch.Tensor | None] | None = None  # lowrank: reads the layer's Λ + λ
    formed: torch.Tensor | None = None

    @classmethod
    def of(cls, representation: str, u, sigma, v, transform) -> QuerySide:
        """`transform`: the pair (P_S, P_A) for kronecker; for lowrank a pair (Curvature, layer index)."""
        left = u * sigma[:, None, :]
        if representation == "kronecker":
            gradient_projection, activation_projection = transform
            left, right = gradient_projection.T @ left, activation_projection.T @ v
            return cls(left, right, formed=left @ right.mT)
        (curvature, index), right = transform, v
        if curvature.strategy.rotates:
            layer = curvature.layer(index, u.device, u.dtype)
            left, right = layer.gradient_basis.T @ left, layer.activation_basis.T @ right
            del layer
        return cls(left, right, partial(curvature.damped_eigenvalues, index, u.dtype))

    def dense(self) -> torch.Tensor:
        if self.formed is not None:
            return self.formed
        formed = self.left @ self.right.mT
        damped = self.damped_eigenvalues()
        return formed if damped is None else formed.mul_(damped.to(formed.device).sqrt_())


def block_scores(representation: str, transformed: torch.Tensor, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """⟨T_q, stored form of G_n⟩ [q, b] for a block of b sequences: one product [q, k] × [k, b].

    lowrank: k = d_out·d_in, the block's W_n ≈ L Rᵀ formed first (b·d_out·d_in·r), which serves every
    query of the pass: r times fewer operations than Σ_k L_kᵀ T_q R_k once a pass has more than r queries.
    """
    if representation == "kronecker":
        return transformed.flatten(1) @ stored["projected"].flatten(1).T
    dense = stored["left"] @ stored["right"].mT  # [b, d_out, d_in]
    return transformed.flatten(1) @ dense.flatten(1).T


def make_projections(layers: list[TrackedLayer], curvature: Curvature, settings: IndexSettings, dtype=torch.float32):
    """(P_S [d_out, k_out], P_A [d_in, k_in]) per layer: seeded Gaussians of variance 1/k, or the
    eigenvectors of the largest eigenvalues of S and A."""
    from attrib.capture import sequence_seed

    result = []
    for index, layer in enumerate(layers):
        k_out, k_in = settings.shape(layer)["projected"]
        if settings.projection == "random":
            pair = []
            for side, (width, k) in enumerate(((layer.d_out, k_out), (layer.d_in_folded, k_in))):
                generator = torch.Generator().manual_seed(sequence_seed(settings.seed, index, side))
                pair.append(torch.randn(width, k, generator=generator, dtype=torch.float64) / k**0.5)
        else:
            pair = []
            for side, k in (("gradient", k_out), ("activation", k_in)):
                values = curvature.files.read(f"{layer.name}.{side}_eigenvalues").double()
                vectors = curvature.files.read(f"{layer.name}.{side}_eigenvectors").double()
                pair.append(vectors[:, torch.argsort(values, descending=True)[:k]])
        result.append(tuple(p.to(dtype) for p in pair))
    return result


# --- building ------------------------------------------------------------------------------------


class IndexBuilder:
    """The stored form of every tracked layer's gradient for batches of sequences, through hooks.

    lowrank keeps every layer's curvature on the device while it takes at most a quarter of the memory
    budget (attrib.memory.default_budget); otherwise each layer's is read from disk in its hook, every batch.
    """

    def __init__(self, model, layers: list[TrackedLayer], settings: IndexSettings, device,
                 curvature: Curvature | None = None, projections=None):
        from attrib.memory import default_budget

        self.model, self.layers, self.settings, self.device = model, layers, settings, device
        self.compute = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        self.storage = STORAGE_DTYPES[settings.storage_dtype]
        self.curvature, self.resident = curvature, None
        if settings.representation == "lowrank":
            size = sum(l.d_out**2 + l.d_in_folded**2 + l.d_out * l.d_in_folded for l in layers) * self.compute.itemsize
            if size <= default_budget(device) // 4:
                self.resident = [curvature.layer(i, device, self.compute) for i in range(len(layers))]
        else:
            self.projections = [(s.to(device, self.compute), a.to(device, self.compute)) for s, a in projections]

    def layer_curvature(self, index: int) -> LayerCurvature:
        if self.resident is not None:
            return self.resident[index]
        return self.curvature.layer(index, self.device, self.compute)

    def encode(self, sequences: list[Sequence], pad_id: int) -> dict[str, torch.Tensor]:
        """`{layer}.left`/`{layer}.right` or `{layer}.projected` [batch, …] on the host, in the storage dtype."""
        input_ids, mask, targets = collate(sequences, pad_id, self.device)
        stored: dict[str, torch.Tensor] = {}
        lowrank = self.settings.representation == "lowrank"

        def keep(index: int, a: torch.Tensor) -> torch.Tensor:
            a = a.to(self.compute)
            return a if lowrank else a @ self.projections[index][1]

        def on_backward(index: int, kept: torch.Tensor, g: torch.Tensor) -> None:
            name, g = self.layers[index].name, g.to(self.compute)
            if lowrank:
                left, right = whitened_low_rank(self.layer_curvature(index), kept, g, self.settings.rank)
                stored[f"{name}.left"], stored[f"{name}.right"] = self._store(left), self._store(right)
            else:
                stored[f"{name}.projected"] = self._store(kronecker_projection(kept, g, self.projections[index][0]))

        Capture(self.model, self.layers, keep, on_backward).run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])
        return stored

    def _store(self, tensor: torch.Tensor) -> torch.Tensor:
        stored = tensor.detach().to("cpu", self.storage)
        # rounding is monotone: the largest magnitude stays finite in storage iff every value does (NaN included)
        peak = torch.linalg.vector_norm(tensor.detach(), ord=float("inf")) if stored.numel() else stored.new_zeros(())
        if not torch.isfinite(peak.to(self.storage)):
            raise RunError(f"a stored value overflows {flag('storage_dtype', self.settings.storage_dtype)}; "
                           "use bfloat16 or float32")
        return stored


def shard_name(rank: int, part: int) -> str:
    return f"{SHARDS_DIR}/r{rank:03d}-p{part:05d}.safetensors"


def _build_part(builder: IndexBuilder, sequences: list[Sequence], settings: IndexSettings, pad_id: int, bar):
    """One corpus part's tensors, in the order of `sequences`, and its doc ids."""
    tensors: dict[str, torch.Tensor] = {}
    for batch in pack_batches(sequences, settings.tokens_per_batch):
        chosen = [sequences[i] for i in batch]
        for name, tensor in builder.encode(chosen, pad_id).items():
            if name not in tensors:
                tensors[name] = torch.empty((len(sequences), *tensor.shape[1:]), dtype=tensor.dtype)
            tensors[name][batch] = tensor  # back in the part's order (batches are sorted by length)
        bar.advance(len(chosen), tokens=sum(len(s) for s in chosen))
    tensors["doc_index"] = torch.tensor([s.doc_index for s in sequences], dtype=torch.int64)
    tensors["chunk"] = torch.tensor([s.chunk for s in sequences], dtype=torch.int32)
    tensors["tokens"] = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
    return tensors, [s.doc_id for s in sequences]


def _empty_tensors(layers: list[TrackedLayer], settings: IndexSettings) -> dict[str, torch.Tensor]:
    """The tensors of a part without sequences (its documents are all shorter than 2 tokens)."""
    storage = STORAGE_DTYPES[settings.storage_dtype]
    tensors = {f"{layer.name}.{kind}": torch.zeros(0, *shape, dtype=storage)
               for layer in layers for kind, shape in settings.shape(layer).items()}
    return {**tensors, "doc_index": torch.zeros(0, dtype=torch.int64), "chunk": torch.zeros(0, dtype=torch.int32),
            "tokens": torch.zeros(0, dtype=torch.int32)}


def build_index(out, model_spec: str, lm, tokenizer, layers: list[TrackedLayer], factors: str, corpus: CorpusSpec,
                settings: IndexSettings, world: World | None = None, overwrite: bool = False) -> dict | None:
    """Index every sequence of `corpus` into `out`; returns the final manifest (None when already complete).

    The factors must have been fitted for this model on the same chat rendering and loss; a rerun
    resumes at the first unfinished part and refuses other settings, factors, corpus or model.
    """
    from attrib.data import chat_format, check_chat_agrees, chunking_identity
    from attrib.models import model_record
    from attrib.storage import input_identity, open_input, save_tensors

    world = world or World()
    settings.validate()
    for layer in layers:
        settings.shape(layer)  # sizes beyond a layer are refused before anything is written
    record = model_record(model_spec, lm, layers)
    curvature = Curvature(factors, layers, settings.damping, settings.damping_scale, record["fingerprint"])
    if settings.projection == "auto":  # eigen finds far more of the top documents (docs/benchmarks.md, issue 20)
        settings = replace(settings, projection="eigen" if curvature.strategy.rotates else "random")
    if settings.representation == "kronecker" and settings.projection == "eigen" and not curvature.strategy.rotates:
        raise InputError(f"{flag('projection')} eigen needs eigenbases; {flag('factors', factors)} holds "
                         f"'{curvature.strategy.name}' factors: use {flag('projection')} random or fit ekfac factors")
    chat = {**chat_format(tokenizer, corpus.chat_template).identity(), "loss_on": corpus.loss_on}
    check_chat_agrees(open_input(factors, "fit-factors", option=flag("factors")), chat, flag("factors", factors))
    recorded = {**asdict(settings), "strategy": curvature.strategy.name, "chat": chat,
                "chunking": chunking_identity(tokenizer, settings.max_length, corpus.long_documents, corpus.chat_template)}
    inputs = {"factors": input_identity(factors), "corpus": {**asdict(corpus), "identity": input_identity(corpus.source)}}
    stage = world.main_first(lambda is_main: StageDir(out, STAGE, recorded, record, inputs, overwrite and is_main))
    if stage.already_complete:
        message(f"{out} is already complete; use {flag('overwrite')} to index again")
        return None
    with stage.guard():
        started = time.time()
        projections = None
        if settings.representation == "kronecker":
            projections = make_projections(layers, curvature, settings)
            if world.is_main and not stage.has(PROJECTIONS_FILE):
                save_tensors(stage.file(PROJECTIONS_FILE), {f"{layer.name}.{side}": p for layer, pair in zip(layers, projections)
                                                            for side, p in zip(("gradient", "activation"), pair)})
        builder = IndexBuilder(lm, layers, settings, world.device, curvature, projections)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        stats = RowStats()
        parts = iter_sequence_parts(corpus, tokenizer, settings.max_length, settings.docs_per_part, stats=stats,
                                    wanted=lambda doc_index, _: world.owns(doc_index))
        with progress("index", unit="seq") as bar:
            for part in parts:
                name = shard_name(world.rank, part.index)
                if stage.has(name):
                    continue
                sequences = [s for _, s in part.sequences]
                if sequences:
                    tensors, doc_ids = _build_part(builder, sequences, settings, pad_id, bar)
                else:
                    tensors, doc_ids = _empty_tensors(layers, settings), []
                save_tensors(stage.file(name), tensors, metadata={"doc_ids": json.dumps(doc_ids)})
        world.barrier()
        stage.timings["build_seconds"] = round(stage.timings.get("build_seconds", 0.0) + time.time() - started, 3)
        if not world.is_main:
            return None
        counts = _write_sequences(stage)
        if not counts["sequences"]:
            raise InputError(f"nothing was indexed: {flag('corpus', corpus.source)} yields no sequence of at least 2 tokens")
        shapes = {layer.name: settings.shape(layer) for layer in layers}
        values = sum(int(np.prod(s)) for shape in shapes.values() for s in shape.values())
        files = stage.parts(f"{SHARDS_DIR}/*.safetensors") + [SEQUENCES_FILE] + (
            [PROJECTIONS_FILE] if settings.representation == "kronecker" else [])
        return stage.complete(
            {**counts, "rows_skipped": stats.skipped}, files,
            layers=[layer.name for layer in layers], shapes=shapes, strategy=curvature.strategy.name,
            damping={layer.name: curvature.damping_of(i) for i, layer in enumerate(layers)},
            representation=_describe(settings), values_per_sequence=values,
            bytes_per_sequence=values * STORAGE_DTYPES[settings.storage_dtype].itemsize,
        )


def _describe(settings: IndexSettings) -> str:
    if settings.representation == "lowrank":
        return f"lowrank rank {settings.rank or 'full'} (whitened)"
    if settings.dims is None:
        return f"kronecker {settings.projection} {DEFAULT_INDEX_DIMS}x{DEFAULT_INDEX_DIMS} (or the layer's width)"
    return f"kronecker {settings.projection} {settings.dims[0] or 'full'}x{settings.dims[1] or 'full'}"


def _write_sequences(stage: StageDir) -> dict:
    """sequences.parquet (shard, row, doc_id, doc_index, chunk, tokens) from the shards; returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors import safe_open

    from attrib.storage import atomic_path

    tables = []
    for name in stage.parts(f"{SHARDS_DIR}/*.safetensors"):
        with safe_open(str(stage.file(name)), framework="pt") as handle:
            doc_ids = json.loads(handle.metadata()["doc_ids"])
            columns = {key: handle.get_tensor(key).numpy() for key in ("doc_index", "chunk", "tokens")}
        tables.append(pa.table({"shard": pa.array([name] * len(doc_ids), pa.string()),
                                "row": pa.array(np.arange(len(doc_ids), dtype=np.int32)),
                                "doc_id": pa.array(doc_ids, pa.string()), **columns}))
    if not tables:  # no part had a sequence of at least 2 tokens
        return {"documents": 0, "sequences": 0, "tokens": 0}
    table = pa.concat_tables(tables)
    with atomic_path(stage.file(SEQUENCES_FILE)) as tmp:
        pq.write_table(table, tmp)
    return {"documents": len(set(table["doc_index"].to_pylist())), "sequences": table.num_rows,
            "tokens": int(table["tokens"].to_numpy().sum()) if table.num_rows else 0}


# --- scoring -------------------------------------------------------------------------------------


@dataclass
class IndexScoreSettings:
    """Everything that changes the index scores written; recorded in the manifest."""

    documents_top: int = 1000  # per query, keep the K most positive and K most negative documents; 0: all
    queries_per_pass: int = 0  # 0: as many as PASS_BYTES holds
    world_size: int = 1


class IndexReader:
    """A finished index: its manifest, the query-side transform of each layer, and blocks of its shards."""

    def __init__(self, directory: str | Path, fingerprint: str | None = None):
        from attrib.storage import input_identity, open_input

        self.directory = Path(directory)
        self.manifest = open_input(directory, STAGE, fingerprint, option=flag("index"))
        self.settings = IndexSettings(**{k: v for k, v in self.manifest["settings"].items()
                                         if k in IndexSettings.__dataclass_fields__})
        self.shards = [name for name in self.manifest["files"] if name.startswith(SHARDS_DIR)]
        self._doc_ids = None
        self.factors = self.manifest["inputs"]["factors"]["path"]
        if input_identity(self.factors) != self.manifest["inputs"]["factors"]:
            raise InputError(f"{flag('index', directory)} was built on {flag('factors', self.factors)}, which changed since; "
                             f"rebuild the index (attrib index {flag('overwrite')})")

    def transforms(self, layers: list[TrackedLayer], dtype, device="cpu") -> list:
        """Per layer what `QuerySide.of` needs: its projections (kronecker) or (Curvature, index) (lowrank: the
        layer's eigenbases and Λ are read when needed, never every layer's at once)."""
        from attrib.storage import load_tensors

        if self.settings.representation == "kronecker":
            tensors = load_tensors(self.directory / PROJECTIONS_FILE)
            return [(tensors[f"{l.name}.gradient"].to(device, dtype), tensors[f"{l.name}.activation"].to(device, dtype))
                    for l in layers]
        curvature = Curvature(self.factors, layers, self.settings.damping, self.settings.damping_scale)
        return [(curvature, index) for index in range(len(layers))]

    def doc_ids(self, doc_index: np.ndarray):
        """The document ids of `doc_index`, an Arrow string array (from sequences.parquet, read once)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._doc_ids is None:
            table = pq.read_table(self.directory / SEQUENCES_FILE, columns=["doc_index", "doc_id"])
            numbers, first = np.unique(table["doc_index"].to_numpy(), return_index=True)
            self._doc_ids = numbers, table["doc_id"].take(pa.array(first)).combine_chunks()
        numbers, ids = self._doc_ids
        return ids.take(pa.array(np.searchsorted(numbers, doc_index)))


def _pass_sides(store, layers, reader: IndexReader, transforms: list, pass_ids: list[str], dtype,
                device) -> list[QuerySide]:
    """Each layer's QuerySide for one pass of queries on `device`, from their factors P_q = U diag(σ) Vᵀ."""
    return [QuerySide.of(reader.settings.representation, *store.load(layer.name, pass_ids, device, dtype), transform)
            for layer, transform in zip(layers, transforms)]


def _groups(doc_index: np.ndarray, size: int) -> list[tuple[int, int]]:
    """(start, end) of consecutive rows, about `size` each, that never split a document's chunks."""
    bounds, start = [], 0
    while start < len(doc_index):
        end = min(start + size, len(doc_index))
        while end < len(doc_index) and doc_index[end] == doc_index[end - 1]:
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def _score_shard(reader: IndexReader, name: str, layers, sides: list[QuerySide], dtype, skip=lambda group: False):
    """(group number, doc indices [m], document layer scores [m, q, L] float64) per group of whole documents of
    one shard, read block by block through the memory map and scored on the query sides' device; a group's
    float64 scores stay within SCORES_BYTES."""
    from safetensors import safe_open

    representation, (queries, device) = reader.settings.representation, (sides[0].left.shape[0], sides[0].left.device)
    kinds = ("projected",) if representation == "kronecker" else ("left", "right")
    with safe_open(str(reader.directory / name), framework="pt") as handle:
        doc_index = handle.get_tensor("doc_index").numpy()
        for number, (start, end) in enumerate(_groups(doc_index, max(1, SCORES_BYTES // (8 * queries * len(layers))))):
            if skip(number):
                continue
            scores = torch.empty(end - start, queries, len(layers), dtype=torch.float64)  # every cell is written
            for index, (layer, side) in enumerate(zip(layers, sides)):
                slices = {kind: handle.get_slice(f"{layer.name}.{kind}") for kind in kinds}
                transformed = side.dense()
                per_sequence = sum(int(np.prod(s.get_shape()[1:])) for s in slices.values()) + transformed[0].numel()
                block = max(1, SCORE_BLOCK_ELEMENTS // per_sequence)
                for first in range(start, end, block):
                    last = min(first + block, end)
                    stored = {kind: s[first:last].to(device, dtype) for kind, s in slices.items()}
                    scored = block_scores(representation, transformed, stored).T
                    scores[first - start : last - start, :, index] = scored.to("cpu", torch.float64)
                del transformed
            rows = doc_index[start:end]
            firsts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            chunked = len(firsts) < len(rows)  # documents of several sequences: their scores are summed
            yield number, rows[firsts], np.add.reduceat(scores.numpy(), firsts, axis=0) if chunked else scores.numpy()


def _tail_members(scores: np.ndarray, doc: np.ndarray, top: int) -> np.ndarray:
    """[q, n] bool: each row's `top` first and `top` last in the order of the final table (score descending, then
    document), n > 2·top. A partition finds the thresholds; rows whose ties at a threshold must be split by
    document order are sorted exactly."""
    count = scores.shape[1]
    part = np.partition(scores, (top - 1, count - top), axis=1)
    low, high = part[:, top - 1 : top], part[:, count - top : count - top + 1]
    above, below = scores > high, scores < low
    at_high, at_low = scores == high, scores == low
    chosen = above | below | at_high | at_low
    split = ((above.sum(1) + at_high.sum(1) != top) | (below.sum(1) + at_low.sum(1) != top)
             | (at_high & at_low).any(1))
    for row in np.flatnonzero(split):
        order = np.lexsort((doc[row], -scores[row]))
        chosen[row] = False
        chosen[row, order[:top]] = chosen[row, order[-top:]] = True
    return chosen


class _Tails:
    """A pass's running result on one rank: each query's `top` most positive and `top` most negative documents so
    far with their layer scores, the summary sums over every document scored, and the shards done.

    Its memory is the output's (q × 2·top × L) whatever the index's size; it is saved at most every
    TAILS_SAVE_SECONDS, after a whole shard, so a killed run resumes at the last save.
    """

    def __init__(self, path: Path, queries: int, layers: int, top: int):
        from attrib.storage import load_tensors

        self.path, self.top, self.saved = path, top, time.time()
        self.doc = np.zeros((queries, 0), np.int64)
        self.score = np.zeros((queries, 0))
        self.layers = np.zeros((queries, 0, layers))
        self.sums = np.zeros((4, queries))  # documents, Σ score, Σ score², Σ positive scores
        self.shards: list[int] = []
        if path.exists():
            state = {key: tensor.numpy() for key, tensor in load_tensors(path).items()}
            self.doc, self.score, self.layers = state["doc"], state["score"], state["layers"]
            self.sums, self.shards = state["sums"], state["shards"].tolist()

    def add(self, doc_index: np.ndarray, layers: np.ndarray) -> None:
        """Whole documents `doc_index` [m] with their layer scores [m, q, L], each document seen once.

        Chosen as the final table orders them (score descending, then document order). Once each query holds
        2·top documents they are slots: a document that enters takes the slot of one that leaves, so only the
        entering rows' layer scores move."""
        new = layers.sum(-1).T  # [q, m]
        self.sums += np.stack([np.full(len(new), len(doc_index)), new.sum(1), (new**2).sum(1), np.maximum(new, 0).sum(1)])
        (queries, kept), top = self.doc.shape, self.top
        doc = np.concatenate([self.doc, np.broadcast_to(doc_index, (queries, len(doc_index)))], axis=1)
        scores = np.concatenate([self.score, new], axis=1)
        chosen = _tail_members(scores, doc, top) if doc.shape[1] > 2 * top else None
        if kept < 2 * top:  # filling up: the union, or its tails
            union = np.concatenate([self.layers, layers.transpose(1, 0, 2)], axis=1)
            if chosen is not None:
                keep = np.nonzero(chosen)[1].reshape(queries, 2 * top)
                doc, scores = np.take_along_axis(doc, keep, 1), np.take_along_axis(scores, keep, 1)
                union = np.take_along_axis(union, keep[..., None], 1)
            self.doc, self.score, self.layers = doc, scores, union
            return
        leaving, entering = np.nonzero(~chosen[:, :kept]), np.nonzero(chosen[:, kept:])  # as many per query
        self.doc[leaving], self.score[leaving] = doc_index[entering[1]], new[entering]
        self.layers[leaving] = layers[entering[1], entering[0]]

    def shard_done(self, shard: int) -> None:
        from attrib.storage import save_tensors

        self.shards.append(shard)
        if time.time() - self.saved >= TAILS_SAVE_SECONDS:
            save_tensors(self.path, {"doc": torch.from_numpy(self.doc), "score": torch.from_numpy(self.score),
                                     "layers": torch.from_numpy(self.layers), "sums": torch.from_numpy(self.sums),
                                     "shards": torch.tensor(self.shards)})
            self.saved = time.time()

    def tables(self, query_ids: np.ndarray, reader: IndexReader):
        queries, kept = self.doc.shape
        doc_index = self.doc.reshape(-1)
        documents = documents_part(query_ids, np.repeat(np.arange(queries), kept), reader.doc_ids(doc_index), doc_index,
                                   self.layers.reshape(queries * kept, -1))
        return documents, summary_table(query_ids, self.sums[0].astype(np.int64), *self.sums[1:])


def _score_pass(stage: StageDir, reader: IndexReader, store, layers, transforms: list, pass_ids: list[str],
                first: int, number: int, top: int, world: World, dtype) -> None:
    """One pass of queries over this rank's shards, into part files: with `top`, the pass's tails (one documents
    and one summary part per rank); without, every (document, query) row, a part per group of documents."""
    query_ids = np.array(pass_ids, dtype=object)
    final = f"{PARTS_DIR}/documents-q{number:04d}-r{world.rank:03d}.parquet"
    if top and stage.has(final):
        return
    tails = _Tails(stage.file(f"{PARTS_DIR}/tails-q{number:04d}-r{world.rank:03d}.safetensors"), len(pass_ids),
                   len(layers), top) if top else None
    sides = None
    owned = [(shard, name) for shard, name in enumerate(reader.shards) if world.owns(shard)]
    with progress(f"index scores (queries {first + 1}–{first + len(pass_ids)})", total=len(owned), unit="shard") as bar:
        for shard, name in owned:
            if top and shard in tails.shards:
                bar.advance(1)
                continue
            part = f"{PARTS_DIR}/documents-q{number:04d}-s{shard:05d}-g{{:04d}}.parquet"
            sides = sides or _pass_sides(store, layers, reader, transforms, pass_ids, dtype, world.device)
            done = (lambda group, part=part: stage.has(part.format(group))) if not top else (lambda group: False)
            for group, doc_index, scores in _score_shard(reader, name, layers, sides, dtype, skip=done):
                if top:
                    tails.add(doc_index, scores)
                    continue
                count = len(pass_ids)
                query = np.tile(np.arange(count), len(doc_index))
                rows = np.repeat(doc_index, count)
                flat = scores.reshape(len(rows), -1)
                _write(stage.file(part.format(group).replace("documents", "summary", 1)),
                       summary_part(query_ids, query, flat.sum(1)))
                _write(stage.file(part.format(group)), documents_part(query_ids, query, reader.doc_ids(rows), rows, flat))
            if top:
                tails.shard_done(shard)
            bar.advance(1)
    if top:
        documents, summary = tails.tables(query_ids, reader)
        _write(stage.file(final.replace("documents", "summary", 1)), summary)
        _write(stage.file(final), documents)
        tails.path.unlink(missing_ok=True)


def score_index(out, index_dir: str, model_spec: str, lm, tokenizer, layers: list[TrackedLayer], queries,
                query_settings, settings: IndexScoreSettings, world: World | None = None, overwrite: bool = False,
                query_gradients: str | None = None, queries_source: str | None = None) -> dict | None:
    """Score every indexed sequence for every query into `out` (documents.parquet, summary.parquet as
    `attrib query` writes them); returns the final manifest, None when already complete.

    The queries' preconditioned gradients come from `query_gradients` (a query-gradients directory) or
    are computed into `out/query-gradients` with `query_settings` and the index's factors.
    """
    from attrib.models import model_record
    from attrib.preconditioned_gradients import QueryGradientStore
    from attrib.scoring import discard_parts, write_documents
    from attrib.stages.query_gradients import run_query_gradients
    from attrib.storage import open_input

    world = world or World()
    record = model_record(model_spec, lm, layers)
    reader = IndexReader(index_dir, record["fingerprint"])
    if [layer.name for layer in layers] != reader.manifest["layers"]:
        raise InputError(f"{flag('index', index_dir)} indexes other layers ({', '.join(reader.manifest['layers'][:3])}); "
                         f"use the index's {flag('factors')}")
    if query_gradients is not None:
        given = open_input(query_gradients, "query-gradients", record["fingerprint"],
                           option=flag("query_gradients_dir"))
        if given["inputs"]["factors"] != reader.manifest["inputs"]["factors"]:
            raise InputError(f"{flag('query_gradients_dir', query_gradients)} was computed with other factors than {flag('index')} "
                             f"{index_dir}; recompute them with {flag('factors', reader.factors)}")
    recorded = {**asdict(settings), "scores_from": "index",
                "query_gradients": None if query_gradients is not None else asdict(query_settings)}
    stage = _scoring_stage(out, "query", recorded, record, (index_dir, queries_source, query_gradients), world,
                           overwrite)
    if stage is None:
        return None
    with stage.guard():
        gradients_dir = query_gradients or str(Path(out) / GRADIENTS_DIR)
        if query_gradients is None:
            run_query_gradients(gradients_dir, model_spec, lm, tokenizer, layers, reader.factors, queries,
                                query_settings, world, record=record)
        gradients_manifest = open_input(gradients_dir, "query-gradients", record["fingerprint"])
        store = QueryGradientStore(gradients_dir, gradients_manifest)
        dtype = torch.promote_types(next(lm.parameters()).dtype, torch.float32)
        transforms = reader.transforms(layers, dtype, world.device)
        query_ids = store.query_ids
        chosen = reader.settings
        per_pass = settings.queries_per_pass or index_queries_per_pass(
            [LayerShape(l.name, l.d_in_folded, l.d_out) for l in layers], chosen.representation, chosen.rank,
            chosen.dims, gradients_manifest["settings"]["query_rank"], len(query_ids), dtype.itemsize)
        started = time.time()
        for first in range(0, len(query_ids), per_pass):
            pass_ids, number = query_ids[first : first + per_pass], first // per_pass
            _score_pass(stage, reader, store, layers, transforms, pass_ids, first, number, settings.documents_top, world,
                        dtype)
        world.barrier()
        stage.timings["score_seconds"] = round(stage.timings.get("score_seconds", 0.0) + time.time() - started, 3)
        if not world.is_main:
            return None
        counts = write_documents(stage, query_ids, None, settings.documents_top)
        index_manifest = reader.manifest
        manifest = stage.complete(
            counts, ["documents.parquet", "summary.parquet"],
            queries=gradients_manifest["queries"], layers=store.layer_names,
            strategy=gradients_manifest["settings"]["strategy"], query_gradients_settings=gradients_manifest["settings"],
            scores_from="index",
            index={"path": str(Path(index_dir).resolve()), "representation": index_manifest["representation"],
                   "shapes": index_manifest["shapes"], "storage_dtype": reader.settings.storage_dtype,
                   "bytes_per_sequence": index_manifest["bytes_per_sequence"]},
        )
        discard_parts(stage)
        return manifest


def _scoring_stage(out, name: str, recorded: dict, record: dict | None, sources: tuple, world: World,
                   overwrite: bool) -> StageDir | None:
    """The stage directory of index scores or candidates; None when it is complete already."""
    from attrib.storage import input_identity, open_input

    index_dir, queries_source, query_gradients = sources
    # The indexed corpus as `attrib query` records its corpus, so that `attrib combine` refuses index scores
    # of another corpus whose documents carry the same ids.
    indexed_corpus = open_input(index_dir, STAGE, option=flag("index"))["inputs"]["corpus"]
    inputs = {"index": input_identity(index_dir), "queries": input_identity(queries_source),
              "query_gradients": input_identity(query_gradients), "corpus": indexed_corpus}
    stage = world.main_first(lambda is_main: StageDir(out, name, recorded, record, inputs, overwrite and is_main))
    if stage.already_complete:
        message(f"{out} is already complete; use {flag('overwrite')} to compute it again")
        return None
    return stage


def index_candidates(out, index_dir: str, model_spec: str, lm, tokenizer, layers: list[TrackedLayer], queries,
                     query_settings, top_k: int, world: World | None = None, overwrite: bool = False,
                     query_gradients: str | None = None, queries_source: str | None = None) -> dict | None:
    """The index's top `top_k` documents per query as a prefilter stage in `out` (candidates.parquet, method
    "index"), for `attrib query --candidates`; the index scores stay in `out/index-scores`."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from attrib.score_tables import DOCUMENTS
    from attrib.stages.prefilter import CANDIDATES_FILE, candidates_schema
    from attrib.storage import atomic_path, read_manifest

    world = world or World()
    if top_k < 1:
        raise InputError(f"{flag('top_k', top_k)} must be at least 1")
    recorded = {"method": "index", "unit": "document", "top_k": top_k,
                "query_gradients": None if query_gradients is not None else asdict(query_settings)}
    stage = _scoring_stage(out, "prefilter", recorded, None, (index_dir, queries_source, query_gradients), world,
                           overwrite)
    if stage is None:
        return None
    with stage.guard():
        scores_dir = stage.file(SCORES_DIR)
        score_index(scores_dir, index_dir, model_spec, lm, tokenizer, layers, queries, query_settings,
                    IndexScoreSettings(documents_top=top_k, world_size=world.size), world,
                    query_gradients=query_gradients, queries_source=queries_source)
        if not world.is_main:
            return None
        scores = read_manifest(scores_dir)
        table = ds.dataset(str(scores_dir / DOCUMENTS)).to_table(
            columns=["query_id", "doc_id", "score", "rank"], filter=ds.field("rank") <= top_k)
        table = table.sort_by([("query_id", "ascending"), ("rank", "ascending")])
        candidates = pa.table({"query_id": table["query_id"], "doc_id": table["doc_id"],
                               "chunk": pa.nulls(table.num_rows, pa.int32()), "score": table["score"],
                               "rank": table["rank"]}, schema=candidates_schema())
        with atomic_path(stage.file(CANDIDATES_FILE)) as tmp:
            pq.write_table(candidates, tmp)
        query_ids = [q["id"] for q in scores["queries"]]
        return stage.complete({"queries": len(query_ids), "candidates": candidates.num_rows},
                              [CANDIDATES_FILE], backend_used="index", query_ids=query_ids, index=scores["index"],
                              chunking=None)


def run(model, factors: str, corpus: str, out, *, options, tokenizer=None) -> StageResult:
    """The stage as `attrib.index` runs it: the corpus checked before any output exists, then indexed."""
    from attrib.data import check_corpus, default_max_length
    from attrib.runtime import borrowed_model
    from attrib.stages.query_gradients import tracked_layers_of_factors
    from attrib.storage import read_manifest, stage_finished

    spec = options.corpus.spec(corpus)
    check_corpus(spec)  # a missing path, a wrong text field or an empty corpus fail before any output exists
    finished = stage_finished(out) and not options.run.overwrite
    with borrowed_model(model, tokenizer, options.model) as (world, model_spec, lm, tokenizer):
        layers = tracked_layers_of_factors(lm, model_spec, factors)
        max_length = options.batch.max_length or default_max_length(lm.config, tokenizer)
        settings = IndexSettings.of(options, max_length, world.size)
        build_index(out, model_spec, lm, tokenizer, layers, factors, spec, settings, world, options.run.overwrite)
        return StageResult(Path(out), read_manifest(out), finished, world.is_main)


def score_from_index(model, index_dir: str, queries: str | None, out, *, options, tokenizer=None,
                     top_k: int | None = None) -> StageResult:
    """`attrib query --index` (every indexed sequence scored) or, with `top_k`, `attrib prefilter --index`
    (each query's top K as candidates): the queries' gradients with the index's factors, then the scores."""
    from attrib.options import ScoreOptions
    from attrib.runtime import borrowed_model
    from attrib.stages.query import DOCUMENTS_TOP
    from attrib.stages.query_gradients import planned_queries, tracked_layers_of_factors
    from attrib.storage import open_input, read_manifest, stage_finished

    scores = options.get(ScoreOptions)
    factors = open_input(index_dir, STAGE, option=flag("index"))["inputs"]["factors"]["path"]
    finished = stage_finished(out) and not options.run.overwrite
    with borrowed_model(model, tokenizer, options.model) as (world, model_spec, lm, tokenizer):
        layers = tracked_layers_of_factors(lm, model_spec, factors)
        given = scores.query_gradients_dir is not None
        settings, query_list = planned_queries(lm, tokenizer, layers, factors, None if given else queries, options,
                                               world)
        common = dict(world=world, overwrite=options.run.overwrite, query_gradients=scores.query_gradients_dir,
                      queries_source=queries)
        if top_k is None:
            kept = IndexScoreSettings(0 if scores.keep_all_scores else DOCUMENTS_TOP, scores.queries_per_pass)
            score_index(out, index_dir, model_spec, lm, tokenizer, layers, query_list, settings, kept, **common)
        else:
            index_candidates(out, index_dir, model_spec, lm, tokenizer, layers, query_list, settings, top_k, **common)
        return StageResult(Path(out), read_manifest(out), finished, world.is_main)
