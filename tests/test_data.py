"""Corpus readers, bad rows, chunking with offsets, queries and batching."""

from __future__ import annotations

import pytest

from attrib.data import (
    CorpusSpec, Document, Query, RowStats, chunk_document, collate, iter_documents, load_queries,
    pack_batches, query_sequence, special_prefix,
)
from attrib.errors import InputError
from tests.conftest import TEXTS, write_jsonl


def docs(source, **kwargs):
    return list(iter_documents(CorpusSpec(str(source), **kwargs)))


def test_formats_read_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"d{i}", "text": text} for i, text in enumerate(TEXTS[:5])]
    write_jsonl(tmp_path / "c.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    (tmp_path / "csv").mkdir()
    import csv

    with open(tmp_path / "csv" / "c.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "text"])
        writer.writeheader()
        writer.writerows(rows)
    expected = [(r["id"], r["text"]) for r in rows]
    for source in ("c.jsonl", "c.parquet", "csv/c.csv"):
        got = docs(tmp_path / source, id_field="id")
        assert [(d.doc_id, d.text) for d in got] == expected, source
    # the `id` field is used by default in every format; --id-field none numbers the rows; --max-docs stops early
    for source in ("c.jsonl", "c.parquet", "csv/c.csv"):
        assert [d.doc_id for d in docs(tmp_path / source)] == [r["id"] for r in rows], source
    assert [d.doc_id for d in docs(tmp_path / "c.jsonl", id_field="none", max_docs=3)] == ["0", "1", "2"]


def test_text_files_directories_and_globs(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first document\nstill first\n", encoding="utf-8")
    (folder / "b.txt").write_text("line one\n\nline two\n", encoding="utf-8")
    whole = docs(folder)
    assert [d.text for d in whole] == ["first document\nstill first\n", "line one\n\nline two\n"]
    assert whole[0].doc_id.endswith("a.txt")
    assert [d.text for d in docs(folder, lines=True)] == ["first document", "still first", "line one", "line two"]
    assert len(docs(str(folder / "*.txt"))) == 2


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"title": "x"}', "no field 'text'"),
        ('{"text": 5}', "not a string"),
        ('["a list"]', "not a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "good row"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message) as error:
        docs(path)
    assert f"{path}:2" in str(error.value) and "skip_bad_rows=" in str(error.value)
    stats = RowStats()
    assert [d.text for d in iter_documents(CorpusSpec(str(path), skip_bad_rows=True), stats)] == ["good row"]
    assert sum(stats.skipped.values()) == 1


def test_non_utf8_and_empty_inputs(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"c.jsonl:2: not UTF-8"):
        docs(path)
    text = tmp_path / "t.txt"
    text.write_bytes(b"fine\n\xff\xfe bad\n")
    with pytest.raises(InputError, match=r"t.txt:2: not UTF-8"):
        docs(text, lines=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputError, match="no usable document"):
        docs(empty)
    with pytest.raises(InputError, match="no such file"):
        docs(tmp_path / "missing.jsonl")


def test_chunks_cover_the_text_and_offsets_slice_back(tokenizer):
    text = " ".join(TEXTS)
    sequences = chunk_document(tokenizer, Document("d", text), max_length=16, prefix=[])
    assert all(len(s) <= 16 for s in sequences)
    assert [s.chunk for s in sequences] == list(range(len(sequences)))
    rebuilt = ""
    for seq in sequences:
        for token_id, (start, end) in zip(seq.input_ids, seq.offsets):
            piece = text[start:end]
            # a token that splits a multi-byte character decodes to U+FFFD and may get an empty span
            assert tokenizer.decode([token_id]) == piece or "\ufffd" in tokenizer.decode([token_id])
            rebuilt += piece
        assert seq.targets == seq.input_ids[1:] + [-1]
    assert rebuilt == text


def test_special_prefix_is_repeated_in_every_chunk(tokenizer):
    from transformers import PreTrainedTokenizerFast

    with_bos = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    from tokenizers import processors

    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    prefix = special_prefix(with_bos)
    assert prefix == [0]
    sequences = chunk_document(with_bos, Document("d", TEXTS[1]), 6, prefix)
    assert all(s.input_ids[0] == 0 and s.offsets[0] == (0, 0) for s in sequences)


def test_queries_and_completion_mask(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "q.jsonl", [{"id": "q1", "prompt": "The capital of Vorlia is", "completion": " Quendar."}])
    (query,) = load_queries(path)
    seq = query_sequence(tokenizer, query, 64, [])
    loss_tokens = [seq.input_ids[t + 1] for t, target in enumerate(seq.targets) if target >= 0]
    completion_text = "".join(tokenizer.decode([t]) for t in loss_tokens)
    assert completion_text == " Quendar."
    with pytest.raises(InputError, match="more than max_length=4"):
        query_sequence(tokenizer, query, 4, [])
    with pytest.raises(InputError, match="no context"):
        query_sequence(tokenizer, Query("q", "", "hello"), 64, [])


@pytest.mark.parametrize(
    "row, message",
    [
        ({"id": "q", "prompt": "p"}, "'completion' is missing"),
        ({"id": "q", "prompt": "p", "completion": ""}, "'completion' is empty"),
        ({"id": "q", "prompt": 3, "completion": "c"}, "'prompt' is not a string"),
    ],
)
def test_bad_queries(tmp_path, row, message):
    path = write_jsonl(tmp_path / "q.jsonl", [row])
    with pytest.raises(InputError, match=message):
        load_queries(path)


def test_duplicate_query_ids(tmp_path):
    row = {"id": "q", "prompt": "p", "completion": "c"}
    with pytest.raises(InputError, match="used twice"):
        load_queries(write_jsonl(tmp_path / "q.jsonl", [row, row]))


def test_packing_respects_token_budget(tokenizer):
    sequences = [chunk_document(tokenizer, Document(str(i), t), 64, [])[0] for i, t in enumerate(TEXTS[:5])]
    batches = pack_batches(sequences, tokens_per_batch=40)
    assert sorted(i for b in batches for i in b) == list(range(5))
    for batch in batches:
        assert len(batch) * max(len(sequences[i]) for i in batch) <= max(40, len(sequences[batch[0]]))
    ids, mask, targets = collate([sequences[i] for i in batches[0]], 0)
    assert ids.shape == mask.shape == targets.shape
    assert int(mask.sum()) == sum(len(sequences[i]) for i in batches[0])


def test_ids_are_decided_row_by_row_whatever_max_docs(tmp_path):
    """`id` is used where rows have it; a corpus that mixes rows with and without one is refused."""
    without = write_jsonl(tmp_path / "plain.jsonl", [{"text": t} for t in TEXTS[:3]])
    assert [d.doc_id for d in docs(without)] == ["0", "1", "2"]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"id": "a", "text": "one"}, {"id": "b", "text": "two"},
                                                   {"text": "three"}])
    assert [d.doc_id for d in docs(mixed, max_docs=2)] == ["a", "b"]  # the ids do not depend on --max-docs
    with pytest.raises(InputError, match=r"mixed.jsonl:3 has no 'id' field but .*mixed.jsonl:1 had one.*id_field='none'"):
        docs(mixed)
    late = write_jsonl(tmp_path / "late.jsonl", [{"text": "one"}, {"id": "b", "text": "two"}])
    with pytest.raises(InputError, match=r"late.jsonl:2 has an 'id' field.*id_field='none'"):
        docs(late)
    assert [d.doc_id for d in docs(mixed, id_field="none")] == ["0", "1", "2"]
    named = write_jsonl(tmp_path / "named.jsonl", [{"id": 1, "key": "k1", "text": "one"}])
    assert [d.doc_id for d in docs(named, id_field="key")] == ["k1"]


def test_empty_documents_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "kept"}, {"id": "b", "text": ""},
                                              {"id": "c", "text": " \n\t"}, {"id": "d", "text": "also kept"}])
    stats = RowStats()
    assert [d.doc_id for d in iter_documents(CorpusSpec(str(path)), stats)] == ["a", "d"]
    assert stats.empty == 2 and stats.skipped == {"empty text": 2} and stats.documents == 2
    only_empty = write_jsonl(tmp_path / "e.jsonl", [{"text": " "}])
    with pytest.raises(InputError, match=r"no usable document \(1 empty\)"):
        docs(only_empty)


@pytest.mark.parametrize("indent", [None, 2])
def test_json_array_files_are_read_as_arrays(tmp_path, indent, monkeypatch):
    import json

    import attrib.data.readers

    rows = [{"id": f"d{i}", "text": text} for i, text in enumerate(TEXTS[:5])] + [{"id": 7, "text": "x" * 5000}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps(rows, indent=indent, ensure_ascii=False), encoding="utf-8")
    monkeypatch.setattr(attrib.data.readers, "JSON_ARRAY_CHUNK", 7)  # elements and numbers straddle reads
    assert [(d.doc_id, d.text) for d in docs(path)] == [(str(r["id"]), r["text"]) for r in rows]
    assert [d.text for d in docs(path, skip_bad_rows=True)] == [r["text"] for r in rows]
    lines = tmp_path / "l.json"
    write_jsonl(lines, rows)  # JSON Lines in a .json file still work
    assert len(docs(lines)) == len(rows)
    (tmp_path / "empty.json").write_text("[ ]")
    with pytest.raises(InputError, match="no usable document"):
        docs(tmp_path / "empty.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[\n  {"text": "a"},\n  {"text": "b",}\n]', r"bad.json:3: array element 1: invalid JSON"),
        ('[{"text": "a"} {"text": "b"}]', r"bad.json:1: array element 0: expected ','"),
        ('[{"text": "a"},\n "just a string"]', r"bad.json:2: array element 1: row is not a JSON object"),
        ('[{"text": "a"}', r"array element 0: expected ',' or ']' after the element, found the end of the file"),
        ('[{"text": "a"}] {}', r"text after the end of the JSON array"),
        ('[{"text": "a"},', r"array element 1: the file ends inside the array"),
    ],
)
def test_bad_json_arrays_name_file_and_element(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        docs(path)


def test_long_documents_chunk_or_truncate(tokenizer):
    text = " ".join(TEXTS)
    chunked = chunk_document(tokenizer, Document("d", text), 16, [])
    truncated = chunk_document(tokenizer, Document("d", text), 16, [], long_documents="truncate")
    assert len(chunked) > 2 and len(truncated) == 1
    assert truncated[0].input_ids == chunked[0].input_ids and truncated[0].chunk == 0
    with pytest.raises(InputError, match="long_documents='drop'"):
        chunk_document(tokenizer, Document("d", text), 16, [], long_documents="drop")


def test_sequence_parts_follow_the_long_document_policy(tmp_path, tokenizer):
    from attrib.data import iter_sequence_parts

    path = write_jsonl(tmp_path / "c.jsonl", [{"id": "long", "text": " ".join(TEXTS)}, {"id": "short", "text": TEXTS[0]}])

    def chunks(**kwargs):
        parts = iter_sequence_parts(CorpusSpec(str(path), **kwargs), tokenizer, 16, 10)
        return [(seq.doc_id, seq.chunk) for part in parts for _, seq in part.sequences]

    assert chunks(long_documents="truncate") == [("long", 0), ("short", 0)]
    assert len(chunks()) > 3 and chunks()[:2] == [("long", 0), ("long", 1)]
