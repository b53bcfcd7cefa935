"""Corpora, queries and their token sequences.

Corpora are streamed document by document (JSONL, a `.json` file holding JSON Lines
or one JSON array, Parquet, CSV, text, directories, globs or a `datasets` hub name).
Every token keeps its character offsets, so any score maps back to the text. Empty
or whitespace-only documents are skipped and counted; other bad rows are errors
naming file and line, or are skipped and counted with `skip_bad_rows`.

Document ids (`CorpusSpec.id_field`): None (the default) uses each row's `id` field
when it has one and the row number otherwise, decided row by row so that the ids do
not depend on `max_docs`; a corpus mixing rows with and without `id` is refused.
`"none"` always uses row numbers; any other name requires that field in every row.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from attrib.errors import InputError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
DEFAULT_ID_FIELD = "id"  # used when every row has it (id_field None)
ROW_NUMBERS = "none"  # --id-field none: ids are row numbers even when rows have an `id`
LONG_DOCUMENTS = ("chunk", "truncate")
EMPTY_TEXT = "empty text"  # the RowStats.skipped key of empty or whitespace-only documents
JSON_ARRAY_CHUNK = 1 << 20
JSON_ARRAY_MAX_ELEMENT = 256 << 20  # an array element this large without a valid parse is reported malformed
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
    id_field: str | None = None  # None: `id` where rows have one; "none": row numbers
    lines: bool = False
    max_docs: int | None = None
    skip_bad_rows: bool = False
    split: str = "train"
    long_documents: str = "chunk"  # documents longer than max_length: "chunk" or "truncate" (DESIGN.md §2)


@dataclass
class RowStats:
    """Counts that go into a manifest: rows read, and rows skipped by reason.

    Empty or whitespace-only documents are always skipped and counted under
    `EMPTY_TEXT`; malformed rows only with `skip_bad_rows`.
    """

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def empty(self) -> int:
        return self.skipped.get(EMPTY_TEXT, 0)


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
        self.rows_with_id: str | None = None  # where the first row with an `id` was (id_field None)
        self.rows_without_id: str | None = None  # where the first row without one was

    def bad(self, where: str, reason: str, key: str) -> None:
        if self.spec.skip_bad_rows:
            self.stats.skip(key)
            return
        raise InputError(f"{where}: {reason} (fix the row or pass --skip-bad-rows)")

    def document(self, row, where: str, path_id: str | None = None) -> Document | None:
        """A Document, or None for a skipped row; a row-number id (None) is filled in later.

        `path_id`: the id of a text file read whole (its path) unless --id-field says otherwise.
        """
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
            self.stats.skip(EMPTY_TEXT)  # real corpora have them: counted, never fatal
            return None
        if spec.id_field is None:
            doc_id = path_id if path_id is not None else self.default_id(row, where)
        elif spec.id_field == ROW_NUMBERS:
            doc_id = None
        elif spec.id_field not in row or row[spec.id_field] is None:
            self.bad(where, f"no field '{spec.id_field}' (given by --id-field)", "missing id")
            return None
        else:
            doc_id = str(row[spec.id_field])
        return Document(doc_id, text)  # type: ignore[arg-type]

    def default_id(self, row: dict, where: str) -> str | None:
        """The row's `id`, or None for a row number; decided per row, so --max-docs cannot change an id."""
        has_id = row.get(DEFAULT_ID_FIELD) is not None
        if has_id and self.rows_without_id is not None:
            raise InputError(
                f"{where} has an '{DEFAULT_ID_FIELD}' field but {self.rows_without_id} had none; "
                "give every row an id, or pass --id-field none to number the rows"
            )
        if not has_id and self.rows_with_id is not None:
            raise InputError(
                f"{where} has no '{DEFAULT_ID_FIELD}' field but {self.rows_with_id} had one; "
                "give every row an id, or pass --id-field none to number the rows"
            )
        if has_id:
            self.rows_with_id = self.rows_with_id or where
            return str(row[DEFAULT_ID_FIELD])
        self.rows_without_id = self.rows_without_id or where
        return None


def _json_rows(path: Path, checker: _RowChecker) -> Iterator[tuple[str, object]]:
    """(where, parsed row) of a JSON Lines file, or of a `.json` file holding one JSON array."""
    if path.suffix.lower() == ".json" and _starts_with(path, b"["):
        yield from _json_array_rows(path, checker)
        return
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
                hint = ""
                if path.suffix.lower() == ".json" and raw.lstrip().startswith(b"{") and line_number == 1:
                    hint = "; a .json file must hold JSON Lines (one object per line) or one JSON array"
                checker.bad(where, f"invalid JSON ({exc.msg}, column {exc.colno}){hint}", "invalid JSON")


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file's first non-whitespace bytes (after a UTF-8 BOM) are `prefix`."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
        while head and not head.lstrip():
            head = handle.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(prefix)


def _json_array_rows(path: Path, checker: _RowChecker) -> Iterator[tuple[str, object]]:
    """The elements of a JSON array file, streamed: `raw_decode` over chunks, never the whole file.

    A malformed element cannot be skipped (where the next one starts is unknown), so it
    is an error even with --skip-bad-rows; `where` names the line and the element index.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as handle:
        buffer, position, line, eof = "", 0, 1, False

        def fill() -> bool:
            """Read one more chunk into the buffer (dropping what was consumed); False at the end."""
            nonlocal buffer, position, eof
            if eof:
                return False
            try:
                chunk = handle.read(max(JSON_ARRAY_CHUNK, len(buffer) - position))  # geometric: linear re-parsing
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{line}: not UTF-8 (after array element {index})") from exc
            buffer, position = buffer[position:] + chunk, 0
            eof = not chunk
            return bool(chunk)

        def skip_space() -> str:
            """The next non-whitespace character (consumed are only the spaces), or '' at the end."""
            nonlocal position, line
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n":
                    line += buffer[position] == "\n"
                    position += 1
                if position < len(buffer):
                    return buffer[position]
                if not fill():
                    return ""

        def fail(reason: str) -> None:
            raise InputError(f"{path}:{line}: array element {index}: {reason}")

        index = 0
        skip_space()
        position += 1  # the opening '['
        if skip_space() == "]":
            position += 1
        else:
            while True:
                if skip_space() == "":
                    fail("the file ends inside the array")
                while True:
                    try:
                        row, end = decoder.raw_decode(buffer, position)
                    except json.JSONDecodeError as exc:
                        if len(buffer) - position > JSON_ARRAY_MAX_ELEMENT or not fill():
                            fail(f"invalid JSON ({exc.msg})")
                        continue
                    if end == len(buffer) and fill():
                        continue  # a number or literal may go on in the next chunk
                    break
                where = f"{path}:{line}: array element {index}"
                line += buffer.count("\n", position, end)
                position = end
                yield where, row
                separator = skip_space()
                position += 1
                if separator not in (",", "]"):
                    fail(f"expected ',' or ']' after the element, found {repr(separator) if separator else 'the end of the file'}")
                index += 1
                if separator == "]":
                    break
        if skip_space() != "":
            raise InputError(f"{path}:{line}: text after the end of the JSON array")


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
        yield checker.document(row, str(path), path_id=str(path))
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
    id_field = checker.spec.id_field
    if id_field is None:
        id_field = DEFAULT_ID_FIELD
    elif id_field != ROW_NUMBERS and id_field not in names:
        raise InputError(f"{path} has no column '{id_field}' (given by --id-field; columns: {', '.join(names)})")
    columns = [checker.spec.text_field] + ([id_field] if id_field in names and id_field != checker.spec.text_field else [])
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

    A document's id is its `id` field (see the module docstring), else its index in
    this order, or, for a text file read whole, its path. Empty documents are
    skipped and counted in `stats`.
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
        empty = f" ({stats.empty:,} empty)" if stats.empty else ""
        raise InputError(f"--corpus {spec.source} holds no usable document{empty}")


def check_corpus(spec: CorpusSpec) -> None:
    """Refuse a corpus that cannot work before any output exists.

    Checks the options, that the source exists, and reads up to the first usable
    document (a wrong --text-field, a bad first row or an empty corpus fail here).
    """
    if spec.long_documents not in LONG_DOCUMENTS:
        raise InputError(f"--long-documents {spec.long_documents} is not one of {', '.join(LONG_DOCUMENTS)}")
    if spec.max_docs is not None and spec.max_docs < 1:
        raise InputError("--max-docs must be at least 1")
    next(iter_documents(replace(spec, max_docs=1)))


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


def tokenizer_identity(tokenizer) -> dict:
    """What decides how a tokenizer cuts text: its vocabulary (hashed), size and special prefix.

    `name_or_path` is recorded for people and not compared: two copies of one tokenizer
    cut text alike.
    """
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest,
        "special_prefix": special_prefix(tokenizer),
    }


def chunking_identity(tokenizer, max_length: int, long_documents: str) -> dict:
    """How documents became sequences: with chunk k of a document, a later stage must mean the same text."""
    return {"tokenizer": tokenizer_identity(tokenizer), "max_length": max_length, "long_documents": long_documents}


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


def chunk_document(
    tokenizer, doc: Document, max_length: int, prefix: list[int], long_documents: str = "chunk"
) -> list[Sequence]:
    """Cut a document into sequences of at most `max_length` tokens (prefix included).

    `long_documents="truncate"` keeps only the first sequence (models fine-tuned on
    truncated examples never saw the rest; DESIGN.md §2).
    """
    if long_documents not in LONG_DOCUMENTS:
        raise InputError(f"--long-documents {long_documents} is not one of {', '.join(LONG_DOCUMENTS)}")
    encoding = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], disjoint_offsets(encoding["offset_mapping"])
    room = max_length - len(prefix)
    if room < 1:
        raise InputError(f"--max-length {max_length} leaves no room after the tokenizer's special prefix")
    starts = range(0, len(ids), room)
    if long_documents == "truncate":
        starts = starts[:1]
    sequences = []
    for chunk, start in enumerate(starts):
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
    width = 0
    for index in order:
        if current and (len(current) + 1) * max(width, len(sequences[index])) > tokens_per_batch:
            batches.append(current)
            current, width = [], 0
        current.append(index)
        width = max(width, len(sequences[index]))
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
    texts: dict[int, str]
    documents: int = 0


def iter_sequence_parts(
    spec: CorpusSpec,
    tokenizer,
    max_length: int,
    docs_per_part: int,
    caps: SequenceCaps | None = None,
    stats: RowStats | None = None,
    wanted: Callable[[int, str], bool] | None = None,
    long_documents: str | None = None,
) -> Iterator[Part]:
    """The corpus as numbered parts of (global sequence index, sequence) pairs.

    Parts are fixed runs of `docs_per_part` documents, so a resumed run sees the
    same parts and indices as an uninterrupted one. Documents for which
    `wanted(doc_index, doc_id)` is false (candidates of other queries, documents of
    other processes) are never tokenized and do not count towards a part. `long_documents`
    (default: the spec's) chunks or truncates documents longer than `max_length`.
    """
    require_fast_tokenizer(tokenizer)
    long_documents = long_documents or spec.long_documents
    caps = caps or SequenceCaps()
    prefix = special_prefix(tokenizer)
    part = Part(0, [], {})
    sequence_index = tokens = 0
    for doc_index, doc in enumerate(iter_documents(spec, stats)):
        if wanted is not None and not wanted(doc_index, doc.doc_id):
            continue
        part.texts[doc_index] = doc.text
        part.documents += 1
        for sequence in chunk_document(tokenizer, doc, max_length, prefix, long_documents):
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
