"""The command line: help, version, recipes with flag overrides, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli

COMMANDS = ["inspect", "fit-factors", "prefilter", "query-gradients", "query", "report", "top", "demo"]


def test_help_lists_every_stage_without_importing_torch():
    code = (
        "import sys; from attrib.cli import main\n"
        "try: main(['--help'])\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported by --help'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0 and "Example" in out


def test_version(capsys):
    from attrib import __version__

    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and out.strip() == f"attrib {__version__}"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["fit-factors", "--corpus", "c", "--out", "o"], "Missing option '--model'"),
        (["fit-factors", "--model", "m", "--corpus", "c", "--out", "o", "--bogus"], "No such option: --bogus"),
        (["no-such-command"], "No such command"),
        (["fit-factors", "--model", "/no/such/model", "--corpus", "c", "--out", "o"], "--model /no/such/model"),
        (["fit-factors", "--config", "/no/recipe.toml", "--model", "m", "--corpus", "c", "--out", "o"], "--config /no/recipe.toml"),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(capsys, args, fragment):
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    assert fragment in err


def test_debug_shows_the_traceback(capsys):
    from attrib.errors import InputError

    with pytest.raises(InputError):
        from attrib.cli import main

        main(["--debug", "inspect", "--model", "/no/such/model"])


def test_recipe_sets_defaults_and_flags_override(tmp_path, capsys, model_dirs, corpus_file):
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'model = "{model_dirs["gpt2"]}"\nmax-length = 16\n'
        f'[fit-factors]\nstrategy = "kfac"\nfisher = "empirical"\ncorpus = "{corpus_file}"\n'
    )
    out = tmp_path / "f"
    code, _, err = run_cli(capsys, "fit-factors", "--config", recipe, "--out", out, "--strategy", "diagonal", "--quiet")
    assert code == 0, err
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert settings["strategy"] == "diagonal"  # the flag wins
    assert settings["fisher"] == "empirical" and settings["max_length"] == 16  # from the recipe


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("modle = 'x'\n", "unknown option 'modle'"),
        ("[fit-factors]\nstrategi = 'kfac'\n", "[fit-factors] has unknown option 'strategi'"),
        ("[fit_factor]\nx = 1\n", "[fit_factor] is not an attrib command"),
        ("model = \n", "not valid TOML"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, capsys, text, fragment):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    code, _, err = run_cli(capsys, "--config", recipe, "fit-factors", "--model", "m", "--corpus", "c", "--out", "o")
    assert code == 2 and fragment in err and err.count("\n") == 1, err


def test_shipped_recipes_are_valid(capsys):
    """Every recipe under recipes/ (subfolders too) loads for every command it names."""
    from pathlib import Path

    import tomllib
    import typer

    from attrib.cli import app
    from attrib.recipes import load_recipe

    group = typer.main.get_command(app)
    recipes = sorted(Path(__file__).parent.parent.joinpath("recipes").rglob("*.toml"))
    assert recipes, "recipes/ holds no recipe"
    for recipe in recipes:
        tables = [k for k, v in tomllib.loads(recipe.read_text()).items() if isinstance(v, dict)]
        for command in tables or ["fit-factors"]:
            load_recipe(str(recipe), command, group.commands[command])


def test_fit_factors_cli_end_to_end_and_rerun(tmp_path, capsys, model_dirs, corpus_file):
    out = tmp_path / "factors"
    args = ["fit-factors", "--model", model_dirs["llama"], "--corpus", corpus_file, "--out", out, "--max-length", "16"]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["covariance_tokens"] > 0
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and "already complete" in err
    code, _, err = run_cli(capsys, *args[:-1], "32")
    assert code == 2 and "other settings (max_length)" in err
    code, _, err = run_cli(capsys, *args, "--strategy", "nope")
    assert code == 2 and "--strategy nope" in err
