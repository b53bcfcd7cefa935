"""The TF-IDF prefilter (`attrib prefilter`): a short list of candidates per query.

Influence scoring costs a forward and backward pass per training sequence, so, as
Grosse et al. (2023) did, only the sequences a lexical search ranks high for a
query are scored. Two backends compute the same function of the same features:

* exact: scikit-learn's `TfidfVectorizer` (true vocabulary) and `linear_kernel`
  over the corpus held in memory;
* streaming: two passes with `HashingVectorizer` features — document frequencies
  first, then batches scored against all queries with sparse products, keeping a
  bounded top-k per query. Memory depends on the hash width, the queries and
  `top_k`, never on the corpus size.

They agree exactly unless two terms share a hashed feature (with the default 2**22
features a vocabulary of a few thousand terms usually has no such pair; the tests
check that before comparing).

The scoring function, shared by both backends (`n` = items, `df` = items holding a term):

* tfidf: weight = (1 + ln tf) × (ln((1 + n) / (1 + df)) + 1) (sublinear tf, smooth idf),
  rows l2-normalised; score = cosine between query and item. Query terms absent
  from the corpus are dropped, as `TfidfVectorizer.transform` drops them.
* bm25: score = Σ_t qtf × ln(1 + (n − df + 0.5)/(df + 0.5)) × tf (k1 + 1) /
  (tf + k1 (1 − b + b |d| / avgdl)), k1 = 1.5, b = 0.75, |d| = terms (n-grams) in the item.

Only items with a positive score are candidates; ties rank the earlier item first.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from attrib.data import EMPTY_TEXT, CorpusSpec, RowStats, corpus_files, iter_documents
from attrib.errors import InputError
from attrib.models import load_tokenizer
from attrib.results import StageResult
from attrib.runtime import flag

CANDIDATES_FILE = "candidates.parquet"
FREQUENCIES_FILE = "frequencies.npz"  # pass 1 of the streaming backend, kept until the stage completes

SCORINGS = ("tfidf", "bm25")
UNITS = ("document", "sequence")
ANALYZERS = ("word", "model")
QUERY_TEXTS = ("prompt", "completion", "both")
BACKENDS = ("auto", "exact", "streaming")

BM25_K1 = 1.5
BM25_B = 0.75
BATCH_ITEMS = 4096
DEFAULT_HASH_FEATURES = 2**22
# `auto` streams above these sizes: the exact backend holds every text and its matrix in memory.
AUTO_EXACT_MAX_BYTES = 64 * 2**20
AUTO_EXACT_MAX_DOCS = 100_000


@dataclass
class Candidate:
    doc_id: str
    chunk: int | None
    rank: int
    score: float


@dataclass
class PrefilterSettings:
    """Everything that changes the candidates; stored in the manifest and checked on resume."""

    top_k: int = 10_000
    unit: str = "document"
    analyzer: str = "word"
    ngram_range: tuple[int, int] = (1, 1)
    scoring: str = "tfidf"
    query_text: str = "both"
    backend: str = "auto"
    model: str | None = None
    max_length: int | None = None
    hash_features: int = DEFAULT_HASH_FEATURES

    def check(self) -> None:
        """The checks of the command's options (attrib.options.PrefilterOptions), for callers of run_prefilter."""
        from attrib.options import STAGES

        given = {**asdict(self), "ngram_range": ",".join(map(str, self.ngram_range))}
        if given["hash_features"] == DEFAULT_HASH_FEATURES:
            given["hash_features"] = None  # the default, not a choice that the exact backend would ignore
        STAGES["prefilter"].parse({name: value for name, value in given.items() if value is not None})

    @property
    def needs_tokenizer(self) -> bool:
        return self.unit == "sequence" or self.analyzer == "model"


def parse_ngram_range(text: str) -> tuple[int, int]:
    """`"1,2"` -> (1, 2); a single number means that n only."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
        raise InputError(f"{flag('ngram_range', text)} must look like 1,2 (smallest and largest n)")
    low, high = int(parts[0]), int(parts[-1])
    return low, high


# --- text to features ---------------------------------------------------------


class TokenStrings:
    """The model tokenizer's tokens of a text, as an sklearn `tokenizer` (picklable, unlike a lambda)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> list[str]:
        return self.tokenizer.tokenize(text)


def _vectorizer_options(settings: PrefilterSettings, tokenizer) -> dict:
    """Analyzer options shared by every vectorizer, so all backends see the same terms."""
    if settings.analyzer == "model":
        return {"tokenizer": TokenStrings(tokenizer), "token_pattern": None, "lowercase": False,
                "ngram_range": settings.ngram_range}
    return {"lowercase": True, "ngram_range": settings.ngram_range}


def _hashing_vectorizer(settings: PrefilterSettings, tokenizer):
    """Raw term counts in a fixed feature space: no vocabulary to grow with the corpus."""
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(n_features=settings.hash_features, alternate_sign=False, norm=None,
                             dtype=np.float64, **_vectorizer_options(settings, tokenizer))


# --- the items a query ranks: documents or the model's sequences ----------------


@dataclass
class ItemBatch:
    doc_ids: list[str]
    chunks: list[int]  # -1 when the unit is the document
    texts: list[str]


@dataclass
class ItemCounts:
    documents: int = 0
    items: int = 0


def _item_batches(spec: CorpusSpec, settings: PrefilterSettings, tokenizer, max_length: int | None,
                  stats: RowStats, counts: ItemCounts) -> Iterator[ItemBatch]:
    """The corpus as batches of scoring units, in a fixed order (both passes must agree)."""
    from attrib.data import chat_format, chunk_document, special_prefix

    prefix = special_prefix(tokenizer) if settings.unit == "sequence" else []
    chat = chat_format(tokenizer, spec.chat_template)
    long_documents = spec.long_documents
    batch = ItemBatch([], [], [])
    for doc in iter_documents(spec, stats):
        doc = chat.prepare(doc)
        counts.documents += 1
        if settings.unit == "document":
            batch.doc_ids.append(doc.doc_id)
            batch.chunks.append(-1)
            batch.texts.append(doc.text)
        else:
            for sequence in chunk_document(tokenizer, doc, max_length, prefix, long_documents):
                spans = [(s, e) for s, e in sequence.offsets if e > s]
                begin, end = (spans[0][0], spans[-1][1]) if spans else (0, 0)
                batch.doc_ids.append(sequence.doc_id)
                batch.chunks.append(sequence.chunk)
                batch.texts.append(doc.text[begin:end])
        if len(batch.texts) >= BATCH_ITEMS:
            counts.items += len(batch.texts)
            yield batch
            batch = ItemBatch([], [], [])
    if batch.texts:
        counts.items += len(batch.texts)
        yield batch


def _query_texts(query_list, query_text: str) -> list[str]:
    texts = []
    for item in query_list:
        text = {"prompt": item.prompt, "completion": item.completion}.get(query_text, item.prompt + item.completion)
        if not text.strip():
            raise InputError(f"query {item.query_id}: its {query_text} text is empty; choose another {flag('query_text')}")
        texts.append(text)
    return texts


def _check_query_terms(query_ids: list[str], query_texts: list[str], settings: PrefilterSettings, tokenizer) -> None:
    """A query the analyzer turns into no term can never match; that is an input error, not an empty result."""
    query_counts = _hashing_vectorizer(settings, tokenizer).transform(query_texts)
    empty = np.flatnonzero(np.diff(query_counts.indptr) == 0)
    if len(empty):
        first = query_ids[empty[0]]
        raise InputError(
            f"query {first} has no term the {settings.analyzer} analyzer keeps "
            f"({len(empty)} such queries); give it words or use {flag('analyzer', 'model')}"
        )


# --- weighting -------------------------------------------------------------------


class TfidfWeights:
    """Sublinear tf × smooth idf, l2-normalised: the function `TfidfVectorizer` computes."""

    def __init__(self, document_frequency: np.ndarray, n_items: int, query_counts):
        self.idf = np.log((1 + n_items) / (1 + document_frequency)) + 1.0
        queries = _known_terms(query_counts, document_frequency)
        self.query_matrix = self._weigh(queries).T.tocsr()

    def _weigh(self, counts):
        from sklearn.preprocessing import normalize

        weighted = counts.astype(np.float64, copy=True)
        weighted.data = (1.0 + np.log(weighted.data)) * self.idf[weighted.indices]
        return normalize(weighted, norm="l2", copy=False)

    def scores(self, counts) -> np.ndarray:
        """[items, queries] cosine similarities of a batch of count rows."""
        return (self._weigh(counts) @ self.query_matrix).toarray()


class Bm25Weights:
    """Okapi BM25 with Lucene's non-negative idf."""

    def __init__(self, document_frequency: np.ndarray, n_items: int, total_length: float, query_counts):
        self.average_length = total_length / n_items
        idf = np.log1p((n_items - document_frequency + 0.5) / (document_frequency + 0.5))
        queries = _known_terms(query_counts, document_frequency)
        queries.data = queries.data * idf[queries.indices]
        self.query_matrix = queries.T.tocsr()

    def scores(self, counts) -> np.ndarray:
        counts = counts.tocsr()
        lengths = np.asarray(counts.sum(axis=1)).ravel()
        saturation = BM25_K1 * (1 - BM25_B + BM25_B * lengths / self.average_length)
        weighted = counts.astype(np.float64, copy=True)
        per_entry = np.repeat(saturation, np.diff(weighted.indptr))
        weighted.data = weighted.data * (BM25_K1 + 1) / (weighted.data + per_entry)
        return (weighted @ self.query_matrix).toarray()


def _known_terms(query_counts, document_frequency: np.ndarray):
    """Query count rows without the terms no item holds (TfidfVectorizer has no column for them)."""
    queries = query_counts.tocsr().astype(np.float64, copy=True)
    queries.data[document_frequency[queries.indices] == 0] = 0.0
    queries.eliminate_zeros()
    return queries


# --- top-k selection ----------------------------------------------------------------


class TopK:
    """The `k` best (score > 0) items per query, fed batch by batch; memory O(queries × k).

    Each query keeps a buffer that is cut back to `k` when it passes 2k; after a cut,
    only scores above the k-th best can enter, so most batches add nothing.
    """

    def __init__(self, n_queries: int, k: int):
        self.k = k
        self.floor = np.zeros(n_queries)
        empty = (np.empty(0), np.empty(0, np.int64), np.empty(0, object), np.empty(0, np.int32))
        self.kept = [empty] * n_queries  # per query: scores, item index, doc_id, chunk
        self.pending: list[list[tuple]] = [[] for _ in range(n_queries)]
        self.pending_size = np.zeros(n_queries, np.int64)

    def push(self, scores: np.ndarray, first_item: int, doc_ids: list[str], chunks: list[int]) -> None:
        """Offer a batch: `scores` is [items, queries]."""
        above = scores > self.floor[None, :]
        if not above.any():
            return
        doc_array = np.asarray(doc_ids, dtype=object)
        chunk_array = np.asarray(chunks, dtype=np.int32)
        for query in np.flatnonzero(above.any(axis=0)):
            rows = np.flatnonzero(above[:, query])
            self.pending[query].append((scores[rows, query], rows + first_item, doc_array[rows], chunk_array[rows]))
            self.pending_size[query] += len(rows)
            if self.pending_size[query] + len(self.kept[query][0]) > 2 * self.k:
                self._cut(query)

    def _cut(self, query: int) -> None:
        parts = [self.kept[query], *self.pending[query]]
        scores, items, doc_ids, chunks = (np.concatenate([p[i] for p in parts]) for i in range(4))
        order = np.lexsort((items, -scores))[: self.k]
        self.kept[query] = (scores[order], items[order], doc_ids[order], chunks[order])
        self.pending[query], self.pending_size[query] = [], 0
        if len(order) == self.k:
            self.floor[query] = scores[order[-1]]

    def result(self, query: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores, doc ids and chunks of one query, best first."""
        self._cut(query)
        scores, _, doc_ids, chunks = self.kept[query]
        return scores, doc_ids, chunks


# --- backends -------------------------------------------------------------------------


@dataclass
class Frequencies:
    """What the streaming backend's first pass learns about the corpus."""

    document_frequency: np.ndarray
    n_items: int
    total_length: float
    documents: int
    skipped: dict[str, int]

    def save(self, path: Path) -> None:
        from attrib.storage import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez_compressed(
                    handle, document_frequency=self.document_frequency,
                    header=np.array(json.dumps({"n_items": self.n_items, "total_length": self.total_length,
                                                "documents": self.documents, "skipped": self.skipped})),
                )

    def counts(self) -> dict:
        return {"documents": self.documents, "items": self.n_items, "rows_skipped": self.skipped}

    @classmethod
    def load(cls, path: Path) -> Frequencies:
        with np.load(path) as stored:
            header = json.loads(str(stored["header"]))
            return cls(stored["document_frequency"], header["n_items"], header["total_length"],
                       header["documents"], header["skipped"])


def _weights(settings: PrefilterSettings, frequencies: Frequencies, query_counts):
    if frequencies.total_length == 0:
        raise InputError(
            f"no document of the corpus has a term the {settings.analyzer} analyzer keeps; "
            f"check {flag('text_field')} or use {flag('analyzer', 'model')}"
        )
    if settings.scoring == "bm25":
        return Bm25Weights(frequencies.document_frequency, frequencies.n_items, frequencies.total_length, query_counts)
    return TfidfWeights(frequencies.document_frequency, frequencies.n_items, query_counts)


def _progress_bar(description: str, total: int | None):
    from attrib.progress import progress

    return progress(description, total=total, unit="docs")


def _count_frequencies(batches: Iterator[ItemBatch], vectorizer, n_features: int, counts: ItemCounts,
                       stats: RowStats) -> Frequencies:
    """Pass 1: in how many items each hashed feature occurs, and how many terms there are."""
    document_frequency = np.zeros(n_features, np.int64)
    total_length = 0.0
    with _progress_bar("prefilter 1/2: frequencies", None) as bar:
        for batch in batches:
            matrix = vectorizer.transform(batch.texts)
            document_frequency += np.bincount(matrix.indices, minlength=n_features)
            total_length += float(matrix.data.sum())
            bar.advance(len(batch.texts))
    return Frequencies(document_frequency, counts.items, total_length, counts.documents, dict(stats.skipped))


def _streaming(batch_source, settings, tokenizer, query_texts, query_ids, stage) -> tuple[TopK, dict]:
    """Two passes over the corpus with hashed features; pass 1 is saved and reused on a rerun."""
    vectorizer = _hashing_vectorizer(settings, tokenizer)
    query_counts = vectorizer.transform(query_texts)
    saved = stage.file(FREQUENCIES_FILE)
    if saved.exists():
        frequencies = Frequencies.load(saved)
    else:
        stats, counts = RowStats(), ItemCounts()
        frequencies = _count_frequencies(batch_source(stats, counts), vectorizer, settings.hash_features, counts, stats)
        frequencies.save(saved)
    weights = _weights(settings, frequencies, query_counts)
    top = TopK(len(query_ids), settings.top_k)
    first_item = 0
    with _progress_bar("prefilter 2/2: scoring", frequencies.n_items) as bar:
        for batch in batch_source(RowStats(), ItemCounts()):
            top.push(weights.scores(vectorizer.transform(batch.texts)), first_item, batch.doc_ids, batch.chunks)
            first_item += len(batch.texts)
            bar.advance(len(batch.texts))
    return top, frequencies.counts()


def _exact(batch_source, settings, tokenizer, query_texts, query_ids) -> tuple[TopK, dict]:
    """The corpus in memory: `TfidfVectorizer` + `linear_kernel` (or counts + BM25) on its vocabulary."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
    from sklearn.metrics.pairwise import linear_kernel

    stats, counts = RowStats(), ItemCounts()
    doc_ids: list[str] = []
    chunks: list[int] = []
    texts: list[str] = []
    with _progress_bar("prefilter: reading", None) as bar:
        for batch in batch_source(stats, counts):
            doc_ids += batch.doc_ids
            chunks += batch.chunks
            texts += batch.texts
            bar.advance(len(batch.texts))
    options = _vectorizer_options(settings, tokenizer)
    tfidf = settings.scoring == "tfidf"
    vectorizer = (TfidfVectorizer(sublinear_tf=True, smooth_idf=True, norm="l2", dtype=np.float64, **options)
                  if tfidf else CountVectorizer(dtype=np.float64, **options))
    try:
        matrix = vectorizer.fit_transform(texts).tocsr()
    except ValueError as exc:  # "empty vocabulary"
        raise InputError(
            f"no document of the corpus has a term the {settings.analyzer} analyzer keeps ({exc})"
        ) from exc
    del texts
    query_matrix = vectorizer.transform(query_texts)
    if not tfidf:
        document_frequency = np.bincount(matrix.indices, minlength=matrix.shape[1])
        bm25 = Bm25Weights(document_frequency, matrix.shape[0], float(matrix.sum()), query_matrix)
    top = TopK(len(query_ids), settings.top_k)
    with _progress_bar("prefilter: scoring", matrix.shape[0]) as bar:
        for start in range(0, matrix.shape[0], BATCH_ITEMS):
            rows = matrix[start : start + BATCH_ITEMS]
            scores = linear_kernel(rows, query_matrix, dense_output=True) if tfidf else bm25.scores(rows)
            stop = start + rows.shape[0]
            top.push(np.asarray(scores), start, doc_ids[start:stop], chunks[start:stop])
            bar.advance(rows.shape[0])
    return top, {"documents": counts.documents, "items": counts.items, "rows_skipped": dict(stats.skipped)}


def choose_backend(spec: CorpusSpec, backend: str) -> str:
    """`auto`: exact when the corpus is small local files (or --max-docs is small), streaming otherwise."""
    if backend != "auto":
        return backend
    if spec.max_docs is not None and spec.max_docs <= AUTO_EXACT_MAX_DOCS:
        return "exact"
    files = corpus_files(spec.source)
    if files is None:
        return "streaming"  # a hub dataset: size unknown without reading it
    return "exact" if sum(f.stat().st_size for f in files) <= AUTO_EXACT_MAX_BYTES else "streaming"


# --- the stage ----------------------------------------------------------------------------


def candidates_schema():
    import pyarrow as pa

    return pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("chunk", pa.int32()),
                      ("score", pa.float64()), ("rank", pa.int32())])


def _write_candidates(path: Path, top: TopK, query_ids: list[str], unit: str) -> tuple[int, list[str]]:
    """candidates.parquet, sorted by query (in the queries file's order) then rank; returns rows and empty queries."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    columns: dict[str, list] = {name: [] for name in candidates_schema().names}
    without = []
    for index, query_id in enumerate(query_ids):
        scores, doc_ids, chunks = top.result(index)
        if not len(scores):
            without.append(query_id)
            continue
        columns["query_id"].append(pa.array([query_id] * len(scores), pa.string()))
        columns["doc_id"].append(pa.array(doc_ids.tolist(), pa.string()))
        columns["chunk"].append(pa.array(chunks, pa.int32(), mask=chunks < 0 if unit == "document" else None))
        columns["score"].append(pa.array(scores, pa.float64()))
        columns["rank"].append(pa.array(np.arange(1, len(scores) + 1, dtype=np.int32)))
    schema = candidates_schema()
    table = pa.Table.from_arrays(
        [pa.chunked_array(columns[field.name], field.type) for field in schema], schema=schema
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return table.num_rows, without


def run_prefilter(
    corpus: CorpusSpec | str,
    queries: str | Path,
    out: str | Path,
    top_k: int = 10_000,
    *,
    unit: str = "document",
    analyzer: str = "word",
    ngram_range: tuple[int, int] = (1, 1),
    scoring: str = "tfidf",
    query_text: str = "both",
    backend: str = "auto",
    model: str | None = None,
    max_length: int | None = None,
    hash_features: int = DEFAULT_HASH_FEATURES,
    trust_remote_code: bool = False,
    revision: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Rank the corpus for every query and write `out/candidates.parquet`; returns the manifest.

    Resume: a completed `out` is left alone. After a crash the streaming backend
    reuses its saved first pass (document frequencies) and rescans for scores; the
    exact backend starts over. candidates.parquet appears only complete (atomic
    rename), followed by the manifest that marks the stage complete.
    """
    from attrib.data import (
        chat_format,
        check_corpus,
        chunking_identity,
        default_max_length,
        load_queries,
        require_fast_tokenizer,
    )
    from attrib.progress import message
    from attrib.storage import StageDir, input_identity, read_manifest

    spec = corpus if isinstance(corpus, CorpusSpec) else CorpusSpec(str(corpus))
    settings = PrefilterSettings(top_k, unit, analyzer, tuple(ngram_range), scoring, query_text, backend, model,
                                 max_length, hash_features)
    settings.check()
    tokenizer, config = load_tokenizer(model, trust_remote_code, revision) if settings.needs_tokenizer else (None, None)
    query_list = load_queries(queries, chat=chat_format(tokenizer, spec.chat_template))
    query_ids = [q.query_id for q in query_list]
    texts = _query_texts(query_list, query_text)
    if unit == "sequence":
        require_fast_tokenizer(tokenizer)  # chunks map back to text through offsets
        settings.max_length = max_length or default_max_length(config, tokenizer)
    _check_query_terms(query_ids, texts, settings, tokenizer)
    check_corpus(spec)  # a missing path, a wrong --text-field or an empty corpus fail before any output exists
    chosen = choose_backend(spec, backend)
    recorded = {**asdict(settings), "ngram_range": list(settings.ngram_range), "corpus": asdict(spec),
                "queries": str(queries), "long_documents": spec.long_documents, "revision": revision}
    chunking = (chunking_identity(tokenizer, settings.max_length, spec.long_documents, spec.chat_template)
                if unit == "sequence" else None)
    inputs = {"corpus": input_identity(spec.source), "queries": input_identity(queries),
              "tokenizer": chunking["tokenizer"] if chunking else None}
    stage = StageDir(out, "prefilter", recorded, None, inputs, overwrite)
    if stage.already_complete:
        message(f"{out} is already complete; use {flag('overwrite')} to compute it again")
        return read_manifest(stage.path)

    def batch_source(stats: RowStats, counts: ItemCounts) -> Iterator[ItemBatch]:
        return _item_batches(spec, settings, tokenizer, settings.max_length, stats, counts)

    with stage.guard():
        if chosen == "streaming":
            top, corpus_counts = _streaming(batch_source, settings, tokenizer, texts, query_ids, stage)
        else:
            top, corpus_counts = _exact(batch_source, settings, tokenizer, texts, query_ids)
        rows, without = _write_candidates(stage.file(CANDIDATES_FILE), top, query_ids, unit)
    if without:
        shown = ", ".join(without[:5]) + (" …" if len(without) > 5 else "")
        print(f"warning: {len(without)} of {len(query_ids)} queries have no candidate (no term shared with "
              f"the corpus): {shown}", file=sys.stderr)
    empty = corpus_counts["rows_skipped"].get(EMPTY_TEXT, 0)
    counts = {**corpus_counts, "queries": len(query_ids), "candidates": rows, "empty_documents": empty}
    manifest = stage.complete(counts, [CANDIDATES_FILE], backend_used=chosen, query_ids=query_ids,
                              queries_without_candidates=without, chunking=chunking)
    stage.file(FREQUENCIES_FILE).unlink(missing_ok=True)
    skipped = f" ({empty:,} empty documents skipped)" if empty else ""
    message(f"{rows:,} candidates for {len(query_ids)} queries written to {out}{skipped}")
    return manifest


def check_candidates_chunking(manifest: dict, tokenizer, max_length: int, long_documents: str,
                              source: str | None = None, chat_template: str = "auto") -> None:
    """Refuse sequence-level candidates cut differently from how the scoring stage cuts the corpus.

    With another tokenizer, --max-length or --long-documents, chunk k of a document is
    other text, so the wrong chunks would be scored. Document-level candidates do not
    depend on chunking and always pass. Call it with the candidates' manifest (e.g.
    `read_manifest(dir)`) and the scoring model's tokenizer and settings.
    """
    from attrib.data import chunking_identity

    if manifest.get("settings", {}).get("unit") != "sequence":
        return
    recorded = manifest.get("chunking")
    source = source or flag("candidates")
    rerun = ("; rerun `attrib prefilter --unit sequence --overwrite` with the scoring --model, --max-length, "
             "--long-documents and --chat-template, or use --unit document")
    if not recorded:
        raise InputError(f"{source} records no chunking (written by an older attrib){rerun}")
    current = chunking_identity(tokenizer, max_length, long_documents, chat_template)
    differences = []
    old_tokenizer, new_tokenizer = recorded.get("tokenizer", {}), current["tokenizer"]
    if any(old_tokenizer.get(key) != new_tokenizer[key] for key in ("vocab_size", "vocab_sha256", "special_prefix")):
        differences.append(f"tokenizer vocabulary sha256 {str(old_tokenizer.get('vocab_sha256'))[:12]} != "
                           f"{new_tokenizer['vocab_sha256'][:12]}")
    for key in ("max_length", "long_documents"):
        if recorded.get(key) != current[key]:
            differences.append(f"{flag(key, recorded.get(key))} != {current[key]}")
    old_chat = recorded.get("chat")
    if old_chat is not None and old_chat.get("template_sha256") != current["chat"]["template_sha256"]:
        differences.append(f"{flag('chat_template', old_chat.get('chat_template'))} != {current['chat']['chat_template']}")
    if differences:
        raise InputError(f"{source} was cut into sequences differently ({'; '.join(differences)}){rerun}")


def load_candidates(directory: str | Path) -> dict[str, list[Candidate]]:
    """The candidates of a finished prefilter stage, per query id, best first (every query has a key)."""
    import pyarrow.parquet as pq

    from attrib.storage import open_input

    manifest = open_input(directory, "prefilter", option=flag("candidates"))
    path = Path(directory) / CANDIDATES_FILE
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a missing or damaged file
        raise InputError(f"{flag('candidates', directory)}: {CANDIDATES_FILE} is unreadable ({exc}); rerun the prefilter") from exc
    missing = sorted(set(candidates_schema().names) - set(table.column_names))
    if missing:
        raise InputError(f"{flag('candidates', directory)}: {CANDIDATES_FILE} lacks columns {', '.join(missing)}")
    result: dict[str, list[Candidate]] = {query_id: [] for query_id in manifest.get("query_ids", [])}
    columns = table.select(candidates_schema().names).to_pydict()
    for query_id, doc_id, chunk, score, rank in zip(*columns.values()):
        result.setdefault(query_id, []).append(Candidate(doc_id, chunk, rank, score))
    for items in result.values():
        items.sort(key=lambda c: c.rank)
    return result


__all__ = ["Candidate", "PrefilterSettings", "TopK", "check_candidates_chunking", "choose_backend", "load_candidates", "parse_ngram_range", "run_prefilter"]


def run(corpus: str | None, queries: str, out, *, options, tokenizer=None) -> StageResult:
    """The stage as `attrib.prefilter` runs it (`tokenizer` is unused: `model=` names the tokenizer to load)."""
    from attrib.progress import libraries_quiet
    from attrib.storage import stage_finished

    chosen = options.prefilter
    if chosen.index is not None:
        from attrib.stages.index import score_from_index

        if corpus is not None or chosen.model is None:
            raise InputError(f"{flag('index')} needs {flag('model')} (whose query gradients it scores) and no "
                             f"{flag('corpus')} (it holds its own)")
        return score_from_index(chosen.model, chosen.index, queries, out, options=options, top_k=chosen.top_k)
    if corpus is None:
        raise InputError(f"{flag('corpus')} is needed unless {flag('index')} is given")
    finished = stage_finished(out) and not options.run.overwrite
    keywords = {**{k: v for k, v in asdict(chosen).items() if k != "index"}, "ngram_range": chosen.ngrams,
                "hash_features": chosen.hash_features or DEFAULT_HASH_FEATURES}
    with libraries_quiet(*(("transformers",) if chosen.model is not None else ())):
        manifest = run_prefilter(options.corpus.spec(corpus), queries, out, **keywords,
                                 max_length=options.batch.max_length, trust_remote_code=options.model.trust_remote_code,
                                 revision=options.model.revision, overwrite=options.run.overwrite)
    return StageResult(Path(out), manifest, finished)
