"""Token sequences: documents cut into chunks that keep every token's character offsets (so any score
maps back to the text), packed into batches, and read in parts (the resume granularity).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from attrib.data.chat import chat_format
from attrib.data.readers import iter_documents
from attrib.data.rows import CorpusSpec, Document, RowStats
from attrib.errors import InputError
from attrib.options import LONG_DOCUMENTS
from attrib.runtime import flag


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

    Not where it was loaded from: two copies of one tokenizer cut text alike, and a moved model
    directory must not stop a resume (manifests compare this dict whole).
    """
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {
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
    first sequence (models fine-tuned on truncated examples never saw the rest; docs/design.md §2).
    """
    if long_documents not in LONG_DOCUMENTS:
        raise InputError(f"{flag('long_documents', long_documents)} is not one of {', '.join(LONG_DOCUMENTS)}")
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
        raise InputError(f"{flag('max_length', max_length)} leaves no room after the tokenizer's special prefix")
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
        if stats is not None and doc.messages is not None:
            stats.conversations = True
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
