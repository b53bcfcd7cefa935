"""`attrib demo` runs every stage on the planted-fact demo and ends with a report."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    from attrib.synthetic import cached_demo

    built = cached_demo("tiny")
    shutil.copytree(built.root, tmp_path / "run" / "data")  # the demo reuses built data and models
    code, out, err = run_cli(capsys, "demo", "--out", tmp_path / "run", "--size", "tiny", "--candidates-per-query", "50")
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    for stage in ("factors", "candidates", "scores"):
        assert json.loads((tmp_path / "run" / stage / "manifest.json").read_text())["status"] == "complete"
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("<section") >= 40 and "<script>" not in page
    assert "<dt>strategy</dt><dd>ekfac</dd>" in page and "rows skipped" not in page  # none skipped: not shown
    assert summary["recall_at_10"] >= 0.9  # measured 1.0 on the tiny demo
    # the terminal shows the first 5 of the 40 queries and says where the rest is
    table = out[: out.rindex("{")]
    assert "q-0004" in table and "q-0005" not in table.split("attrib top")[0]
    assert f"attrib top {tmp_path / 'run' / 'scores'}" in table and "report.html" in table
    # one line per stage with its time; no library chatter
    assert all(f"stage {name}: " in err for name in ("fit-factors", "prefilter", "query", "report"))
    assert set(summary["stage_seconds"]) == {"fit-factors", "prefilter", "query", "report"}
    assert "Writing model shards" not in err and "loss_type" not in err and "warn" not in err.lower()
    # a rerun finds every stage complete and changes nothing
    before = (tmp_path / "run" / "scores" / "documents.parquet").read_bytes()
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "run", "--size", "tiny", "--candidates-per-query", "50")
    assert code == 0 and "already complete" in err
    assert (tmp_path / "run" / "scores" / "documents.parquet").read_bytes() == before
