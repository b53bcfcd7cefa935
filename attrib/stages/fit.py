"""The fit-factors stage: covariance, eigendecomposition and correction steps (docs/design.md §2–3).

Each step loops over groups of tracked layers (`--layers-per-pass`; one group unless
memory asks for more), so peak memory is bounded by a group, not the model; every group
costs one more pass over the corpus. Pass 1 accumulates A = E[a aᵀ] and S = E[g gᵀ];
the eigendecomposition loads, decomposes, writes and frees one layer at a time, layer i
on rank i mod N; pass 2 accumulates Λ from per-sequence gradients rotated into those
bases. Running sums are reduced to rank 0 and checkpointed on a wall-clock interval, so
a killed run resumes from its last checkpoint. Which steps and groups are still to do is
decided on rank 0 and broadcast, so every rank enters the same collectives.

Files (listed in the manifest's `files`): `covariance.safetensors`, `eigen.safetensors`,
`lambda.safetensors` for one group; `covariance-g000.safetensors`, … per group otherwise.
Counts live in the manifest and in each file's safetensors metadata, never in tensors.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attrib.capture import Capture, sample_labels, sequence_seed, summed_nll
from attrib.data import CorpusSpec, RowStats, SequenceCaps, collate, iter_sequence_parts, pack_batches
from attrib.distributed import World
from attrib.errors import InputError, RunError
from attrib.factors import CorrectionSums, CovarianceSums, kfac_eigenvalues, symmetric_eigh
from attrib.memory import layer_groups
from attrib.models import TrackedLayer, shared_activation_sources
from attrib.progress import message, progress
from attrib.results import StageResult
from attrib.runtime import flag
from attrib.storage import StageDir, load_into, merge_tensor_files, tensor_metadata, write_tensors
from attrib.strategies import STRATEGY, Strategy

COVARIANCE, EIGEN, LAMBDA = "covariance", "eigen", "lambda"
EIGEN_PARTS = "eigen-parts"  # one file per decomposed layer until its group's file is assembled
CHECKPOINTS = "checkpoints"  # running sums of unfinished passes, one file per pass and group
PASS_SEED = {"covariance": 1, "correction": 2}
DEFAULT_CHECKPOINT_EVERY = 600.0  # seconds


def group_file(kind: str, group: int, groups: int) -> str:
    """`kind.safetensors` when all layers form one group, else `kind-g000.safetensors`, …"""
    return f"{kind}.safetensors" if groups == 1 else f"{kind}-g{group:03d}.safetensors"


@dataclass
class FitSettings:
    """Everything that changes the factors or their files; stored in the manifest and checked on resume."""

    strategy: str = "ekfac"
    fisher: str = "empirical"  # LDS ahead of the true Fisher on every kit, by a little (docs/benchmarks.md)
    fisher_samples: int = 1
    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    max_sequences: int | None = None
    max_tokens: int | None = None
    stats_dtype: str = "float32"
    seed: int = 0
    world_size: int = 1
    layers_per_pass: int | None = None  # None: every tracked layer in one pass
    tf32: bool = False  # TF32 matmuls for the float32 statistics (CUDA only; a no-op on CPU)
    covariance_max_tokens: int | None = None  # A and S from the first this many tokens; Λ still from all

    @classmethod
    def of(cls, options, max_length: int, world) -> FitSettings:
        """The settings of a run with these stage options; what depends on the model and device resolved."""
        fit, reading = options.fit, options.batch
        settings = cls(strategy=fit.strategy, fisher=fit.fisher, fisher_samples=fit.fisher_samples,
                       max_length=max_length, tokens_per_batch=reading.tokens_per_batch,
                       docs_per_part=reading.docs_per_part, max_sequences=fit.max_sequences, max_tokens=fit.max_tokens,
                       stats_dtype=fit.stats_dtype, seed=fit.seed, world_size=world.size,
                       layers_per_pass=fit.layers_per_pass, covariance_max_tokens=fit.covariance_max_tokens,
                       tf32=str(world.device).startswith("cuda") if fit.tf32 is None else fit.tf32)
        settings.validate()
        return settings

    def validate(self) -> None:
        """What the options cannot check alone: the sequence length resolved from the model."""
        if self.max_length > self.tokens_per_batch:
            raise InputError(f"{flag('tokens_per_batch')} must be at least {flag('max_length')} ({self.max_length})")
        if self.covariance_max_tokens is not None and self.covariance_max_tokens < self.max_length:
            raise InputError(f"{flag('covariance_max_tokens')} must be at least {flag('max_length')} "
                             f"({self.max_length})")


@dataclass
class PassCounts:
    """What one pass saw, summed over ranks: A is normalised by `tokens`, S by `labelled`."""

    sequences: int = 0
    tokens: int = 0  # real (unpadded) positions
    labelled: int = 0  # positions with a label (all but the last of each sequence)

    def metadata(self) -> dict[str, str]:
        return {key: str(value) for key, value in asdict(self).items()}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> PassCounts:
        return cls(int(metadata["sequences"]), int(metadata["tokens"]), int(metadata["labelled"]))


def _group_counts(stage: StageDir, names: list[str]) -> PassCounts:
    """The counts recorded in the files of every group; all groups must have seen the same data."""
    found = {name: PassCounts.from_metadata(tensor_metadata(stage.file(name))) for name in names}
    distinct = {(c.sequences, c.tokens, c.labelled) for c in found.values()}
    if len(distinct) > 1:
        raise RunError(
            f"{stage.path}: layer groups were fitted on different data ({', '.join(f'{n}: {c}' for n, c in found.items())}); "
            f"the corpus changed between runs; use {flag('overwrite')}"
        )
    return next(iter(found.values()))


class _PassRunner:
    """Runs one pass of forward/backward over this rank's share of the corpus with checkpoints."""

    def __init__(self, stage: StageDir, model, tokenizer, corpus: CorpusSpec, settings: FitSettings, world: World,
                 checkpoint_every: float):
        self.stage, self.model, self.tokenizer = stage, model, tokenizer
        self.corpus, self.settings, self.world = corpus, settings, world
        self.checkpoint_every = checkpoint_every
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.row_stats = RowStats()
        self.samples = 1 if settings.fisher == "empirical" else settings.fisher_samples

    @property
    def label_weight(self) -> float:
        """Each sampled label's share of a position's statistics."""
        return 1.0 / self.samples

    @staticmethod
    def checkpoint_name(name: str, group: int) -> str:
        return f"{CHECKPOINTS}/{name}-g{group:03d}.safetensors"

    def run(self, name: str, group: int, groups: int, sums: dict[str, torch.Tensor], capture: Capture) -> PassCounts:
        """Accumulate into `sums` (tensors the capture handlers update); return the counts summed over ranks.

        On return rank 0's `sums` hold the totals over all ranks; other ranks' are unspecified.
        """
        settings, world, stage = self.settings, self.world, self.stage
        checkpoint = self.checkpoint_name(name, group)
        saved = world.broadcast_object(
            tensor_metadata(stage.file(checkpoint)) if world.is_main and stage.has(checkpoint) else None
        )
        local = [0, 0, 0]  # sequences, tokens, labelled since this rank's last checkpoint (rank 0: plus the checkpoint)
        parts_done = 0
        if saved is not None:
            parts_done = int(saved["parts_done"])
            if world.is_main:
                load_into(stage.file(checkpoint), sums)
                counts = PassCounts.from_metadata(saved)
                local = [counts.sequences, counts.tokens, counts.labelled]
            message(f"{name}: resuming after {parts_done} finished part(s)")
        self.row_stats = RowStats()
        max_tokens = settings.max_tokens
        if name == "covariance" and settings.covariance_max_tokens is not None:  # a sample of the tokens for A and S
            max_tokens = min(max_tokens or settings.covariance_max_tokens, settings.covariance_max_tokens)
        parts = iter_sequence_parts(
            self.corpus, self.tokenizer, settings.max_length, settings.docs_per_part,
            SequenceCaps(settings.max_sequences, max_tokens), self.row_stats,
        )
        pass_seed = PASS_SEED[name]
        last_checkpoint = time.monotonic()
        title = f"{name} pass" + (f" (layer group {group + 1}/{groups})" if groups > 1 else "")
        with progress(title, unit="seq") as bar:
            for part in parts:
                if part.index < parts_done:
                    continue
                mine = [(index, seq) for index, seq in part.sequences if world.owns(index)]
                for batch_rows in pack_batches([seq for _, seq in mine], settings.tokens_per_batch):
                    batch = [mine[row] for row in batch_rows]
                    sequences = [seq for _, seq in batch]
                    input_ids, mask, targets = collate(sequences, self.pad_id, world.device)

                    def losses(logits, batch=batch, sequences=sequences, targets=targets):
                        if settings.fisher == "empirical":
                            return [summed_nll(logits, targets)]
                        lengths = [len(seq) for seq in sequences]
                        return [
                            summed_nll(logits, sample_labels(
                                logits, targets, lengths,
                                [sequence_seed(settings.seed, pass_seed, index, sample) for index, _ in batch],
                            ))
                            for sample in range(self.samples)
                        ]

                    capture.run(input_ids, mask, losses)
                    tokens = sum(len(seq) for seq in sequences)
                    local[0] += len(batch)
                    local[1] += tokens
                    local[2] += sum(seq.num_loss_tokens for seq in sequences)
                    bar.advance(len(batch), tokens=tokens)
                if self._end_of_part(name, part.index, sums, time.monotonic() - last_checkpoint):
                    local = self._checkpoint(checkpoint, sums, local, part.index + 1)
                    last_checkpoint = time.monotonic()
        totals = torch.tensor(local, dtype=torch.float64, device=world.device)
        world.all_reduce_sum([totals])
        world.reduce_sum(list(sums.values()))
        counts = PassCounts(*(int(value) for value in totals.tolist()))
        if counts.sequences == 0:
            raise InputError(f"{flag('corpus', self.corpus.source)} yields no sequence of at least 2 tokens to fit on")
        return counts

    def _end_of_part(self, name: str, part_index: int, sums: dict[str, torch.Tensor], since_checkpoint: float) -> bool:
        """Check this rank's running sums are finite and take rank 0's decision whether to
        checkpoint now: one small collective per part, so no rank is left waiting alone."""
        finite = torch.stack([_all_finite(tensor) for tensor in sums.values()]) if sums else torch.ones(0, dtype=torch.bool)
        status = torch.stack([
            (~finite).any().to(torch.float64).to(self.world.device),
            torch.tensor(float(self.world.is_main and since_checkpoint >= self.checkpoint_every),
                         dtype=torch.float64, device=self.world.device),
        ])
        self.world.all_reduce_sum([status])
        if status[0] > 0:
            bad = [key.rsplit(".", 1)[0] for key, ok in zip(sums, finite.tolist()) if not ok]
            where = f"layer {bad[0]}" if bad else f"a layer on another rank than {self.world.rank}"
            raise RunError(
                f"{name} pass: the running sums of {where} are not finite after part {part_index} of the corpus "
                f"(inf/nan in the model's activations or gradients); fit in {flag('dtype', 'float32')} or check that part's documents"
            )
        return bool(status[1] > 0)

    def _checkpoint(self, path: str, sums: dict[str, torch.Tensor], local: list[int], parts_done: int) -> list[int]:
        """Reduce the running sums to rank 0, which writes them once; other ranks restart from zero."""
        world = self.world
        totals = torch.tensor(local, dtype=torch.float64, device=world.device)
        world.reduce_sum(list(sums.values()) + [totals])
        if world.is_main:
            counts = PassCounts(*(int(value) for value in totals.tolist()))
            write_tensors(self.stage.file(path), sums, {**counts.metadata(), "parts_done": str(parts_done)})
            return [counts.sequences, counts.tokens, counts.labelled]
        for tensor in sums.values():
            tensor.zero_()
        return [0, 0, 0]

    def discard_checkpoint(self, name: str, group: int) -> None:
        """Drop a finished pass's running sums once its result file exists (they are as large)."""
        if self.world.is_main:
            self.stage.file(self.checkpoint_name(name, group)).unlink(missing_ok=True)


def _all_finite(tensor: torch.Tensor, chunk: int = 2**22) -> torch.Tensor:
    """isfinite(tensor).all() as a device bool, in chunks: the plain form allocates temporaries
    as large as the tensor (0.8 GiB transient for one 11008² covariance)."""
    flat = tensor.reshape(-1)
    return torch.stack([torch.isfinite(part).all() for part in flat.split(chunk)]).all()


def _group_shares(group: list[int], sources: dict[int, int]) -> dict[int, int]:
    """`sources` in the positions of the group's members (what a group's Capture takes)."""
    position = {layer: j for j, layer in enumerate(group)}
    return {position[i]: position[source] for i, source in sources.items() if i in position}


def covariance_step(runner: _PassRunner, layers: list[TrackedLayer], groups: list[list[int]],
                    sources: dict[int, int]) -> PassCounts:
    """Pass 1 per group: A normalised by real positions, S by labelled ones, written by rank 0."""
    stage, world = runner.stage, runner.world
    names = [group_file(COVARIANCE, g, len(groups)) for g in range(len(groups))]
    done = world.broadcast_object([stage.has(name) for name in names] if world.is_main else None)
    for g, group in enumerate(groups):
        if not done[g]:
            started = time.time()
            _covariance_group(runner, [layers[i] for i in group], _group_shares(group, sources), g, len(groups), names[g])
            stage.timings["covariance_seconds"] = round(stage.timings.get("covariance_seconds", 0.0) + time.time() - started, 3)
    # rank 0 broadcasts after its last write, so no rank reads a covariance file before it exists
    return world.broadcast_object(_group_counts(stage, names) if world.is_main else None)


def _covariance_group(runner: _PassRunner, members: list[TrackedLayer], shares: dict[int, int], group: int, groups: int,
                      name: str) -> None:
    """One group's pass 1 (a function, so that nothing of the group outlives it)."""
    stage, world = runner.stage, runner.world
    dtype = getattr(torch, runner.settings.stats_dtype)
    covariances = [
        CovarianceSums(None if j in shares else l.d_in_folded, l.d_out, dtype, world.device) for j, l in enumerate(members)
    ]
    capture = Capture(
        runner.model, members,
        lambda j, a: covariances[j].add_activations(a),
        lambda j, _, grad: covariances[j].add_gradients(grad, runner.label_weight),
        shared_inputs=shares,
    )
    sums = {}
    for layer, covariance in zip(members, covariances):
        if covariance.activation is not None:
            sums[f"{layer.name}.activation_covariance"] = covariance.activation
        sums[f"{layer.name}.gradient_covariance"] = covariance.gradient
    counts = runner.run(COVARIANCE, group, groups, sums, capture)
    if world.is_main:
        for key, tensor in sums.items():  # in place: no second copy of the group
            tensor.div_(counts.tokens if key.endswith(".activation_covariance") else counts.labelled)
        write_tensors(stage.file(name), sums, counts.metadata())
    runner.discard_checkpoint(COVARIANCE, group)


def _eigen_part(layer: TrackedLayer) -> str:
    return f"{EIGEN_PARTS}/{layer.name}.safetensors"


def decompose_layer(covariance_path, layer: TrackedLayer, out_path, device, shares_activations: bool = False) -> None:
    """Eigenbases of one layer's A and S (float64 solve, float32 storage), read and written per tensor;
    only S's for a layer that shares another layer's A."""
    from safetensors import safe_open

    eigen = {}
    with safe_open(str(covariance_path), framework="pt", device=str(device)) as handle:
        for side in ("gradient",) if shares_activations else ("activation", "gradient"):
            values, vectors = symmetric_eigh(handle.get_tensor(f"{layer.name}.{side}_covariance"))
            eigen[f"{layer.name}.{side}_eigenvalues"] = values.float()
            eigen[f"{layer.name}.{side}_eigenvectors"] = vectors.float()
            del values, vectors
    write_tensors(out_path, eigen)


def eigendecomposition_step(layers: list[TrackedLayer], groups: list[list[int]], sources: dict[int, int], stage: StageDir,
                            world: World) -> None:
    """Layer i is decomposed on rank i mod N into its own file; each group's file is then
    assembled from them by copying bytes (rank g mod N assembles group g)."""
    n = len(groups)
    targets = [group_file(EIGEN, g, n) for g in range(n)]
    plan = None
    if world.is_main:
        missing = [g for g in range(n) if not stage.has(targets[g])]
        plan = (missing, [i for g in missing for i in groups[g] if not stage.has(_eigen_part(layers[i]))])
    missing, todo = world.broadcast_object(plan)
    if not missing:
        return
    started = time.time()
    group_of = {i: g for g, group in enumerate(groups) for i in group}
    mine = [i for i in todo if i % world.size == world.rank]
    with progress("eigendecomposition", total=len(mine), unit="layer") as bar:
        for i in mine:
            covariance = stage.file(group_file(COVARIANCE, group_of[i], n))
            decompose_layer(covariance, layers[i], stage.file(_eigen_part(layers[i])), world.device, i in sources)
            bar.advance(1)
    world.barrier()
    for g in missing:
        if g % world.size == world.rank:
            parts = [stage.file(_eigen_part(layers[i])) for i in groups[g]]
            merge_tensor_files(stage.file(targets[g]), parts)
            for part in parts:
                part.unlink()
    world.barrier()
    if world.is_main:
        shutil.rmtree(stage.file(EIGEN_PARTS), ignore_errors=True)
    stage.timings["eigendecomposition_seconds"] = round(
        stage.timings.get("eigendecomposition_seconds", 0.0) + time.time() - started, 3
    )


def correction_step(
    runner: _PassRunner, layers: list[TrackedLayer], groups: list[list[int]], sources: dict[int, int], strategy: Strategy,
    covariance_counts: PassCounts | None,
) -> PassCounts | None:
    """Λ per group: pass 2 over the corpus (EK-FAC, diagonal) or the covariance spectra (K-FAC)."""
    stage, world = runner.stage, runner.world
    n = len(groups)
    names = [group_file(LAMBDA, g, n) for g in range(n)]
    done = world.broadcast_object([stage.has(name) for name in names] if world.is_main else None)
    for g, group in enumerate(groups):
        if done[g]:
            continue
        started = time.time()
        members = [layers[i] for i in group]
        shares = _group_shares(group, sources)
        if strategy.corrects:
            _correction_group(runner, members, shares, strategy, g, n, names[g])
        elif world.is_main:
            _kfac_group(stage, members, shares, covariance_counts, stage.file(group_file(EIGEN, g, n)), stage.file(names[g]))
        stage.timings["correction_seconds"] = round(stage.timings.get("correction_seconds", 0.0) + time.time() - started, 3)
    if not strategy.corrects:
        return None
    return world.broadcast_object(_group_counts(stage, names) if world.is_main else None)


def _kfac_group(stage: StageDir, members: list[TrackedLayer], shares: dict[int, int], counts: PassCounts, eigen_path,
                out_path) -> None:
    """K-FAC's Λ = T λ_S λ_Aᵀ of one group from its eigenvalues, T the labelled tokens per sequence."""
    from safetensors import safe_open

    lambdas = {}
    with safe_open(str(eigen_path), framework="pt") as handle:
        for j, layer in enumerate(members):
            a_owner = members[shares.get(j, j)]
            lambdas[f"{layer.name}.lambda"] = kfac_eigenvalues(
                handle.get_tensor(f"{layer.name}.gradient_eigenvalues").double(),
                handle.get_tensor(f"{a_owner.name}.activation_eigenvalues").double(),
                counts.labelled / counts.sequences,
            ).float()
    write_tensors(out_path, lambdas, counts.metadata())


def _correction_group(runner: _PassRunner, members: list[TrackedLayer], shares: dict[int, int], strategy: Strategy,
                      group: int, groups: int, name: str) -> None:
    """One group's pass 2 (a function, so that nothing of the group outlives it)."""
    from safetensors import safe_open

    stage, world = runner.stage, runner.world
    dtype = getattr(torch, runner.settings.stats_dtype)
    corrections = []
    bases: dict = {}
    with contextlib.ExitStack() as stack:
        if strategy.rotates:
            eigen = stage.file(group_file(EIGEN, group, groups))
            handle = stack.enter_context(safe_open(str(eigen), framework="pt", device=str(world.device)))
        for j, layer in enumerate(members):
            if strategy.rotates:
                bases = {"gradient": handle.get_tensor(f"{layer.name}.gradient_eigenvectors")}
                if j not in shares:
                    bases["activation"] = handle.get_tensor(f"{layer.name}.activation_eigenvectors")
            shared = corrections[shares[j]].activation_basis if j in shares else None  # the same tensor, not a copy
            corrections.append(CorrectionSums(
                bases.get("activation", shared), bases.get("gradient"), layer.d_in_folded, layer.d_out, dtype, world.device
            ))
            bases = {}
    capture = Capture(  # a shared pair rotates its input once, with the source's basis
        runner.model, members,
        lambda j, a: corrections[j].rotate_activations(a),
        lambda j, kept, grad: corrections[j].add_gradients(kept, grad, runner.label_weight),
        shared_inputs=shares,
    )
    sums = {f"{layer.name}.lambda": correction.squares for layer, correction in zip(members, corrections)}
    counts = runner.run("correction", group, groups, sums, capture)
    if world.is_main:
        for tensor in sums.values():
            tensor.div_(counts.sequences)
        write_tensors(stage.file(name), {key: tensor.float() for key, tensor in sums.items()}, counts.metadata())
    runner.discard_checkpoint("correction", group)


def fit_factors(
    model,
    tokenizer,
    layers: list[TrackedLayer],
    corpus: CorpusSpec,
    stage: StageDir,
    settings: FitSettings,
    world: World,
    checkpoint_every: float = DEFAULT_CHECKPOINT_EVERY,
) -> dict:
    """Fit the factors of `settings.strategy` into `stage`; returns the final manifest.

    `checkpoint_every` (seconds; 0 = after every part of the corpus) does not change the result.
    """
    with _statistics_precision(settings.tf32):
        return _fit_factors(model, tokenizer, layers, corpus, stage, settings, world, checkpoint_every)


@contextlib.contextmanager
def _statistics_precision(tf32: bool):
    """TF32 (10-bit mantissa inputs, float32 accumulation) for CUDA float32 matmuls while fitting.

    With bf16 model compute only the statistics run in float32, so this speeds up exactly them;
    tests/test_fit.py states how far TF32-rounded and bf16-computed statistics move the factors.
    """
    previous = torch.backends.cuda.matmul.fp32_precision
    if tf32:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def _fit_factors(model, tokenizer, layers, corpus, stage, settings, world, checkpoint_every) -> dict:
    strategy = STRATEGY[settings.strategy]
    groups = layer_groups(len(layers), settings.layers_per_pass)
    sources = shared_activation_sources(layers, groups) if strategy.covariances else {}
    runner = _PassRunner(stage, model, tokenizer, corpus, settings, world, checkpoint_every)
    counts: dict = {}
    files: list[str] = []
    covariance_counts = None
    if strategy.covariances:
        covariance_counts = covariance_step(runner, layers, groups, sources)
        counts.update(covariance_tokens=covariance_counts.tokens, covariance_labelled_tokens=covariance_counts.labelled,
                      covariance_sequences=covariance_counts.sequences)
        files += [group_file(COVARIANCE, g, len(groups)) for g in range(len(groups))]
        eigendecomposition_step(layers, groups, sources, stage, world)
        files += [group_file(EIGEN, g, len(groups)) for g in range(len(groups))]
    if strategy.has_factors:
        correction_counts = correction_step(runner, layers, groups, sources, strategy, covariance_counts)
        if correction_counts is not None:
            counts["correction_sequences"] = correction_counts.sequences
        files += [group_file(LAMBDA, g, len(groups)) for g in range(len(groups))]
    counts["rows_skipped"] = runner.row_stats.skipped
    counts["rendered_conversations"] = runner.row_stats.conversations
    world.barrier()
    manifest = {}
    if world.is_main:
        shutil.rmtree(stage.file(CHECKPOINTS), ignore_errors=True)
        layer_names = [[layers[i].name for i in group] for group in groups]
        alias = {layers[i].name: layers[source].name for i, source in sources.items()}
        manifest = stage.complete(counts, files, layer_groups=layer_names, activation_alias=alias)
    world.barrier()
    return manifest


def run(model, corpus: str, out, *, options, tokenizer=None) -> StageResult:
    """The stage as `attrib.fit_factors` runs it: the corpus checked before any output exists, the model
    borrowed, --layers-per-pass chosen for a memory budget, then the factors fitted (or resumed)."""
    from attrib.data import chat_format, check_corpus, default_max_length
    from attrib.models import find_tracked_layers, model_record
    from attrib.runtime import borrowed_model
    from attrib.storage import input_identity, read_manifest

    spec = options.corpus.spec(corpus)
    check_corpus(spec)  # a missing path, a wrong text field or a bad first row fail before any output exists
    fit = options.fit
    with borrowed_model(model, tokenizer, options.model, fit.collective_timeout_seconds) as (
            world, model_spec, lm, tokenizer):
        dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
        if dtype == "float16":
            raise InputError("the model is in float16, which fit-factors refuses (no loss scaling); "
                             "convert it to bfloat16 or float32")
        layers = find_tracked_layers(lm, fit.modules)
        settings = FitSettings.of(options, options.batch.max_length or default_max_length(lm.config, tokenizer), world)
        if options.run.memory_budget is not None:
            settings.layers_per_pass = layers_for_budget(options.run.memory_budget, lm, layers, settings, dtype,
                                                         world.device)
        reading = {key: value for key, value in asdict(spec).items() if key not in ("source", "long_documents")}
        recorded = {**asdict(settings), "modules": fit.modules, "dtype": dtype, "long_documents": spec.long_documents,
                    "corpus_options": reading,
                    "chat": {**chat_format(tokenizer, spec.chat_template).identity(), "loss_on": spec.loss_on}}
        inputs = {"corpus": input_identity(spec.source)}
        record = model_record(model_spec, lm, layers)
        stage = world.main_first(
            lambda is_main: StageDir(out, "fit-factors", recorded, record, inputs, options.run.overwrite and is_main)
        )
        if stage.already_complete:
            message(f"{out} is already complete; use {flag('overwrite')} to fit again")
        else:
            with stage.guard():
                fit_factors(lm, tokenizer, layers, spec, stage, settings, world, fit.checkpoint_seconds)
        return StageResult(Path(out), read_manifest(out), stage.already_complete, world.is_main)


def layers_for_budget(budget: int, lm, layers, settings: FitSettings, dtype: str, device: str) -> int | None:
    """--layers-per-pass for a memory budget, through attrib.memory's model of fit-factors."""
    from attrib import memory

    shape, shapes = memory.model_shape(lm), memory.layer_shapes(layers)
    kind = "cpu" if str(device) == "cpu" else "cuda"

    def predict(layers_per_pass):
        return memory.fit_factors(
            shape, shapes, tokens_per_batch=settings.tokens_per_batch, dtype=dtype, device=kind,
            layers_per_pass=layers_per_pass, strategy=settings.strategy, fisher=settings.fisher,
            stats_dtype=settings.stats_dtype,
        )

    try:
        return memory.choose_layers_per_pass(budget, predict, len(layers), kind)
    except ValueError as exc:
        raise InputError(
            f"{flag('max_memory')} {budget / memory.GiB:.1f} GiB is too small: {exc}; lower "
            f"{flag('tokens_per_batch')} or raise {flag('max_memory')}"
        ) from None
