"""`attrib demo`: the whole pipeline offline, on planted facts and a model trained here."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="Directory for the demo's data, models and every stage's output.")] = "demo-run",
    size: Annotated[str, typer.Option(help="small (about two minutes in all on 2 CPU cores) or tiny (seconds; what the tests use).")] = "small",
    architecture: Annotated[str, typer.Option(help="Which demo model to train and attribute: llama or gpt2.")] = "llama",
    strategy: Annotated[str, typer.Option(help="Curvature: ekfac, kfac, diagonal or identity.")] = "ekfac",
    candidates_per_query: Annotated[int, typer.Option(help="TF-IDF candidates scored per query.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the corpus, the training and the sampled labels.")] = 0,
) -> None:
    """Build a planted-fact corpus, train a small model on it, then run every stage on them.

    Only the attributed model is trained; a rerun with the other --architecture and the same
    --out reuses the data and trains that one. One line per stage gives its time.

    Example: attrib demo --out demo-run
    """
    import json
    from pathlib import Path

    import attrib
    from attrib.commands.printing import print_top
    from attrib.errors import InputError
    from attrib.progress import message
    from attrib.report import write_report
    from attrib.strategies import STRATEGY
    from attrib.synthetic import ARCHITECTURES, DEMO_SIZES, DemoPaths, build_demo

    if size not in DEMO_SIZES:
        raise InputError(f"--size {size} is not one of {', '.join(DEMO_SIZES)}")
    if architecture not in ARCHITECTURES:
        raise InputError(f"--architecture {architecture} is not one of {', '.join(ARCHITECTURES)}")
    root = Path(out)
    data = DemoPaths.at(root / "data")
    clock = StageClock()
    info = data.load_info() if (data.root / "demo.json").is_file() else {"models": {}}
    if architecture not in info["models"]:
        message(f"building the {size} demo in {data.root}: corpus, tokenizer and a {architecture} trained on it "
                "(no network needed)")
        with clock.stage(f"train {architecture}"):
            try:
                build_demo(data.root, size=size, seed=seed, architectures=[architecture])
            except ValueError as exc:
                raise InputError(f"--out {out}: {exc}; choose another --out") from None
        info = data.load_info()
    model = str(getattr(data, architecture))
    message(f"demo model {model}: fact accuracy {info['models'][architecture]['fact_accuracy']:.2f}")
    corpus = {"corpus": str(data.corpus), "id_field": "id"}
    with clock.stage("fit-factors"):
        fits = strategy not in STRATEGY or STRATEGY[strategy].has_factors  # (an unknown one is refused by the fit)
        fisher = {"fisher": "true", "fisher_samples": 4} if fits else {}
        attrib.fit_factors(model, **corpus, out=root / "factors", strategy=strategy, seed=seed, tokens_per_batch=2048,
                           **fisher)
    with clock.stage("prefilter"):
        attrib.prefilter(**corpus, queries=str(data.queries), out=root / "candidates", top_k=candidates_per_query)
    with clock.stage("query"):
        attrib.query(model, root / "factors", str(data.queries), **corpus, candidates=root / "candidates",
                     out=root / "scores", token_scores_top=10, tokens_per_batch=2048)
    with clock.stage("report"):
        report = write_report(root / "scores", root / "report.html")
    recall = fact_tracing_recall(root / "scores", data.queries)
    print_top(str(root / "scores"), report=str(report))
    message(f"planted fact document in the top 10 for {recall:.0%} of the queries; "
            f"stages took {clock.summary()}; open {report} in a browser")
    summary = {"report": str(report), "scores": str(root / "scores"), "recall_at_10": recall,
               "stage_seconds": clock.seconds}
    print(json.dumps(summary))


class StageClock:
    """Wall and CPU seconds of each demo stage, with one line per stage on stderr when it ends.

    CPU seconds (this process, all threads) tell what a stage costs on a quiet machine when
    the machine it ran on was busy: on 2 cores, a stage needs at least CPU / 2 seconds.
    """

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    def stage(self, name: str):
        import contextlib
        import time

        from attrib.progress import duration, message

        @contextlib.contextmanager
        def timed():
            wall, cpu = time.perf_counter(), time.process_time()
            yield
            self.seconds[name] = {"wall": round(time.perf_counter() - wall, 2),
                                  "cpu": round(time.process_time() - cpu, 2)}
            message(f"stage {name}: {duration(self.seconds[name]['wall'])}")

        return timed()

    def summary(self) -> str:
        from attrib.progress import duration

        total = sum(times["wall"] for times in self.seconds.values())
        stages = ", ".join(f"{name} {duration(times['wall'])}" for name, times in self.seconds.items())
        return f"{duration(total)} ({stages})"


def fact_tracing_recall(scores_dir, queries_file, k: int = 10) -> float:
    """Fraction of queries whose planted source document ranks in the top k."""
    import json

    from attrib.score_tables import read_top_documents

    truth = {}
    for line in open(queries_file, encoding="utf-8"):
        row = json.loads(line)
        truth[row["id"]] = row["source_doc"]
    top = read_top_documents(scores_dir, k).to_pylist()
    found = {row["query_id"] for row in top if truth.get(row["query_id"]) == row["doc_id"]}
    return len(found) / len(truth)
