"""Corpora, queries and their token sequences.

Corpora are streamed document by document (JSONL, a `.json` file holding JSON Lines
or one JSON array, Parquet, CSV, text, directories, globs or a `datasets` hub name).
Every token keeps its character offsets, so any score maps back to the text. Empty
or whitespace-only documents are skipped and counted; other bad rows are errors
naming file and line, or are skipped and counted with `skip_bad_rows`.

Conversations: a row with a `messages` field (a list of {"role", "content"}; the usual
supervised fine-tuning layout) and no text field is a conversation. `ChatFormat` renders
it with a chat template (`--chat-template`), and with `--loss-on assistant` only the
assistant turns carry loss (see README, "Chat data").

Document ids (`CorpusSpec.id_field`): None (the default) uses each row's `id` field
when it has one and the row number otherwise, decided row by row so that the ids do
not depend on `max_docs`; a corpus mixing rows with and without `id` is refused.
`"none"` always uses row numbers; any other name requires that field in every row.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import re
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
MESSAGES_FIELD = "messages"  # a row holding a conversation instead of a text
CHAT_TEMPLATES = ("auto", "none")  # --chat-template: these, or the path of a Jinja template file
LOSS_ON = ("all", "assistant")  # --loss-on: which tokens of a corpus sequence carry loss
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # templates that mark assistant text themselves


@dataclass
class Document:
    """A corpus document. A conversation keeps its `messages`; until `ChatFormat.prepare` renders
    it, `text` is its contents alone. `assistant_spans` (character spans of the rendered text)
    are set with --loss-on assistant: only tokens overlapping them carry loss."""

    doc_id: str
    text: str
    messages: list | None = None
    assistant_spans: list[tuple[int, int]] | None = None


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
    chat_template: str = "auto"  # how conversations are rendered: "auto", "none" or a template file
    loss_on: str = "all"  # "all" tokens of a sequence carry loss, or only "assistant" tokens of conversations


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
        messages = None
        if spec.text_field == MESSAGES_FIELD or (spec.text_field not in row and MESSAGES_FIELD in row):
            messages = row.get(MESSAGES_FIELD)
            problem = messages_problem(messages)
            if problem is not None:
                self.bad(where, problem, "bad messages")
                return None
            if spec.chat_template == "none":
                raise InputError(
                    f"{where} is a conversation ('{MESSAGES_FIELD}') but --chat-template is none; pass --chat-template "
                    "auto (the tokenizer's template) or the path of a template file"
                )
            text = conversation_contents(messages)
        elif spec.text_field not in row:
            fields = ", ".join(sorted(map(str, row))) or "none"
            self.bad(where, f"no field '{spec.text_field}' (fields: {fields}; choose one with --text-field)", "missing field")
            return None
        else:
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
        return Document(doc_id, text, messages)  # type: ignore[arg-type]

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
    text_field = checker.spec.text_field
    if text_field not in names and MESSAGES_FIELD in names:
        text_field = MESSAGES_FIELD  # conversations
    if text_field not in names:
        raise InputError(
            f"{path} has no column '{checker.spec.text_field}' (columns: {', '.join(names)}); choose one with --text-field"
        )
    id_field = checker.spec.id_field
    if id_field is None:
        id_field = DEFAULT_ID_FIELD
    elif id_field != ROW_NUMBERS and id_field not in names:
        raise InputError(f"{path} has no column '{id_field}' (given by --id-field; columns: {', '.join(names)})")
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
    check_chat_options(spec.chat_template, spec.loss_on)
    next(iter_documents(replace(spec, max_docs=1)))


# --- conversations -------------------------------------------------------------


def messages_problem(messages) -> str | None:
    """Why `messages` is not a conversation attrib can render, or None."""
    if not isinstance(messages, list) or not messages:
        return f"field '{MESSAGES_FIELD}' is not a non-empty list of messages"
    for number, item in enumerate(messages):
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            return f"message {number} of '{MESSAGES_FIELD}' is not an object with a string 'role'"
        if not isinstance(item.get("content"), str):
            return f"message {number} of '{MESSAGES_FIELD}' has no string 'content'"
    return None


def conversation_contents(messages: list[dict]) -> str:
    """A conversation's contents alone, one message per paragraph: the text of a conversation
    that is not rendered (the prefilter without --model searches it)."""
    return "\n\n".join(item["content"] for item in messages)


def check_chat_options(chat_template: str, loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise InputError(f"--loss-on {loss_on} is not one of {', '.join(LOSS_ON)}")
    if chat_template not in CHAT_TEMPLATES and not Path(chat_template).expanduser().is_file():
        raise InputError(f"--chat-template {chat_template}: not auto, none or a template file")


@dataclass
class ChatFormat:
    """How conversations become text and loss masks: a Jinja chat template and the tokenizer
    whose special tokens it uses.

    `template` None: conversations are refused with `missing` as the reason. `tokenizer` None
    (the prefilter without --model): conversations are read as their contents alone.
    """

    option: str  # --chat-template as given: auto, none or a file
    template: str | None
    tokenizer: object = None
    missing: str = ""

    def identity(self) -> dict:
        """What a manifest records: the option and a hash of the template it resolved to."""
        digest = hashlib.sha256(self.template.encode()).hexdigest() if self.template is not None else None
        return {"chat_template": self.option, "template_sha256": digest}

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.tokenizer is None:
            return conversation_contents(messages) + ("\n\n" if add_generation_prompt else "")
        if self.template is None:
            raise InputError(self.missing)
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # jinja raises TemplateError subclasses, templates raise their own
            raise InputError(f"the chat template ({self.option}) failed on a conversation: {exc}") from exc

    def prepare(self, doc: Document, loss_on: str = "all") -> Document:
        """The document as the model sees it: a conversation rendered (with its assistant spans
        under --loss-on assistant); a text unchanged."""
        if doc.messages is None:
            if loss_on == "assistant":
                raise InputError(
                    f"document {doc.doc_id} is plain text, but --loss-on assistant needs conversations "
                    f"('{MESSAGES_FIELD}'); use --loss-on all"
                )
            return doc
        text = self.render(doc.messages)
        spans = self.assistant_spans(doc.messages, text, doc.doc_id) if loss_on == "assistant" else None
        return Document(doc.doc_id, text, doc.messages, spans)

    def assistant_spans(self, messages: list[dict], text: str, doc_id: str) -> list[tuple[int, int]]:
        """Character spans of `text` (the rendered conversation) written by the assistant.

        A template with `{% generation %}` blocks marks them itself: the tokens of
        `apply_chat_template(..., return_assistant_tokens_mask=True)`, as spans. Otherwise each
        assistant turn i spans from the end of messages[:i] rendered with the generation prompt
        to the end of messages[:i+1] rendered: its content and what the template writes up to
        the next message (its end-of-turn marker, typically).
        """
        if self.tokenizer is None or self.template is None:
            return []
        if GENERATION_BLOCK.search(self.template):
            marked = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=True,
                                                        return_dict=True, return_assistant_tokens_mask=True)
            encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            spans: list[tuple[int, int]] = []
            for flag, (start, end) in zip(marked["assistant_masks"], encoding["offset_mapping"]):
                if not flag:
                    continue
                if spans and start <= spans[-1][1]:
                    spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
                else:
                    spans.append((start, end))
            return spans
        spans = []
        for index, item in enumerate(messages):
            if item["role"] != "assistant":
                continue
            before = self.render(messages[:index], add_generation_prompt=True) if index else ""
            through = self.render(messages[: index + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise InputError(
                    f"document {doc_id}: the chat template ({self.option}) does not render this conversation turn "
                    "by turn, so its assistant turns cannot be found; mark them with {% generation %} in the template"
                )
            spans.append((len(before), len(through)))
        return spans

    def query_texts(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt, completion) of a chat query: the conversation before its last (assistant) turn
        rendered with the generation prompt, and what the whole conversation adds to it."""
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        full = self.render(messages)
        if not full.startswith(prompt):
            raise InputError(
                f"the chat template ({self.option}) renders the conversation without its last turn and the "
                "generation prompt as something other than the start of the whole conversation"
            )
        return prompt, full[len(prompt):]


def chat_format(tokenizer, option: str = "auto") -> ChatFormat:
    """The ChatFormat of --chat-template `option` for `tokenizer` (None: contents alone)."""
    check_chat_options(option, "all")
    if option == "none":
        return ChatFormat(option, None, tokenizer, "conversations ('messages') need a chat template, but "
                          "--chat-template is none; pass --chat-template auto or the path of a template file")
    if option != "auto":
        try:
            template = Path(option).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--chat-template {option} cannot be read: {exc}") from exc
        return ChatFormat(option, template, tokenizer)
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default")
    return ChatFormat(option, template, tokenizer, "the model's tokenizer has no chat template, so its "
                      "conversations ('messages') cannot be rendered; pass --chat-template with a template file")


def check_chat_agrees(recorded: dict | None, current: dict, source: str) -> None:
    """Refuse an input whose conversations were rendered with another template, or whose loss
    was taken over other tokens (--loss-on); `recorded` None (an older manifest) is not compared."""
    if not recorded:
        return
    if "loss_on" in recorded and "loss_on" in current and recorded["loss_on"] != current["loss_on"]:
        raise InputError(
            f"{source} was computed with --loss-on {recorded['loss_on']}, this run has --loss-on {current['loss_on']}; "
            f"the fit and the scores must take the loss over the same tokens: pass --loss-on {recorded['loss_on']} "
            "or recompute it"
        )
    if recorded.get("template_sha256") != current.get("template_sha256"):
        def named(identity: dict) -> str:
            digest = identity.get("template_sha256")
            return f"{identity.get('chat_template')} ({'sha256 ' + digest[:12] if digest else 'no template'})"

        raise InputError(
            f"{source} rendered conversations with chat template {named(recorded)}, this run with {named(current)}; "
            "pass the same --chat-template or recompute it"
        )


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


def chunking_identity(tokenizer, max_length: int, long_documents: str, chat_template: str = "auto") -> dict:
    """How documents became sequences: with chunk k of a document, a later stage must mean the same text."""
    return {"tokenizer": tokenizer_identity(tokenizer), "max_length": max_length, "long_documents": long_documents,
            "chat": chat_format(tokenizer, chat_template).identity()}


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

    A text whose own tokens start with the prefix (a rendered template's BOS) does not get it
    twice, and a conversation gets it only where its template writes it: its tokens are the
    template's. With `doc.assistant_spans`, only tokens overlapping them are predicted, and a
    sequence that predicts nothing is left out. `long_documents="truncate"` keeps only the
    first sequence (models fine-tuned on truncated examples never saw the rest; DESIGN.md §2).
    """
    if long_documents not in LONG_DOCUMENTS:
        raise InputError(f"--long-documents {long_documents} is not one of {', '.join(LONG_DOCUMENTS)}")
    encoding = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, raw_offsets = list(encoding["input_ids"]), list(encoding["offset_mapping"])
    offsets = disjoint_offsets(raw_offsets)
    predicted = None if doc.assistant_spans is None else overlaps(raw_offsets, doc.assistant_spans)
    own_prefix = bool(prefix) and ids[: len(prefix)] == prefix
    lead = [(0, 0)] * len(prefix)
    if own_prefix:  # kept once per chunk, with its text in the first
        lead, ids, offsets = offsets[: len(prefix)], ids[len(prefix):], offsets[len(prefix):]
        if predicted is not None:
            predicted = predicted[len(prefix):]
    elif doc.messages is not None:
        prefix, lead = [], []
    room = max_length - len(prefix)
    if room < 1:
        raise InputError(f"--max-length {max_length} leaves no room after the tokenizer's special prefix")
    starts = range(0, len(ids), room)
    if long_documents == "truncate":
        starts = starts[:1]
    sequences = []
    for chunk, start in enumerate(starts):
        chunk_ids = prefix + ids[start : start + room]
        chunk_offsets = (lead if chunk == 0 else [(0, 0)] * len(prefix)) + offsets[start : start + room]
        if len(chunk_ids) < 2:
            continue  # a single token predicts nothing
        targets = next_token_targets(chunk_ids)
        if predicted is not None:
            flags = [False] * len(prefix) + predicted[start : start + room]
            targets = [t if flags[p + 1] else -1 for p, t in enumerate(targets[:-1])] + [-1]
            if all(t < 0 for t in targets):
                continue  # no assistant token in this chunk: nothing to learn from
        sequences.append(Sequence(doc.doc_id, chunk, chunk_ids, chunk_offsets, targets))
    return sequences


def overlaps(offsets, spans: list[tuple[int, int]]) -> list[bool]:
    """Per token, whether its character span overlaps one of `spans` (both in order); the rule
    of transformers' assistant mask, so a token cut by a span's edge counts as inside."""
    flags, index = [], 0
    for start, end in offsets:
        while index < len(spans) and start >= spans[index][1]:
            index += 1
        flags.append(index < len(spans) and end > spans[index][0])
    return flags


_SAID: set[str] = set()


def say_once(key: str, text: str) -> None:
    """A warning line (attrib.progress.message) the first time `key` comes up in this process."""
    from attrib.progress import message

    if key not in _SAID:
        _SAID.add(key)
        message(f"warning: {text}")


# --- queries -----------------------------------------------------------------


@dataclass
class Query:
    """A query; a chat query keeps its `messages`, and `prompt`/`completion` are their rendering."""

    query_id: str
    prompt: str
    completion: str
    messages: list | None = None

    def as_row(self) -> dict:
        """The query as a JSONL row (a chat query's row also holds the rendered prompt and completion)."""
        row: dict = {"id": self.query_id, "prompt": self.prompt, "completion": self.completion}
        if self.messages is not None:
            row[MESSAGES_FIELD] = self.messages
        return row


def load_queries(path: str | Path, skip_bad_rows: bool = False, chat: ChatFormat | None = None) -> list[Query]:
    """Queries from JSONL `{"id", "prompt", "completion"}` or `{"id", "messages"}`; ids must be unique.

    A chat query's last message is the assistant turn attributed; `chat` renders the rest as
    the prompt (ChatFormat.query_texts). A row with `messages` is a chat query even when it
    also holds `prompt` and `completion` (as the rows a stage writes back do).
    """
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
        messages = row.get(MESSAGES_FIELD)
        fields = ("id",) if messages is not None else ("id", "prompt", "completion")
        problem = next(
            (
                f"field '{name}' is missing" if name not in row else f"field '{name}' is not a string"
                for name in fields
                if not isinstance(row.get(name), str) and not (name == "id" and isinstance(row.get(name), int))
            ),
            None,
        )
        if problem is None and messages is not None:
            problem = messages_problem(messages)
            if problem is None and (len(messages) < 2 or messages[-1]["role"] != "assistant"):
                problem = "a chat query's last message must be the assistant turn to attribute, after at least one other"
        if problem is None and messages is None and not row["completion"].strip():
            problem = "field 'completion' is empty; a query needs a completion to attribute"
        if problem is None and str(row["id"]) in seen:
            problem = f"query id {row['id']!r} is used twice"
        if problem is not None:
            checker.bad(where, problem, "bad query")
            continue
        seen.add(str(row["id"]))
        if messages is None:
            queries.append(Query(str(row["id"]), row["prompt"], row["completion"]))
            continue
        if chat is None:
            raise InputError(f"{where}: a chat query ('{MESSAGES_FIELD}') needs the model's tokenizer to be rendered")
        try:
            prompt, completion = chat.query_texts(messages)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        queries.append(Query(str(row["id"]), prompt, completion, messages))
    if not queries:
        raise InputError(f"--queries {path} holds no query")
    return queries


def query_sequence(tokenizer, query: Query, max_length: int, prefix: list[int]) -> Sequence:
    """Prompt + completion tokens; only completion tokens carry loss (DESIGN.md §2).

    The prefix is not added to a prompt whose tokens already start with it (a pre-rendered
    template: said once), nor to a chat query (its tokens are its template's). A completion
    starting inside a token is said (per query): that token is scored as a completion token,
    the token the model would emit.
    """
    text = query.prompt + query.completion
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if prefix and ids[: len(prefix)] == prefix:
        if query.messages is None:
            say_once("prefix", f"query {query.query_id}: the prompt already starts with the tokenizer's special prefix "
                     f"{tokenizer.convert_ids_to_tokens(prefix)} (a rendered template?); it is not added again "
                     "(nor to other queries that start with it)")
        prefix = []
    elif query.messages is not None:
        prefix = []
    ids = prefix + ids
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
    start, end = offsets[first_completion] if first_completion < len(ids) else (boundary, boundary)
    if start < boundary:
        say_once(f"boundary {query.query_id}", (
            f"query {query.query_id}: the completion starts inside the token {text[start:end]!r} (character "
            f"{boundary - start} of it); the whole token is scored as completion. To split there, end the prompt "
            "before the token (e.g. move a trailing space into the completion)"))
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
    other processes) are never tokenized and do not count towards a part. Conversations are
    rendered with `spec.chat_template`, their loss taken as `spec.loss_on` says. `long_documents`
    (default: the spec's) chunks or truncates documents longer than `max_length`.
    """
    require_fast_tokenizer(tokenizer)
    long_documents = long_documents or spec.long_documents
    caps = caps or SequenceCaps()
    prefix = special_prefix(tokenizer)
    chat = chat_format(tokenizer, spec.chat_template)
    part = Part(0, [], {})
    sequence_index = tokens = 0
    for doc_index, doc in enumerate(iter_documents(spec, stats)):
        if wanted is not None and not wanted(doc_index, doc.doc_id):
            continue
        doc = chat.prepare(doc, spec.loss_on)
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
