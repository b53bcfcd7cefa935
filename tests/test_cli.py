"""The command line: help, version, recipes with flag overrides, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli

COMMANDS = ["inspect", "fit-factors", "prefilter", "query-gradients", "query", "self-influence", "index", "combine", "report",
            "top", "demo"]


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
            load_recipe(str(recipe), command, group)


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


def test_only_rank_zero_prints_progress(monkeypatch, capsys):
    from attrib import runtime
    from attrib.progress import message, progress

    monkeypatch.setenv("RANK", "1")
    message("status line")
    with progress("a bar", total=3) as bar:
        bar.advance(3)
    assert capsys.readouterr().err == ""
    with runtime.session(debug=True):  # --debug: every rank speaks, saying which it is
        message("status line")
    assert capsys.readouterr().err == "[rank 1] status line\n"
    monkeypatch.setenv("RANK", "0")
    message("status line")
    assert capsys.readouterr().err == "status line\n"


@pytest.mark.parametrize("error", [
    "torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')",
    "RuntimeError('[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can\\'t allocate memory: you tried to allocate 123')",
])
def test_out_of_memory_names_the_settings_that_reduce_it(tmp_path, capsys, monkeypatch, model_dirs, corpus_file, error):
    """A real fit whose forward pass runs out of memory ends in one line naming the memory settings."""
    import torch

    from attrib.models import load_model

    original = load_model

    def load_then_fail(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)
        exc = eval(error, {"torch": torch})

        def raise_oom(module, inputs):
            raise exc

        model.register_forward_pre_hook(raise_oom)  # the model itself fails as an allocator would
        return model, tokenizer

    monkeypatch.setattr("attrib.models.load_model", load_then_fail)
    code, _, err = run_cli(capsys, "fit-factors", "--model", model_dirs["gpt2"], "--corpus", corpus_file,
                           "--out", tmp_path / "f", "--max-length", "16", "--quiet")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: out of memory"), err
    for setting in ("--tokens-per-batch", "--layers-per-pass", "--queries-per-pass", "--modules"):
        assert setting in err
    assert (tmp_path / "f" / "manifest.json").exists()  # a run-time failure keeps the run for a resume


def fit_args(model, corpus, out, *extra):
    return ["fit-factors", "--model", model, "--corpus", corpus, "--out", out, "--max-length", "16", "--quiet", *extra]


def test_fit_factors_does_not_resume_on_a_changed_corpus(tmp_path, capsys, monkeypatch, model_dirs, corpus_file):
    """A run killed after some parts on corpus A is neither continued on corpus B nor reported done."""
    from attrib.models import load_model

    original, forwards = load_model, {"count": 0}

    def load_then_die(*args, **kwargs):
        model, tokenizer = original(*args, **kwargs)

        def die_on_the_third_batch(module, inputs):
            forwards["count"] += 1
            if forwards["count"] == 3:
                raise RuntimeError("killed")

        model.register_forward_pre_hook(die_on_the_third_batch)
        return model, tokenizer

    out = tmp_path / "f"
    args = fit_args(model_dirs["gpt2"], corpus_file, out, "--docs-per-part", "2", "--tokens-per-batch", "16")
    monkeypatch.setattr("attrib.models.load_model", load_then_die)
    code, _, err = run_cli(capsys, *args)
    assert code == 1 and json.loads((out / "manifest.json").read_text())["status"] == "running", err
    monkeypatch.undo()
    with open(corpus_file, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "new", "text": "Another document appended to the corpus."}) + "\n")
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1, err
    assert "other inputs (corpus changed since)" in err and "--overwrite" in err
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    code, _, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["corpus"]["kind"] == "file" and manifest["settings"]["long_documents"] == "chunk"


@pytest.mark.parametrize("case, fragment", [
    ("missing corpus", "no such file"),
    ("wrong text field", "no field 'body'"),
    ("bad row later", "c.jsonl:9: invalid JSON"),
    ("max-length 0", "--max-length"),
    ("float16", "--dtype float16 is refused for fit-factors"),
    ("bad long-documents", "--long-documents"),
])
def test_fit_factors_writes_nothing_on_bad_input(tmp_path, capsys, model_dirs, corpus_file, case, fragment):
    corpus, extra = corpus_file, []
    if case == "missing corpus":
        corpus = tmp_path / "nowhere.jsonl"
    elif case == "wrong text field":
        extra = ["--text-field", "body"]
    elif case == "bad row later":  # found only after the output directory exists
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("\n".join(corpus_file.read_text().splitlines()[:8]) + "\n{oops\n")
    elif case == "max-length 0":
        extra = ["--max-length", "0"]
    elif case == "float16":
        extra = ["--dtype", "float16"]
    elif case == "bad long-documents":
        extra = ["--long-documents", "drop"]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *fit_args(model_dirs["gpt2"], corpus, out, *extra))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not out.exists()


def test_fit_factors_skips_and_counts_empty_documents(tmp_path, capsys, model_dirs, corpus_file):
    rows = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    rows[2]["text"], rows[5]["text"] = "", "  \n "
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "f"
    code, _, err = run_cli(capsys, "fit-factors", "--model", model_dirs["gpt2"], "--corpus", corpus, "--out", out,
                           "--max-length", "16", "--strategy", "kfac")
    assert code == 0, err
    assert "2 empty documents skipped" in err
    assert json.loads((out / "manifest.json").read_text())["counts"]["rows_skipped"] == {"empty text": 2}


STAGE_ARGS = {"fit-factors": ["--corpus", "c.jsonl"], "prefilter": ["--corpus", "c.jsonl", "--queries", "q.jsonl"],
              "query": ["--factors", "f", "--corpus", "c.jsonl"]}


@pytest.mark.parametrize("command, flags, fragment", [
    ("query", ["--query-gradients", "g", "--solve-corpus", "s.jsonl"],
     "--solve-corpus has no effect with --query-gradients"),
    ("query", ["--queries", "q.jsonl", "--query-gradients", "g"], "give --queries or --query-gradients, not both"),
    ("query", ["--queries", "q.jsonl", "--candidates", "cands", "--keep-all-scores"],
     "--keep-all-scores has no effect with --candidates"),
    ("query", ["--queries", "q.jsonl", "--prefilter", "5", "--keep-all-scores"],
     "--keep-all-scores has no effect with --prefilter"),
    ("fit-factors", ["--strategy", "diagonal", "--covariance-max-tokens", "4096"],
     "--covariance-max-tokens has no effect with --strategy diagonal"),
    ("fit-factors", ["--strategy", "identity", "--fisher", "true"], "--fisher true has no effect with --strategy identity"),
    ("prefilter", ["--backend", "exact", "--hash-features", "4096"], "--hash-features has no effect with --backend exact"),
    ("prefilter", ["--max-length", "64"], "--max-length has no effect with --unit document"),
])
def test_an_option_without_effect_is_refused(capsys, tmp_path, model_dirs, command, flags, fragment):
    """An option that another option makes moot is refused in one line (the user expected it to act), before
    anything is read or written; through the API the message names keywords."""
    model = [] if command == "prefilter" else ["--model", model_dirs["llama"]]
    code, _, err = run_cli(capsys, command, *model, *STAGE_ARGS[command], *flags, "--out", tmp_path / "out")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_api_errors_name_keywords(tmp_path, model_dirs):
    """The same refusal through the API speaks Python: keywords, not flags."""
    import attrib

    with pytest.raises(attrib.InputError, match="solve_corpus= has no effect with query_gradients_dir="):
        attrib.query(model_dirs["llama"], "f", None, "c.jsonl", out=tmp_path / "out", query_gradients_dir="g",
                     solve_corpus="s.jsonl")
    with pytest.raises(attrib.InputError, match="max_length=1 must be at least 2"):
        attrib.fit_factors(model_dirs["llama"], "c.jsonl", out=tmp_path / "out", max_length=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_lenght'"):
        attrib.fit_factors(model_dirs["llama"], "c.jsonl", out=tmp_path / "out", max_lenght=64)
    assert not (tmp_path / "out").exists()


def test_library_logging_is_restored_and_quiet_is_per_call(tmp_path, capsys, model_dirs):
    """transformers' log level is the user's: attrib quiets it only while it loads (inspect, a stage) and
    gives it back; `quiet=True` in one API call does not silence the next."""
    import transformers

    import attrib

    logging = transformers.utils.logging
    logging.set_verbosity_info()
    try:
        code, _, err = run_cli(capsys, "inspect", "--model", model_dirs["gpt2"])
        assert code == 0, err
        assert logging.get_verbosity() == logging.INFO
        queries = [{"id": "q", "prompt": "The capital", "completion": " of rivers."}]
        corpus = [{"id": "d", "text": "The capital of rivers is a city."}]
        attrib.prefilter(corpus, queries, out=tmp_path / "quiet", top_k=1, quiet=True)
        assert capsys.readouterr().err == "" and logging.get_verbosity() == logging.INFO
        attrib.prefilter(corpus, queries, out=tmp_path / "loud", top_k=1)
        assert "1 candidates for 1 queries" in capsys.readouterr().err
    finally:
        logging.set_verbosity_warning()
