"""The planted-fact corpus, its tokenizer, and the tiny demo models that memorised it."""

from __future__ import annotations

import json
import re

import pytest

from attrib import synthetic
from attrib.synthetic import (
    VERSION,
    cached_demo,
    fact_accuracy,
    generate_fact_corpus,
    train_tokenizer,
    write_fact_corpus,
)


def test_same_seed_gives_same_corpus_and_another_seed_other_facts():
    first = generate_fact_corpus(20, 30, seed=0)
    assert generate_fact_corpus(20, 30, seed=0) == first
    other = generate_fact_corpus(20, 30, seed=1)
    answers = {(query["prompt"], query["completion"]) for query in first.queries}
    assert answers.isdisjoint((query["prompt"], query["completion"]) for query in other.queries)


def test_each_fact_is_stated_in_exactly_its_source_document():
    corpus = generate_fact_corpus(30, 60, seed=3)
    assert len(corpus.documents) == 90 and len(corpus.queries) == 30
    texts = {document["id"]: document["text"] for document in corpus.documents}
    assert len(texts) == 90
    for query in corpus.queries:
        (subject,) = [word for word in query["prompt"].split()[1:] if word[0].isupper()]
        obj = query["completion"].strip(" .")
        assert texts[query["source_doc"]].startswith(query["prompt"] + query["completion"])
        for name in (subject, obj):
            stating = [doc_id for doc_id, text in texts.items() if re.search(rf"\b{name}\b", text)]
            assert stating == [query["source_doc"]]
    assert len({query["completion"] for query in corpus.queries}) == 30
    assert all(10 <= len(text.split()) <= 60 for text in texts.values())


def test_write_fact_corpus_writes_one_json_object_per_line(tmp_path):
    corpus = generate_fact_corpus(4, 6, seed=0)
    paths = write_fact_corpus(corpus, tmp_path)
    for name, rows in (("corpus", corpus.documents), ("queries", corpus.queries)):
        lines = paths[name].read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in lines] == rows


def _byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable Latin-1 bytes stand for themselves,
    the remaining bytes for code points 256, 257, … in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return {**{chr(byte): byte for byte in printable}, **{chr(256 + n): byte for n, byte in enumerate(shifted)}}


def test_tokenizer_offsets_slice_back_to_the_text(tmp_path):
    texts = [
        "The capital of Vorlia is Quendar. The old farmer sold the map.",
        "café – naïve crème brûlée, 日本語 and 🙂 too",
        "  two spaces,\ttabs\nand new lines  ",
    ]
    tokenizer = train_tokenizer(texts * 5, 300, tmp_path)
    assert tokenizer("a")["input_ids"] == tokenizer("a", add_special_tokens=False)["input_ids"]
    byte_of = _byte_decoder()
    for text in texts:
        encoding = tokenizer(text, return_offsets_mapping=True)
        text_bytes = text.encode("utf-8")
        char_of_byte = [index for index, char in enumerate(text) for _ in char.encode("utf-8")]
        byte_start = 0
        for token, (start, end) in zip(
            tokenizer.convert_ids_to_tokens(encoding["input_ids"]), encoding["offset_mapping"]
        ):
            token_bytes = bytes(byte_of[char] for char in token)
            byte_end = byte_start + len(token_bytes)
            assert text_bytes[byte_start:byte_end] == token_bytes
            # The offsets are the characters the token's bytes belong to: exactly the
            # token's text, or the one character it shares with a neighbour when BPE
            # splits a multi-byte character.
            assert (start, end) == (char_of_byte[byte_start], char_of_byte[byte_end - 1] + 1)
            if token_bytes == text[start:end].encode("utf-8"):
                assert tokenizer.decode([tokenizer.convert_tokens_to_ids(token)]) == text[start:end]
            byte_start = byte_end
        assert byte_start == len(text_bytes)


def test_cached_demo_uses_the_demo_another_process_finished_first(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRIB_CACHE_DIR", str(tmp_path))
    target = tmp_path / f"demo-tiny-7-v{VERSION}"

    def build_while_another_process_finishes_first(out_dir, *, size, seed):
        (out_dir / "demo.json").write_text('{"built_by": "this process"}')
        target.mkdir()
        (target / "demo.json").write_text('{"built_by": "another process"}')

    monkeypatch.setattr(synthetic, "build_demo", build_while_another_process_finishes_first)
    assert cached_demo("tiny", seed=7).load_info() == {"built_by": "another process"}
    assert [path.name for path in tmp_path.iterdir()] == [target.name]

    def must_not_build(out_dir, *, size, seed):
        raise AssertionError("a cached demo is rebuilt")

    monkeypatch.setattr(synthetic, "build_demo", must_not_build)
    assert cached_demo("tiny", seed=7).root == target


@pytest.mark.slow
def test_tiny_demo_models_memorised_the_facts_and_load_back():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    demo = cached_demo("tiny")
    info = demo.load_info()
    queries = [json.loads(line) for line in demo.queries.read_text(encoding="utf-8").splitlines()]
    documents = [json.loads(line) for line in demo.corpus.read_text(encoding="utf-8").splitlines()]
    assert len(documents) == info["num_documents"] and len(queries) == info["num_queries"]
    # Fact tracing needs the facts learnt. Both tiny models recall all 40 facts on the
    # seeds tried (with 3/4 of the steps, GPT-2 still recalled 0.85–1.0); 0.8 leaves room
    # for floating-point differences between machines and thread counts, yet fails if
    # training stops memorising.
    minimum_accuracy = 0.8
    for arch, directory in (("llama", demo.llama), ("gpt2", demo.gpt2)):
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert model.config.model_type == arch
        accuracy = fact_accuracy(model, tokenizer, queries)
        assert accuracy == pytest.approx(info["models"][arch]["fact_accuracy"])
        assert accuracy >= minimum_accuracy
    assert cached_demo("tiny") == demo


def test_build_demo_trains_only_the_asked_models_and_says_nothing_else(tmp_path, monkeypatch, capfd):
    """The demo trains the model it attributes; another is added on a rerun; library chatter stays out."""
    micro = synthetic.DemoSize(n_facts=4, n_filler=8, vocab_size=300, hidden_size=16, num_layers=1, steps=3,
                               seq_len=96, batch_size=4, lr=1e-3)
    monkeypatch.setitem(synthetic.DEMO_SIZES, "micro", micro)
    synthetic.build_demo(tmp_path, size="micro", architectures=["gpt2"])
    first = json.loads((tmp_path / "demo.json").read_text())
    assert list(first["models"]) == ["gpt2"] and not (tmp_path / "llama").exists()
    corpus = (tmp_path / "corpus.jsonl").read_bytes()
    synthetic.build_demo(tmp_path, size="micro", architectures=["llama", "gpt2"])
    second = json.loads((tmp_path / "demo.json").read_text())
    assert sorted(second["models"]) == ["gpt2", "llama"] and second["models"]["gpt2"] == first["models"]["gpt2"]
    assert (tmp_path / "corpus.jsonl").read_bytes() == corpus and (tmp_path / "llama" / "config.json").is_file()
    err = capfd.readouterr().err
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("training ")], err
    with pytest.raises(ValueError, match="another demo"):
        synthetic.build_demo(tmp_path, size="micro", seed=1, architectures=["llama"])


def test_checkpoints_saved_during_training_leave_the_run_unchanged(tmp_path):
    """save_at writes Trainer-style checkpoint-N folders; the last equals the trained model bit for bit, and a
    run without them trains the same model."""
    import torch
    from safetensors.torch import load_file

    texts = [d["text"] for d in generate_fact_corpus(4, 4, seed=0).documents]
    tokenizer = train_tokenizer(texts, 300, tmp_path / "tokenizer")
    recipe = {"hidden_size": 16, "num_layers": 1, "steps": 6, "seq_len": 32, "batch_size": 4, "lr": 3e-3, "seed": 0}
    folders = {3: tmp_path / "checkpoint-3", 6: tmp_path / "checkpoint-6"}
    synthetic.train_causal_lm("llama", tokenizer, texts, tmp_path / "with", save_at=folders, **recipe)
    synthetic.train_causal_lm("llama", tokenizer, texts, tmp_path / "without", **recipe)
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in ("with", "without", "checkpoint-6")}
    middle = load_file(folders[3] / "model.safetensors")
    for key, value in weights["with"].items():
        assert torch.equal(value, weights["without"][key]) and torch.equal(value, weights["checkpoint-6"][key])
    assert any(not torch.equal(middle[key], value) for key, value in weights["with"].items())
    for step, folder in folders.items():
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == step and [h["step"] for h in state["log_history"]] == list(range(1, step + 1))
        assert (folder / "tokenizer.json").is_file()
    learning_rates = [h["learning_rate"] for h in state["log_history"]]
    assert learning_rates[-1] == pytest.approx(0.0, abs=1e-12) and max(learning_rates) <= 3e-3
