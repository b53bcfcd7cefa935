"""Corpora, queries and their token sequences.

Corpora are streamed document by document (JSONL, Parquet, CSV, text, directories,
globs or a `datasets` hub name). Every token keeps its character offsets, so any
score maps back to the text. Bad rows are errors naming file and line, or are
skipped and counted with `skip_bad_rows`.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from attrib.errors import InputError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
CORPUS_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet", ".csv"}


@dataclass
class Document:
    doc_id: str
    text: str


@dataclass
class CorpusSpec:
    """Where a corpus is and how to read it; the CLI fills it from flags."""

    source: str
    text_field: str = "text"
    id_field: str | None = None
    lines: bool = False
    max_docs: int | None = None
    skip_bad_rows: bool = False
    split: str = "train"


@dataclass
class RowStats:
    """Counts that go into a manifest: rows read, and bad rows skipped by reason."""

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def corpus_files(source: str) -> list[Path] | None:
    """The local files a corpus source names, or None when it is no local path or glob."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        if not files:
            raise InputError(
                f"--corpus {source} holds no {', '.join(sorted(CORPUS_SUFFIXES))} files"
            )
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"--corpus {source} matches no file")
        return files
    return None


class _RowChecker:
    """Turns raw rows into Documents, or reports/skips the bad ones by file and line."""

    def __init__(self, spec: CorpusSpec, stats: RowStats):
        self.spec = spec
        self.stats = stats

    def bad(self, where: str, reason: str, key: str) -> None:
        if self.spec.skip_bad_rows:
            self.stats.skip(key)
            return
        raise InputError(f"{where}: {reason} (fix the row or pass --skip-bad-rows)")

    def document(self, row, where: str) -> Document | None:
        """A Document, or None for a skipped row; without --id-field its id is filled in later."""
        spec = self.spec
        if not isinstance(row, dict):
            self.bad(where, "row is not a JSON object", "not an object")
            return None
        if spec.text_field not in row:
            fields = ", ".join(sorted(map(str, row))) or "none"
            self.bad(where, f"no field '{spec.text_field}' (fields: {fields}; choose one with --text-field)", "missing field")
            return None
        text = row[spec.text_field]
        if not isinstance(text, str):
            self.bad(where, f"field '{spec.text_field}' is {type(text).__name__}, not a string", "not a string")
            return None
        if not text.strip():
            self.bad(where, f"field '{spec.text_field}' is empty", "empty text")
            return None
        if spec.id_field is None:
            doc_id = None
        elif spec.id_field not in row or row[spec.id_field] is None:
            self.bad(where, f"no field '{spec.id_field}' (given by --id-field)", "missing id")
            return None
        else:
            doc_id = str(row[spec.id_field])
        return Document(doc_id, text)  # type: ignore[arg-type]


def _json_rows(path: Path, checker: _RowChecker) -> Iterator[tuple[str, object]]:
    """(where, parsed row) for each non-blank line; undecodable lines are reported or skipped."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            where = f"{path}:{line_number}"
            if not raw.strip():
                continue
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                checker.bad(where, f"not UTF-8 (byte {exc.start})", "not UTF-8")
            except json.JSONDecodeError as exc:
                checker.bad(where, f"invalid JSON ({exc.msg}, column {exc.colno})", "invalid JSON")


def _json_lines(path: Path, checker: _RowChecker) -> Iterator[Document | None]:
    for where, row in _json_rows(path, checker):
        yield checker.document(row, where)


def _text_file(path: Path, checker: _RowChecker, lines: bool) -> Iterator[Document | None]:
    data = path.read_bytes()
    if not lines:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            checker.bad(f"{path}:{line}", f"not UTF-8 (byte {exc.start})", "not UTF-8")
            yield None
            return
        row = {checker.spec.text_field: text, "path": str(path)}
        doc = checker.document(row, str(path))
        if doc is not None and checker.spec.id_field is None:
            doc.doc_id = str(path)
        yield doc
        return
    for line_number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            checker.bad(f"{path}:{line_number}", f"not UTF-8 (byte {exc.start})", "not UTF-8")
            yield None
            continue
        yield checker.document({checker.spec.text_field: text}, f"{path}:{line_number}")


def _parquet_file(path: Path, checker: _RowChecker) -> Iterator[Document | None]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc
    names = table.schema_arrow.names
    if checker.spec.text_field not in names:
        raise InputError(
            f"{path} has no column '{checker.spec.text_field}' (columns: {', '.join(names)}); choose one with --text-field"
        )
    columns = [checker.spec.text_field] + ([checker.spec.id_field] if checker.spec.id_field in names else [])
    row_number = 0
    for batch in table.iter_batches(batch_size=4096, columns=columns):
        for row in batch.to_pylist():
            row_number += 1
            yield checker.document(row, f"{path}:row {row_number}")


def _datasets_rows(source: str, checker: _RowChecker, builder: str | None = None) -> Iterator[Document | None]:
    """Rows through `datasets` in streaming mode: CSV files, or a dataset on the hub."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if builder is not None:
            stream = datasets.load_dataset(builder, data_files=source, split="train", streaming=True)
        else:
            stream = datasets.load_dataset(source, split=checker.spec.split, streaming=True)
        for row_number, row in enumerate(stream, 1):
            yield checker.document(row, f"{source}:row {row_number}")
    except InputError:
        raise
    except StopIteration as exc:
        raise InputError(f"--corpus {source} is empty") from exc
    except Exception as exc:  # datasets wraps reader errors in many types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--corpus {source} could not be read through datasets: {message}") from exc


def iter_documents(spec: CorpusSpec, stats: RowStats | None = None) -> Iterator[Document]:
    """Every document of the corpus in a fixed order, streamed; at most `spec.max_docs`.

    Without --id-field a document's id is its index in this order (or, for a text
    file read whole, its path).
    """
    from attrib.models import looks_like_hub_id

    stats = stats if stats is not None else RowStats()
    checker = _RowChecker(spec, stats)
    files = corpus_files(spec.source)
    if files is None and not looks_like_hub_id(spec.source):
        raise InputError(f"--corpus {spec.source}: no such file or directory")

    def rows_of(source: Path) -> Iterator[Document | None]:
        suffix = source.suffix.lower()
        if suffix in JSON_SUFFIXES:
            return _json_lines(source, checker)
        if suffix == ".parquet":
            return _parquet_file(source, checker)
        if suffix == ".csv":
            return _datasets_rows(str(source), checker, builder="csv")
        return _text_file(source, checker, spec.lines)

    streams = [_datasets_rows(spec.source, checker)] if files is None else map(rows_of, files)
    index = 0
    for rows in streams:
        for doc in rows:
            if doc is None:
                continue
            if doc.doc_id is None:
                doc.doc_id = str(index)
            index += 1
            stats.documents += 1
            yield doc
            if spec.max_docs is not None and index >= spec.max_docs:
                return
    if index == 0:
        raise InputError(f"--corpus {spec.source} holds no usable document")


# --- token sequences -------------------------------------------------------


@dataclass
class Sequence:
    """One chunk of a document as the model sees it.

    `targets[t]` is the token predicted at position t (-1 where no loss is taken:
    the last position, and prompt positions of a query).
    """

    doc_id: str
    chunk: int
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    targets: list[int]
    doc_index: int = 0  # the document's position in the corpus stream

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(t >= 0 for t in self.targets)


def require_fast_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("the model's tokenizer is not a fast tokenizer; attrib needs character offsets")


def special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before every text (e.g. Llama's BOS); kept at every chunk's start."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for cut in range(len(full)):
        if full[cut : cut + len(plain)] == plain:
            return list(full[:cut])
    return []


def default_max_length(model_config, tokenizer) -> int:
    """The model's context, capped at 2048."""
    candidates = [
        getattr(model_config, name, None)
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
    ]
    context = min([c for c in candidates if isinstance(c, int) and c > 0] or [2048])
    return min(context, 2048)


def next_token_targets(input_ids: list[int], loss_from: int = 1) -> list[int]:
    """Targets for next-token prediction; only tokens at index >= loss_from are predicted."""
    targets = [-1] * len(input_ids)
    for position in range(max(loss_from, 1) - 1, len(input_ids) - 1):
        targets[position] = input_ids[position + 1]
    return targets


def disjoint_offsets(offsets) -> list[tuple[int, int]]:
    """Character spans that do not overlap.

    Byte-level BPE splits a multi-byte character over several tokens that all report
    the character's span; the first keeps it and the rest get an empty span, so the
    spans tile the text and a character is coloured once.
    """
    spans, previous_end = [], 0
    for start, end in offsets:
        start = max(start, previous_end)
        end = max(end, start)
        spans.append((start, end))
        previous_end = end
    return spans


def chunk_document(tokenizer, doc: Document, max_length: int, prefix: list[int]) -> list[Sequence]:
    """Cut a document into sequences of at most `max_length` tokens (prefix included)."""
    encoding = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], disjoint_offsets(encoding["offset_mapping"])
    room = max_length - len(prefix)
    if room < 1:
        raise InputError(f"--max-length {max_length} leaves no room after the tokenizer's special prefix")
    sequences = []
    for chunk, start in enumerate(range(0, len(ids), room)):
        chunk_ids = prefix + ids[start : start + room]
        chunk_offsets = [(0, 0)] * len(prefix) + offsets[start : start + room]
        if len(chunk_ids) < 2:
            continue  # a single token predicts nothing
        sequences.append(Sequence(doc.doc_id, chunk, chunk_ids, chunk_offsets, next_token_targets(chunk_ids)))
    return sequences


# --- queries -----------------------------------------------------------------


@dataclass
class Query:
    query_id: str
    prompt: str
    completion: str

    def as_row(self) -> dict[str, str]:
        """The query as its JSONL row."""
        return {"id": self.query_id, "prompt": self.prompt, "completion": self.completion}


def load_queries(path: str | Path, skip_bad_rows: bool = False) -> list[Query]:
    """Queries from JSONL `{"id", "prompt", "completion"}`; ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--queries {path}: no such file")
    stats = RowStats()
    checker = _RowChecker(CorpusSpec(str(path), skip_bad_rows=skip_bad_rows), stats)
    queries: list[Query] = []
    seen: set[str] = set()
    for where, row in _json_rows(path, checker):
        if not isinstance(row, dict):
            checker.bad(where, "row is not a JSON object", "not an object")
            continue
        problem = next(
            (
                f"field '{name}' is missing" if name not in row else f"field '{name}' is not a string"
                for name in ("id", "prompt", "completion")
                if not isinstance(row.get(name), str) and not (name == "id" and isinstance(row.get(name), int))
            ),
            None,
        )
        if problem is None and not row["completion"].strip():
            problem = "field 'completion' is empty; a query needs a completion to attribute"
        if problem is None and str(row["id"]) in seen:
            problem = f"query id {row['id']!r} is used twice"
        if problem is not None:
            checker.bad(where, problem, "bad query")
            continue
        seen.add(str(row["id"]))
        queries.append(Query(str(row["id"]), row["prompt"], row["completion"]))
    if not queries:
        raise InputError(f"--queries {path} holds no query")
    return queries


def query_sequence(tokenizer, query: Query, max_length: int, prefix: list[int]) -> Sequence:
    """Prompt + completion tokens; only completion tokens carry loss (DESIGN.md §2)."""
    text = query.prompt + query.completion
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = prefix + list(encoding["input_ids"])
    offsets = [(0, 0)] * len(prefix) + disjoint_offsets(encoding["offset_mapping"])
    boundary = len(query.prompt)
    first_completion = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
    if first_completion == 0:
        raise InputError(
            f"query {query.query_id}: the first completion token has no context to be predicted from; "
            "give a non-empty prompt"
        )
    if len(ids) > max_length:
        raise InputError(
            f"query {query.query_id} has {len(ids)} tokens, more than --max-length {max_length}; shorten it"
        )
    targets = next_token_targets(ids, loss_from=first_completion)
    return Sequence(query.query_id, 0, ids, offsets, targets)


# --- batches -----------------------------------------------------------------


def pack_batches(sequences: list[Sequence], tokens_per_batch: int) -> list[list[int]]:
    """Group sequence indices into batches of at most `tokens_per_batch` padded tokens.

    Sorting by length first keeps padding small.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        width = len(sequences[current[0]]) if current else len(sequences[index])
        if current and (len(current) + 1) * width > tokens_per_batch:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def collate(sequences: list[Sequence], pad_id: int, device="cpu"):
    """Right-padded tensors: input_ids, attention_mask and targets (-1 = no loss), each [batch, seq]."""
    import torch

    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    targets = torch.full((len(sequences), width), -1, dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq.input_ids)
        attention_mask[row, : len(seq)] = 1
        targets[row, : len(seq)] = torch.tensor(seq.targets)
    return input_ids.to(device), attention_mask.to(device), targets.to(device)


@dataclass
class SequenceCaps:
    """Limits on the data a stage uses, counted over the whole stream (all ranks alike)."""

    max_sequences: int | None = None
    max_tokens: int | None = None


@dataclass
class Part:
    """A fixed run of documents: their sequences with global indices, and their texts by doc index."""

    index: int
    sequences: list[tuple[int, Sequence]]
    texts: dict[int, str]  # of the wanted documents
    documents: int = 0  # read, wanted or not


def iter_sequence_parts(
    spec: CorpusSpec,
    tokenizer,
    max_length: int,
    docs_per_part: int,
    caps: SequenceCaps | None = None,
    stats: RowStats | None = None,
    wanted: Callable[[int, str], bool] | None = None,
) -> Iterator[Part]:
    """The corpus as numbered parts of (global sequence index, sequence) pairs.

    Parts are fixed runs of `docs_per_part` documents, so a resumed run sees the
    same parts and indices as an uninterrupted one. Documents for which
    `wanted(doc_index, doc_id)` is false are counted in their part but never
    tokenized (candidates another query or process scores).
    """
    require_fast_tokenizer(tokenizer)
    caps = caps or SequenceCaps()
    prefix = special_prefix(tokenizer)
    part = Part(0, [], {})
    sequence_index = tokens = 0
    for doc_index, doc in enumerate(iter_documents(spec, stats)):
        skip = wanted is not None and not wanted(doc_index, doc.doc_id)
        if not skip:
            part.texts[doc_index] = doc.text
        part.documents += 1
        for sequence in [] if skip else chunk_document(tokenizer, doc, max_length, prefix):
            if caps.max_sequences is not None and sequence_index >= caps.max_sequences:
                break
            if caps.max_tokens is not None and tokens + len(sequence) > caps.max_tokens:
                break
            sequence.doc_index = doc_index
            part.sequences.append((sequence_index, sequence))
            sequence_index += 1
            tokens += len(sequence)
        else:
            if part.documents == docs_per_part:
                yield part
                part = Part(part.index + 1, [], {})
            continue
        break  # a cap was reached
    if part.sequences:
        yield part
