"""Run one fit-factors step in a fresh process and print its peak RSS beside attrib.memory's
prediction (used by tests/test_memory.py). The peak is VmHWM, this address space's own high-water mark:
ru_maxrss would also count the parent's RSS, which Linux carries into a child across fork and exec.

    python -m tests.memory_probe MODEL_DIR CORPUS OUT STEP LAYERS_PER_PASS TOKENS_PER_BATCH
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path


def main(model_dir: str, corpus: str, out: str, step: str, layers_per_pass: str, tokens_per_batch: str) -> None:
    import torch

    from attrib import memory
    from attrib.data import CorpusSpec
    from attrib.distributed import World
    from attrib.stages.fit import FitSettings, _PassRunner, correction_step, covariance_step
    from attrib.strategies import STRATEGY
    from attrib.memory import layer_groups
    from attrib.models import find_tracked_layers, load_model, model_record, shared_activation_sources
    from attrib.storage import StageDir

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
