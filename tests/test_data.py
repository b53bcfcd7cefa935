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
    # default ids are row indices; --max-docs stops early
    assert [d.doc_id for d in docs(tmp_path / "c.jsonl", max_docs=3)] == ["0", "1", "2"]


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
        ('{"text": "   "}', "is empty"),
        ('["a list"]', "not a JSON object"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "good row"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message) as error:
        docs(path)
    assert f"{path}:2" in str(error.value) and "--skip-bad-rows" in str(error.value)
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
    with pytest.raises(InputError, match="more than --max-length"):
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
