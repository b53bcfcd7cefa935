"""The self-influence stage: ⟨H⁻¹∇L_m, ∇L_m⟩ of every training sequence m (docs/design.md §2), streamed to Parquet.

A training sequence that the fitted curvature finds surprising (corrupted or mislabelled text, an
outlier, a candidate for memorisation) has a large self-influence. No query gradients are needed:
one forward and backward per batch gives each tracked layer's matched (a, g), and per sequence

    R = Q_Sᵀ G Q_A with G = Σ_t g_t a_tᵀ,   score_l = Σ_ij R_ij² / (Λ_ij + λ),

with the layer's damped curvature (EK-FAC, K-FAC, diagonal: bases are the identity; identity:
score_l = ‖G‖²). Per-token scores ⟨H⁻¹∇L_m, ∇ℓ_t⟩ = Σ_l (Q_Sᵀg_t)ᵀ (R ⊘ (Λ + λ)) (Q_Aᵀa_t) sum to the
score; they are computed in a second pass over the top `token_scores_top` sequences alone.

Memory: the dense per-sequence gradients exist for one layer at a time (inside its backward hook)
and for at most `correction_sequences_per_step(d_out, d_in)` sequences at once (8, fewer for wide
layers; 2²⁴ elements per block), three blocks of [sequences, d_out, d_in] in float32 at the peak
(G, G ⊘ (Λ + λ) and their product). Every layer's curvature stays on the device when the predicted
peak fits `max_memory` (attrib.memory.self_influence); otherwise each layer's is read from disk
inside its hook, every batch. Each (rank, corpus part) writes its own part file, so a killed run
resumes at the first unfinished part; self_influence.parquet is then written part by part, with
ranks computed from the score column alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from attrib.capture import Capture, label_nll
from attrib.curvature import Curvature
from attrib.data import CorpusSpec, RowStats, Sequence, collate, iter_sequence_parts, pack_batches
from attrib.distributed import World
from attrib.errors import InputError
from attrib.factors import LayerCurvature, correction_sequences_per_step
from attrib.models import TrackedLayer
from attrib.options import DEFAULT_DAMPING_SCALE
from attrib.progress import message, progress
from attrib.results import StageResult
from attrib.runtime import flag
from attrib.score_tables import SELF_INFLUENCE, SELF_QUERY, self_influence_schema, tokens_schema
from attrib.storage import StageDir

STAGE = "self-influence"
PARTS_DIR = "parts"


@dataclass
class SelfInfluenceSettings:
    """Everything that changes the scores written; stored in the manifest and checked on resume."""

    damping: float | None = None
    damping_scale: float = DEFAULT_DAMPING_SCALE
    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    token_scores_top: int = 100  # -1: every sequence; 0: none
    world_size: int = 1

    @classmethod
    def of(cls, options, max_length: int, world_size: int) -> SelfInfluenceSettings:
        reading = options.batch
        return cls(damping=options.damping.damping, damping_scale=options.damping.scale, max_length=max_length,
                   tokens_per_batch=reading.tokens_per_batch, docs_per_part=reading.docs_per_part,
                   token_scores_top=options.scores.token_scores, world_size=world_size)


def layer_self_influence(curvature: LayerCurvature, a: torch.Tensor, g: torch.Tensor, tokens: bool = False,
                         sequences_per_step: int | None = None):
    """One layer's self-influence per sequence [batch], and per token [batch, seq] when `tokens`.

    `a` [batch, seq, d_in] and `g` [batch, seq, d_out] are the layer's matched inputs and output
    gradients (zero at padding). The rotation goes whichever way is cheaper for the batch's length,
    as in the eigenvalue correction (attrib.factors.CorrectionSums).
    """
    dtype = curvature.eigenvalues.dtype if curvature.eigenvalues is not None else torch.promote_types(a.dtype, torch.float32)
    a, g = a.to(dtype), g.to(dtype)
    (batch, length, d_in), d_out = a.shape, g.shape[-1]
    rotates = curvature.gradient_basis is not None
    rotate_first = rotates and length * (d_in**2 + d_out**2) <= d_out * d_in * (d_out + d_in)
    if rotate_first:
        a, g = a @ curvature.activation_basis, g @ curvature.gradient_basis
    if sequences_per_step is None:
        sequences_per_step = correction_sequences_per_step(d_out, d_in)
    scores = torch.zeros(batch, dtype=dtype, device=a.device)
    per_token = torch.zeros(batch, length, dtype=dtype, device=a.device) if tokens else None
    for start in range(0, batch, sequences_per_step):
        rows = slice(start, start + sequences_per_step)
        gradient = torch.bmm(g[rows].mT, a[rows])  # [step, d_out, d_in], in the eigenbasis when rotated first
        if rotates and not rotate_first:
            gradient = curvature.gradient_basis.T @ gradient @ curvature.activation_basis
        preconditioned = gradient if curvature.eigenvalues is None else gradient / (curvature.eigenvalues + curvature.damping)
        scores[rows] = (preconditioned * gradient).sum((1, 2))
        if tokens:
            if rotates and not rotate_first:  # back to the layer's own basis, where a and g are
                preconditioned = curvature.gradient_basis @ preconditioned @ curvature.activation_basis.T
            per_token[rows] = (torch.bmm(g[rows], preconditioned) * a[rows]).sum(-1)
        del gradient, preconditioned
    return scores, per_token


class SelfInfluenceScorer:
    """Self-influence of batches of training sequences through hooks on the tracked layers."""

    def __init__(self, model, layers: list[TrackedLayer], curvature: Curvature, device, resident: bool = True):
        self.model, self.layers, self.curvature, self.device = model, layers, curvature, device
        self.compute = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        self.resident = [curvature.layer(i, device, self.compute) for i in range(len(layers))] if resident else None

    def layer(self, index: int) -> LayerCurvature:
        return self.resident[index] if self.resident is not None else self.curvature.layer(index, self.device, self.compute)

    def score(self, sequences: list[Sequence], pad_id: int, tokens: bool = False):
        """(summed loss [batch], per-layer scores [batch, L], per-token scores [batch, seq] or None), float64 on the host."""
        input_ids, mask, targets = collate(sequences, pad_id, self.device)
        batch, length = input_ids.shape
        layer_scores = torch.zeros(batch, len(self.layers), dtype=torch.float64)
        token_scores = torch.zeros(batch, length, dtype=torch.float64) if tokens else None
        losses = []

        def contract(index: int, a: torch.Tensor, g: torch.Tensor) -> None:
            scores, per_token = layer_self_influence(self.layer(index), a, g, tokens)
            layer_scores[:, index] = scores.double().cpu()
            if tokens:
                token_scores.add_(per_token.double().cpu())

        def loss(logits):
            nll = label_nll(logits, targets)  # [batch, seq]
            losses.append(nll.detach().double().sum(1).cpu())
            return [nll.sum()]

        Capture(self.model, self.layers, lambda index, a: a, contract).run(input_ids, mask, loss)
        return losses[0], layer_scores, token_scores


def _part_schema():
    import pyarrow as pa

    return pa.schema([("doc_id", pa.string()), ("doc_index", pa.int64()), ("chunk", pa.int32()), ("score", pa.float64()),
                      ("tokens", pa.int32()), ("loss", pa.float64()), ("layer_scores", pa.list_(pa.float64()))])


def _write(path, table) -> None:
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _score_part(scorer: SelfInfluenceScorer, sequences: list[Sequence], settings, pad_id: int, bar):
    """One corpus part's scores as a part table."""
    import pyarrow as pa

    if not sequences:  # a part whose documents are all shorter than 2 tokens
        return _part_schema().empty_table()
    columns = {name: [] for name in ("loss", "layers")}
    ordered = []
    for batch in pack_batches(sequences, settings.tokens_per_batch):
        chosen = [sequences[i] for i in batch]
        loss, layers, _ = scorer.score(chosen, pad_id)
        ordered += chosen
        columns["loss"].append(loss.numpy())
        columns["layers"].append(layers.numpy())
        bar.advance(len(chosen), tokens=sum(len(s) for s in chosen))
    layers = np.concatenate(columns["layers"])
    return pa.Table.from_arrays(
        [
            pa.array([s.doc_id for s in ordered], pa.string()),
            pa.array(np.array([s.doc_index for s in ordered], np.int64)),
            pa.array(np.array([s.chunk for s in ordered], np.int32)),
            pa.array(layers.sum(1)),
            pa.array(np.array([len(s) for s in ordered], np.int32)),
            pa.array(np.concatenate(columns["loss"])),
            pa.ListArray.from_arrays(pa.array(np.arange(len(ordered) + 1) * layers.shape[1], pa.int32()),
                                     pa.array(layers.reshape(-1))),
        ],
        schema=_part_schema(),
    )


def _token_part(scorer: SelfInfluenceScorer, sequences: list[Sequence], texts: dict[int, str], settings, pad_id: int, bar):
    """Per-token self-influence of the chosen sequences of one corpus part, as a tokens table."""
    import pyarrow as pa

    from attrib.scoring import add_token_row

    rows = {field.name: [] for field in tokens_schema()}
    for batch in pack_batches(sequences, settings.tokens_per_batch):
        chosen = [sequences[i] for i in batch]
        _, _, per_token = scorer.score(chosen, pad_id, tokens=True)
        for row, sequence in enumerate(chosen):
            add_token_row(rows, SELF_QUERY, sequence, texts[sequence.doc_index],
                          per_token[row, : len(sequence)].float().numpy())
        bar.advance(len(chosen), tokens=sum(len(s) for s in chosen))
    return pa.Table.from_pydict(rows, schema=tokens_schema())


def _pass(scorer, tokenizer, corpus: CorpusSpec, stage: StageDir, settings, world: World, kind: str,
          chosen: set[tuple[int, int]] | None = None) -> RowStats:
    """This rank's share of the corpus, one part file per corpus part: scores (`kind` "scores") or the
    token scores (`kind` "top-tokens") of the `chosen` (doc_index, chunk) sequences, or of all when None."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    documents = None if chosen is None else {doc for doc, _ in chosen}
    stats = RowStats()
    parts = iter_sequence_parts(corpus, tokenizer, settings.max_length, settings.docs_per_part, stats=stats,
                                wanted=lambda doc_index, _: world.owns(doc_index) and (documents is None or doc_index in documents))
    what = "self-influence" if kind == "scores" else "token scores of the top sequences"
    with progress(what, unit="seq") as bar:
        for part in parts:
            name = f"{PARTS_DIR}/{kind}-r{world.rank:03d}-p{part.index:05d}.parquet"
            if stage.has(name):
                continue
            sequences = [s for _, s in part.sequences]
            if kind == "scores":
                _write(stage.file(name), _score_part(scorer, sequences, settings, pad_id, bar))
            else:
                sequences = [s for s in sequences if chosen is None or (s.doc_index, s.chunk) in chosen]
                _write(stage.file(name), _token_part(scorer, sequences, part.texts, settings, pad_id, bar))
    return stats


def write_self_influence(stage: StageDir) -> dict:
    """self_influence.parquet from the score parts, one part in memory at a time; ranks (1 = highest,
    ties by corpus order) come from the score, document and chunk columns alone. Returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    parts = stage.parts(f"{PARTS_DIR}/scores-*.parquet")
    keys = [pq.read_table(stage.file(p), columns=["doc_index", "chunk", "score", "tokens"]) for p in parts]
    score = np.concatenate([k["score"].to_numpy() for k in keys])
    doc_index = np.concatenate([k["doc_index"].to_numpy() for k in keys])
    chunk = np.concatenate([k["chunk"].to_numpy() for k in keys])
    order = np.lexsort((chunk, doc_index, -score))
    rank = np.empty(len(order), np.int32)
    rank[order] = np.arange(1, len(order) + 1, dtype=np.int32)
    schema = self_influence_schema()
    with atomic_path(stage.file(SELF_INFLUENCE)) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            first = 0
            for part in parts:
                table = pq.read_table(stage.file(part))
                table = table.append_column("rank", pa.array(rank[first : first + len(table)], pa.int32()))
                writer.write_table(table.select(schema.names).cast(schema))
                first += len(table)
    return {"documents": int(len(np.unique(doc_index))), "sequences": int(len(score)),
            "tokens": int(sum(int(k["tokens"].to_numpy().sum()) for k in keys))}


def top_sequences(stage: StageDir, top: int) -> set[tuple[int, int]]:
    """(doc_index, chunk) of the `top` highest-ranked sequences."""
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    parts = stage.parts(f"{PARTS_DIR}/scores-*.parquet")
    doc_index = np.concatenate([pq.read_table(stage.file(p), columns=["doc_index"])["doc_index"].to_numpy() for p in parts])
    chunk = np.concatenate([pq.read_table(stage.file(p), columns=["chunk"])["chunk"].to_numpy() for p in parts])
    ranks = ds.dataset(str(stage.file(SELF_INFLUENCE))).to_table(columns=["rank"])["rank"].to_numpy()
    keep = ranks <= top  # rows of self_influence.parquet are in the parts' order
    return set(zip(doc_index[keep].tolist(), chunk[keep].tolist()))


def run_self_influence(out, model_spec: str, lm, tokenizer, layers: list[TrackedLayer], factors: str,
                       corpus: CorpusSpec, settings: SelfInfluenceSettings, world: World | None = None,
                       overwrite: bool = False, max_memory: int | None = None) -> dict | None:
    """Self-influence of every sequence of `corpus` under the curvature in `factors`, into `out`.

    Returns the final manifest, or None when `out` is already complete. The factors must have been
    fitted for this model (their fingerprint is checked); `max_memory` (bytes, default: half the
    host's RAM on CPU, 90% of the GPU) decides whether every layer's curvature stays on the device.
    """
    from attrib import memory
    from attrib.data import chat_format, check_chat_agrees, chunking_identity
    from attrib.models import model_record
    from attrib.storage import input_identity, open_input

    world = world or World()
    record = model_record(model_spec, lm, layers)
    curvature = Curvature(factors, layers, settings.damping, settings.damping_scale, record["fingerprint"])
    chat = {**chat_format(tokenizer, corpus.chat_template).identity(), "loss_on": corpus.loss_on}
    check_chat_agrees(open_input(factors, "fit-factors", option=flag("factors")), chat,
                      flag("factors", factors))  # the loss the factors were fitted on
    recorded = {**asdict(settings), "strategy": curvature.strategy.name, "chat": chat,
                "chunking": chunking_identity(tokenizer, settings.max_length, corpus.long_documents)}
    inputs = {"factors": input_identity(factors),
              "corpus": {**asdict(corpus), "identity": input_identity(corpus.source)}}
    stage = world.main_first(lambda is_main: StageDir(out, STAGE, recorded, record, inputs, overwrite and is_main))
    if stage.already_complete:
        message(f"{out} is already complete; use {flag('overwrite')} to score again")
        return None
    budget = max_memory or memory.default_budget(world.device)
    peak = memory.self_influence(memory.model_shape(lm), memory.layer_shapes(layers),
                                 tokens_per_batch=settings.tokens_per_batch,
                                 dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
                                 device="cpu" if world.device == "cpu" else "cuda", rotates=curvature.strategy.rotates)
    resident = (peak.host if world.device == "cpu" else peak.device) <= budget
    with stage.guard():
        scorer = SelfInfluenceScorer(lm, layers, curvature, world.device, resident)
        stats = _pass(scorer, tokenizer, corpus, stage, settings, world, "scores")
        world.barrier()
        import pyarrow.parquet as pq

        parts = stage.parts(f"{PARTS_DIR}/scores-*.parquet")  # every rank sees the same directory
        if not sum(pq.read_metadata(stage.file(p)).num_rows for p in parts):
            raise InputError(f"nothing was scored: {flag('corpus', corpus.source)} yields no sequence of at least 2 tokens")
        counts = write_self_influence(stage) if world.is_main else {}
        world.barrier()
        top = settings.token_scores_top
        if top != 0:
            _pass(scorer, tokenizer, corpus, stage, settings, world, "top-tokens",
                  None if top < 0 else top_sequences(stage, top))
            world.barrier()
        if not world.is_main:
            return None
        from attrib.scoring import collect_tokens, discard_parts

        files = [SELF_INFLUENCE] + collect_tokens(stage)
        manifest = stage.complete(
            {**counts, "rows_skipped": stats.skipped},
            files,
            layers=[layer.name for layer in layers],
            strategy=curvature.strategy.name,
            damping={layer.name: curvature.damping_of(index) for index, layer in enumerate(layers)},
        )
        discard_parts(stage)
        return manifest


def run(model, factors: str, corpus: str, out, *, options, tokenizer=None) -> StageResult:
    """The stage as `attrib.self_influence` runs it: the corpus checked before any output exists, then scored."""
    from attrib.data import check_corpus, default_max_length
    from attrib.runtime import borrowed_model
    from attrib.stages.query_gradients import tracked_layers_of_factors
    from attrib.storage import read_manifest, stage_finished

    spec = options.corpus.spec(corpus)
    check_corpus(spec)  # a missing path, a wrong text field or a bad first row fail before any output exists
    finished = stage_finished(out) and not options.run.overwrite
    with borrowed_model(model, tokenizer, options.model) as (world, model_spec, lm, tokenizer):
        layers = tracked_layers_of_factors(lm, model_spec, factors)
        max_length = options.batch.max_length or default_max_length(lm.config, tokenizer)
        settings = SelfInfluenceSettings.of(options, max_length, world.size)
        run_self_influence(out, model_spec, lm, tokenizer, layers, factors, spec, settings, world,
                           options.run.overwrite, options.run.memory_budget)
        return StageResult(Path(out), read_manifest(out), finished, world.is_main)
