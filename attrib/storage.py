"""Stage directories: manifest.json, atomic writes, resumable parts (docs/design.md §3).

A stage writes `manifest.json` with status "running" when it starts and "complete"
when it ends (written last), so a later stage can tell a finished artefact from a
crashed one. Every file goes through a temporary name and a rename. A rerun resumes
only a run with the same stage, model, settings and inputs (`input_identity`); a
run that fails on bad input removes the directory it created (`StageDir.guard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from attrib import __version__
from attrib.errors import InputError
from attrib.runtime import flag

MANIFEST = "manifest.json"
IDENTITY_BYTES = 2**20  # hashed at each end of an input file
LISTED_FILES = 64  # a directory input with more files is recorded as one digest


def _file_identity(path: Path) -> dict:
    """Size, mtime and a sha256 of the first and last MiB: cheap, and catches edits and replacements."""
    info = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(IDENTITY_BYTES))
        if info.st_size > IDENTITY_BYTES:
            handle.seek(max(IDENTITY_BYTES, info.st_size - IDENTITY_BYTES))
            digest.update(handle.read(IDENTITY_BYTES))
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256_ends": digest.hexdigest()}


def _stage_identity(path: Path, manifest: dict) -> dict:
    """An input stage by what it computed: its model, and a hash of its settings, inputs, counts and files."""
    summary = {key: manifest.get(key) for key in ("stage", "settings", "inputs", "counts", "files")}
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()
    return {
        "path": str(path.resolve()),
        "kind": "stage",
        "stage": manifest.get("stage"),
        "status": manifest.get("status"),
        "model_fingerprint": manifest.get("model", {}).get("fingerprint"),
        "sha256": digest,
    }


def input_identity(source: str | Path | None) -> dict | None:
    """What an input is, for manifests and resume checks: JSON, cheap to compute on large inputs.

    * a file: absolute path, size, mtime_ns and a sha256 of its first and last MiB;
    * a stage directory (one with a manifest.json): its model fingerprint and a hash of
      its manifest's stage, settings, inputs, counts and files;
    * a directory or glob of corpus files: each file's relative path and identity (one
      digest of them all when there are more than 64 files);
    * anything else (a hub dataset or model id): the name.

    Use it for every input a stage reads, e.g. `StageDir(..., inputs={"factors":
    input_identity(factors), "queries": input_identity(queries)})`: a rerun whose inputs
    differ is then refused with a line naming `--overwrite` instead of resuming.
    """
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        return {"path": str(path.resolve()), "kind": "file", **_file_identity(path)}
    if path.is_dir() and (path / MANIFEST).is_file():
        manifest = read_manifest(path) or {}
        return _stage_identity(path, manifest)
    from attrib.data import corpus_files

    try:
        files = corpus_files(str(source))
    except InputError:
        files = None
    if files is None:
        return {"name": str(source), "kind": "name"}
    root = path.resolve() if path.is_dir() else Path.cwd()
    listed = []
    for file in files:
        resolved = file.resolve()
        name = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(resolved)
        listed.append({"file": name, **_file_identity(file)})
    identity: dict = {"path": str(path.resolve()) if path.is_dir() else str(source), "kind": "files"}
    if len(listed) <= LISTED_FILES:
        return {**identity, "files": listed}
    digest = hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()
    return {**identity, "count": len(listed), "bytes": sum(f["size"] for f in listed), "sha256": digest}


def _as_json(value: Any) -> Any:
    """What `value` reads back as from a manifest (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors, atomically; tensors are made contiguous and unshared first."""
    from safetensors.torch import save_file

    owned = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(owned, str(tmp), metadata=metadata)


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a valid manifest ({exc}); rerun the stage that wrote it") from exc


def open_input(
    directory: str | Path, stage: str, fingerprint: str | None = None, option: str = ""
) -> dict:
    """The manifest of a finished input artefact; refuse anything else with a one-line reason."""
    directory = Path(directory)
    what = f"{option} {directory}" if option else str(directory)
    if not directory.is_dir():
        raise InputError(f"{what} does not exist; run `attrib {stage}` first")
    manifest = read_manifest(directory)
    if manifest is None:
        raise InputError(f"{what} has no {MANIFEST}; it is not the output of `attrib {stage}`")
    if manifest.get("stage") != stage:
        raise InputError(
            f"{what} holds the output of `attrib {manifest.get('stage')}`, not of `attrib {stage}`"
        )
    if manifest.get("status") != "complete":
        raise InputError(f"{what} is unfinished; rerun `attrib {stage}` to complete it")
    if fingerprint is not None and manifest.get("model", {}).get("fingerprint") != fingerprint:
        raise InputError(
            f"{what} was computed for another model (fingerprint "
            f"{manifest.get('model', {}).get('fingerprint', '?')[:12]} != {fingerprint[:12]}); "
            f"use the same {flag('model')}, or recompute it"
        )
    return manifest


class StageDir:
    """The output directory of one stage run: its manifest, parts and final files.

    Opening a directory that holds an unfinished run with the same settings and
    inputs resumes it (finished parts stay); other settings, inputs or another model
    are refused unless `overwrite`, which starts over.

    Check what can be checked before creating a StageDir, and run the stage inside
    `with stage.guard():` so that an input error found later removes what this run
    created (the directory, or the contents of a directory that was empty) instead
    of leaving a "running" manifest that a later run would resume into.
    """

    def __init__(
        self,
        path: str | Path,
        stage: str,
        settings: dict,
        model: dict | None = None,
        inputs: dict | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.stage = stage
        self.settings = settings
        self.model = model or {}
        self.inputs = inputs or {}
        self.started = time.time()
        self.timings: dict[str, float] = {}
        self.already_complete = False
        self.created: str | None = None  # "directory" or "contents": what a failed run may remove
        existing = read_manifest(self.path) if self.path.is_dir() else None
        if self.path.exists() and not self.path.is_dir():
            raise InputError(f"{flag('out', self.path)} is a file; give a directory")
        if existing is not None and not overwrite:
            self._check_resumable(existing)
            self.already_complete = existing.get("status") == "complete"
            self.timings = existing.get("timings", {})
        elif existing is None and self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise InputError(
                f"{flag('out', self.path)} is a non-empty directory without a manifest; "
                "choose an empty or new directory"
            )
        if overwrite and self.path.is_dir():
            if existing is None and any(self.path.iterdir()):
                raise InputError(
                    f"{flag('out', self.path)} is not an attrib stage directory; refusing to overwrite it"
                )
            shutil.rmtree(self.path)
        if not self.already_complete:
            if not self.path.exists():
                self.created = "directory"
            elif existing is None:
                self.created = "contents"  # an empty directory given by the user
            self.path.mkdir(parents=True, exist_ok=True)
            self._write_manifest("running")

    def _check_resumable(self, existing: dict) -> None:
        if existing.get("stage") != self.stage:
            raise InputError(
                f"{flag('out', self.path)} holds the output of `attrib {existing.get('stage')}`; "
                "choose another directory"
            )
        if existing.get("model", {}).get("fingerprint") != self.model.get("fingerprint"):
            raise InputError(
                f"{flag('out', self.path)} holds a run for another model; use {flag('overwrite')} or another {flag('out')}"
            )
        for key, ours, what in (("settings", self.settings, "with other settings ({})"),
                                ("inputs", self.inputs, "on other inputs ({} changed since)")):
            old, new = existing.get(key, {}), _as_json(ours)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if changed:
                raise InputError(f"{flag('out', self.path)} holds a run {what.format(', '.join(changed))}; "
                                 f"use {flag('overwrite')} to start over or another {flag('out')}")

    @contextlib.contextmanager
    def guard(self) -> Iterator[StageDir]:
        """Run the stage; on an input error, remove what this run created (see `discard_if_created`).

        Other failures (a crash, out of memory, Ctrl-C) keep the directory, so that a
        rerun resumes from the parts already finished.
        """
        try:
            yield self
        except InputError:
            self.discard_if_created()
            raise

    def discard_if_created(self) -> bool:
        """Remove the directory this run created (or empty the empty one it was given); True if it did."""
        if self.created is None or not self.path.is_dir():
            return False
        if self.created == "directory":
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        self.created = None
        return True

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return (self.path / name).exists()

    def parts(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.glob(pattern))

    def _write_manifest(self, status: str, **extra: Any) -> None:
        manifest = {
            "attrib_version": __version__,
            "stage": self.stage,
            "status": status,
            "settings": self.settings,
            "inputs": self.inputs,
            "model": self.model,
            "timings": self.timings,
            **extra,
        }
        write_json(self.path / MANIFEST, manifest)

    def complete(self, counts: dict, files: list[str], **extra: Any) -> dict:
        """Write the final manifest; the status is what makes the artefact usable."""
        self.timings["total_seconds"] = round(
            self.timings.get("total_seconds", 0.0) + time.time() - self.started, 3
        )
        self._write_manifest("complete", counts=counts, files=files, **extra)
        return read_manifest(self.path)


# safetensors dtype names of the torch dtypes attrib writes
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "bfloat16": "BF16", "float16": "F16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_ITEM_SIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_COPY_CHUNK = 64 * 2**20


def _write_safetensors(path: str | Path, entries: list[tuple[str, str, list[int], int, Any]], metadata: dict[str, str] | None) -> None:
    """Write a safetensors file from (name, dtype, shape, nbytes, write(handle)) entries, atomically.

    The header is built from shapes alone, then each entry writes its own bytes, so
    the caller decides how much is in memory at once (one tensor, or a file chunk).
    """
    import json as _json
    import struct

    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape, nbytes, _ in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {key: str(value) for key, value in metadata.items()}
    encoded = _json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for *_, write in entries:
            write(handle)


def write_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors, atomically, without cloning: one tensor at a time is copied to the host
    (only if it lives on a device or is not contiguous), so writing a group of device-resident
    sums costs the host one tensor, not the group. Tensors sharing memory are written twice."""
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))

    import torch

    def writer(tensor):
        def write(handle):
            host = tensor.detach().to("cpu").contiguous().reshape(-1)
            handle.write(memoryview(host.view(torch.uint8).numpy()))

        return write

    entries = []
    for name in names:
        tensor = tensors[name]
        dtype = _SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        entries.append((name, dtype, list(tensor.shape), tensor.numel() * tensor.element_size(), writer(tensor)))
    _write_safetensors(path, entries, metadata)


def _read_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor entries and `__metadata__`) and where its data starts."""
    import json as _json
    import struct

    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return _json.loads(handle.read(length)), 8 + length


def tensor_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, read from its header alone."""
    return _read_header(path)[0].get("__metadata__", {}) or {}


def merge_tensor_files(path: str | Path, sources: list[str | Path], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file holding every tensor of `sources`, copied byte for byte in
    chunks (no tensor is loaded); tensors are ordered by name, as `write_tensors` orders them."""
    found = []
    for source in sources:
        header, start = _read_header(source)
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                found.append((name, entry["dtype"], entry["shape"], source, start + begin, end - begin))

    def copier(source, begin, nbytes):
        def write(handle):
            with open(source, "rb") as reader:
                reader.seek(begin)
                left = nbytes
                while left:
                    chunk = reader.read(min(left, _COPY_CHUNK))
                    handle.write(chunk)
                    left -= len(chunk)

        return write

    entries = [(name, dtype, shape, nbytes, copier(source, begin, nbytes))
               for name, dtype, shape, source, begin, nbytes in sorted(found, key=lambda e: (-_ITEM_SIZE[e[1]], e[0]))]
    _write_safetensors(path, entries, metadata)


def load_into(path: str | Path, tensors: dict) -> None:
    """Copy the tensors of a safetensors file into existing tensors of the same names, one at a time."""
    from safetensors import safe_open

    device = str(next(iter(tensors.values())).device) if tensors else "cpu"
    with safe_open(str(path), framework="pt", device=device) as handle:
        for name, tensor in tensors.items():
            tensor.copy_(handle.get_tensor(name))


def stage_finished(out) -> bool:
    """Whether `out` holds a finished stage: a call that then succeeds without overwrite leaves it as it was."""
    return Path(out).is_dir() and (read_manifest(out) or {}).get("status") == "complete"
