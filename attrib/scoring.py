"""Influence scores of training sequences on all queries, streamed to Parquet (DESIGN.md §2–3).

One forward+backward per batch of training sequences with their own labels; at every
tracked layer the per-token score for query q is Σ_k σ_k (g_tᵀ u_k)(v_kᵀ a_t), so no
d_out × d_in gradient is ever formed per training sequence. Each corpus part writes
its own files (per rank), so a killed run resumes at the first unfinished part.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from attrib.capture import Capture, summed_nll
from attrib.data import CorpusSpec, Part, RowStats, Sequence, collate, iter_sequence_parts, pack_batches
from attrib.distributed import World
from attrib.models import TrackedLayer
from attrib.progress import progress
from attrib.query_gradients import QueryGradients
from attrib.score_tables import DOCUMENTS, TOKENS_DIR, documents_schema, tokens_schema, write_table
from attrib.storage import StageDir

PARTS_DIR = "parts"


class Scorer:
    """Scores batches of training sequences against every query through hooks on the tracked layers."""

    def __init__(self, model, layers: list[TrackedLayer], gradients: QueryGradients, device):
        self.model, self.layers = model, layers
        self.num_queries = len(gradients.query_ids)
        self.compute = torch.promote_types(next(model.parameters()).dtype, gradients.left[0].dtype)
        # Per layer the queries' factors side by side: [d_out, Q·r], [d_in, Q·r], [Q·r].
        self.left = [u.permute(1, 0, 2).reshape(u.shape[1], -1).to(device, self.compute) for u in gradients.left]
        self.right = [v.permute(1, 0, 2).reshape(v.shape[1], -1).to(device, self.compute) for v in gradients.right]
        self.sigma = [s.reshape(-1).to(device, self.compute) for s in gradients.sigma]
        self._token_scores: torch.Tensor | None = None
        self._layer_scores: torch.Tensor | None = None

    def _on_activation(self, index: int, a: torch.Tensor) -> torch.Tensor:
        """Keep a's projection [batch, seq, Q·r] until backward, or a itself when that is smaller."""
        a = a.to(self.compute)
        return a @ self.right[index] if self.right[index].shape[1] <= a.shape[-1] else a

    def _on_gradient(self, index: int, projected_a: torch.Tensor, g: torch.Tensor) -> None:
        projected_g = g.to(self.compute) @ self.left[index]  # [batch, seq, Q·r]
        if projected_a.shape[-1] != projected_g.shape[-1]:
            projected_a = projected_a @ self.right[index]
        product = projected_g * projected_a * self.sigma[index]
        batch, seq = product.shape[:2]
        per_token = product.view(batch, seq, self.num_queries, -1).sum(-1)  # [batch, seq, Q]
        self._token_scores += per_token
        self._layer_scores[:, :, index] = per_token.sum(1)

    def score(self, sequences: list[Sequence], pad_id: int, device):
        """Per-token scores [batch, seq, Q] (summed over layers) and per-layer scores [batch, Q, L]."""
        input_ids, mask, targets = collate(sequences, pad_id, device)
        batch, seq = input_ids.shape
        self._token_scores = torch.zeros(batch, seq, self.num_queries, dtype=self.compute, device=device)
        self._layer_scores = torch.zeros(batch, self.num_queries, len(self.layers), dtype=self.compute, device=device)
        capture = Capture(self.model, self.layers, self._on_activation, self._on_gradient)
        capture.run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])
        return self._token_scores.detach(), self._layer_scores.detach()


@dataclass
class ScoreSettings:
    """Everything that changes the scores written; stored in the manifest and checked on resume."""

    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    token_scores_top: int = 100  # -1: every scored document; 0: none
    world_size: int = 1


class Candidates:
    """Which (query, document[, chunk]) pairs to score, and each document's prefilter rank."""

    def __init__(self, ranks: dict[str, dict[tuple[str, int | None], int]]):
        # ranks: query -> (doc_id, chunk or None for a whole document) -> rank
        self.pairs = {query_id: set(chosen) for query_id, chosen in ranks.items()}
        self.doc_ids = {doc_id for chosen in ranks.values() for doc_id, _ in chosen}
        self.doc_rank: dict[tuple[str, str], int] = {}
        for query_id, chosen in ranks.items():
            for (doc_id, _), rank in chosen.items():
                key = (query_id, doc_id)
                self.doc_rank[key] = min(rank, self.doc_rank.get(key, rank))

    def wanted(self, sequence: Sequence) -> bool:
        return sequence.doc_id in self.doc_ids

    def allows(self, query_id: str, sequence: Sequence) -> bool:
        chosen = self.pairs.get(query_id, ())
        return (sequence.doc_id, None) in chosen or (sequence.doc_id, sequence.chunk) in chosen

    def rank(self, query_id: str, doc_id: str) -> int | None:
        return self.doc_rank.get((query_id, doc_id))


def _part_rows(part: Part, sequences, token_scores, layer_scores, query_ids, candidates, token_top: int):
    """Document rows (sums over this rank's chunks of each document) and the token rows worth keeping."""
    doc_ids = {sequence.doc_index: sequence.doc_id for sequence in sequences}
    doc_layer_scores: dict[tuple[int, str], np.ndarray] = {}
    chunk_tokens: dict[tuple[int, str], list] = defaultdict(list)
    for sequence, tokens, layers in zip(sequences, token_scores, layer_scores):
        for q, query_id in enumerate(query_ids):
            if candidates is not None and not candidates.allows(query_id, sequence):
                continue
            key = (sequence.doc_index, query_id)
            doc_layer_scores[key] = doc_layer_scores.get(key, 0.0) + layers[q]
            if token_top != 0:
                chunk_tokens[key].append((sequence, tokens[: len(sequence), q]))
    documents = {name: [] for name in ("query_id", "doc_id", "doc_index", "score", "layer_scores")}
    for (doc_index, query_id), layers in doc_layer_scores.items():
        documents["query_id"].append(query_id)
        documents["doc_id"].append(doc_ids[doc_index])
        documents["doc_index"].append(doc_index)
        documents["score"].append(float(layers.sum()))
        documents["layer_scores"].append(layers.tolist())
    # A document in a query's global top k is in the top k of its own part.
    keep = set(doc_layer_scores) if token_top < 0 else set()
    for query_id in query_ids if token_top > 0 else ():
        ranked = sorted((k for k in doc_layer_scores if k[1] == query_id), key=lambda k: -doc_layer_scores[k].sum())
        keep.update(ranked[:token_top])
    tokens = {field.name: [] for field in tokens_schema()}
    for key in sorted(keep, key=lambda k: (k[1], k[0])):
        text = part.texts[key[0]]
        for sequence, scores in chunk_tokens[key]:
            begin = min((s for s, e in sequence.offsets if e > s), default=0)
            end = max((e for _, e in sequence.offsets), default=0)
            tokens["query_id"].append(key[1])
            tokens["doc_id"].append(sequence.doc_id)
            tokens["chunk"].append(sequence.chunk)
            tokens["text"].append(text[begin:end])
            tokens["token_ids"].append(list(sequence.input_ids))
            tokens["tokens"].append([text[s:e] for s, e in sequence.offsets])
            tokens["token_start"].append([max(s - begin, 0) for s, _ in sequence.offsets])
            tokens["token_end"].append([max(e - begin, 0) for _, e in sequence.offsets])
            tokens["token_scores"].append(scores.tolist())
    return documents, tokens


def _documents_part_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("doc_index", pa.int64()),
            ("score", pa.float64()),
            ("layer_scores", pa.list_(pa.float64())),
        ]
    )


def score_corpus(
    model,
    tokenizer,
    layers: list[TrackedLayer],
    gradients: QueryGradients,
    corpus: CorpusSpec,
    stage: StageDir,
    settings: ScoreSettings,
    world: World,
    candidates: Candidates | None = None,
) -> RowStats:
    """Score this rank's share of the corpus, one part file pair per corpus part."""
    scorer = Scorer(model, layers, gradients, world.device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stats = RowStats()
    parts = iter_sequence_parts(corpus, tokenizer, settings.max_length, settings.docs_per_part, stats=stats)
    with progress("scoring", unit="seq") as bar:
        for part in parts:
            name = f"r{world.rank:03d}-p{part.index:05d}.parquet"
            if stage.has(f"{PARTS_DIR}/documents-{name}"):
                continue
            mine = [
                seq for _, seq in part.sequences
                if world.owns(seq.doc_index) and (candidates is None or candidates.wanted(seq))
            ]
            scored, token_scores, layer_scores = [], [], []
            for batch in pack_batches(mine, settings.tokens_per_batch):
                sequences = [mine[i] for i in batch]
                per_token, per_layer = scorer.score(sequences, pad_id, world.device)
                scored += sequences
                keep_tokens = settings.token_scores_top != 0
                token_scores += list(per_token.float().cpu().numpy()) if keep_tokens else [None] * len(sequences)
                layer_scores += list(per_layer.double().cpu().numpy())
                bar.advance(len(sequences), tokens=sum(len(s) for s in sequences))
            documents, tokens = _part_rows(
                part, scored, token_scores, layer_scores, gradients.query_ids, candidates, settings.token_scores_top
            )
            if settings.token_scores_top != 0:
                write_table(stage.file(f"{PARTS_DIR}/tokens-{name}"), tokens, tokens_schema())
            write_table(stage.file(f"{PARTS_DIR}/documents-{name}"), documents, _documents_part_schema())
    return stats


def finalize_scores(stage: StageDir, query_ids: list[str], settings: ScoreSettings, candidates: Candidates | None) -> dict:
    """Rank documents per query, keep the token rows of the top documents, write the final tables."""
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    document_parts = stage.parts(f"{PARTS_DIR}/documents-*.parquet")
    table = ds.dataset([str(stage.file(p)) for p in document_parts], schema=_documents_part_schema()).to_table()
    table = table.sort_by([("query_id", "ascending"), ("score", "descending"), ("doc_index", "ascending")])
    query_column = table["query_id"].to_pylist()
    ranks, previous, rank = [], None, 0
    for query_id in query_column:
        rank = rank + 1 if query_id == previous else 1
        previous = query_id
        ranks.append(rank)
    doc_ids = table["doc_id"].to_pylist()
    prefilter_ranks = [
        candidates.rank(q, d) if candidates is not None else None for q, d in zip(query_column, doc_ids)
    ]
    final = pa.Table.from_pydict(
        {
            "query_id": query_column,
            "doc_id": doc_ids,
            "score": table["score"],
            "rank": pa.array(ranks, pa.int32()),
            "prefilter_rank": pa.array(prefilter_ranks, pa.int32()),
            "layer_scores": table["layer_scores"],
        },
        schema=documents_schema(),
    )
    write_table(stage.file(DOCUMENTS), final.to_pydict(), documents_schema())
    files = [DOCUMENTS]
    if settings.token_scores_top != 0:
        top = settings.token_scores_top
        kept = {(q, d) for q, d, r in zip(query_column, doc_ids, ranks) if top < 0 or r <= top}
        for part in stage.parts(f"{PARTS_DIR}/tokens-*.parquet"):
            rows = pq.read_table(stage.file(part))
            mask = [(q, d) in kept for q, d in zip(rows["query_id"].to_pylist(), rows["doc_id"].to_pylist())]
            target = f"{TOKENS_DIR}/part-{part.split('tokens-', 1)[1]}"
            write_table(stage.file(target), rows.filter(pa.array(mask, pa.bool_())).to_pydict(), tokens_schema())
            files.append(target)
    scored_docs = len({d for d in doc_ids})
    return {"files": files, "counts": {"rows": len(query_column), "documents_scored": scored_docs, "queries": len(query_ids)}}


def discard_parts(stage: StageDir) -> None:
    shutil.rmtree(stage.file(PARTS_DIR), ignore_errors=True)
