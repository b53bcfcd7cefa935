"""The Python API: one function per stage, the code the `attrib` commands run.

    import attrib
    factors = attrib.fit_factors("path/to/model", corpus, out="run/factors")
    scores = attrib.query("path/to/model", factors, queries, corpus, out="run/scores")
    scores.documents(pandas=True)

Each function takes the options of its command as keyword arguments (same names and
defaults, `--max-length` is `max_length=`), writes the same stage directory, and
returns a `StageResult`. Bad input raises the typed errors of `attrib.errors`
(`InputError`, `RunError`), the ones the command prints as one `error: …` line.

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
  the stage that wrote it.

Library log lines and progress bars (transformers, datasets) are off during a call and
restored after it; attrib's own progress goes to stderr (`attrib.progress`).

A stage's module is named apart from its function here (`attrib.prefilter` is this module's
function, the stage module is `attrib.prefilter_stage`): an imported submodule would shadow it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from attrib.errors import InputError

INPUTS_DIR = "attrib-inputs"
DOCUMENTS_TOP = 1000  # without candidates: each query's most positive and most negative documents kept


# --------------------------------------------------------------------------- results


@dataclass
class StageResult:
    """A finished stage directory: where it is, its manifest, and readers for its tables."""

    out: Path
    manifest: dict
    already_complete: bool = False  # True when `out` was finished before this call and left as it was

    @classmethod
    def open(cls, out: str | Path) -> StageResult:
        """The result of a stage directory written earlier (by the API or the command line)."""
        from attrib.storage import read_manifest

        manifest = read_manifest(out)
        if manifest is None:
            raise InputError(f"{out} is not a stage directory (no manifest.json)")
        return cls(Path(out), manifest)

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "?")

    def documents(self, pandas: bool = False):
        """The ranked table: documents.parquet of `query`, candidates.parquet of `prefilter`,
        self_influence.parquet of `self_influence`.

        A pyarrow Table, or a pandas DataFrame with `pandas=True` (pandas must be installed).
        """
        import pyarrow.parquet as pq

        from attrib.prefilter_stage import CANDIDATES_FILE
        from attrib.score_tables import DOCUMENTS, SELF_INFLUENCE

        names = {"query": DOCUMENTS, "prefilter": CANDIDATES_FILE, "self-influence": SELF_INFLUENCE}
        if self.stage not in names:
            raise InputError(f"{self.out} holds `attrib {self.stage}` output, which has no documents table")
        return _maybe_pandas(pq.read_table(self.out / names[self.stage]), pandas)

    def to_pandas(self):
        """`documents(pandas=True)`."""
        return self.documents(pandas=True)

    def tokens(self, query_id: str, doc_id: str, pandas: bool = False):
        """Per-token scores of one (query, document) pair, one row per chunk (token offsets, ids and
        scores); empty when the pair's tokens were not kept (see `token_scores_top`)."""
        from attrib.score_tables import read_token_rows

        if self.stage != "query":
            raise InputError(f"{self.out} holds `attrib {self.stage}` output; token scores come from `attrib query`")
        return _maybe_pandas(read_token_rows(self.out, [(str(query_id), str(doc_id))]), pandas)


def _maybe_pandas(table, pandas: bool):
    if not pandas:
        return table
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise InputError("pandas=True needs pandas (pip install pandas); without it you get a pyarrow Table") from None
    return table.to_pandas()


def _stage_path(value, name: str) -> str | None:
    """A stage directory given as a path or as the StageResult that wrote it."""
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else str(value)
    if isinstance(value, StageResult):
        return str(value.out)
    raise InputError(f"{name} must be a stage directory or a StageResult, not {type(value).__name__}")


# --------------------------------------------------------------------------- inputs


def _rows_path(value, name: str, out) -> str:
    """A path to read `value` from: a path as given; a Dataset or rows written once, named by content."""
    import hashlib
    import tempfile
    if isinstance(value, (str, os.PathLike)):
        return str(value)
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


def _corpus_spec(corpus, out, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                 chat_template="auto", loss_on="all"):
    from attrib.data import LONG_DOCUMENTS, CorpusSpec, check_chat_options

    if max_docs is not None and max_docs < 1:
        raise InputError("--max-docs must be at least 1")
    if long_documents not in LONG_DOCUMENTS:
        raise InputError(f"--long-documents {long_documents} is not one of {', '.join(LONG_DOCUMENTS)}")
    check_chat_options(chat_template, loss_on)
    source = _rows_path(corpus, "corpus", out)
    return CorpusSpec(source, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                      chat_template, loss_on)


def _checked_max_length(max_length: int | None) -> int | None:
    """--max-length as given (None: the model's context); 0 or less is refused, never read as 'default'."""
    if max_length is not None and max_length < 2:
        raise InputError(f"--max-length {max_length} must be at least 2 (a sequence of one token predicts nothing)")
    return max_length


def parse_duration(text: str, option: str) -> float:
    """Seconds from '90', '90s', '10m' or '2h' (0 is allowed)."""
    units = {"s": 1, "m": 60, "h": 3600}
    value = text.strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale else value
    try:
        seconds = float(number) * (scale or 1)
    except ValueError:
        raise InputError(f"{option} {text!r} is not a duration like 90s, 10m or 2h") from None
    if seconds < 0:
        raise InputError(f"{option} must not be negative")
    return seconds


# --------------------------------------------------------------------------- models


def _is_loaded_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model, "named_modules") and hasattr(model, "parameters")


@contextlib.contextmanager
def _model_in_use(model, tokenizer, dtype: str, world, trust_remote_code: bool) -> Iterator[tuple[str, object, object]]:
    """(spec recorded in manifests, model in eval mode with frozen weights, tokenizer).

    A path is loaded in `dtype` on the world's device; a loaded model is used as it is and its
    training mode and requires_grad flags are restored afterwards.
    """
    from attrib.models import load_model

    if isinstance(model, (str, os.PathLike)):
        lm, loaded_tokenizer = load_model(str(model), dtype, world.device, trust_remote_code)
        yield str(model), lm, tokenizer if tokenizer is not None else loaded_tokenizer
        return
    if tokenizer is None:
        raise InputError("a loaded model needs its tokenizer: pass tokenizer=")
    parameters = list(model.parameters())
    training, flags = model.training, [p.requires_grad for p in parameters]
    model.eval()
    model.requires_grad_(False)
    try:
        yield getattr(model, "name_or_path", "") or f"<{type(model).__name__} object>", model, tokenizer
    finally:
        model.train(training)
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def _device_of(model, device: str) -> str:
    """The device to run on: `device`, or a loaded model's own (which `device` must then agree with)."""
    if isinstance(model, (str, os.PathLike)):
        return device
    if not _is_loaded_model(model):
        raise InputError(
            f"model must be a directory, a hub id or a loaded transformers model, not {type(model).__name__}"
        )
    own = str(next(model.parameters()).device)
    if device not in ("auto", own) and not (device == "cuda" and own.startswith("cuda")):
        raise InputError(f"the model is on {own} but device={device!r}; move the model or pass device={own!r}")
    return own


def _check_model_path(model) -> None:
    """A mistyped model path is named before anything is read."""
    from attrib.models import model_source

    if isinstance(model, (str, os.PathLike)):
        model_source(str(model))


def _tracked_layers_of_factors(lm, model_spec: str, factors: str):
    """The factors' tracked layers in `lm`, refused when the factors were fitted for another model."""
    import re

    from attrib.models import find_tracked_layers, fingerprint
    from attrib.storage import open_input

    factors_manifest = open_input(factors, "fit-factors", option="--factors")
    names = factors_manifest["model"]["tracked_modules"]
    present = {name for name, _ in lm.named_modules()}
    if not set(names) <= present:
        raise InputError(
            f"--factors {factors} was fitted for another model ({factors_manifest['model']['model_type']}, "
            f"modules like {names[0]}); fit factors for --model {model_spec}"
        )
    layers = find_tracked_layers(lm, "^(" + "|".join(re.escape(n) for n in names) + ")$")
    open_input(factors, "fit-factors", fingerprint(lm, layers), option="--factors")
    return layers


# --------------------------------------------------------------------------- fit-factors


def fit_factors(
    model,
    corpus,
    out: str | Path,
    *,
    tokenizer=None,
    strategy: str = "ekfac",
    fisher: str = "empirical",
    fisher_samples: int = 1,
    max_sequences: int | None = None,
    max_tokens: int | None = None,
    covariance_max_tokens: int | None = None,
    stats_dtype: str = "float32",
    docs_per_part: int = 2000,
    layers_per_pass: int | None = None,
    max_memory: str | None = None,
    checkpoint_every: str = "10m",
    tf32: bool | None = None,
    collective_timeout: str = "6h",
    tokens_per_batch: int = 4096,
    max_length: int | None = None,
    long_documents: str = "chunk",
    chat_template: str = "auto",
    loss_on: str = "all",
    seed: int = 0,
    modules: str | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    lines: bool = False,
    max_docs: int | None = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Fit EK-FAC factors (covariances, eigenbases, eigenvalue correction) of `model` on `corpus` into `out`.

    The options are those of `attrib fit-factors` (see `attrib fit-factors --help`). A rerun
    resumes an unfinished `out` and leaves a finished one alone.
    """
    from dataclasses import asdict

    from attrib.data import chat_format, check_corpus, default_max_length
    from attrib.distributed import detect_world
    from attrib.fit import FitSettings
    from attrib.fit import fit_factors as run_fit
    from attrib.memory import parse_bytes
    from attrib.models import find_tracked_layers, model_record
    from attrib.progress import libraries_quiet, message
    from attrib.storage import StageDir, input_identity, read_manifest

    max_length = _checked_max_length(max_length)
    if dtype == "float16":
        raise InputError(
            "--dtype float16 is refused for fit-factors: without loss scaling its gradients underflow to zero "
            "or overflow; use --dtype bfloat16 (same memory, float32's range)"
        )
    device = _device_of(model, device)
    _check_model_path(model)
    spec = _corpus_spec(corpus, out, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                        chat_template, loss_on)
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    every = parse_duration(str(checkpoint_every), "--checkpoint-every")
    timeout = parse_duration(str(collective_timeout), "--collective-timeout")
    budget = parse_bytes(str(max_memory), "--max-memory") if max_memory is not None else None
    if budget is not None and layers_per_pass is not None:
        raise InputError("give --layers-per-pass or --max-memory, not both")
    if timeout <= 0:
        raise InputError("--collective-timeout must be positive")
    world = detect_world(device, timeout=timeout)
    try:
        dtype = default_dtype(dtype, world.device)
        with libraries_quiet("transformers"), _model_in_use(model, tokenizer, dtype, world, trust_remote_code) as (
                model_spec, lm, tokenizer):
            dtype = str(next(lm.parameters()).dtype).removeprefix("torch.")
            if dtype == "float16":
                raise InputError("the model is in float16, which fit-factors refuses (no loss scaling); "
                                 "convert it to bfloat16 or float32")
            layers = find_tracked_layers(lm, modules)
            settings = FitSettings(
                strategy=strategy, fisher=fisher, fisher_samples=fisher_samples,
                max_length=max_length or default_max_length(lm.config, tokenizer),
                tokens_per_batch=tokens_per_batch, docs_per_part=docs_per_part,
                max_sequences=max_sequences, max_tokens=max_tokens, stats_dtype=stats_dtype,
                covariance_max_tokens=covariance_max_tokens,
                seed=seed, world_size=world.size, layers_per_pass=layers_per_pass,
                tf32=str(world.device).startswith("cuda") if tf32 is None else tf32,
            )
            settings.validate()
            if budget is not None:
                settings.layers_per_pass = layers_for_budget(budget, lm, layers, settings, dtype, world.device)
            reading = {key: value for key, value in asdict(spec).items() if key not in ("source", "long_documents")}
            recorded = {**asdict(settings), "modules": modules, "dtype": dtype, "long_documents": long_documents,
                        "corpus_options": reading,
                        "chat": {**chat_format(tokenizer, chat_template).identity(), "loss_on": loss_on}}
            inputs = {"corpus": input_identity(spec.source)}
            record = model_record(model_spec, lm, layers)
            stage = world.main_first(
                lambda is_main: StageDir(out, "fit-factors", recorded, record, inputs, overwrite and is_main)
            )
            if stage.already_complete:
                message(f"{out} is already complete; use --overwrite to fit again")
            else:
                with stage.guard():
                    run_fit(lm, tokenizer, layers, spec, stage, settings, world, checkpoint_every=every)
        return StageResult(Path(out), read_manifest(out), stage.already_complete)
    finally:
        world.close()


def default_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 compute on CUDA (statistics stay float32), float32 on CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def layers_for_budget(budget: int, lm, layers, settings, dtype: str, device: str) -> int | None:
    """--layers-per-pass from --max-memory through attrib.memory's model of fit-factors."""
    from attrib import memory

    shape, shapes = memory.model_shape(lm), memory.layer_shapes(layers)
    kind = "cpu" if str(device) == "cpu" else "cuda"

    def predict(layers_per_pass):
        return memory.fit_factors(
            shape, shapes, tokens_per_batch=settings.tokens_per_batch, dtype=dtype, device=kind,
            layers_per_pass=layers_per_pass, strategy=settings.strategy, fisher=settings.fisher,
            stats_dtype=settings.stats_dtype,
        )

    try:
        return memory.choose_layers_per_pass(budget, predict, len(layers), kind)
    except ValueError as exc:
        raise InputError(
            f"--max-memory {budget / memory.GiB:.1f} GiB is too small: {exc}; lower --tokens-per-batch or raise --max-memory"
        ) from None


# --------------------------------------------------------------------------- prefilter


def prefilter(
    corpus,
    queries,
    out: str | Path,
    *,
    top_k: int = 10_000,
    unit: str = "document",
    analyzer: str = "word",
    ngram_range: str | tuple[int, int] = "1,1",
    scoring: str = "tfidf",
    query_text: str = "both",
    backend: str = "auto",
    model: str | None = None,
    max_length: int | None = None,
    long_documents: str = "chunk",
    chat_template: str = "auto",
    hash_features: int = 2**22,
    text_field: str = "text",
    id_field: str | None = None,
    lines: bool = False,
    max_docs: int | None = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Rank the corpus for each query by TF-IDF (or BM25) and keep the `top_k` candidates in `out`.

    The options are those of `attrib prefilter`; `model` (a path or hub id) is the tokenizer
    that `unit="sequence"` or `analyzer="model"` need; `ngram_range` is "1,2" or (1, 2).
    """
    from attrib.prefilter_stage import parse_ngram_range, run_prefilter
    from attrib.progress import libraries_quiet

    if not isinstance(ngram_range, str):
        ngram_range = ",".join(str(n) for n in ngram_range)
    spec = _corpus_spec(corpus, out, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                        chat_template)
    queries = _rows_path(queries, "queries", out)
    finished = _finished(out) and not overwrite
    with libraries_quiet(*(("transformers",) if model is not None else ())):
        manifest = run_prefilter(
            spec, queries, out, top_k, unit=unit, analyzer=analyzer, ngram_range=parse_ngram_range(ngram_range),
            scoring=scoring, query_text=query_text, backend=backend, model=None if model is None else str(model),
            max_length=_checked_max_length(max_length), hash_features=hash_features,
            trust_remote_code=trust_remote_code, overwrite=overwrite,
        )
    return StageResult(Path(out), manifest, finished)


def _finished(out) -> bool:
    """Whether `out` holds a finished stage: a call that then succeeds without overwrite left it as it was."""
    from attrib.storage import read_manifest

    return Path(out).is_dir() and (read_manifest(out) or {}).get("status") == "complete"


# --------------------------------------------------------------------------- query-gradients and query


def _checked_queries(queries: str, tokenizer, max_length: int, chat_template: str = "auto"):
    """The queries (chat queries rendered), each checked to tokenize into a prompt and a completion that fit."""
    from attrib.data import chat_format, load_queries, query_sequence, special_prefix

    query_list = load_queries(queries, chat=chat_format(tokenizer, chat_template))
    prefix = special_prefix(tokenizer)
    for item in query_list:
        query_sequence(tokenizer, item, max_length, prefix)
    return query_list


def _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world, chat_template="auto",
                    solver=None, solve_iterations=None, solve_tokens=None, solve_corpus=None):
    """QuerySettings from the options (queries per batch are set from the memory budget by `_batching`)."""
    from attrib.query_stage import QuerySettings

    if damping is not None and damping_scale is not None:
        raise InputError("give either --damping (absolute) or --damping-scale (relative), not both")
    settings = QuerySettings(query_rank=32 if query_rank is None else query_rank, damping=damping,
                             max_length=max_length, tokens_per_batch=tokens_per_batch, world_size=world.size,
                             chat_template=chat_template)
    if damping_scale is not None:
        settings.damping_scale = damping_scale
    settings.solver = solver or settings.solver
    if settings.solver != "cg":
        given = [name for name, value in (("--solve-iterations", solve_iterations), ("--solve-tokens", solve_tokens),
                                          ("--solve-corpus", solve_corpus)) if value is not None]
        if given:
            raise InputError(f"{', '.join(given)} applies to --solver cg only")
    if solve_iterations is not None:
        settings.solve_iterations = solve_iterations
    elif settings.solver == "cg":
        from attrib.solve import DEFAULT_SOLVE_ITERATIONS

        settings.solve_iterations = DEFAULT_SOLVE_ITERATIONS
    if solve_tokens is not None:
        settings.solve_tokens = solve_tokens
    settings.validate()
    return settings


def _batching(lm, layers, factors, queries: int, rank: int, max_memory, settings, world, docs_per_part=2000):
    """(queries per batch, queries per pass) whose predicted peaks fit --max-memory (default: 90% of
    the GPU, half of the host's RAM on CPU); see attrib.memory and `attrib inspect`."""
    from attrib import memory
    from attrib.storage import open_input

    budget = memory.parse_bytes(str(max_memory), "--max-memory") if max_memory else memory.default_budget(world.device)
    strategy = open_input(factors, "fit-factors", option="--factors")["settings"]["strategy"]
    return memory.query_batching(
        memory.model_shape(lm), memory.layer_shapes(layers), queries=queries, budget=budget,
        tokens_per_batch=settings.tokens_per_batch, dtype=str(next(lm.parameters()).dtype).removeprefix("torch."),
        device=str(world.device), rank=rank, max_length=settings.max_length, rotates=strategy in ("ekfac", "kfac"),
        docs_per_part=docs_per_part, cg=settings.solves,
    )


def query_gradients(
    model,
    factors,
    queries,
    out: str | Path,
    *,
    tokenizer=None,
    query_rank: int = 32,
    damping: float | None = None,
    damping_scale: float | None = None,
    max_length: int | None = None,
    tokens_per_batch: int = 4096,
    max_memory: str | None = None,
    solver: str | None = None,
    solve_iterations: int | None = None,
    solve_tokens: int | None = None,
    solve_corpus: str | None = None,
    chat_template: str = "auto",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Compute, precondition with `factors` and compress each query's gradient into `out`.

    The options are those of `attrib query-gradients`; `query(..., query_gradients_dir=result)`
    scores with them.
    """
    from attrib.data import check_chat_options, default_max_length
    from attrib.distributed import detect_world
    from attrib.progress import libraries_quiet
    from attrib.query_stage import run_query_gradients

    max_length = _checked_max_length(max_length)
    check_chat_options(chat_template, "all")
    factors = _stage_path(factors, "factors")
    device = _device_of(model, device)
    _check_model_path(model)
    queries = _rows_path(queries, "queries", out)
    finished = _finished(out) and not overwrite
    world = detect_world(device)
    try:
        with libraries_quiet("transformers"), _model_in_use(model, tokenizer, dtype, world, trust_remote_code) as (
                model_spec, lm, tokenizer):
            layers = _tracked_layers_of_factors(lm, model_spec, factors)
            max_length = max_length or default_max_length(lm.config, tokenizer)
            settings = _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world,
                                       chat_template, solver, solve_iterations, solve_tokens, solve_corpus)
            query_list = _checked_queries(queries, tokenizer, max_length, chat_template)
            settings.queries_per_batch, _ = _batching(lm, layers, factors, len(query_list), settings.query_rank,
                                                      max_memory, settings, world)
            manifest = run_query_gradients(out, model_spec, lm, tokenizer, layers, factors, query_list, settings, world,
                                           overwrite, solve_corpus=solve_corpus)
        return StageResult(Path(out), manifest, finished)
    finally:
        world.close()


def _token_scores_top(value) -> int:
    """--token-scores-top: a positive number, 'all' (-1) or 'none' (0)."""
    text = str(value)
    if text == "all":
        return -1
    if text == "none":
        return 0
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise InputError(f"--token-scores-top {value} must be a positive number, 'all' or 'none'")


def _checked_query_gradients(query_gradients_dir: str, given: dict) -> dict:
    """DIR's manifest; options that would change DIR's gradients must agree with it."""
    from attrib.storage import open_input

    manifest = open_input(query_gradients_dir, "query-gradients", option="--query-gradients")
    recorded = manifest["settings"]
    for name, value in given.items():
        if value is not None and recorded.get(name) != value:
            raise InputError(
                f"--{name.replace('_', '-')} {value} conflicts with --query-gradients {query_gradients_dir}, computed "
                f"with {recorded.get(name)}; drop the flag or recompute the query gradients"
            )
    return manifest


def query(
    model,
    factors,
    queries,
    corpus,
    out: str | Path,
    *,
    tokenizer=None,
    query_gradients_dir=None,
    candidates=None,
    prefilter: int | None = None,
    token_scores_top: int | str = 100,
    query_rank: int | None = None,
    damping: float | None = None,
    damping_scale: float | None = None,
    keep_all_scores: bool = False,
    queries_per_pass: int = 0,
    max_memory: str | None = None,
    docs_per_part: int = 2000,
    tokens_per_batch: int = 4096,
    max_length: int | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    lines: bool = False,
    max_docs: int | None = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    long_documents: str = "chunk",
    solver: str | None = None,
    solve_iterations: int | None = None,
    solve_tokens: int | None = None,
    solve_corpus: str | None = None,
    chat_template: str = "auto",
    loss_on: str = "all",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Score the corpus against every query into `out`: per document, per layer and per token.

    The options are those of `attrib query`. `queries` may be None when `query_gradients_dir`
    (a directory or the result of `query_gradients`) gives computed query gradients;
    `candidates` is a prefilter directory or result; `token_scores_top` a number, "all" or "none".
    """
    from attrib.data import check_corpus, default_max_length
    from attrib.distributed import detect_world
    from attrib.prefilter_stage import check_candidates_chunking
    from attrib.progress import libraries_quiet
    from attrib.query_stage import ScoreRequest, run_query
    from attrib.scoring import ScoreSettings
    from attrib.storage import open_input, read_manifest

    top = _token_scores_top(token_scores_top)
    max_length = _checked_max_length(max_length)
    factors = _stage_path(factors, "factors")
    candidates = _stage_path(candidates, "candidates")
    query_gradients_dir = _stage_path(query_gradients_dir, "query_gradients_dir")
    if candidates is not None and prefilter is not None:
        raise InputError("give either --candidates or --prefilter, not both")
    if prefilter is not None and prefilter < 1:
        raise InputError("--prefilter must be at least 1")
    if query_gradients_dir is None and queries is None:
        raise InputError("--queries is needed unless --query-gradients gives computed query gradients")
    if docs_per_part < 1 or tokens_per_batch < 1 or queries_per_pass < 0:
        raise InputError("--docs-per-part and --tokens-per-batch must be positive, --queries-per-pass at least 0")
    device = _device_of(model, device)
    candidates_manifest = open_input(candidates, "prefilter", option="--candidates") if candidates is not None else None
    if query_gradients_dir is not None:
        gradients_manifest = _checked_query_gradients(
            query_gradients_dir, {"query_rank": query_rank, "damping": damping, "damping_scale": damping_scale,
                                  "solver": solver, "solve_iterations": solve_iterations, "solve_tokens": solve_tokens})
    queries = None if queries is None else _rows_path(queries, "queries", out)
    spec = _corpus_spec(corpus, out, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                        chat_template, loss_on)
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    _check_model_path(model)
    world = detect_world(device)
    try:
        with libraries_quiet("transformers"), _model_in_use(model, tokenizer, dtype, world, trust_remote_code) as (
                model_spec, lm, tokenizer):
            layers = _tracked_layers_of_factors(lm, model_spec, factors)
            max_length = max_length or default_max_length(lm.config, tokenizer)
            if candidates_manifest is not None:
                check_candidates_chunking(candidates_manifest, tokenizer, max_length, long_documents,
                                          chat_template=chat_template)
            query_settings = _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world,
                                             chat_template, solver, solve_iterations, solve_tokens, solve_corpus)
            if query_gradients_dir is None:
                query_list = _checked_queries(queries, tokenizer, max_length, chat_template)
                count, rank = len(query_list), query_settings.query_rank
            else:
                query_list = None
                count, rank = len(gradients_manifest["queries"]), gradients_manifest["settings"]["query_rank"]
            per_batch, per_pass = _batching(lm, layers, factors, count, rank, max_memory, query_settings, world,
                                            docs_per_part)
            query_settings.queries_per_batch = per_batch
            every = keep_all_scores or candidates is not None or prefilter is not None
            score_settings = ScoreSettings(max_length, tokens_per_batch, docs_per_part, top,
                                           queries_per_pass or per_pass, 0 if every else DOCUMENTS_TOP, world.size)
            request = ScoreRequest(factors, spec, queries, query_gradients_dir, candidates, prefilter, solve_corpus)
            manifest = run_query(out, model_spec, lm, tokenizer, layers, request, query_list, query_settings,
                                 score_settings, world, overwrite)
        return StageResult(Path(out), read_manifest(out), world.is_main and manifest is None)
    finally:
        world.close()


# --------------------------------------------------------------------------- self-influence


def self_influence(
    model,
    factors,
    corpus,
    out: str | Path,
    *,
    tokenizer=None,
    token_scores_top: int | str = 100,
    damping: float | None = None,
    damping_scale: float | None = None,
    max_memory: str | None = None,
    docs_per_part: int = 2000,
    tokens_per_batch: int = 4096,
    max_length: int | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    lines: bool = False,
    max_docs: int | None = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    long_documents: str = "chunk",
    chat_template: str = "auto",
    loss_on: str = "all",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Score every training sequence of `corpus` by its self-influence ⟨H⁻¹∇L_m, ∇L_m⟩ into `out`.

    The options are those of `attrib self-influence`; `.documents()` of the result reads
    self_influence.parquet (highest first: surprising, corrupted or memorised sequences).
    """
    from attrib import memory
    from attrib.data import check_corpus, default_max_length
    from attrib.distributed import detect_world
    from attrib.progress import libraries_quiet
    from attrib.self_influence_stage import SelfInfluenceSettings, run_self_influence
    from attrib.storage import read_manifest

    top = _token_scores_top(token_scores_top)
    max_length = _checked_max_length(max_length)
    factors = _stage_path(factors, "factors")
    if damping is not None and damping_scale is not None:
        raise InputError("give either --damping (absolute) or --damping-scale (relative), not both")
    budget = memory.parse_bytes(str(max_memory), "--max-memory") if max_memory else None
    device = _device_of(model, device)
    spec = _corpus_spec(corpus, out, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                        chat_template, loss_on)
    check_corpus(spec)  # a missing path, a wrong --text-field or a bad first row fail before any output exists
    _check_model_path(model)
    finished = _finished(out) and not overwrite
    world = detect_world(device)
    try:
        with libraries_quiet("transformers"), _model_in_use(model, tokenizer, dtype, world, trust_remote_code) as (
                model_spec, lm, tokenizer):
            layers = _tracked_layers_of_factors(lm, model_spec, factors)
            settings = SelfInfluenceSettings(
                damping=damping, max_length=max_length or default_max_length(lm.config, tokenizer),
                tokens_per_batch=tokens_per_batch, docs_per_part=docs_per_part, token_scores_top=top,
                world_size=world.size,
            )
            if damping_scale is not None:
                settings.damping_scale = damping_scale
            run_self_influence(out, model_spec, lm, tokenizer, layers, factors, spec, settings, world, overwrite, budget)
        return StageResult(Path(out), read_manifest(out), finished)
    finally:
        world.close()


# --------------------------------------------------------------------------- index (issue 20)


def index(
    model,
    factors,
    corpus,
    out: str | Path,
    *,
    tokenizer=None,
    representation: str = "lowrank",
    rank: int = 8,
    dims: str = "16",
    projection: str = "random",
    seed: int = 0,
    storage_dtype: str = "bfloat16",
    damping: float | None = None,
    damping_scale: float | None = None,
    docs_per_part: int = 2000,
    tokens_per_batch: int = 4096,
    max_length: int | None = None,
    text_field: str = "text",
    id_field: str | None = None,
    lines: bool = False,
    max_docs: int | None = None,
    skip_bad_rows: bool = False,
    split: str = "train",
    long_documents: str = "chunk",
    chat_template: str = "auto",
    loss_on: str = "all",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Store a compressed gradient of every sequence of `corpus` in `out` (attrib.stages.index), for
    `index_scores` and `index_candidates`. `dims` is "16" or "16x32" (k_out x k_in per layer)."""
    from attrib.data import check_corpus, default_max_length
    from attrib.distributed import detect_world
    from attrib.progress import libraries_quiet
    from attrib.stages.index import IndexSettings, build_index, parse_dims
    from attrib.storage import read_manifest

    max_length = _checked_max_length(max_length)
    factors = _stage_path(factors, "factors")
    if damping is not None and damping_scale is not None:
        raise InputError("give either --damping (absolute) or --damping-scale (relative), not both")
    settings = IndexSettings(representation=representation, rank=rank, dims=parse_dims(dims), projection=projection,
                             seed=seed, storage_dtype=storage_dtype, damping=damping, docs_per_part=docs_per_part,
                             tokens_per_batch=tokens_per_batch)
    if damping_scale is not None:
        settings.damping_scale = damping_scale
    settings.validate()
    device = _device_of(model, device)
    spec = _corpus_spec(corpus, out, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents,
                        chat_template, loss_on)
    check_corpus(spec)  # a missing path, a wrong --text-field or an empty corpus fail before any output exists
    _check_model_path(model)
    finished = _finished(out) and not overwrite
    world = detect_world(device)
    try:
        with libraries_quiet("transformers"), _model_in_use(model, tokenizer, dtype, world, trust_remote_code) as (
                model_spec, lm, tokenizer):
            layers = _tracked_layers_of_factors(lm, model_spec, factors)
            settings.max_length = max_length or default_max_length(lm.config, tokenizer)
            settings.world_size = world.size
            build_index(out, model_spec, lm, tokenizer, layers, factors, spec, settings, world, overwrite)
        return StageResult(Path(out), read_manifest(out), finished)
    finally:
        world.close()


def _index_scoring(kind: str, model, index, queries, out, tokenizer, query_gradients_dir, query_rank, damping,
                   damping_scale, max_length, tokens_per_batch, chat_template, dtype, device, trust_remote_code,
                   overwrite, **options) -> StageResult:
    """index_scores and index_candidates: the queries' gradients with the index's factors, then the stage."""
    from attrib.data import check_chat_options, default_max_length
    from attrib.distributed import detect_world
    from attrib.progress import libraries_quiet
    from attrib.stages import index as stage
    from attrib.storage import open_input, read_manifest

    max_length = _checked_max_length(max_length)
    check_chat_options(chat_template, "all")
    index_dir = _stage_path(index, "index")
    query_gradients_dir = _stage_path(query_gradients_dir, "query_gradients_dir")
    if query_gradients_dir is None and queries is None:
        raise InputError("--queries is needed unless --query-gradients gives computed query gradients")
    index_manifest = open_input(index_dir, stage.STAGE, option="--index")
    factors = index_manifest["inputs"]["factors"]["path"]
    queries = None if queries is None else _rows_path(queries, "queries", out)
    device = _device_of(model, device)
    _check_model_path(model)
    finished = _finished(out) and not overwrite
    world = detect_world(device)
    try:
        with libraries_quiet("transformers"), _model_in_use(model, tokenizer, dtype, world, trust_remote_code) as (
                model_spec, lm, tokenizer):
            layers = _tracked_layers_of_factors(lm, model_spec, factors)
            max_length = max_length or default_max_length(lm.config, tokenizer)
            settings = _query_settings(query_rank, damping, damping_scale, max_length, tokens_per_batch, world,
                                       chat_template)
            query_list = None
            if query_gradients_dir is None:
                query_list = _checked_queries(queries, tokenizer, max_length, chat_template)
                settings.queries_per_batch, _ = _batching(lm, layers, factors, len(query_list), settings.query_rank,
                                                          None, settings, world)
            run = stage.score_index if kind == "scores" else stage.index_candidates
            run(out, index_dir, model_spec, lm, tokenizer, layers, query_list, settings, world=world,
                overwrite=overwrite, query_gradients=query_gradients_dir, queries_source=queries, **options)
        return StageResult(Path(out), read_manifest(out), finished)
    finally:
        world.close()


def index_scores(
    model,
    index,
    queries,
    out: str | Path,
    *,
    tokenizer=None,
    query_gradients_dir=None,
    keep_all_scores: bool = False,
    queries_per_pass: int = 0,
    query_rank: int | None = None,
    damping: float | None = None,
    damping_scale: float | None = None,
    max_length: int | None = None,
    tokens_per_batch: int = 4096,
    chat_template: str = "auto",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """Score every document of an index (a directory or the result of `index`) for every query into `out`:
    documents.parquet and summary.parquet as `query` writes them, from the compressed gradients."""
    from attrib.stages.index import IndexScoreSettings

    if queries_per_pass < 0:
        raise InputError("--queries-per-pass must be at least 0")
    settings = IndexScoreSettings(0 if keep_all_scores else DOCUMENTS_TOP, queries_per_pass)
    return _index_scoring("scores", model, index, queries, out, tokenizer, query_gradients_dir, query_rank, damping,
                          damping_scale, max_length, tokens_per_batch, chat_template, dtype, device, trust_remote_code,
                          overwrite, settings=settings)


def index_candidates(
    model,
    index,
    queries,
    out: str | Path,
    *,
    top_k: int = 10_000,
    tokenizer=None,
    query_gradients_dir=None,
    query_rank: int | None = None,
    damping: float | None = None,
    damping_scale: float | None = None,
    max_length: int | None = None,
    tokens_per_batch: int = 4096,
    chat_template: str = "auto",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> StageResult:
    """The index's `top_k` documents per query as prefilter candidates in `out`, for `query(candidates=...)`."""
    return _index_scoring("candidates", model, index, queries, out, tokenizer, query_gradients_dir, query_rank, damping,
                          damping_scale, max_length, tokens_per_batch, chat_template, dtype, device, trust_remote_code,
                          overwrite, top_k=top_k)
