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
    model.config.model_type = "mystery"
    with pytest.raises(InputError, match="--modules"):
        find_tracked_layers(model)


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
    with pytest.raises(InputError, match="--dtype"):
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
