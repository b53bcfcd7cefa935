"""Shared fixtures: tiny Hugging Face models built from configs and a tokenizer trained here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEXTS = [
    "The capital of Vorlia is Quendar.",
    "Rivers run to the sea and the sea does not fill.",
    "A café in Zürich serves naïve crème brûlée — très bien!",
    "Numbers like 12345 and symbols like <, >, & appear in text.",
    "Influence functions ask which training documents changed the model.",
] * 4


def train_tokenizer(directory: Path, texts=TEXTS, vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on `texts`, saved to `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_config(arch: str, vocab_size: int, hidden: int = 16, layers: int = 2, context: int = 64):
    """Configs of the architectures attrib supports, small enough for dense oracles."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    special = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=2, n_positions=context,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special)
    if arch == "gpt_neox":
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=2, intermediate_size=2 * hidden,
                             max_position_embeddings=context, **special)
    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                           max_position_embeddings=context, **special)
    if arch == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=context, word_embed_proj_dim=hidden,
                         dropout=0.0, **special)
    raise ValueError(arch)


def build_model(directory: Path, arch: str, tokenizer, seed: int = 0, **config):
    """A random-init model of `arch` saved with its tokenizer; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), **config))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """Saved tiny models by architecture name."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(root / arch, arch, tokenizer) for arch in ("gpt2", "gpt_neox", "llama", "opt")}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def corpus_file(tmp_path):
    """A small corpus of documents of varied lengths."""
    rows = [{"id": f"doc{i}", "text": " ".join(TEXTS[i % 5 : i % 5 + 1 + i % 3])} for i in range(12)]
    return write_jsonl(tmp_path / "corpus.jsonl", rows)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the attrib CLI in-process; returns (exit code, stdout, stderr)."""
    from attrib.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
