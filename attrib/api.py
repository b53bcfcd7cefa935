"""The Python API: one function per stage, the code the `attrib` commands run.

    import attrib
    factors = attrib.fit_factors("path/to/model", corpus, out="run/factors")
    scores = attrib.query("path/to/model", factors, queries, corpus, out="run/scores")
    scores.documents(pandas=True)

The functions are generated from the stages of `attrib.options.STAGES`: each takes the stage's
inputs (positional or by name) and its command's options as keyword arguments, with the same
names and defaults (`--max-length` is `max_length=`; `help(attrib.query)` lists them), writes
the same stage directory, and returns a `StageResult`. Bad input raises the typed errors of
`attrib.errors` (`InputError`, `RunError`), the ones the command prints as one `error: …` line,
naming options as keywords; an unknown keyword is a TypeError, as in any Python function.
`quiet=True` hides attrib's progress for that call only.

Inputs:

* model: a directory or hub id, or a loaded `transformers` model together with
  `tokenizer=`. A loaded model is used in its own dtype and on its own device; it is put
  in eval mode with frozen weights for the call and given back as it was.
* corpus and queries: a path (anything the commands read), a `datasets.Dataset`, a pandas
  DataFrame or an iterable of dicts (`{"id", "text"}` rows; `{"id", "prompt", "completion"}` queries).
  In-memory rows are written once to a content-addressed file in `attrib-inputs/` beside
  the output directory (`<sha256>.parquet` for a Dataset, `.jsonl` otherwise) and read
  from there like any other file: the same validation and error messages (which name
  that file and its line), and the same resume rule (the same rows are the same file;
  other rows are another file, which a rerun into the same `out` refuses without
  `overwrite=True`). The files can be deleted once the run is finished.
* factors, candidates and query gradients: a stage directory or the `StageResult` of
  the stage that wrote it; `combine`'s scores: a list of them (or one).

Library log lines and progress bars (transformers, datasets) are off during a call and
restored after it; attrib's own progress goes to stderr (`attrib.progress`).
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from attrib import runtime
from attrib.errors import InputError
from attrib.options import STAGES, StageSpec
from attrib.results import StageResult

INPUTS_DIR = "attrib-inputs"


def _stage_path(value, name: str) -> str | None:
    """A stage directory given as a path or as the StageResult that wrote it."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else str(value)
    if isinstance(value, StageResult):
        return str(value.out)
    raise InputError(f"{name} must be a stage directory or a StageResult, not {type(value).__name__}")


def _rows_path(value, name: str, out) -> str | None:
    """A path to read `value` from: a path as given; a Dataset or rows written once, named by content."""
    import hashlib
    import tempfile

    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else str(value)
    if type(value).__module__.startswith("pandas") and hasattr(value, "to_dict"):
        value = value.to_dict("records")  # a DataFrame iterates over its column names, not its rows
    if isinstance(value, Mapping) or not (isinstance(value, Iterable) or hasattr(value, "to_parquet")):
        raise InputError(
            f"{name} must be a path, a datasets.Dataset or an iterable of dicts (rows), not {type(value).__name__}"
        )
    directory = Path(out).expanduser().resolve().parent / INPUTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        if type(value).__module__.startswith("datasets") and hasattr(value, "to_parquet"):
            suffix = ".parquet"
            from attrib.progress import libraries_quiet

            with libraries_quiet("datasets"):
                value.to_parquet(str(tmp))
        else:
            suffix = ".jsonl"
            _write_json_lines(value, tmp, name)
        digest = hashlib.sha256()
        with open(tmp, "rb") as source:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
        target = directory / f"{name}-{digest.hexdigest()[:32]}{suffix}"
        if target.is_file():
            tmp.unlink()  # the same rows as before: keep the file (and its identity) as it is
        else:
            os.replace(tmp, target)
        return str(target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json_lines(rows: Iterable, path: Path, name: str) -> None:
    import json

    with open(path, "w", encoding="utf-8") as handle:
        for number, row in enumerate(rows, start=1):
            try:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            except (TypeError, ValueError) as exc:
                raise InputError(f"{name} row {number}: cannot be written as JSON ({exc})") from None


def _signature(spec: StageSpec) -> inspect.Signature:
    """The stage's inputs (positional or by name; one that is optional on the command line may be None),
    `tokenizer=`, then every option by keyword."""
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    found = [inspect.Parameter(i.name, positional) for i in spec.inputs]
    found.append(inspect.Parameter("tokenizer", keyword, default=None))
    found += [inspect.Parameter(item.name, keyword, default=item.default, annotation=item.type)
              for _, item in spec.option_fields()]
    return inspect.Signature(found, return_annotation=StageResult)


def _stage_function(command: str):
    """The API function of one stage (see the module docstring)."""
    spec = STAGES[command]
    signature = _signature(spec)

    def stage(*args, **keywords) -> StageResult:
        bound = signature.bind(*args, **keywords)  # a missing input or an unknown keyword: TypeError
        given = dict(bound.arguments)
        tokenizer = given.pop("tokenizer", None)
        inputs = {i.name: given.pop(i.name, None) for i in spec.inputs}
        options = spec.parse(given)
        with runtime.session(quiet=options.run.quiet or None):
            for item in spec.inputs:
                if item.kind == "model":
                    runtime.device_of(inputs[item.name], options.model.device)  # a wrong model fails first
                elif item.kind == "rows":
                    inputs[item.name] = _rows_path(inputs[item.name], item.name, inputs["out"])
                elif item.kind == "stage":
                    inputs[item.name] = _stage_path(inputs[item.name], item.name)
                elif item.kind == "stages":
                    given_stages = inputs[item.name]
                    if given_stages is None or isinstance(given_stages, (str, os.PathLike, StageResult)):
                        given_stages = [] if given_stages is None else [given_stages]
                    inputs[item.name] = [_stage_path(value, item.name) for value in given_stages]
            for group, item in spec.option_fields():
                if item.metadata["stage_input"]:
                    owner = options.groups[group.key]
                    setattr(owner, item.name, _stage_path(getattr(owner, item.name), item.name))
            module = importlib.import_module(f"attrib.stages.{spec.module}")
            return module.run(*inputs.values(), options=options, tokenizer=tokenizer)

    stage.__name__ = stage.__qualname__ = spec.function
    stage.__signature__ = signature
    stage.__doc__ = (f"{spec.summary}\n\nThe options are those of `attrib {spec.command}` as keywords "
                     f"(`attrib {spec.command} --help`). A rerun resumes an unfinished `out` and leaves a "
                     "finished one alone.")
    return stage


fit_factors = _stage_function("fit-factors")
prefilter = _stage_function("prefilter")
query_gradients = _stage_function("query-gradients")
query = _stage_function("query")
self_influence = _stage_function("self-influence")
index = _stage_function("index")
combine = _stage_function("combine")
