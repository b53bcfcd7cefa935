"""`attrib demo`: the whole pipeline offline, on planted facts and models trained here."""

from __future__ import annotations

from typing import Annotated

import typer


def demo(
    out: Annotated[str, typer.Option("--out", "-o", help="Directory for the demo's data, models and every stage's output.")] = "demo-run",
    size: Annotated[str, typer.Option(help="small (a few minutes per model) or tiny (seconds; what the tests use).")] = "small",
    architecture: Annotated[str, typer.Option(help="Which demo model to attribute: llama or gpt2.")] = "llama",
    strategy: Annotated[str, typer.Option(help="Curvature: ekfac, kfac, diagonal or identity.")] = "ekfac",
    candidates_per_query: Annotated[int, typer.Option(help="TF-IDF candidates scored per query.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the corpus, the training and the sampled labels.")] = 0,
) -> None:
    """Build a planted-fact corpus and small models, then run every stage on them.

    Example: attrib demo --out demo-run
    """
    import json
    from pathlib import Path

    from attrib.commands.factors import fit_factors
    from attrib.commands.prefilter import prefilter
    from attrib.commands.query import query
    from attrib.commands.report import report
    from attrib.errors import InputError
    from attrib.progress import message
    from attrib.synthetic import ARCHITECTURES, DEMO_SIZES, DemoPaths, build_demo

    if size not in DEMO_SIZES:
        raise InputError(f"--size {size} is not one of {', '.join(DEMO_SIZES)}")
    if architecture not in ARCHITECTURES:
        raise InputError(f"--architecture {architecture} is not one of {', '.join(ARCHITECTURES)}")
    root = Path(out)
    data = DemoPaths.at(root / "data")
    if not (data.root / "demo.json").is_file():
        message(f"building the {size} demo corpus and models in {data.root} (no network needed)")
        build_demo(data.root, size=size, seed=seed)
    info = data.load_info()
    model = str(getattr(data, architecture))
    message(f"demo model {model}: fact accuracy {info['models'][architecture]['fact_accuracy']:.2f}")
    corpus = {"corpus": str(data.corpus), "id_field": "id"}
    fit_factors(model=model, **corpus, out=str(root / "factors"), strategy=strategy, seed=seed,
                fisher_samples=4, tokens_per_batch=2048)
    prefilter(**corpus, queries=str(data.queries), out=str(root / "candidates"), top_k=candidates_per_query)
    query(model=model, factors=str(root / "factors"), queries=str(data.queries), **corpus,
          candidates=str(root / "candidates"), out=str(root / "scores"), token_scores_top="10", tokens_per_batch=2048)
    report(scores_dir=str(root / "scores"), out=str(root / "report.html"))
    recall = fact_tracing_recall(root / "scores", data.queries)
    message(f"planted fact document in the top 10 for {recall:.0%} of the queries")
    summary = {"report": str(root / "report.html"), "scores": str(root / "scores"), "recall_at_10": recall}
    print(json.dumps(summary))


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
