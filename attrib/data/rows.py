"""Corpus rows: documents, how a corpus is read (CorpusSpec), and the checks of each row.

Document ids (`CorpusSpec.id_field`): None (the default) uses each row's `id` field
when it has one and the row number otherwise, decided row by row so that the ids do
not depend on `max_docs`; a corpus mixing rows with and without `id` is refused.
`"none"` always uses row numbers; any other name requires that field in every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attrib.errors import InputError
from attrib.runtime import flag

TEXT_SUFFIXES = {".txt", ".md", ".text"}
DEFAULT_ID_FIELD = "id"  # used when every row has it (id_field None)
ROW_NUMBERS = "none"  # --id-field none: ids are row numbers even when rows have an `id`
EMPTY_TEXT = "empty text"  # the RowStats.skipped key of empty or whitespace-only documents
JSON_ARRAY_CHUNK = 1 << 20
JSON_ARRAY_MAX_ELEMENT = 256 << 20  # an array element this large without a valid parse is reported malformed
JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
CORPUS_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | {".parquet", ".csv"}
MESSAGES_FIELD = "messages"  # a row holding a conversation instead of a text


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
    long_documents: str = "chunk"  # documents longer than max_length: "chunk" or "truncate" (docs/design.md §2)
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
    conversations: bool = False  # whether a conversation was rendered (then its template mattered)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def empty(self) -> int:
        return self.skipped.get(EMPTY_TEXT, 0)



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
        raise InputError(f"{where}: {reason} (fix the row or pass {flag('skip_bad_rows')})")

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
                    f"{where} is a conversation ('{MESSAGES_FIELD}') but {flag('chat_template', 'none')} refuses "
                    f"conversations; pass {flag('chat_template', 'auto')} (the tokenizer's template) or the path of a "
                    "template file"
                )
            text = conversation_contents(messages)
        elif spec.text_field not in row:
            fields = ", ".join(sorted(map(str, row))) or "none"
            self.bad(where, f"no field '{spec.text_field}' (fields: {fields}; choose one with {flag('text_field')})", "missing field")
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
            self.bad(where, f"no field '{spec.id_field}' (given by {flag('id_field')})", "missing id")
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
                f"give every row an id, or pass {flag('id_field', 'none')} to number the rows"
            )
        if not has_id and self.rows_with_id is not None:
            raise InputError(
                f"{where} has no '{DEFAULT_ID_FIELD}' field but {self.rows_with_id} had one; "
                f"give every row an id, or pass {flag('id_field', 'none')} to number the rows"
            )
        if has_id:
            self.rows_with_id = self.rows_with_id or where
            return str(row[DEFAULT_ID_FIELD])
        self.rows_without_id = self.rows_without_id or where
        return None


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
