"""`attrib combine`: influence across a training run, a weighted sum of scores from several checkpoints.

Influence adds over checkpoints as TracIn's gradient products do (Pruthi et al. 2020):
I(q, m) = Σ_c w_c I_c(q, m), with I_c the scores of `attrib query` at checkpoint c. Document,
per-layer and per-token scores are each that weighted sum; ranks and summaries are recomputed.
Weights are normalised to sum to 1, so one input gives back its own scores and `lr` weights are
TracIn's learning-rate weights up to one constant factor (which no rank or correlation sees).

The output is an ordinary scores directory (stage "query" plus a "combine" record of every input),
so `attrib report`, `attrib top` and `StageResult` read it as any scores. Inputs must score the same
queries against the same (query, document) pairs of the same corpus, chunked the same way, all exactly
or all from gradient indexes (`attrib query --index`); anything else is refused before anything is written.
Index scores combine as exact ones do: inner products add, so the weighted sum of several checkpoints'
index scores is the score against the concatenation of their (√w-scaled) compressed gradients.
Queries are combined in groups of bounded size (GROUP_BYTES of rows over all inputs), one part file each, so
memory does not grow with the number of queries and a killed run resumes at the first unfinished group.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attrib.errors import InputError
from attrib.options import parse_weights
from attrib.runtime import flag
from attrib.score_tables import DOCUMENTS, SUMMARY, TOKENS_DIR, documents_schema, tokens_schema, write_table

TRAINER_STATE = "trainer_state.json"  # Hugging Face Trainer's record in each checkpoint-N folder
# Queries are combined in groups whose rows, over all inputs, stay within GROUP_BYTES: one part file each,
# the unit of resume and of memory (scripts/bench_combine.py measures it). A row is its ids, score and ranks
# (ROW_BYTES, an estimate) and its layer scores.
GROUP_BYTES = 512 * 2**20
ROW_BYTES = 96
PARTS_DIR = "parts"
IGNORED_IN_IDENTITY = ("path", "mtime_ns", "status")  # the same content elsewhere or copied is the same input


@dataclass
class ScoresInput:
    """One input scores directory, its manifest and its weight (given, and normalised to sum 1)."""

    path: Path
    manifest: dict
    given_weight: float
    weight: float = 0.0
    checkpoint: dict | None = None  # step and learning rate from trainer_state.json, where there is one


def run(scores: list[str], out, *, options, tokenizer=None):
    """The stage as `attrib.combine` runs it (the tokenizer, which every stage function accepts, is unused)."""
    from attrib.results import StageResult
    from attrib.storage import stage_finished

    finished = stage_finished(out) and not options.run.overwrite
    manifest = run_combine(scores, out, options.combine.weights, options.run.overwrite)
    return StageResult(Path(out), manifest, finished)


def run_combine(inputs: Sequence[str | Path], out: str | Path, weights: str | Sequence[float] = "equal",
                overwrite: bool = False) -> dict:
    """Combine the `attrib query` outputs `inputs` into `out`; returns its manifest.

    `weights`: "equal", "lr" (each checkpoint's learning rate, from the trainer_state.json of the
    model directory it was scored with), or one number per input, in the order of `inputs`
    (e.g. "3e-4,1e-4"); normalised to sum to 1."""
    from attrib.progress import message
    from attrib.storage import StageDir, input_identity, read_manifest

    sources = _open_inputs(inputs, out)
    weighting = parse_weights(weights)
    _weigh(sources, weighting)
    sources.sort(key=lambda s: str(s.path.resolve()))  # the sum's order, so the order given changes no bit
    first = sources[0].manifest
    settings = {
        "combine": {"weighting": weighting if isinstance(weighting, str) else "given",
                    "weights": [s.weight for s in sources]},
        "max_length": first["settings"].get("max_length"),
    }
    fingerprints = [s.manifest["model"].get("fingerprint") for s in sources]
    model = {
        "spec": f"{len(sources)} checkpoints combined",
        "model_type": _common(s.manifest["model"].get("model_type") for s in sources),
        "fingerprint": hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest(),
        "tracked_modules": first["model"].get("tracked_modules"),
    }
    recorded_inputs = {"scores": [input_identity(s.path) for s in sources],
                       **{key: first["inputs"].get(key) for key in ("corpus", "candidates", "prefilter")}}
    stage = StageDir(out, "query", settings, model, recorded_inputs, overwrite)
    if stage.already_complete:
        message(f"{out} is already complete; use {flag('overwrite')} to combine again")
        return read_manifest(out)
    with stage.guard():
        return _combine(stage, sources)


def checkpoint_state(model_dir: str | Path) -> dict | None:
    """{"step", "learning_rate"} of a Trainer checkpoint folder: its global step and the learning rate
    last logged at or before it (None without a readable trainer_state.json: only `--weights lr` needs one)."""
    if not model_dir or not Path(model_dir).is_dir():
        return None  # a hub id: its revisions carry no learning rate
    path = Path(model_dir) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        step = int(state["global_step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        return None
    logged = [entry for entry in state.get("log_history", []) if isinstance(entry, dict)
              and "learning_rate" in entry and entry.get("step", 0) <= step]
    return {"step": step, "learning_rate": float(logged[-1]["learning_rate"]) if logged else None}


def _open_inputs(inputs: Sequence[str | Path], out: str | Path) -> list[ScoresInput]:
    from attrib.storage import open_input

    if not inputs:
        raise InputError("give at least one SCORES_DIR")
    paths = [Path(p) for p in inputs]
    resolved = [p.resolve() for p in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise InputError(f"SCORES_DIR {paths[index]} is given twice")
    if Path(out).resolve() in resolved:
        raise InputError(f"--out {out} is one of the SCORES_DIRs; write the combination elsewhere")
    sources = []
    for path in paths:
        manifest = open_input(path, "query", option="SCORES_DIR")
        _check_complete_table(path)
        sources.append(ScoresInput(path, manifest, 0.0, checkpoint=checkpoint_state(manifest["model"].get("spec", ""))))
    for source in sources[1:]:
        _check_same_scores(sources[0], source)
    return sources


def _check_complete_table(path: Path) -> None:
    """Refuse a documents.parquet that keeps only each query's tails: a document missing from one
    input has no score there to add."""
    import pyarrow.parquet as pq

    for name in (DOCUMENTS, SUMMARY):
        if not (path / name).is_file():
            raise InputError(f"SCORES_DIR {path} has no {name}; rerun `attrib query`")
    rows = pq.ParquetFile(path / DOCUMENTS).metadata.num_rows
    scored = int(np.sum(pq.read_table(path / SUMMARY, columns=["documents"])["documents"].to_numpy()))
    if rows < scored:
        raise InputError(f"SCORES_DIR {path} keeps only each query's most positive and negative documents "
                         f"({rows:,} of {scored:,} scores); rerun `attrib query` with --keep-all-scores or "
                         "--candidates")


def _content(value):
    """An input's identity without where it lives: copies of the same content compare equal."""
    if isinstance(value, dict):
        return {k: _content(v) for k, v in value.items() if k not in IGNORED_IN_IDENTITY}
    if isinstance(value, list):
        return [_content(v) for v in value]
    return value


def _what_was_scored(manifest: dict) -> dict[str, object]:
    """What must agree between inputs, by the name an error message gives it."""
    inputs = manifest.get("inputs", {})
    corpus = {k: v for k, v in (inputs.get("corpus") or {}).items() if k != "source"}
    gradients = manifest.get("query_gradients_settings") or {}
    return {
        "scores source (exact, or --index)": manifest.get("scores_from", "exact"),
        "queries": manifest.get("queries"),
        "candidates": (_content(inputs.get("candidates")), inputs.get("prefilter")),
        "corpus": _content({k: v for k, v in corpus.items() if k not in ("long_documents", "chat_template")}),
        "chunking (--max-length, --long-documents, chat template)": (
            manifest.get("settings", {}).get("max_length"), corpus.get("long_documents"), gradients.get("chat")),
        "tracked layers": manifest.get("layers"),
    }


def _check_same_scores(reference: ScoresInput, other: ScoresInput) -> None:
    expected, found = _what_was_scored(reference.manifest), _what_was_scored(other.manifest)
    for name, value in expected.items():
        if _as_json(found[name]) != _as_json(value):
            raise InputError(f"SCORES_DIR {other.path} has other {name} than {reference.path}; "
                             "combine only scores of the same queries, candidates, corpus and chunking")


def _as_json(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _weigh(sources: list[ScoresInput], weighting: str | list[float]) -> None:
    """Set each input's given and normalised weight."""
    if weighting == "equal":
        given = [1.0] * len(sources)
    elif weighting == "lr":
        given = []
        for source in sources:
            state = source.checkpoint or {}
            if state.get("learning_rate") is None:
                spec = source.manifest["model"].get("spec")
                raise InputError(f"{flag('weights', 'lr')}: SCORES_DIR {source.path} was scored with --model {spec}, "
                                 f"which has no readable {TRAINER_STATE} with a logged learning rate; give the rates "
                                 f"as numbers ({flag('weights', '3e-4,1e-4')})")
            given.append(state["learning_rate"])
    else:
        given = list(weighting)
        if len(given) != len(sources):
            raise InputError(f"{flag('weights')} has {len(given)} numbers for {len(sources)} SCORES_DIRs; give one "
                             "per input")
    if not all(math.isfinite(w) and w >= 0 for w in given) or sum(given) <= 0:
        raise InputError(f"{flag('weights')} must be non-negative numbers with a positive sum")
    total = math.fsum(given)
    for source, weight in zip(sources, given):
        source.given_weight, source.weight = weight, weight / total


def _common(values) -> str:
    return ", ".join(sorted({str(v) for v in values}))


def _combine(stage, sources: list[ScoresInput]) -> dict:
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    first = sources[0].manifest
    query_ids = sorted(q["id"] for q in first["queries"])
    num_layers = len(first.get("layers", []))
    groups = _query_groups(sources, query_ids, num_layers)
    for number, group in enumerate(groups):
        part = f"{PARTS_DIR}/documents-{number:05d}.parquet"
        if stage.has(part):
            continue
        documents = _combined_documents(sources, group, num_layers)
        tokens = _combined_tokens(sources, group)
        if tokens is not None and len(tokens):
            _write(stage.file(f"{TOKENS_DIR}/part-{number:05d}.parquet"), tokens)
        _write(stage.file(part), documents)  # last: its presence marks the group done
    summaries, rows = [], 0
    with atomic_path(stage.file(DOCUMENTS)) as tmp, pq.ParquetWriter(tmp, documents_schema()) as writer:
        for part in stage.parts(f"{PARTS_DIR}/documents-*.parquet"):
            table = pq.read_table(stage.file(part))
            writer.write_table(table)
            summaries.append(_summary(table))
            rows += len(table)
    write_table(stage.file(SUMMARY), {k: [v for s in summaries for v in s[k]] for k in summaries[0]},
                pq.read_schema(sources[0].path / SUMMARY))
    token_files = stage.parts(f"{TOKENS_DIR}/part-*.parquet")
    gradients = [s.manifest.get("query_gradients_settings") for s in sources]
    manifest = stage.complete(
        {"rows": rows, "documents_scored": first["counts"].get("documents_scored"), "queries": len(query_ids),
         "inputs": len(sources)},
        [DOCUMENTS, SUMMARY] + token_files,
        queries=first["queries"],
        layers=first.get("layers", []),
        strategy=_common(s.manifest.get("strategy") for s in sources),
        query_gradients_settings=gradients[0] if all(g == gradients[0] for g in gradients) else None,
        combine=[{"path": str(s.path.resolve()), "model": s.manifest["model"].get("spec"),
                  "fingerprint": s.manifest["model"].get("fingerprint"), "checkpoint": s.checkpoint,
                  "given_weight": s.given_weight, "weight": s.weight} for s in sources],
    )
    shutil.rmtree(stage.file(PARTS_DIR), ignore_errors=True)
    return manifest


def _query_groups(sources: list[ScoresInput], query_ids: list[str], num_layers: int) -> list[list[str]]:
    """Consecutive queries whose rows over all inputs fit GROUP_BYTES (a query with more rows than that is a
    group of its own); the inputs hold the same pairs, so the first input's summary counts them."""
    import pyarrow.parquet as pq

    summary = pq.read_table(sources[0].path / SUMMARY, columns=["query_id", "documents"]).to_pydict()
    rows = dict(zip(summary["query_id"], summary["documents"]))
    row_bytes = group_row_bytes(len(sources), num_layers)
    groups, size = [], 0
    for query_id in query_ids:
        held = rows.get(query_id, 0) * row_bytes
        if not groups or size + held > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(query_id)
        size += held
    return groups


def group_row_bytes(inputs: int, num_layers: int) -> int:
    """Bytes held per (query, document) row of a group: each input's rows as read and again as sorted by
    document, and their weighted sums."""
    return (2 * inputs + 1) * (ROW_BYTES + 8 * num_layers)


def _write(path: Path, table) -> None:
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_group(source, group: list[str], columns: list[str], sort: list[str], schema=None):
    """The rows of `group`'s queries of a Parquet file (or list of files), sorted by `sort`."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(source if isinstance(source, list) else str(source), format="parquet", schema=schema)
    table = dataset.to_table(columns=columns, filter=ds.field("query_id").isin(group))
    return table.sort_by([(name, "ascending") for name in sort])


def _combined_documents(sources: list[ScoresInput], group: list[str], num_layers: int):
    """The group's rows of documents.parquet: weighted sums, ranked per query (1 = most positive;
    ties by the inputs' mean rank, so one input keeps its own order)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = ["query_id", "doc_id", "score", "rank", "prefilter_rank", "layer_scores"]
    tables = [_read_group(s.path / DOCUMENTS, group, columns, ["query_id", "doc_id"]) for s in sources]
    base = tables[0]
    score = np.zeros(len(base))
    layers = np.zeros((len(base), num_layers))
    rank_sum = np.zeros(len(base))
    for source, table in zip(sources, tables):
        if not (table["query_id"].equals(base["query_id"]) and table["doc_id"].equals(base["doc_id"])):
            raise InputError(f"SCORES_DIR {source.path} scored other (query, document) pairs than {sources[0].path}; "
                             "combine only scores of the same candidates and corpus")
        score += source.weight * table["score"].to_numpy()
        flat = pc.list_flatten(table["layer_scores"]).to_numpy(zero_copy_only=False)
        layers += source.weight * flat.reshape(len(table), num_layers)
        rank_sum += table["rank"].to_numpy()
    query_codes = np.searchsorted(np.array(group, dtype=object), base["query_id"].to_numpy(zero_copy_only=False))
    order = np.lexsort((rank_sum, -score, query_codes))
    grouped = query_codes[order]
    rank = np.arange(len(order)) - np.searchsorted(grouped, grouped) + 1
    return pa.table({
        "query_id": base["query_id"].take(order),
        "doc_id": base["doc_id"].take(order),
        "score": pa.array(score[order], pa.float64()),
        "rank": pa.array(rank, pa.int32()),
        "prefilter_rank": base["prefilter_rank"].take(order),
        "layer_scores": pa.ListArray.from_arrays(pa.array(np.arange(len(order) + 1) * num_layers, pa.int32()),
                                                 pa.array(layers[order].reshape(-1), pa.float64())),
    }, schema=documents_schema())


def _combined_tokens(sources: list[ScoresInput], group: list[str]):
    """The group's token rows kept by every input, their token scores weighted and summed (None when an
    input kept none at all)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    for source in sources:
        files = sorted(str(p) for p in (source.path / TOKENS_DIR).glob("part-*.parquet"))
        if not files:
            return None
        tables.append(_read_group(files, group, tokens_schema().names, ["query_id", "doc_id", "chunk"],
                                  tokens_schema()))

    def keys(table):
        chunk = pc.cast(table["chunk"], pa.string())
        return pc.binary_join_element_wise(table["query_id"], table["doc_id"], chunk, "\x00")

    common = set(keys(tables[0]).to_pylist())
    for table in tables[1:]:
        common &= set(keys(table).to_pylist())
    wanted = pa.array(sorted(common), pa.string())
    tables = [t.filter(pc.is_in(keys(t), value_set=wanted)) for t in tables]
    base = tables[0]
    values = np.zeros(len(pc.list_flatten(base["token_scores"])))
    for source, table in zip(sources, tables):
        if not table["token_ids"].equals(base["token_ids"]):
            raise InputError(f"SCORES_DIR {source.path} tokenized documents differently from {sources[0].path}; "
                             "combine only scores computed with the same tokenizer and chunking")
        values += source.weight * pc.list_flatten(table["token_scores"]).to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(base["token_scores"]).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    scores = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.float32()))
    return base.set_column(base.schema.get_field_index("token_scores"), "token_scores", scores)


def _summary(table) -> dict[str, list]:
    """summary.parquet's rows for the queries of one part (its rows sorted by query): count, mean, std and
    positive mass of the scores."""
    query_ids = table["query_id"].to_numpy(zero_copy_only=False)
    scores = table["score"].to_numpy()
    starts = np.flatnonzero(np.r_[True, query_ids[1:] != query_ids[:-1]]) if len(query_ids) else np.array([], int)
    out: dict[str, list] = {"query_id": [], "documents": [], "mean": [], "std": [], "positive_sum": []}
    for start, end in zip(starts, [*starts[1:], len(query_ids)]):
        mine = scores[start:end]
        out["query_id"].append(query_ids[start])
        out["documents"].append(len(mine))
        out["mean"].append(float(mine.mean()))
        out["std"].append(float(mine.std()))
        out["positive_sum"].append(float(np.maximum(mine, 0).sum()))
    return out
