"""The fit-factors stage: two passes over the corpus, then EK-FAC files (DESIGN.md §2–3).

Pass 1 accumulates A = E[a aᵀ] and S = E[g gᵀ]; their eigenbases follow; pass 2
accumulates Λ from per-sequence gradients rotated into those bases. Each pass
checkpoints its running sums after every part of the corpus (one file per rank), so a
killed run resumes where it stopped; finished passes are skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from attrib.capture import Capture, sample_labels, sequence_seed, summed_nll
from attrib.data import CorpusSpec, RowStats, SequenceCaps, collate, iter_sequence_parts, pack_batches
from attrib.distributed import World
from attrib.errors import InputError
from attrib.factors import (
    DEFAULT_DAMPING_SCALE,
    STRATEGY,
    CorrectionSums,
    CovarianceSums,
    LayerCurvature,
    default_damping,
    kfac_eigenvalues,
    symmetric_eigh,
)
from attrib.models import TrackedLayer
from attrib.progress import message, progress
from attrib.storage import StageDir, load_tensors, open_input, save_tensors

COVARIANCE_FILE = "covariance.safetensors"
EIGEN_FILE = "eigen.safetensors"
LAMBDA_FILE = "lambda.safetensors"
PASS_SEED = {"covariance": 1, "correction": 2}


@dataclass
class FitSettings:
    """Everything that changes the factors; stored in the manifest and checked on resume."""

    strategy: str = "ekfac"
    fisher: str = "true"
    fisher_samples: int = 1
    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    max_sequences: int | None = None
    max_tokens: int | None = None
    stats_dtype: str = "float32"
    seed: int = 0
    world_size: int = 1

    def validate(self) -> None:
        if self.strategy not in STRATEGY:
            raise InputError(f"--strategy {self.strategy} is not one of {', '.join(STRATEGY)}")
        if self.fisher not in ("true", "empirical"):
            raise InputError(f"--fisher {self.fisher} is not 'true' or 'empirical'")
        if self.fisher_samples < 1:
            raise InputError("--fisher-samples must be at least 1")
        if self.fisher == "empirical" and self.fisher_samples != 1:
            raise InputError("--fisher-samples applies to --fisher true only (the data has one label)")
        if self.stats_dtype not in ("float32", "float64"):
            raise InputError("--stats-dtype must be float32 or float64")
        for name in ("max_length", "tokens_per_batch", "docs_per_part"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be positive")
        if self.max_length > self.tokens_per_batch:
            raise InputError("--tokens-per-batch must be at least --max-length")


class _PassRunner:
    """Runs one pass of forward/backward over this rank's share of the corpus with checkpoints."""

    def __init__(self, stage: StageDir, model, layers, tokenizer, corpus: CorpusSpec, settings: FitSettings, world: World):
        self.stage, self.model, self.layers, self.tokenizer = stage, model, layers, tokenizer
        self.corpus, self.settings, self.world = corpus, settings, world
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.row_stats = RowStats()

    def run(self, name: str, sums: dict[str, torch.Tensor], capture: Capture) -> dict[str, float]:
        """Accumulate into `sums` (tensors updated by the capture handlers); return global counts."""
        settings, world = self.settings, self.world
        checkpoint = f"{name}/rank{world.rank}-of{world.size}.safetensors"
        counts = {"sequences": 0.0, "tokens": 0.0}
        parts_done = 0
        if self.stage.has(checkpoint):
            saved = load_tensors(self.stage.file(checkpoint), device=world.device)
            for key, tensor in sums.items():
                tensor.copy_(saved[key])
            counts = {key: float(saved[f"count.{key}"]) for key in counts}
            parts_done = int(saved["parts_done"])
            message(f"{name}: resuming after {parts_done} finished part(s)")
        parts = iter_sequence_parts(
            self.corpus, self.tokenizer, settings.max_length, settings.docs_per_part,
            SequenceCaps(settings.max_sequences, settings.max_tokens), self.row_stats,
        )
        samples = 1 if settings.fisher == "empirical" else settings.fisher_samples
        pass_seed = PASS_SEED[name]
        with progress(f"{name} pass", unit="seq") as bar:
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
                            for sample in range(samples)
                        ]

                    capture.run(input_ids, mask, losses)
                    counts["sequences"] += len(batch)
                    counts["tokens"] += float(mask.sum())
                    bar.advance(len(batch), tokens=int(mask.sum()))
                state = {key: tensor for key, tensor in sums.items()}
                state.update({f"count.{key}": torch.tensor(value) for key, value in counts.items()})
                state["parts_done"] = torch.tensor(part.index + 1)
                save_tensors(self.stage.file(checkpoint), state)
        totals = torch.tensor([counts["sequences"], counts["tokens"]], dtype=torch.float64, device=world.device)
        world.all_reduce_sum(list(sums.values()) + [totals])
        if totals[0] == 0:
            raise InputError(f"--corpus {self.corpus.source} yields no sequence of at least 2 tokens to fit on")
        return {"sequences": float(totals[0]), "tokens": float(totals[1])}

    def discard_checkpoints(self, name: str) -> None:
        """Drop a finished pass's running sums once its result file exists (they are as large)."""
        import shutil

        self.world.barrier()
        if self.world.is_main:
            shutil.rmtree(self.stage.file(name), ignore_errors=True)


def fit_factors(
    model,
    tokenizer,
    layers: list[TrackedLayer],
    corpus: CorpusSpec,
    stage: StageDir,
    settings: FitSettings,
    world: World,
) -> dict:
    """Fit the factors of `settings.strategy` into `stage`; returns the final manifest."""
    strategy = STRATEGY[settings.strategy]
    runner = _PassRunner(stage, model, layers, tokenizer, corpus, settings, world)
    stats_dtype = getattr(torch, settings.stats_dtype)
    counts: dict = {}
    files: list[str] = []

    if strategy.covariances:
        if not stage.has(COVARIANCE_FILE):
            started = time.time()
            covariances = [CovarianceSums(l.d_in_folded, l.d_out, stats_dtype, world.device) for l in layers]
            weight = 1.0 / (1 if settings.fisher == "empirical" else settings.fisher_samples)
            capture = Capture(
                model, layers,
                lambda i, a: covariances[i].add_activations(a),
                lambda i, _, g: covariances[i].add_gradients(g, weight),
            )
            sums = {}
            for layer, cov in zip(layers, covariances):
                sums[f"{layer.name}.activation_covariance"] = cov.activation
                sums[f"{layer.name}.gradient_covariance"] = cov.gradient
            pass_counts = runner.run("covariance", sums, capture)
            if world.is_main:
                tensors = {key: value / pass_counts["tokens"] for key, value in sums.items()}
                tensors["count.tokens"] = torch.tensor(pass_counts["tokens"])
                tensors["count.sequences"] = torch.tensor(pass_counts["sequences"])
                save_tensors(stage.file(COVARIANCE_FILE), tensors)
            stage.timings["covariance_seconds"] = round(time.time() - started, 3)
            runner.discard_checkpoints("covariance")
        files.append(COVARIANCE_FILE)
        if not stage.has(EIGEN_FILE):
            started = time.time()
            covariance = load_tensors(stage.file(COVARIANCE_FILE), device=world.device)
            if world.is_main:
                eigen = {}
                for layer in layers:
                    for side in ("activation", "gradient"):
                        values, vectors = symmetric_eigh(covariance[f"{layer.name}.{side}_covariance"])
                        eigen[f"{layer.name}.{side}_eigenvalues"] = values.float()
                        eigen[f"{layer.name}.{side}_eigenvectors"] = vectors.float()
                save_tensors(stage.file(EIGEN_FILE), eigen)
            stage.timings["eigendecomposition_seconds"] = round(time.time() - started, 3)
            world.barrier()
        files.append(EIGEN_FILE)
        covariance = load_tensors(stage.file(COVARIANCE_FILE))
        counts["covariance_tokens"] = int(covariance["count.tokens"])
        counts["covariance_sequences"] = int(covariance["count.sequences"])

    if strategy.name != "identity":
        if not stage.has(LAMBDA_FILE):
            started = time.time()
            eigen = load_tensors(stage.file(EIGEN_FILE)) if strategy.rotates else {}
            lambdas = {}
            if strategy.corrects:
                corrections = [
                    CorrectionSums(
                        eigen.get(f"{l.name}.activation_eigenvectors"),
                        eigen.get(f"{l.name}.gradient_eigenvectors"),
                        l.d_in_folded, l.d_out, stats_dtype, world.device,
                    )
                    for l in layers
                ]
                weight = 1.0 / (1 if settings.fisher == "empirical" else settings.fisher_samples)
                capture = Capture(
                    model, layers,
                    lambda i, a: corrections[i].rotate_activations(a),
                    lambda i, kept, g: corrections[i].add_gradients(kept, g, weight),
                )
                sums = {f"{l.name}.lambda": c.squares for l, c in zip(layers, corrections)}
                pass_counts = runner.run("correction", sums, capture)
                lambdas = {key: value / pass_counts["sequences"] for key, value in sums.items()}
                counts["correction_sequences"] = int(pass_counts["sequences"])
            else:
                tokens_per_sequence = counts["covariance_tokens"] / counts["covariance_sequences"]
                for layer in layers:
                    lambdas[f"{layer.name}.lambda"] = kfac_eigenvalues(
                        eigen[f"{layer.name}.gradient_eigenvalues"].double(),
                        eigen[f"{layer.name}.activation_eigenvalues"].double(),
                        tokens_per_sequence,
                    )
            if world.is_main:
                lambdas = {key: value.float() for key, value in lambdas.items()}
                lambdas["count.sequences"] = torch.tensor(float(counts.get("correction_sequences", 0)))
                save_tensors(stage.file(LAMBDA_FILE), lambdas)
            stage.timings["correction_seconds"] = round(time.time() - started, 3)
            runner.discard_checkpoints("correction")
        files.append(LAMBDA_FILE)
        lambda_counts = load_tensors(stage.file(LAMBDA_FILE))
        if strategy.corrects:
            counts["correction_sequences"] = int(lambda_counts["count.sequences"])

    counts["rows_skipped"] = runner.row_stats.skipped
    manifest = stage.complete(counts, files) if world.is_main else {}
    world.barrier()
    return manifest
