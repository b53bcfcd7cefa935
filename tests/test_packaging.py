"""Real installs: the README's test command is CI's, and pyproject's floors match what the code needs."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def floors() -> dict[str, tuple[int, ...]]:
    """pyproject's `name>=X.Y` floors as version tuples, plus `python`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    result = {"python": tuple(map(int, project["requires-python"].removeprefix(">=").split(".")))}
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, floor = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement).groups()
        result[name.lower()] = tuple(map(int, floor.split(".")))
    return result


def source(module: str) -> str:
    return (ROOT / "attrib" / module).read_text()


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Install and run the test suite:", 1)[1].split("```", 2)[1]
    (command,) = [line for line in block.splitlines() if line.strip()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command.strip() in ci, "`.ci/run` must run the README's test command verbatim"
    assert any("ATTRIB_REQUIRE_BROWSER=1" in line for line in ci), "CI must require the browser test"


def test_every_dependency_has_a_floor_the_min_versions_job_can_pin():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        assert re.fullmatch(r"[A-Za-z0-9_.-]+>=[0-9.]+", requirement), requirement


def test_python_floor_covers_tomllib():
    uses_tomllib = any("import tomllib" in path.read_text() for path in (ROOT / "attrib").rglob("*.py"))
    has_fallback = any("tomli" in path.read_text().replace("tomllib", "") for path in (ROOT / "attrib").rglob("*.py"))
    assert not uses_tomllib or has_fallback or floors()["python"] >= (3, 11)


def test_transformers_floor_covers_dtype_in_from_pretrained():
    """`from_pretrained(dtype=...)` arrived in transformers 4.56 (it was `torch_dtype` before)."""
    if re.search(r"from_pretrained\([^)]*\bdtype=", source("models.py"), re.S):
        assert floors()["transformers"] >= (4, 56)


def test_typer_floor_vendors_click_and_the_cli_falls_back_to_click(monkeypatch):
    """typer._click (private) exists from typer 0.26; without it the CLI uses click itself."""
    assert floors()["typer"] >= (0, 26) or "from click import exceptions" in source("cli.py")
    pytest.importorskip("click")
    from attrib import cli

    monkeypatch.setitem(sys.modules, "typer._click", None)  # `import typer._click` now fails
    exceptions = cli._click_exceptions()
    assert exceptions.__name__ == "click.exceptions" and hasattr(exceptions, "UsageError")
