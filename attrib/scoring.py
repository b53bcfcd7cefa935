"""Influence scores of training sequences on the queries, streamed to Parquet (DESIGN.md §2–3).

One forward+backward per batch of training sequences with their own labels; at every
tracked layer the per-token score for query q is Σ_k σ_k (g_tᵀ u_k)(v_kᵀ a_t), so no
d_out × d_in gradient is ever formed per training sequence. Queries are scored in
passes of `queries_per_pass` (their factors on the device, the rest on disk); with
candidates, a batch is contracted only with the queries that want one of its
documents, and documents no query of the pass wants are never tokenized. Each
(pass, corpus part) writes its own files per rank, so a killed run resumes at the first
unfinished one. Part tables are built from numpy arrays, not Python rows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import numpy as np
import torch

from attrib.candidates import CandidateIndex
from attrib.capture import Capture, summed_nll
from attrib.data import CorpusSpec, Part, RowStats, Sequence, collate, iter_sequence_parts, pack_batches
from attrib.distributed import World
from attrib.models import TrackedLayer
from attrib.progress import progress
from attrib.query_gradients import QueryGradients, QueryGradientStore
from attrib.score_tables import DOCUMENTS, TOKENS_DIR, documents_schema, tokens_schema
from attrib.storage import StageDir

PARTS_DIR = "parts"


class Scorer:
    """Scores batches of training sequences against a set of queries through hooks on the tracked layers."""

    def __init__(self, model, layers: list[TrackedLayer], gradients: QueryGradients, device):
        self.model, self.layers = model, layers
        self.num_queries = len(gradients.query_ids)
        self.rank = [s.shape[-1] for s in gradients.sigma]
        self.compute = torch.promote_types(next(model.parameters()).dtype, gradients.left[0].dtype)
        # Per layer the queries' factors side by side: [d_out, Q·r], [d_in, Q·r], [Q·r].
        self.left = [u.permute(1, 0, 2).reshape(u.shape[1], -1).to(device, self.compute) for u in gradients.left]
        self.right = [v.permute(1, 0, 2).reshape(v.shape[1], -1).to(device, self.compute) for v in gradients.right]
        self.sigma = [s.reshape(-1).to(device, self.compute) for s in gradients.sigma]

    def _columns(self, queries: torch.Tensor | None):
        """Per layer (left, right, σ) restricted to the columns of `queries` (all when None)."""
        if queries is None:
            return list(zip(self.left, self.right, self.sigma))
        out = []
        for left, right, sigma, rank in zip(self.left, self.right, self.sigma, self.rank):
            columns = (queries[:, None] * rank + torch.arange(rank, device=queries.device)).reshape(-1)
            out.append((left[:, columns], right[:, columns], sigma[columns]))
        return out

    def score(self, sequences: list[Sequence], pad_id: int, device, queries: list[int] | None = None):
        """Per-token scores [batch, seq, q] (summed over layers) and per-layer scores [batch, q, L].

        `queries` selects the queries (positions in this scorer's set) to contract with.
        """
        selected = None if queries is None else torch.as_tensor(queries, dtype=torch.long, device=device)
        factors = self._columns(selected)
        count = self.num_queries if queries is None else len(queries)
        input_ids, mask, targets = collate(sequences, pad_id, device)
        batch, seq = input_ids.shape
        token_scores = torch.zeros(batch, seq, count, dtype=self.compute, device=device)
        layer_scores = torch.zeros(batch, count, len(self.layers), dtype=self.compute, device=device)

        def keep(index: int, a: torch.Tensor) -> torch.Tensor:
            """a's projection [batch, seq, q·r] until backward, or a itself when that is smaller."""
            right = factors[index][1]
            a = a.to(self.compute)
            return a @ right if right.shape[1] <= a.shape[-1] else a

        def contract(index: int, projected_a: torch.Tensor, g: torch.Tensor) -> None:
            left, right, sigma = factors[index]
            projected_g = g.to(self.compute) @ left  # [batch, seq, q·r]
            if projected_a.shape[-1] != projected_g.shape[-1]:
                projected_a = projected_a @ right
            per_token = (projected_g * projected_a * sigma).view(batch, seq, count, -1).sum(-1)  # [batch, seq, q]
            token_scores.add_(per_token)
            layer_scores[:, :, index] = per_token.sum(1)

        Capture(self.model, self.layers, keep, contract).run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])
        return token_scores.detach(), layer_scores.detach()


@dataclass
class ScoreSettings:
    """Everything that changes the scores written; stored in the manifest and checked on resume."""

    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    token_scores_top: int = 100  # -1: every scored document; 0: none
    queries_per_pass: int = 0  # 0: all queries in one pass
    world_size: int = 1


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


class _PartScores:
    """The scores of one (query pass, corpus part): arrays of scored (sequence, query) pairs."""

    def __init__(self, query_ids: list[str], num_layers: int, keep_tokens: bool):
        self.query_ids = np.array(query_ids, dtype=object)
        self.num_layers, self.keep_tokens = num_layers, keep_tokens
        self.doc_index: list[np.ndarray] = []
        self.query: list[np.ndarray] = []
        self.layers: list[np.ndarray] = []
        self.sequences: list[Sequence] = []
        self.token_batches: list[tuple[np.ndarray, dict[int, int], int]] = []  # scores [b, s, q], query → column, first row
        self.doc_ids: dict[int, str] = {}

    def add(self, sequences, queries: np.ndarray, allowed: np.ndarray, per_token, per_layer) -> None:
        """A scored batch: `queries` [q] its query positions, `allowed` [b, q] the pairs to keep."""
        rows, columns = np.nonzero(allowed)
        doc_index = np.array([s.doc_index for s in sequences], dtype=np.int64)
        self.doc_index.append(doc_index[rows])
        self.query.append(queries[columns])
        self.layers.append(per_layer.double().cpu().numpy()[rows, columns])
        for sequence in sequences:
            self.doc_ids[sequence.doc_index] = sequence.doc_id
        if self.keep_tokens:
            column_of = {int(q): c for c, q in enumerate(queries)}
            self.token_batches.append((per_token.float().cpu().numpy(), column_of, len(self.sequences)))
        self.sequences += sequences

    def documents(self):
        """(query position, doc index, layer scores [n, L]) summed over each document's chunks."""
        if not self.doc_index:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, self.num_layers))
        doc_index, query = np.concatenate(self.doc_index), np.concatenate(self.query)
        keys, inverse = np.unique(doc_index * len(self.query_ids) + query, return_inverse=True)
        layers = np.zeros((len(keys), self.num_layers))
        np.add.at(layers, inverse, np.concatenate(self.layers))
        return keys % len(self.query_ids), keys // len(self.query_ids), layers

    def tables(self, part: Part, token_top: int):
        """The documents table of this part and its token table (top `token_top` per query)."""
        import pyarrow as pa

        query, doc_index, layers = self.documents()
        scores = layers.sum(1)
        doc_ids = np.array([self.doc_ids[i] for i in doc_index], dtype=object)
        documents = pa.Table.from_arrays(
            [
                pa.array(self.query_ids[query], pa.string()),
                pa.array(doc_ids, pa.string()),
                pa.array(doc_index, pa.int64()),
                pa.array(scores, pa.float64()),
                pa.ListArray.from_arrays(pa.array(np.arange(len(scores) + 1) * self.num_layers, pa.int32()),
                                         pa.array(layers.reshape(-1), pa.float64())),
            ],
            schema=_documents_part_schema(),
        )
        if token_top == 0:
            return documents, None
        # A document in a query's global top k is in the top k of its own part.
        order = np.lexsort((doc_index, -scores, query))
        group_start = np.searchsorted(query[order], query[order])
        keep = order[(np.arange(len(order)) - group_start) < token_top] if token_top > 0 else order
        return documents, self._token_table(part, set(zip(query[keep].tolist(), doc_index[keep].tolist())))

    def _token_table(self, part: Part, kept: set[tuple[int, int]]):
        import pyarrow as pa

        tokens = {field.name: [] for field in tokens_schema()}
        for scores, column_of, first in self.token_batches:
            for row in range(scores.shape[0]):
                sequence = self.sequences[first + row]
                for query, column in column_of.items():
                    if (query, sequence.doc_index) not in kept:
                        continue
                    text = part.texts[sequence.doc_index]
                    begin = min((s for s, e in sequence.offsets if e > s), default=0)
                    end = max((e for _, e in sequence.offsets), default=0)
                    tokens["query_id"].append(self.query_ids[query])
                    tokens["doc_id"].append(sequence.doc_id)
                    tokens["chunk"].append(sequence.chunk)
                    tokens["text"].append(text[begin:end])
                    tokens["token_ids"].append(sequence.input_ids)
                    tokens["tokens"].append([text[s:e] for s, e in sequence.offsets])
                    tokens["token_start"].append([max(s - begin, 0) for s, _ in sequence.offsets])
                    tokens["token_end"].append([max(e - begin, 0) for _, e in sequence.offsets])
                    tokens["token_scores"].append(scores[row, : len(sequence), column])
        return pa.Table.from_pydict(tokens, schema=tokens_schema())


def _batches_sharing_queries(sequences: list[Sequence], wanted: list[np.ndarray], tokens_per_batch: int) -> list[list[int]]:
    """Batches of sequences grouped by their first wanting query, so a batch selects few query columns."""
    by_query: dict[int, list[int]] = {}
    for index, queries in enumerate(wanted):
        by_query.setdefault(int(queries[0]), []).append(index)
    batches = []
    for members in by_query.values():
        batches += [[members[i] for i in batch] for batch in pack_batches([sequences[i] for i in members], tokens_per_batch)]
    return batches


def score_corpus(
    model,
    tokenizer,
    layers: list[TrackedLayer],
    store: QueryGradientStore | QueryGradients,
    corpus: CorpusSpec,
    stage: StageDir,
    settings: ScoreSettings,
    world: World,
    candidates: CandidateIndex | None = None,
) -> RowStats:
    """Score this rank's share of the corpus, one pair of part files per (query pass, corpus part)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    query_ids = store.query_ids
    per_pass = settings.queries_per_pass or len(query_ids)
    stats = RowStats()
    for first in range(0, len(query_ids), per_pass):
        pass_ids = query_ids[first : first + per_pass]
        pass_number = first // per_pass
        scorer = Scorer(model, layers, _pass_factors(store, layers, pass_ids), world.device)
        in_pass = lambda q, first=first, count=len(pass_ids): (q >= first) & (q < first + count)  # noqa: E731

        def wanted(doc_index: int, doc_id: str) -> bool:
            """This rank's documents that a query of this pass wants (all of them without candidates)."""
            return world.owns(doc_index) and (candidates is None or _wants_any_chunk(candidates, doc_id, in_pass))

        pass_stats = RowStats()
        parts = iter_sequence_parts(corpus, tokenizer, settings.max_length, settings.docs_per_part,
                                    stats=pass_stats, wanted=wanted)
        with progress(f"scoring (queries {first + 1}–{first + len(pass_ids)})", unit="seq") as bar:
            for part in parts:
                name = f"q{pass_number:04d}-r{world.rank:03d}-p{part.index:05d}.parquet"
                if stage.has(f"{PARTS_DIR}/documents-{name}"):
                    continue
                _score_part(scorer, part, first, pass_ids, candidates, in_pass, settings, pad_id, world, stage, name, bar)
        if first == 0:
            stats = pass_stats
    return stats


def _wants_any_chunk(candidates: CandidateIndex, doc_id: str, in_pass) -> bool:
    number = candidates.doc_number.get(doc_id)
    if number is None:
        return False
    queries = candidates.pair_query[candidates.doc_start[number] : candidates.doc_start[number + 1]]
    return bool(in_pass(queries).any())


def _pass_factors(store, layers, pass_ids: list[str]) -> QueryGradients:
    """The factors of one pass's queries, on the host, from a store on disk (or one in memory)."""
    if isinstance(store, QueryGradients):
        rows = [store.query_ids.index(q) for q in pass_ids]
        return QueryGradients(pass_ids, store.layer_names, [u[rows] for u in store.left],
                              [s[rows] for s in store.sigma], [v[rows] for v in store.right])
    loaded = [store.load(layer.name, pass_ids) for layer in layers]
    return QueryGradients(pass_ids, [l.name for l in layers], [f[0] for f in loaded], [f[1] for f in loaded],
                          [f[2] for f in loaded])


def _score_part(scorer, part, first, pass_ids, candidates, in_pass, settings, pad_id, world, stage, name, bar):
    """Score one corpus part for one pass of queries and write its two part files."""
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    mine = [seq for _, seq in part.sequences]
    results = _PartScores(list(pass_ids), len(scorer.layers), settings.token_scores_top != 0)
    if candidates is None:
        everyone = np.arange(len(pass_ids))
        batches = pack_batches(mine, settings.tokens_per_batch)
    else:
        wanting = [candidates.queries_for(seq.doc_id, seq.chunk) for seq in mine]
        wanting = [w[in_pass(w)] - first for w in wanting]
        keep = [i for i, w in enumerate(wanting) if len(w)]
        mine, wanting = [mine[i] for i in keep], [wanting[i] for i in keep]
        batches = _batches_sharing_queries(mine, wanting, settings.tokens_per_batch)
    for batch in batches:
        sequences = [mine[i] for i in batch]
        if candidates is None:
            queries, allowed, selection = everyone, np.ones((len(batch), len(pass_ids)), bool), None
        else:
            queries = np.unique(np.concatenate([wanting[i] for i in batch]))
            allowed = np.stack([np.isin(queries, wanting[i]) for i in batch])
            selection = queries.tolist()
        per_token, per_layer = scorer.score(sequences, pad_id, world.device, selection)
        results.add(sequences, queries, allowed, per_token, per_layer)
        bar.advance(len(sequences), tokens=sum(len(s) for s in sequences))
    documents, tokens = results.tables(part, settings.token_scores_top)
    if tokens is not None:
        with atomic_path(stage.file(f"{PARTS_DIR}/tokens-{name}")) as tmp:
            pq.write_table(tokens, tmp)
    with atomic_path(stage.file(f"{PARTS_DIR}/documents-{name}")) as tmp:
        pq.write_table(documents, tmp)


def finalize_scores(stage: StageDir, query_ids: list[str], settings: ScoreSettings, candidates: CandidateIndex | None) -> dict:
    """Rank documents per query, keep the token rows of the top documents, write the final tables."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    document_parts = stage.parts(f"{PARTS_DIR}/documents-*.parquet")
    table = ds.dataset([str(stage.file(p)) for p in document_parts], schema=_documents_part_schema()).to_table()
    table = table.sort_by([("query_id", "ascending"), ("score", "descending"), ("doc_index", "ascending")])
    query_codes = pc.dictionary_encode(table["query_id"].combine_chunks()).indices.to_numpy(zero_copy_only=False)
    rows = np.arange(len(query_codes))
    ranks = (rows - np.searchsorted(query_codes, query_codes) + 1).astype(np.int32) if len(rows) else rows.astype(np.int32)
    final = pa.table({
        "query_id": table["query_id"],
        "doc_id": table["doc_id"],
        "score": table["score"],
        "rank": pa.array(ranks, pa.int32()),
        "order": pa.array(rows, pa.int64()),
        "layer_scores": table["layer_scores"],
    })
    if candidates is not None:
        keys = final.select(["query_id", "doc_id", "order"])
        joined = keys.join(candidates.document_ranks(), ["query_id", "doc_id"], join_type="left outer").sort_by("order")
        final = final.append_column("prefilter_rank", joined["prefilter_rank"])
    else:
        final = final.append_column("prefilter_rank", pa.nulls(len(final), pa.int32()))
    final = final.select(documents_schema().names).cast(documents_schema())
    with atomic_path(stage.file(DOCUMENTS)) as tmp:
        pq.write_table(final, tmp)
    files = [DOCUMENTS]
    if settings.token_scores_top != 0:
        top = settings.token_scores_top
        kept = final if top < 0 else final.filter(pc.less_equal(final["rank"], top))
        kept_keys = pc.binary_join_element_wise(kept["query_id"], kept["doc_id"], "\x00")
        for number, part in enumerate(stage.parts(f"{PARTS_DIR}/tokens-*.parquet")):
            rows_table = pq.read_table(stage.file(part))
            keys = pc.binary_join_element_wise(rows_table["query_id"], rows_table["doc_id"], "\x00")
            target = f"{TOKENS_DIR}/part-{part.split('tokens-', 1)[1]}"
            with atomic_path(stage.file(target)) as tmp:
                pq.write_table(rows_table.filter(pc.is_in(keys, value_set=kept_keys)).cast(tokens_schema()), tmp)
            files.append(target)
    counts = {"rows": len(final), "documents_scored": len(pc.unique(final["doc_id"])), "queries": len(query_ids)}
    return {"files": files, "counts": counts}


def discard_parts(stage: StageDir) -> None:
    shutil.rmtree(stage.file(PARTS_DIR), ignore_errors=True)
