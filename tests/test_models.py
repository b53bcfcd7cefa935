"""Model loading, MLP discovery per architecture, fingerprints and factor memory."""

from __future__ import annotations

import pytest
import torch

from attrib.errors import InputError
from attrib.models import factor_bytes, find_tracked_layers, fingerprint, load_model
from tests.conftest import build_model, run_cli

EXPECTED = {
    "gpt2": ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"],
    "gpt_neox": ["gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"],
    "llama": ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"],
    "opt": ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"],
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_discovers_mlp_layers_with_shapes(model_dirs, arch):
    model, _ = load_model(str(model_dirs[arch]), "float32", "cpu")
    assert not model.training
    layers = find_tracked_layers(model)
    names = [layer.name for layer in layers]
    assert names[: len(EXPECTED[arch])] == EXPECTED[arch]
    assert len(names) == 2 * len(EXPECTED[arch])  # two blocks
    for layer in layers:
        # the folded weight matrix is [d_out, d_in(+1)] and maps inputs like the module does
        x = torch.randn(3, layer.d_in)
        folded = torch.cat([x, torch.ones(3, 1)], 1) if layer.has_bias else x
        assert torch.allclose(folded @ layer.weight_matrix().T, layer.module(x), atol=1e-6)
    assert layers[0].transposed == (arch == "gpt2")


def test_modules_regex_override_and_errors(model_dirs):
    model, _ = load_model(str(model_dirs["llama"]), "float32", "cpu")
    assert [l.name for l in find_tracked_layers(model, r"layers\.1\.mlp\.down_proj$")] == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(InputError, match="matches no"):
        find_tracked_layers(model, "nothing_like_this")
    with pytest.raises(InputError, match="not a valid regular expression"):
        find_tracked_layers(model, "(")
    known = [layer.name for layer in find_tracked_layers(model)]
    model.config.model_type = "mystery"  # unknown: the Linear children of modules named mlp
    assert [layer.name for layer in find_tracked_layers(model)] == known
    opt, _ = load_model(str(model_dirs["opt"]), "float32", "cpu")
    opt.config.model_type = "mystery"  # OPT has no module named mlp
    with pytest.raises(InputError, match="--modules"):
        find_tracked_layers(opt)


def test_unknown_model_types_say_the_fallback_was_used(model_dirs, capsys):
    model, _ = load_model(str(model_dirs["gpt_neox"]), "float32", "cpu")
    model.config.model_type = "mystery"
    assert [layer.name for layer in find_tracked_layers(model)][:2] == EXPECTED["gpt_neox"]
    assert "structural fallback" in capsys.readouterr().err


TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
FAMILIES = {
    "falcon": ({"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2},
               ["transformer.h.0.mlp.dense_h_to_4h", "transformer.h.0.mlp.dense_4h_to_h"]),
    "bloom": ({"vocab_size": 64, "hidden_size": 16, "n_layer": 2, "n_head": 2},
              ["transformer.h.0.mlp.dense_h_to_4h", "transformer.h.0.mlp.dense_4h_to_h"]),
    "gpt_bigcode": ({"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2},
                    ["transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]),
    "starcoder2": ({**TINY, "num_key_value_heads": 2}, ["model.layers.0.mlp.c_fc", "model.layers.0.mlp.c_proj"]),
    **{
        family: ({**TINY, "num_key_value_heads": 2},
                 ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"])
        for family in ("stablelm", "granite", "cohere")
    },
}


def tiny_family_model(family: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **config)).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_discovers_mlp_layers_of_more_families(family):
    """The MLP projections of each family, two blocks, each a Linear the capture can fold."""
    config, expected = FAMILIES[family]
    model = tiny_family_model(family, **config)
    layers = find_tracked_layers(model)
    assert [layer.name for layer in layers] == expected + [name.replace(".0.", ".1.") for name in expected]
    for layer in layers:
        x = torch.randn(3, layer.d_in)
        folded = torch.cat([x, torch.ones(3, 1)], 1) if layer.has_bias else x
        assert torch.allclose(folded @ layer.weight_matrix().T, layer.module(x), atol=1e-6)


@pytest.mark.parametrize("family, extra", [
    ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    ("qwen2_moe", {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 8,
                   "shared_expert_intermediate_size": 8}),
])
def test_mixture_of_experts_is_refused_unless_experts_are_left_out(family, extra):
    model = tiny_family_model(family, **TINY, num_key_value_heads=2, **extra)
    with pytest.raises(InputError, match="mixture-of-experts model.*modules=") as error:
        find_tracked_layers(model)
    assert "\n" not in str(error.value)
    names = [layer.name for layer in find_tracked_layers(model, r"self_attn\.o_proj$")]
    assert names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def capture_forward(model, layers, batch=2, seq=5):
    from attrib.capture import Capture

    input_ids = torch.randint(1, 60, (batch, seq))
    mask = torch.ones_like(input_ids)
    Capture(model, layers, lambda i, a: None, lambda i, kept, g: None).run(input_ids, mask, lambda logits: [logits.sum()])


def test_capture_refuses_modules_of_the_wrong_shape_or_called_twice():
    """A shared expert sees [tokens, d]; a block used twice calls its MLP twice per forward."""
    moe = tiny_family_model("qwen2_moe", **TINY, num_key_value_heads=2, num_experts=2, num_experts_per_tok=1,
                            moe_intermediate_size=8, shared_expert_intermediate_size=8)
    layers = find_tracked_layers(moe, r"shared_expert\.down_proj$")
    with pytest.raises(InputError, match=r"module model.layers.0.mlp.shared_expert.down_proj sees inputs of shape \[10, 8\]"):
        capture_forward(moe, layers)
    llama = tiny_family_model("llama", **TINY, num_key_value_heads=2)
    capture_forward(llama, find_tracked_layers(llama))  # the normal case passes, twice in a row
    capture_forward(llama, find_tracked_layers(llama))
    llama.model.layers[1].mlp = llama.model.layers[0].mlp  # one MLP shared by both blocks
    with pytest.raises(InputError, match="model.layers.0.mlp.gate_proj is called more than once per forward"):
        capture_forward(llama, find_tracked_layers(llama))


def test_fingerprint_covers_every_parameter_and_is_cached(model_dirs, monkeypatch):
    """Hashing runs once per model and set of weights: a repeated call is served from the cache (counted,
    not timed), an in-place change of a parameter or other tracked layers hash again."""
    import attrib.models

    model, _ = load_model(str(model_dirs["llama"]), "float32", "cpu")
    layers = find_tracked_layers(model)
    hashed = []
    original = attrib.models._fingerprint
    monkeypatch.setattr(attrib.models, "_fingerprint", lambda *args: hashed.append(1) or original(*args))
    base = fingerprint(model, layers)
    assert fingerprint(model, layers) == base and len(hashed) == 1  # cached
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # in place, same values: the version counter moves, the hash does not
    assert fingerprint(model, layers) == base and len(hashed) == 2
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"):
        parameter = dict(model.named_parameters())[name]
        with torch.no_grad():
            parameter.view(-1)[0] += 1.0  # the first element is always in the strided sample
        changed = fingerprint(model, layers)
        assert changed != base, name
        with torch.no_grad():
            parameter.view(-1)[0] -= 1.0
        assert fingerprint(model, layers) == base, name
    assert fingerprint(model, layers[:1]) != base  # keyed by the tracked layers


def test_fingerprint_tracks_weights_not_dtype(model_dirs):
    model, _ = load_model(str(model_dirs["gpt2"]), "float32", "cpu")
    layers = find_tracked_layers(model)
    base = fingerprint(model, layers)
    bf16, _ = load_model(str(model_dirs["gpt2"]), "bfloat16", "cpu")
    assert fingerprint(bf16, find_tracked_layers(bf16)) == base
    with torch.no_grad():
        layers[0].module.weight[0, 0] += 1.0
    assert fingerprint(model, layers) != base


def test_load_model_errors(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        load_model(str(tmp_path / "missing" / "model"), "float32", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        load_model(str(tmp_path / "empty"), "float32", "cpu")
    with pytest.raises(InputError, match="dtype='float8'"):
        load_model(str(tmp_path / "empty"), "float8", "cpu")


def test_inspect_command(capsys, model_dirs):
    code, out, err = run_cli(capsys, "inspect", "--model", model_dirs["llama"])
    assert code == 0, err
    assert "model.layers.1.mlp.down_proj" in out and "fingerprint" in out
    code, out, err = run_cli(capsys, "inspect", "--model", "/definitely/not/here")
    assert code == 2 and err.strip().count("\n") == 0 and err.startswith("error: --model")


def test_factor_memory_estimate_matches_written_files(tmp_path, model_dirs, corpus_file):
    """inspect's estimate equals the float32 bytes of covariance + eigen + lambda tensors."""
    from attrib.storage import load_tensors

    code = run_cli_fit(tmp_path, model_dirs["gpt2"], corpus_file)
    assert code == 0
    model, _ = load_model(str(model_dirs["gpt2"]), "float32", "cpu")
    layers = find_tracked_layers(model)
    written = sum(
        t.numel() * t.element_size()
        for name in ("covariance", "eigen", "lambda")
        for key, t in load_tensors(tmp_path / "f" / f"{name}.safetensors").items()
        if not key.startswith("count.")
    )
    assert written == sum(factor_bytes(layer) for layer in layers)


def run_cli_fit(tmp_path, model_dir, corpus_file) -> int:
    from attrib.cli import main

    try:
        main(["--quiet", "fit-factors", "--model", str(model_dir), "--corpus", str(corpus_file), "--out", str(tmp_path / "f")])
    except SystemExit as exc:
        return exc.code
    return 0


def test_build_model_helper_is_loadable(tmp_path, tokenizer):
    directory = build_model(tmp_path / "m", "gpt2", tokenizer, hidden=8)
    model, loaded_tokenizer = load_model(str(directory), "float32", "cpu")
    assert model.config.n_embd == 8 and loaded_tokenizer.is_fast


def _hub_cache(root, repo: str, revisions: dict) -> None:
    """A Hugging Face hub cache holding `repo` at each revision name of `revisions` ({name: model dir}), laid out
    as huggingface_hub writes it (refs/<name> holds a commit; snapshots/<commit>/ the files), so that a hub id
    with a revision loads offline."""
    import shutil

    folder = root / f"models--{repo.replace('/', '--')}"
    for number, (name, directory) in enumerate(revisions.items()):
        commit = f"{number + 1:040x}"
        shutil.copytree(directory, folder / "snapshots" / commit)
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(commit)


def test_revision_of_a_hub_model_is_loaded_and_recorded(tmp_path, tokenizer, corpus_file):
    """`--revision` picks the snapshot of a hub id (here from an offline hub cache): the factors carry that
    revision's weights (fingerprint) and `ID@REVISION`; with a local directory it is refused in one line."""
    import json
    import os
    import subprocess
    import sys

    from attrib.models import model_record

    steps = {name: build_model(tmp_path / name, "llama", tokenizer, seed=seed) for seed, name in
             enumerate(("step1", "step2"))}
    _hub_cache(tmp_path / "hub", "attrib-test/tiny-llama", {**steps, "main": steps["step2"]})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    fingerprints = set()
    for name in steps:
        done = subprocess.run([sys.executable, "-m", "attrib", "--quiet", "fit-factors", "--model",
                               "attrib-test/tiny-llama", "--revision", name, "--corpus", str(corpus_file),
                               "--max-length", "16", "--out", str(tmp_path / f"factors-{name}")],
                              env=env, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        recorded = json.loads((tmp_path / f"factors-{name}" / "manifest.json").read_text())["model"]
        model, _ = load_model(str(steps[name]), "float32", "cpu")
        assert recorded["spec"] == f"attrib-test/tiny-llama@{name}"
        assert recorded["fingerprint"] == model_record("", model, find_tracked_layers(model))["fingerprint"]
        fingerprints.add(recorded["fingerprint"])
    assert len(fingerprints) == 2
    with pytest.raises(InputError, match="revision='step1'.*local directory"):
        load_model(str(steps["step1"]), "float32", "cpu", revision="step1")


def test_revision_with_a_local_directory_is_refused_in_one_line(tmp_path, capsys, model_dirs, corpus_file):
    code, _, err = run_cli(capsys, "fit-factors", "--model", model_dirs["llama"], "--revision", "step1",
                           "--corpus", corpus_file, "--out", tmp_path / "f")
    assert code == 2 and err.startswith("error: --revision step1") and err.count("\n") == 1, err
    assert not (tmp_path / "f").exists()
