"""Queries: `{"id", "prompt", "completion"}` or `{"id", "messages"}` rows, each cut into one sequence
whose completion tokens alone carry loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attrib.data.chat import ChatFormat
from attrib.data.readers import _json_rows
from attrib.data.rows import MESSAGES_FIELD, CorpusSpec, RowStats, _RowChecker, messages_problem
from attrib.data.sequences import Sequence, disjoint_offsets, next_token_targets
from attrib.errors import InputError
from attrib.runtime import flag, warn_once


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
        raise InputError(f"{flag('queries', path)}: no such file")
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
        raise InputError(f"{flag('queries', path)} holds no query")
    return queries


def query_sequence(tokenizer, query: Query, max_length: int, prefix: list[int]) -> Sequence:
    """Prompt + completion tokens; only completion tokens carry loss (docs/design.md §2).

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
            warn_once("prefix", f"query {query.query_id}: the prompt already starts with the tokenizer's special prefix "
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
            f"query {query.query_id} has {len(ids)} tokens, more than {flag('max_length', max_length)}; shorten it"
        )
    start, end = offsets[first_completion] if first_completion < len(ids) else (boundary, boundary)
    if start < boundary:
        warn_once(f"boundary {query.query_id}", (
            f"query {query.query_id}: the completion starts inside the token {text[start:end]!r} (character "
            f"{boundary - start} of it); the whole token is scored as completion. To split there, end the prompt "
            "before the token (e.g. move a trailing space into the completion)"))
    targets = next_token_targets(ids, loss_from=first_completion)
    return Sequence(query.query_id, 0, ids, offsets, targets)
