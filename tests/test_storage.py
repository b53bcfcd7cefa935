"""Atomic writes, manifests, resume and refusal of stage directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attrib.errors import InputError
from attrib.storage import StageDir, atomic_path, open_input, write_json


def test_killed_writer_leaves_no_file(tmp_path):
    """A process killed mid-write leaves neither the target nor a file a reader would accept."""
    target = tmp_path / "data.bin"
    script = (
        "import os, sys\n"
        "from attrib.storage import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    os._exit(9)\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    assert not target.exists()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == [p for p in tmp_path.iterdir() if p.name.startswith(".data.bin")]
    assert not target.exists()


def stage(path, settings=None, fingerprint="f1", **kwargs):
    return StageDir(path, "fit-factors", settings or {"a": 1}, {"fingerprint": fingerprint}, **kwargs)


def test_manifest_lifecycle_and_refusals(tmp_path):
    out = tmp_path / "run"
    running = stage(out)
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    with pytest.raises(InputError, match="unfinished"):
        open_input(out, "fit-factors")
    running.complete({"tokens": 3}, [])
    manifest = open_input(out, "fit-factors", "f1")
    assert manifest["counts"] == {"tokens": 3} and manifest["attrib_version"]
    with pytest.raises(InputError, match="another model"):
        open_input(out, "fit-factors", "f2")
    with pytest.raises(InputError, match="not of `attrib query`"):
        open_input(out, "query")
    with pytest.raises(InputError, match="does not exist"):
        open_input(tmp_path / "nope", "fit-factors")
    (tmp_path / "bare").mkdir()
    with pytest.raises(InputError, match="no manifest.json"):
        open_input(tmp_path / "bare", "fit-factors")
    assert stage(out).already_complete


def test_resume_refuses_other_settings_or_model(tmp_path):
    out = tmp_path / "run"
    stage(out)
    (out / "part-00000").write_text("kept")
    resumed = stage(out)
    assert (out / "part-00000").read_text() == "kept" and not resumed.already_complete
    with pytest.raises(InputError, match=r"other settings \(a\)"):
        stage(out, {"a": 2})
    with pytest.raises(InputError, match="another model"):
        stage(out, fingerprint="f2")
    fresh = stage(out, {"a": 2}, overwrite=True)
    assert not (out / "part-00000").exists() and fresh.settings == {"a": 2}


def test_refuses_foreign_directories(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("do not delete")
    with pytest.raises(InputError, match="non-empty directory"):
        stage(foreign)
    with pytest.raises(InputError, match="refusing to overwrite"):
        stage(foreign, overwrite=True)
    assert (foreign / "precious.txt").exists()
    write_json(tmp_path / "x.json", {"k": 1})
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": 1}
    assert os.listdir(tmp_path).count("x.json") == 1


def test_input_identity_sees_content_changes(tmp_path):
    from attrib.storage import input_identity

    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b"a" * (3 * 2**20))
    first = input_identity(corpus)
    assert first["kind"] == "file" and first["size"] == 3 * 2**20 and json.loads(json.dumps(first)) == first
    assert input_identity(corpus) == first
    with open(corpus, "r+b") as handle:  # the same size and a restored mtime: the hash of the last MiB differs
        handle.seek(3 * 2**20 - 10)
        handle.write(b"b")
    os.utime(corpus, ns=(first["mtime_ns"], first["mtime_ns"]))
    assert input_identity(corpus) != first
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("one")
    listed = input_identity(folder)
    assert [f["file"] for f in listed["files"]] == ["a.txt"]
    (folder / "b.txt").write_text("two")
    assert input_identity(folder) != listed
    assert input_identity("org/dataset") == {"name": "org/dataset", "kind": "name"}
    done = stage(tmp_path / "stage")
    done.complete({"tokens": 3}, ["x"])
    identity = input_identity(tmp_path / "stage")
    assert identity["kind"] == "stage" and identity["model_fingerprint"] == "f1"
    fresh = stage(tmp_path / "stage", {"a": 2}, overwrite=True)
    fresh.complete({"tokens": 3}, ["x"])
    assert input_identity(tmp_path / "stage")["sha256"] != identity["sha256"]


def test_resume_refuses_other_inputs(tmp_path):
    from attrib.storage import input_identity

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n')
    out = tmp_path / "run"
    stage(out, inputs={"corpus": input_identity(corpus)})
    (out / "part-00000").write_text("from corpus A")
    assert not stage(out, inputs={"corpus": input_identity(corpus)}).already_complete  # same inputs resume
    corpus.write_text('{"text": "b"}\n')
    with pytest.raises(InputError, match=r"other inputs \(corpus changed since\); use overwrite=") as error:
        stage(out, inputs={"corpus": input_identity(corpus)})
    assert "\n" not in str(error.value) and (out / "part-00000").exists()
    done = stage(out, inputs={"corpus": input_identity(corpus)}, overwrite=True)
    done.complete({}, [])
    corpus.write_text('{"text": "c"}\n')
    with pytest.raises(InputError, match="other inputs"):  # a finished run is not reported as done for new inputs
        stage(out, inputs={"corpus": input_identity(corpus)})


def test_guard_removes_only_what_a_failed_run_created(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(InputError):
        with stage(new).guard():
            raise InputError("bad row on line 1")
    assert not new.exists()
    given = tmp_path / "given"
    given.mkdir()
    with pytest.raises(InputError):
        with stage(given).guard():
            (given / "part-0").write_text("x")
            raise InputError("bad row")
    assert given.is_dir() and not any(given.iterdir())
    kept = tmp_path / "kept"
    with pytest.raises(RuntimeError):  # a crash keeps the parts for a resume
        with stage(kept).guard():
            raise RuntimeError("killed")
    assert (kept / "manifest.json").exists()
    with pytest.raises(InputError):  # a resumed run never deletes earlier work
        with stage(kept).guard():
            raise InputError("bad")
    assert (kept / "manifest.json").exists()
