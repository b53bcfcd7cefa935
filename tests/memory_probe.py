"""Run one fit-factors step in a fresh process and print its peak RSS beside attrib.memory's
prediction (used by tests/test_memory.py). The peak is VmHWM, this address space's own high-water mark:
ru_maxrss would also count the parent's RSS, which Linux carries into a child across fork and exec.

    python -m tests.memory_probe MODEL_DIR CORPUS OUT STEP LAYERS_PER_PASS TOKENS_PER_BATCH

Also what the memory tests share: `attrib ARGS` run so that it prints its own peak (PEAK_RSS_CODE), a
saved random-init Llama, and the queries and corpus of its runs.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

# `python -c PEAK_RSS_CODE ARGS`: the attrib command line, then this process's VmHWM in kB on the last line
PEAK_RSS_CODE = ("import re, sys\nfrom attrib.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
                 "    assert not e.code, e.code\n"
                 "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1))")


def saved_llama(root: Path, tokenizer, *, hidden: int, intermediate: int, blocks: int, heads: int, context: int):
    """A random-init Llama (seed 0) saved with the tokenizer in root/model; (model, config, tracked layers)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from attrib.models import find_tracked_layers

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=context, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return model, config, find_tracked_layers(model)


def write_query_inputs(root: Path, queries: int) -> None:
    """root/queries.jsonl (`queries` short queries) and root/corpus.jsonl (8 documents) from the test texts."""
    from tests.conftest import TEXTS, write_jsonl

    write_jsonl(root / "queries.jsonl", [{"id": f"q{i}", "prompt": TEXTS[i % 5][:15], "completion": TEXTS[i % 5][15:30]}
                                         for i in range(queries)])
    write_jsonl(root / "corpus.jsonl", [{"text": " ".join(TEXTS[i % 5 : i % 5 + 2])} for i in range(8)])


def main(model_dir: str, corpus: str, out: str, step: str, layers_per_pass: str, tokens_per_batch: str) -> None:
    import torch

    from attrib import memory
    from attrib.data import CorpusSpec
    from attrib.distributed import World
    from attrib.memory import layer_groups
    from attrib.models import find_tracked_layers, load_model, model_record, shared_activation_sources
    from attrib.stages.fit import FitSettings, _PassRunner, correction_step, covariance_step
    from attrib.storage import StageDir
    from attrib.strategies import STRATEGY

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_dir, "float32", "cpu")
    layers = find_tracked_layers(model)
    lpp = None if layers_per_pass == "all" else int(layers_per_pass)
    strategy = "ekfac" if step == "covariance" else "diagonal"
    settings = FitSettings(strategy=strategy, max_length=int(tokens_per_batch), tokens_per_batch=int(tokens_per_batch),
                           layers_per_pass=lpp)
    stage = StageDir(out, "fit-factors", asdict(settings), model_record(model_dir, model, layers), overwrite=True)
    runner = _PassRunner(stage, model, tokenizer, CorpusSpec(corpus), settings, World(), checkpoint_every=1e9)
    groups = layer_groups(len(layers), lpp)
    if step == "covariance":  # gate and up share A when in one group, as in fit_factors
        covariance_step(runner, layers, groups, shared_activation_sources(layers, groups))
    else:  # a whole diagonal fit: the correction pass without eigenbases
        correction_step(runner, layers, groups, {}, STRATEGY["diagonal"], None)
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    predicted = memory.fit_factors(
        memory.model_shape(model), memory.layer_shapes(layers), tokens_per_batch=int(tokens_per_batch),
        dtype="float32", device="cpu", layers_per_pass=lpp, strategy=strategy,
    )
    step_host = memory.step_device_bytes(predicted.steps[step]) + memory.PROCESS_HOST["cpu"]
    print("RESULT " + json.dumps({"peak_rss": peak, "predicted_host": step_host, "terms": predicted.steps[step]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
