"""Corpus files read as a stream of documents: JSONL, a `.json` file holding JSON Lines or one JSON
array, Parquet, CSV, text, directories, globs or a `datasets` hub name. Bad rows are errors naming
file and line, or are skipped and counted with `skip_bad_rows`; empty documents are skipped and counted.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from attrib.data.rows import (
    CORPUS_SUFFIXES,
    DEFAULT_ID_FIELD,
    JSON_SUFFIXES,
    MESSAGES_FIELD,
    ROW_NUMBERS,
    CorpusSpec,
    Document,
    RowStats,
    _RowChecker,
)
from attrib.errors import InputError
from attrib.options import CorpusOptions
from attrib.runtime import flag

JSON_ARRAY_CHUNK = 1 << 20
JSON_ARRAY_MAX_ELEMENT = 256 << 20  # an array element this large without a valid parse is reported malformed


def corpus_files(source: str) -> list[Path] | None:
    """The local files a corpus source names, or None when it is no local path or glob."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES)
        if not files:
            raise InputError(
                f"{flag('corpus', source)} holds no {', '.join(sorted(CORPUS_SUFFIXES))} files"
            )
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file())
        if not files:
            raise InputError(f"{flag('corpus', source)} matches no file")
        return files
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
    text_field = checker.spec.text_field
    if text_field not in names and MESSAGES_FIELD in names:
        text_field = MESSAGES_FIELD  # conversations
    if text_field not in names:
        raise InputError(
            f"{path} has no column '{checker.spec.text_field}' (columns: {', '.join(names)}); choose one with {flag('text_field')}"
        )
    id_field = checker.spec.id_field
    if id_field is None:
        id_field = DEFAULT_ID_FIELD
    elif id_field != ROW_NUMBERS and id_field not in names:
        raise InputError(f"{path} has no column '{id_field}' (given by {flag('id_field')}; columns: {', '.join(names)})")
    columns = [text_field] + ([id_field] if id_field in names and id_field != text_field else [])
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
        raise InputError(f"{flag('corpus', source)} is empty") from exc
    except Exception as exc:  # datasets wraps reader errors in many types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{flag('corpus', source)} could not be read through datasets: {message}") from exc


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
        raise InputError(f"{flag('corpus', spec.source)}: no such file or directory")

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
        raise InputError(f"{flag('corpus', spec.source)} holds no usable document{empty}")


def check_corpus(spec: CorpusSpec) -> None:
    """Refuse a corpus that cannot work before any output exists.

    Checks the options, that the source exists, and reads up to the first usable
    document (a wrong --text-field, a bad first row or an empty corpus fail here).
    """
    CorpusOptions.checked(**{key: value for key, value in asdict(spec).items() if key != "source"})
    next(iter_documents(replace(spec, max_docs=1)))
