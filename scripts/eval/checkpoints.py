"""LDS of influence across checkpoints (issue 21): the final checkpoint alone against 2, 4 and 8 combined.

The kit's full-data model is retrained with its recipe and seed, saving checkpoint-N folders at 1/8 … 8/8
of its steps (the last is checked to be bit-identical to the kit's model), each with a Hugging Face
Trainer-style trainer_state.json: the learning rate logged after every step, as the Trainer logs it.
From each checkpoint, attrib's default EK-FAC scores (empirical Fisher, c = 0.001, query rank 32) with
its own factors, or with the final checkpoint's factors (then each extra checkpoint costs only its query
pass). They are combined as `attrib combine` combines them (weights normalised to sum 1): equal; lr, the
learning rate logged at the checkpoint (TracIn; what `--weights lr` reads); and, for comparison, the
mean learning rate over the segment of steps each checkpoint ends, and equal weights with each checkpoint's
scores of a query divided by their root mean square over documents ("scaled per query"). The cheaper
ensemble with factors fitted on a token sample (`--covariance-max-tokens`: A and S from the corpus's first
1/4 of the tokens, Λ from all) is scored for the final checkpoint and the 4-checkpoint set, its Δ paired
also against the 4-checkpoint ensemble on all tokens.

LDS: lds.py's protocol and subset models (cached under --work; M subset models, seed 1000 + j); 95%
bootstrap intervals over queries, Δ paired against the final checkpoint alone. Cost: seconds of factor
fits and query scoring over the checkpoints a row uses (one thread, float64 as the other evaluations), all
timed in this run (each fit again into a scratch folder; the cached factors serve the scores).
The 4-checkpoint equal ensemble is also run end to end as a user runs it — attrib.fit_factors,
attrib.query (--keep-all-scores) and attrib.combine on the checkpoint folders, float32 — and its LDS is
printed beside the float64 row.

    python scripts/eval/checkpoints.py --kit plain --out scripts/eval/results/checkpoints-plain.json
    python scripts/eval/checkpoints.py --kit fortunes --fortunes pkg/usr/share/games/fortunes --hidden 16 \
        --models 50 --out scripts/eval/results/checkpoints-fortunes.json
    python scripts/eval/checkpoints.py --kit fortunes --fortunes pkg/usr/share/games/fortunes --hidden 16 \
        --docs 1247 --each-alone --every-set --models 50 --out scripts/eval/results/checkpoints-fortunes-d1247.json

--schedule (cosine, linear or constant; attrib.synthetic.LR_SCHEDULES) and --steps train the kit, its checkpoints
and its subset models with another recipe, cached apart (docs/benchmarks.md, "The training run decides the gain"):

    python scripts/eval/checkpoints.py --kit fortunes --fortunes pkg/usr/share/games/fortunes --hidden 16 \
        --docs 1247 --each-alone --every-set --models 50 --schedule constant --steps 800 \
        --out scripts/eval/results/checkpoints-fortunes-d1247-constant-t800.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lds
import numpy as np
import torch
from common import MAX_LENGTH, Attributor, default_work, log, markdown_table, write_json
from realtext import add_kit_arguments, bootstrap, open_kit_of

FRACTIONS = 8  # checkpoints at k/8 of the steps; the 4- and 2-checkpoint sets are subsets of these
SAMPLE = 4  # the token-sample rows fit A and S on 1/SAMPLE of the corpus's tokens


def checkpoint_steps(steps: int, count: int) -> list[int]:
    return [round(steps * k / count) for k in range(1, count + 1)]


def train_with_checkpoints(setup, setup_dir: Path, out: Path) -> list[Path]:
    """The kit's training run (train_causal_lm, same recipe and seed) saving checkpoint-N folders."""
    from transformers import AutoTokenizer

    from attrib.synthetic import train_causal_lm

    folders = {step: out / f"checkpoint-{step}" for step in checkpoint_steps(setup.steps, FRACTIONS)}
    if not all((f / "trainer_state.json").is_file() for f in folders.values()):
        tokenizer = AutoTokenizer.from_pretrained(setup_dir / "tokenizer")
        with open(setup_dir / "corpus.jsonl", encoding="utf-8") as handle:
            texts = [json.loads(line)["text"] for line in handle]
        train_causal_lm(setup.arch, tokenizer, texts, folders[setup.steps], hidden_size=setup.hidden,
                        num_layers=setup.layers, steps=setup.steps, seq_len=MAX_LENGTH, batch_size=setup.batch_size,
                        lr=setup.lr, seed=setup.seed, save_at=folders, schedule=setup.schedule)
    return list(folders.values())


def check_final_is_the_kit_model(final: Path, kit_model: Path) -> None:
    from safetensors.torch import load_file

    ours, theirs = load_file(final / "model.safetensors"), load_file(kit_model / "model.safetensors")
    if ours.keys() != theirs.keys() or not all(torch.equal(ours[k], theirs[k]) for k in ours):
        raise SystemExit(f"retrained {final} differs from the kit's model {kit_model}")


def timed_fit(att: Attributor, folder: Path, covariance_max_tokens: int | None = None) -> float:
    """Seconds of one factor fit of `folder` in this run, into a scratch folder (the cached factors serve the
    scores), so that every row's cost is measured under the same load."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        fresh = Attributor(att.setup_dir, Path(scratch), model_dir=folder)
        t0 = time.perf_counter()
        fresh.fit("ekfac", "empirical", covariance_max_tokens=covariance_max_tokens)
        return round(time.perf_counter() - t0, 2)


def segment_mean_lr(folders: list[Path], used: list[int]) -> list[float]:
    """Mean logged learning rate over the steps since the previous used checkpoint (from step 0 for the first)."""
    history = json.loads((folders[-1] / "trainer_state.json").read_text())["log_history"]
    steps = [json.loads((folders[i] / "trainer_state.json").read_text())["global_step"] for i in used]
    bounds = [0] + steps
    return [float(np.mean([h["learning_rate"] for h in history if lo < h["step"] <= hi]))
            for lo, hi in itertools.pairwise(bounds)]


def end_to_end(att: Attributor, folders: list[Path], work: Path) -> tuple[np.ndarray, dict]:
    """attrib.fit_factors, attrib.query and attrib.combine on the checkpoint folders, as a user runs them."""
    import pyarrow.parquet as pq

    import attrib

    corpus, queries = str(att.setup_dir / "corpus.jsonl"), str(att.setup_dir / "queries.jsonl")
    costs, scores = {"fit": 0.0, "query": 0.0}, []
    for folder in folders:
        root = work / "pipeline" / folder.parent.name / folder.name
        t0 = time.perf_counter()
        factors = attrib.fit_factors(str(folder), corpus, root / "factors", id_field="id", max_length=MAX_LENGTH)
        costs["fit"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        scores.append(attrib.query(str(folder), factors, queries, corpus, root / "scores", id_field="id",
                                   max_length=MAX_LENGTH, keep_all_scores=True, token_scores_top="none"))
        costs["query"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    combined = attrib.combine(scores, work / "pipeline" / folders[0].parent.name / f"combined-{len(folders)}",
                              overwrite=True)
    costs["combine"] = time.perf_counter() - t0
    table = pq.read_table(combined.out / "documents.parquet").to_pylist()
    query_index = {q.query_id: i for i, q in enumerate(att.queries)}
    matrix = np.zeros((len(att.queries), len(att.doc_ids)))
    for row in table:
        matrix[query_index[row["query_id"]], att.doc_index[row["doc_id"]]] = row["score"]
    return matrix, {k: round(v, 1) for k, v in costs.items()}


def evaluate(att: Attributor, setup, work: Path, kinds: list[str], num_models: int, jobs: int,
             each_alone: bool = False, every_set: bool = False) -> dict:
    started = time.perf_counter()
    subsets = lds.subset_models(att, setup, work, num_models, jobs)
    masks = np.array([np.isin(att.doc_ids, s["docs"]) for s in subsets], dtype=float)
    actual = np.array([s["log_probs"] for s in subsets])
    folders = train_with_checkpoints(setup, att.setup_dir, work / f"checkpoints-{att.setup_dir.name}")
    check_final_is_the_kit_model(folders[-1], att.setup_dir / "model")
    from attrib.stages.combine import checkpoint_state

    checkpoints = [Attributor(att.setup_dir, work, model_dir=folder) for folder in folders]
    sets = {1: [FRACTIONS - 1], 2: [FRACTIONS // 2 - 1, FRACTIONS - 1],
            4: list(range(1, FRACTIONS, 2)), 8: list(range(FRACTIONS))}
    max_tokens = att.shapes()["tokens"] // SAMPLE
    factors = [checkpoint.fit("ekfac", "empirical") for checkpoint in checkpoints]
    sample_factors = {i: checkpoints[i].fit("ekfac", "empirical", covariance_max_tokens=max_tokens) for i in sets[4]}
    cost_fit, cost_sample_fit = [], {}
    for i, folder in enumerate(folders):  # alternating, so that both see the same load
        cost_fit.append(timed_fit(att, folder))
        if i in sets[4]:
            cost_sample_fit[i] = timed_fit(att, folder, max_tokens)
    fit_timings = {"all tokens": cost_fit, f"1/{SAMPLE} of the tokens ({max_tokens}), 4 checkpoints":
                   [cost_sample_fit[i] for i in sets[4]]}
    log(f"  fit seconds: {fit_timings}")
    sampled, cost_sample = {}, {}
    for i in sets[4]:
        t0 = time.perf_counter()
        sampled[i] = checkpoints[i].scores(sample_factors[i], rank=lds.DEFAULT_RANK)
        cost_sample[i] = time.perf_counter() - t0
    own, reused, cost_own, cost_reuse = [], [], [], []
    for folder, checkpoint, own_factors, fit_seconds in zip(folders, checkpoints, factors, cost_fit):
        t0 = time.perf_counter()
        own.append(checkpoint.scores(own_factors, rank=lds.DEFAULT_RANK))
        cost_own.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reused.append(checkpoint.scores(factors[-1], rank=lds.DEFAULT_RANK))
        cost_reuse.append(time.perf_counter() - t0)
        log(f"  {folder.name}: fit {fit_seconds:.1f} s, scores {cost_own[-1]:.1f} s")
    learning_rates = [checkpoint_state(f)["learning_rate"] for f in folders]

    def combined(scores, used, weights, per_query_scale=False):
        weights = np.asarray(weights, dtype=float) / np.sum(weights)
        if per_query_scale:  # each checkpoint's scores of a query divided by their root mean square over documents
            return sum(w * scores[i] / np.sqrt((scores[i] ** 2).mean(1, keepdims=True)) for w, i in zip(weights, used))
        return sum(w * scores[i] for w, i in zip(weights, used))

    def row(label, used, weighting="equal", factors="own"):
        scores = {"own": own, "final": reused, "sample": sampled}[factors]
        weights = {"equal": [1.0] * len(used), "equal, scaled per query": [1.0] * len(used),
                   "lr": [learning_rates[i] for i in used],
                   "lr (segment mean)": segment_mean_lr(folders, used)}[weighting]
        if factors == "own":
            seconds = sum(cost_fit[i] + cost_own[i] for i in used)
        elif factors == "sample":
            seconds = sum(cost_sample_fit[i] + cost_sample[i] for i in used)
        else:
            seconds = cost_fit[-1] + sum(cost_reuse[i] for i in used)
        return {"setting": label, "checkpoints": [folders[i].name for i in used], "weighting": weighting,
                "factors": factors, "weights": [round(w / sum(weights), 4) for w in weights],
                "scores": combined(scores, used, weights, weighting.endswith("scaled per query")),
                "seconds": round(seconds, 1)}

    grid = [row("final checkpoint alone", sets[1]),
            row("earliest of the 4 (25 %) alone", [sets[4][0]])]
    if each_alone:
        grid += [row(f"{folders[i].name} ({i + 1}/{FRACTIONS}) alone", [i]) for i in range(FRACTIONS - 1)]
    for n in (2, 4, 8):
        grid.append(row(f"{n} checkpoints, equal", sets[n]))
    for n in (2, 4, 8):
        grid.append(row(f"{n} checkpoints, equal, scaled per query", sets[n], "equal, scaled per query"))
    for n in (4, 8):
        grid.append(row(f"{n} checkpoints, lr", sets[n], "lr"))
        grid.append(row(f"{n} checkpoints, lr (segment mean)", sets[n], "lr (segment mean)"))
    for n in (2, 4, 8):
        grid.append(row(f"{n} checkpoints, equal, final checkpoint's factors", sets[n], factors="final"))
    for n in (1, 4):
        grid.append({**row(f"{n} checkpoint{'s, equal' if n > 1 else ' (final)'}, A and S from 1/{SAMPLE} of the "
                           f"tokens", sets[n], factors="sample"), "paired_with": "4 checkpoints, equal"})
    pipeline_scores, pipeline_costs = end_to_end(att, [folders[i] for i in sets[4]], work)
    grid.append({"setting": "4 checkpoints, equal: attrib fit-factors + query + combine (float32)",
                 "checkpoints": [folders[i].name for i in sets[4]], "weighting": "equal", "factors": "own",
                 "scores": pipeline_scores, "seconds": round(sum(pipeline_costs.values()), 1),
                 "pipeline_costs": pipeline_costs})
    rows, baseline, per_setting = [], None, {}
    for entry in grid:
        scores = entry.pop("scores")
        result = {**entry, **lds.lds(scores, masks, actual, kinds)}
        per_query = per_setting[entry["setting"]] = np.array(result["per_query"])
        baseline = per_query if baseline is None else baseline
        result.update(ci=bootstrap(per_query), delta=float((per_query - baseline).mean()),
                      delta_ci=bootstrap(per_query - baseline))
        paired = ""
        if "paired_with" in entry:
            other = per_query - per_setting[entry["paired_with"]]
            result.update(delta_paired=float(other.mean()), delta_paired_ci=bootstrap(other))
            paired = (f", Δ vs {entry['paired_with']} {result['delta_paired']:+.3f} "
                      f"[{result['delta_paired_ci'][0]:+.3f}, {result['delta_paired_ci'][1]:+.3f}]")
        rows.append(result)
        log(f"  {entry['setting']}: LDS {result['lds']:.3f} [{result['ci'][0]:.3f}, {result['ci'][1]:.3f}], "
            f"Δ {result['delta']:+.3f} [{result['delta_ci'][0]:+.3f}, {result['delta_ci'][1]:+.3f}]{paired}, "
            f"{entry['seconds']} s")
    sets_of_4 = every_set_of_4(own, masks, actual, kinds, per_setting["final checkpoint alone"]) if every_set else None
    return {"setup": setup.__dict__, "shapes": att.shapes(), "num_models": num_models,
            "checkpoint_steps": checkpoint_steps(setup.steps, FRACTIONS), "learning_rates": learning_rates,
            "sample_tokens": max_tokens, "fit_seconds": fit_timings, "every_set_of_4": sets_of_4,
            "rows": rows, "seconds": round(time.perf_counter() - started, 1)}


def every_set_of_4(own: list[np.ndarray], masks, actual, kinds, final: np.ndarray) -> list[dict]:
    """Δ LDS over the final checkpoint of every equal 4-checkpoint ensemble, best first: how much any choice of
    checkpoints could gain (an optimistic bound, chosen on the same queries it is measured on)."""
    out = []
    for used in itertools.combinations(range(len(own)), 4):
        gain = np.array(lds.lds(sum(own[i] for i in used) / 4, masks, actual, kinds)["per_query"]) - final
        out.append({"checkpoints": [i + 1 for i in used], "delta": float(gain.mean()), "delta_ci": bootstrap(gain)})
    return sorted(out, key=lambda r: -r["delta"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_kit_arguments(parser, "plain")
    parser.add_argument("--each-alone", action="store_true", help="add a row for every checkpoint alone")
    parser.add_argument("--every-set", action="store_true", help="also score every equal 4-checkpoint ensemble")
    parser.add_argument("--models", type=int, default=50, help="M, the number of subset models")
    parser.add_argument("--jobs", type=int, default=1, help="subset models trained at once (one thread each)")
    parser.add_argument("--work", default=str(default_work()), help="cache of models, subset models and factors")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(args.work)
    setup, att, kinds = open_kit_of(parser, args, work)
    log(f"checkpoints ({args.kit}): {setup.name()}, M={args.models}, {att.shapes()}")
    result = {"evaluation": "lds-checkpoints", "kit": args.kit,
              **evaluate(att, setup, work, kinds, args.models, args.jobs, args.each_alone, args.every_set)}
    table = [[r["setting"], f"{r['lds']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
              " / ".join(f"{r[k]:.3f}" for k in sorted(set(kinds))),
              f"{r['delta']:+.3f} [{r['delta_ci'][0]:+.3f}, {r['delta_ci'][1]:+.3f}]",
              f"{r['delta_paired']:+.3f} [{r['delta_paired_ci'][0]:+.3f}, {r['delta_paired_ci'][1]:+.3f}]"
              if "delta_paired" in r else "", f"{r['seconds']:.1f}"]
             for r in result["rows"]]
    print(markdown_table(["setting", "LDS [95% CI]", " / ".join(sorted(set(kinds))), "Δ vs final alone [95% CI]",
                          "Δ vs 4 checkpoints, all tokens [95% CI]", "cost (s)"], table))
    print(f"\nfit seconds: {result['fit_seconds']}")
    if result["every_set_of_4"]:
        ranked = result["every_set_of_4"]
        print(f"\nevery equal 4-checkpoint ensemble (checkpoint k of {FRACTIONS}), Δ vs final alone: median "
              f"{np.median([r['delta'] for r in ranked]):+.3f}; best five:")
        for r in ranked[:5]:
            print(f"  {r['checkpoints']}: {r['delta']:+.3f} [{r['delta_ci'][0]:+.3f}, {r['delta_ci'][1]:+.3f}]")
    print(f"\n{result['shapes']}, checkpoints at steps {result['checkpoint_steps']}, learning rates logged there "
          f"{[f'{lr:.2e}' for lr in result['learning_rates']]}, total {result['seconds']} s")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
