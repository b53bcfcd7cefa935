"""Influence scores of training sequences on the queries, streamed to Parquet (docs/design.md §2–3).

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
from attrib.errors import InputError
from attrib.memory import DENSE_BYTES
from attrib.models import TrackedLayer
from attrib.preconditioned_gradients import QueryGradients, QueryGradientStore
from attrib.progress import progress
from attrib.runtime import flag
from attrib.score_tables import DOCUMENTS, SUMMARY, TOKENS_DIR, documents_schema, tokens_schema
from attrib.storage import StageDir

PARTS_DIR = "parts"


class Scorer:
    """Scores batches of training sequences against a set of queries through hooks on the tracked layers.

    Per-token scores need the low-rank contraction Σ_k σ_k (g_tᵀu_k)(v_kᵀa_t), costing
    T·q·r·(d_in + d_out) per sequence and layer. Document and layer scores alone may instead
    form the sequence's gradient G = Σ_t g_t a_tᵀ once and take ⟨P_q, G⟩ with the dense P_q,
    costing (T + q)·d_in·d_out: far cheaper on narrow layers or with many queries. Each layer
    of each batch takes the cheaper way (docs/design.md §2).
    """

    def __init__(self, model, layers: list[TrackedLayer], gradients: QueryGradients, device):
        self.model, self.layers = model, layers
        self.num_queries = len(gradients.query_ids)
        self.rank = [s.shape[-1] for s in gradients.sigma]
        self.compute = torch.promote_types(next(model.parameters()).dtype, gradients.left[0].dtype)
        # Per layer the queries' factors query-major, so selecting queries gathers rows:
        # U as [Q·r, d_out], V as [Q·r, d_in], σ as [Q·r].
        self.left = [u.mT.reshape(-1, u.shape[1]).to(device, self.compute) for u in gradients.left]
        self.right = [v.mT.reshape(-1, v.shape[1]).to(device, self.compute) for v in gradients.right]
        self.sigma = [s.reshape(-1).to(device, self.compute) for s in gradients.sigma]
        # Per layer the dense P_q flattened [Q, d_out·d_in], while all of them fit DENSE_BYTES.
        self.dense: list[torch.Tensor | None] = []
        room = DENSE_BYTES
        for u, s, v in zip(gradients.left, gradients.sigma, gradients.right):
            size = u.shape[0] * u.shape[1] * v.shape[1] * self.compute.itemsize
            room -= size
            self.dense.append(
                (u.to(device, self.compute) * s.to(device, self.compute)[:, None, :] @ v.to(device, self.compute).mT).flatten(1)
                if room >= 0 else None
            )

    def _gradient_is_cheaper(self, index: int, seq: int, low_rank_queries: int) -> bool:
        """Whether ⟨P_q, G_n⟩ over the pass's queries costs less than the low-rank contraction."""
        layer = self.layers[index]
        d_in, d_out = layer.d_in_folded, layer.d_out
        low_rank = seq * low_rank_queries * self.rank[index] * (d_in + d_out)
        return self.dense[index] is not None and (seq + self.num_queries) * d_in * d_out < low_rank

    def _factors(self, index: int, queries: torch.Tensor | None):
        """Layer `index`'s (U, V, σ) for every row: shared [Q·r, d_out], [Q·r, d_in], [Q·r] when
        `queries` is None, else each row's own queries [batch, k] gathered: [batch, k·r, d_out],
        [batch, k·r, d_in], [batch, 1, k·r]. Either way `g @ U.mT`, `a @ V.mT` and `* σ` apply."""
        left, right, sigma = self.left[index], self.right[index], self.sigma[index]
        if queries is None:
            return left, right, sigma
        rank, (batch, k) = self.rank[index], queries.shape
        return (left.view(-1, rank, left.shape[-1])[queries].reshape(batch, k * rank, -1),
                right.view(-1, rank, right.shape[-1])[queries].reshape(batch, k * rank, -1),
                sigma.view(-1, rank)[queries].reshape(batch, 1, k * rank))

    def score(self, sequences: list[Sequence], pad_id: int, device, queries=None, tokens: bool = True):
        """Per-token scores [batch, seq, k] (summed over layers; None unless `tokens`) and per-layer
        scores [batch, k, L], for every query (k = Q) or, with `queries` [batch, k], for each
        sequence's own queries (positions in this scorer's set; a sequence is contracted with its
        k queries only, so a batch of sequences wanted by different queries costs no more)."""
        chosen = None if queries is None else torch.as_tensor(queries, dtype=torch.long, device=device)
        count = self.num_queries if chosen is None else chosen.shape[1]
        input_ids, mask, targets = collate(sequences, pad_id, device)
        batch, seq = input_ids.shape
        token_scores = torch.zeros(batch, seq, count, dtype=self.compute, device=device) if tokens else None
        layer_scores = torch.zeros(batch, count, len(self.layers), dtype=self.compute, device=device)
        by_gradient = [not tokens and self._gradient_is_cheaper(i, seq, count) for i in range(len(self.layers))]
        factors = [None if by_gradient[i] else self._factors(i, chosen) for i in range(len(self.layers))]
        # keep a's projection [batch, seq, k·r] until backward where it is smaller than a
        project_early = [f is not None and f[1].shape[-2] <= layer.d_in_folded for f, layer in zip(factors, self.layers)]

        def keep(index: int, a: torch.Tensor) -> torch.Tensor:
            a = a.to(self.compute)
            return a @ factors[index][1].mT if project_early[index] else a

        def contract(index: int, kept: torch.Tensor, g: torch.Tensor) -> None:
            g = g.to(self.compute)
            if by_gradient[index]:
                every = torch.bmm(g.mT, kept).flatten(1) @ self.dense[index].T  # ⟨P_q, G_n⟩ [batch, Q]
                layer_scores[:, :, index] = every if chosen is None else every.gather(1, chosen)
                return
            left, right, sigma = factors[index]
            projected_a = kept if project_early[index] else kept @ right.mT
            per_token = ((g @ left.mT) * projected_a * sigma).view(batch, seq, count, -1).sum(-1)  # [batch, seq, k]
            if tokens:
                token_scores.add_(per_token)
            layer_scores[:, :, index] = per_token.sum(1)

        Capture(self.model, self.layers, keep, contract).run(input_ids, mask, lambda logits: [summed_nll(logits, targets)])
        return None if token_scores is None else token_scores.detach(), layer_scores.detach()


@dataclass
class ScoreSettings:
    """Everything that changes the scores written; stored in the manifest and checked on resume."""

    max_length: int = 512
    tokens_per_batch: int = 4096
    docs_per_part: int = 2000
    token_scores_top: int = 100  # -1: every scored document; 0: none
    queries_per_pass: int = 0  # 0: all queries in one pass
    documents_top: int = 0  # per query, keep the K most positive and K most negative documents; 0: all
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


def documents_part(query_ids: np.ndarray, query: np.ndarray, doc_ids, doc_index: np.ndarray, layers: np.ndarray):
    """A documents part table: one row per (query position, document) with its layer scores [n, L] and their sum;
    `doc_ids` an Arrow string array of the rows' document ids."""
    import pyarrow as pa

    offsets = pa.array(np.arange(len(doc_index) + 1) * layers.shape[1], pa.int32())
    return pa.Table.from_arrays(
        [pa.array(query_ids[query], pa.string()), doc_ids, pa.array(doc_index, pa.int64()),
         pa.array(layers.sum(1), pa.float64()), pa.ListArray.from_arrays(offsets, pa.array(layers.reshape(-1), pa.float64()))],
        schema=_documents_part_schema(),
    )


def summary_part(query_ids: np.ndarray, query: np.ndarray, scores: np.ndarray):
    """A summary part table: per query, documents scored, Σ score, Σ score², Σ of the positive scores."""
    size = len(query_ids)
    return summary_table(query_ids, np.bincount(query, minlength=size), np.bincount(query, scores, minlength=size),
                         np.bincount(query, scores**2, minlength=size),
                         np.bincount(query, np.maximum(scores, 0), minlength=size))


def summary_table(query_ids: np.ndarray, documents, sums, sum_squares, positive_sums):
    import pyarrow as pa

    return pa.table({"query_id": pa.array(query_ids, pa.string()), "documents": pa.array(documents, pa.int64()),
                     "sum": pa.array(sums, pa.float64()), "sum_squares": pa.array(sum_squares, pa.float64()),
                     "positive_sum": pa.array(positive_sums, pa.float64())})


class _PartScores:
    """The scores of one (query pass, corpus part): arrays of scored (sequence, query) pairs."""

    def __init__(self, query_ids: list[str], num_layers: int, keep_tokens: bool):
        """Token scores are kept (for every scored pair) when `keep_tokens`."""
        self.query_ids = np.array(query_ids, dtype=object)
        self.num_layers, self.keep_tokens = num_layers, keep_tokens
        self.doc_index: list[np.ndarray] = []
        self.query: list[np.ndarray] = []
        self.layers: list[np.ndarray] = []
        self.sequences: list[Sequence] = []
        # per batch: token scores [b, s, k], each row's query positions [b, k], the scored pairs [b, k], its first sequence
        self.token_batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self.doc_ids: dict[int, str] = {}

    def add(self, sequences, queries: np.ndarray, allowed: np.ndarray, per_token, per_layer) -> None:
        """A scored batch: `queries` [b, k] each row's query positions, `allowed` [b, k] the pairs to keep."""
        rows, columns = np.nonzero(allowed)
        doc_index = np.array([s.doc_index for s in sequences], dtype=np.int64)
        self.doc_index.append(doc_index[rows])
        self.query.append(queries[rows, columns])
        self.layers.append(per_layer.double().cpu().numpy()[rows, columns])
        for sequence in sequences:
            self.doc_ids[sequence.doc_index] = sequence.doc_id
        if self.keep_tokens:
            self.token_batches.append((per_token.float().cpu().numpy(), queries, allowed, len(self.sequences)))
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

    def tables(self, top: int = 0):
        """This part's documents table — (query, document) rows, scores summed over the document's
        chunks; with `top`, only each query's `top` most positive and `top` most negative documents
        (the global ones are among them, as every chunk of a document is in its part) — and its
        summary table: per query, documents scored, Σ score, Σ score², Σ of the positive scores."""
        import pyarrow as pa

        query, doc_index, layers = self.documents()
        scores = layers.sum(1)
        summary = summary_part(self.query_ids, query, scores)
        if top > 0:
            keep = _tails(query, doc_index, scores, top)
            query, doc_index, layers = query[keep], doc_index[keep], layers[keep]
        doc_ids = pa.array([self.doc_ids[i] for i in doc_index], pa.string())
        return documents_part(self.query_ids, query, doc_ids, doc_index, layers), summary

    def tokens_table(self, part: Part):
        """One row per scored (query, chunk): the chunk's tokens, their offsets and per-token scores."""
        import pyarrow as pa

        tokens = {field.name: [] for field in tokens_schema()}
        for scores, queries, allowed, first in self.token_batches:
            for row in range(scores.shape[0]):
                sequence = self.sequences[first + row]
                for column in np.flatnonzero(allowed[row]):
                    add_token_row(tokens, self.query_ids[queries[row, column]], sequence, part.texts[sequence.doc_index],
                                  scores[row, : len(sequence), column])
        return pa.Table.from_pydict(tokens, schema=tokens_schema())


def add_token_row(tokens: dict[str, list], query_id: str, sequence: Sequence, text: str, scores) -> None:
    """Append one tokens-table row (docs/design.md §3) to column lists: the chunk's text, its tokens and offsets."""
    begin = min((s for s, e in sequence.offsets if e > s), default=0)
    end = max((e for _, e in sequence.offsets), default=0)
    tokens["query_id"].append(query_id)
    tokens["doc_id"].append(sequence.doc_id)
    tokens["chunk"].append(sequence.chunk)
    tokens["text"].append(text[begin:end])
    tokens["token_ids"].append(sequence.input_ids)
    tokens["tokens"].append([text[s:e] for s, e in sequence.offsets])
    tokens["token_start"].append([max(s - begin, 0) for s, _ in sequence.offsets])
    tokens["token_end"].append([max(e - begin, 0) for _, e in sequence.offsets])
    tokens["token_scores"].append(scores)


def _tails(query: np.ndarray, doc_index: np.ndarray, scores: np.ndarray, top: int) -> np.ndarray:
    """Row indices of each query's `top` highest and `top` lowest scores (ties by document order)."""
    order = np.lexsort((doc_index, -scores, query))
    grouped = query[order]
    position = np.arange(len(order)) - np.searchsorted(grouped, grouped)
    size = np.bincount(grouped)[grouped] if len(grouped) else grouped
    return order[(position < top) | (position >= size - top)]


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
    keep_tokens: bool = False,
    tokens_of_top: bool = False,
) -> RowStats:
    """Score this rank's share of the corpus, part files per (query pass, corpus part).

    The first phase writes document and layer scores, and token scores too with `keep_tokens`
    (worth it when every scored document keeps them); with `tokens_of_top`, `candidates` are
    the top documents per query and only their token scores are written (Grosse et al.'s
    second pass).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    query_ids = store.query_ids
    per_pass = settings.queries_per_pass or len(query_ids)
    keep_tokens = keep_tokens or tokens_of_top
    kind = "tokens-top" if tokens_of_top else "documents"
    stats = RowStats()
    for first in range(0, len(query_ids), per_pass):
        pass_ids = query_ids[first : first + per_pass]
        pass_number = first // per_pass
        in_pass = lambda q, first=first, count=len(pass_ids): (q >= first) & (q < first + count)  # noqa: E731

        def wanted(doc_index: int, doc_id: str) -> bool:
            """This rank's documents that a query of this pass wants (all of them without candidates)."""
            return world.owns(doc_index) and (candidates is None or _wants_any_chunk(candidates, doc_id, in_pass))

        names = lambda index: f"{PARTS_DIR}/{kind}-q{pass_number:04d}-r{world.rank:03d}-p{index:05d}.parquet"  # noqa: E731
        pass_stats = RowStats()
        parts = iter_sequence_parts(corpus, tokenizer, settings.max_length, settings.docs_per_part,
                                    stats=pass_stats, wanted=wanted)
        scorer = None
        what = "token scores of the top documents" if tokens_of_top else "scoring"
        with progress(f"{what} (queries {first + 1}–{first + len(pass_ids)})", unit="seq") as bar:
            for part in parts:
                if stage.has(names(part.index)):
                    continue
                scorer = scorer or Scorer(model, layers, _pass_factors(store, layers, pass_ids), world.device)
                results = _score_part(scorer, part, first, pass_ids, candidates, in_pass, settings, pad_id, world,
                                      keep_tokens, bar)
                if keep_tokens:
                    _write(stage.file(names(part.index).replace(kind, f"{kind}-tokens", 1)), results.tokens_table(part))
                documents, summary = results.tables(settings.documents_top)
                if not tokens_of_top:
                    _write(stage.file(names(part.index).replace(kind, "summary", 1)), summary)
                _write(stage.file(names(part.index)), documents)
        if first == 0:
            stats = pass_stats
    return stats


def _write(path, table) -> None:
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


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


def _score_part(scorer, part, first, pass_ids, candidates, in_pass, settings, pad_id, world, keep_tokens, bar):
    """Scores of one corpus part for one pass of queries."""
    mine = [seq for _, seq in part.sequences]
    results = _PartScores(list(pass_ids), len(scorer.layers), keep_tokens)
    if candidates is not None:
        wanting = [candidates.queries_for(seq.doc_id, seq.chunk) for seq in mine]
        wanting = [w[in_pass(w)] - first for w in wanting]
        keep = [i for i, w in enumerate(wanting) if len(w)]
        mine, wanting = [mine[i] for i in keep], [wanting[i] for i in keep]
    for batch in pack_batches(mine, settings.tokens_per_batch):
        sequences = [mine[i] for i in batch]
        if candidates is None:
            selection = None
            queries = np.broadcast_to(np.arange(len(pass_ids)), (len(batch), len(pass_ids)))
            allowed = np.ones(queries.shape, bool)
        else:  # each sequence with its own queries, padded to the batch's most
            width = max(len(wanting[i]) for i in batch)
            queries = np.zeros((len(batch), width), np.int64)
            allowed = np.zeros((len(batch), width), bool)
            for row, i in enumerate(batch):
                queries[row, : len(wanting[i])], allowed[row, : len(wanting[i])] = wanting[i], True
            selection = queries
        per_token, per_layer = scorer.score(sequences, pad_id, world.device, selection, tokens=keep_tokens)
        results.add(sequences, queries, allowed, per_token, per_layer)
        bar.advance(len(sequences), tokens=sum(len(s) for s in sequences))
    return results


def write_documents(stage: StageDir, query_ids: list[str], candidates: CandidateIndex | None,
                    documents_top: int = 0) -> dict:
    """documents.parquet and summary.parquet from the parts: documents ranked per query (1 = most
    positive; with `documents_top`, only the K most positive and K most negative, at their ranks
    among all scored documents), with prefilter ranks; per query the count, mean, standard
    deviation and positive mass of all scores. Returns counts."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    summary = ds.dataset([str(stage.file(p)) for p in stage.parts(f"{PARTS_DIR}/summary-*.parquet")]).to_table()
    summary = summary.group_by("query_id").aggregate(
        [("documents", "sum"), ("sum", "sum"), ("sum_squares", "sum"), ("positive_sum", "sum")])
    count = summary["documents_sum"].to_numpy().astype(np.float64)
    mean = summary["sum_sum"].to_numpy() / np.maximum(count, 1)
    variance = np.maximum(summary["sum_squares_sum"].to_numpy() / np.maximum(count, 1) - mean**2, 0)
    summary = pa.table({"query_id": summary["query_id"], "documents": summary["documents_sum"], "mean": mean,
                        "std": np.sqrt(variance), "positive_sum": summary["positive_sum_sum"]}).sort_by("query_id")
    _write(stage.file(SUMMARY), summary)

    document_parts = stage.parts(f"{PARTS_DIR}/documents-q*.parquet")
    table = ds.dataset([str(stage.file(p)) for p in document_parts], schema=_documents_part_schema()).to_table()
    if documents_top > 0:
        codes = pc.dictionary_encode(table["query_id"].combine_chunks()).indices.to_numpy(zero_copy_only=False)
        keep = _tails(codes.astype(np.int64), table["doc_index"].to_numpy(), table["score"].to_numpy(), documents_top)
        table = table.take(pa.array(np.sort(keep)))
    table = table.sort_by([("query_id", "ascending"), ("score", "descending"), ("doc_index", "ascending")])
    query_codes = pc.dictionary_encode(table["query_id"].combine_chunks()).indices.to_numpy(zero_copy_only=False)
    rows = np.arange(len(query_codes))
    position = rows - np.searchsorted(query_codes, query_codes)
    kept = np.bincount(query_codes)[query_codes] if len(rows) else rows
    scored = dict(zip(summary["query_id"].to_pylist(), summary["documents"].to_pylist()))
    total = np.array([scored[q] for q in table["query_id"].to_pylist()], dtype=np.int64) if len(rows) else rows
    upper = position < documents_top if documents_top else np.ones(len(rows), bool)
    ranks = np.where(upper, position + 1, total - (kept - position) + 1)  # the lower tail: ranks among all scored
    final = pa.table({
        "query_id": table["query_id"],
        "doc_id": table["doc_id"],
        "score": table["score"],
        "rank": pa.array(ranks.astype(np.int32), pa.int32()),
        "order": pa.array(rows, pa.int64()),
        "layer_scores": table["layer_scores"],
    })
    if candidates is not None:
        keys = final.select(["query_id", "doc_id", "order"])
        joined = keys.join(candidates.document_ranks(), ["query_id", "doc_id"], join_type="left outer").sort_by("order")
        final = final.append_column("prefilter_rank", joined["prefilter_rank"])
    else:
        final = final.append_column("prefilter_rank", pa.nulls(len(final), pa.int32()))
    _write(stage.file(DOCUMENTS), final.select(documents_schema().names).cast(documents_schema()))
    scored_documents = len(pc.unique(final["doc_id"])) if candidates is not None else max(scored.values(), default=0)
    return {"rows": len(final), "documents_scored": scored_documents, "queries": len(query_ids)}


def top_documents(stage: StageDir, top: int, query_ids: list[str]) -> CandidateIndex:
    """The `top` documents per query of documents.parquet, as candidates for the token-score pass."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    table = ds.dataset(str(stage.file(DOCUMENTS))).to_table(columns=["query_id", "doc_id", "rank"],
                                                            filter=ds.field("rank") <= top)
    return CandidateIndex(table.append_column("chunk", pa.nulls(len(table), pa.int32())), query_ids)


def collect_tokens(stage: StageDir) -> list[str]:
    """The token tables of the parts, moved to tokens/part-*.parquet; returns their names."""
    for part in stage.parts(f"{PARTS_DIR}/*-tokens-*.parquet"):
        target = stage.file(f"{TOKENS_DIR}/part-{part.split('-tokens-', 1)[1]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        stage.file(part).replace(target)
    return stage.parts(f"{TOKENS_DIR}/part-*.parquet")


def score_documents_and_tokens(model, tokenizer, layers, store, corpus, stage: StageDir, settings: ScoreSettings,
                               world: World, candidates: CandidateIndex | None = None):
    """The scoring stage's passes on every rank: document scores, documents.parquet (rank 0), then
    per-token scores of the top documents. Returns (row stats, counts, files written) on rank 0.

    Per-token scores come with the first pass when every scored document keeps them (all of them,
    or no more candidates per query than `token_scores_top`); otherwise from a second pass over
    the top documents alone.
    """
    top = settings.token_scores_top
    all_kept = top < 0 or (top > 0 and candidates is not None and candidates.most_per_query() <= top)
    stats = score_corpus(model, tokenizer, layers, store, corpus, stage, settings, world, candidates, keep_tokens=all_kept)
    world.barrier()
    if not stage.parts(f"{PARTS_DIR}/documents-q*.parquet"):  # every rank sees the same directory
        raise InputError(
            f"nothing was scored: none of the {len(candidates.doc_number)} candidate documents is in {flag('corpus')} "
            f"{corpus.source} (check {flag('corpus')} and {flag('id_field')})" if candidates is not None else
            f"nothing was scored: {flag('corpus', corpus.source)} yields no sequence of at least 2 tokens"
        )
    counts = write_documents(stage, store.query_ids, candidates, settings.documents_top) if world.is_main else {}
    world.barrier()
    if top > 0 and not all_kept:
        score_corpus(model, tokenizer, layers, store, corpus, stage, settings, world,
                     top_documents(stage, top, store.query_ids), tokens_of_top=True)
        world.barrier()
    files = [DOCUMENTS, SUMMARY] + collect_tokens(stage) if world.is_main else []
    return stats, counts, files


def discard_parts(stage: StageDir) -> None:
    shutil.rmtree(stage.file(PARTS_DIR), ignore_errors=True)
