"""`attrib report` and `attrib top`: influence scores for people."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.errors import InputError

ScoresDir = Annotated[str, typer.Argument(help="Output directory of `attrib query` or `attrib self-influence`.", show_default=False)]
TopK = Annotated[int, typer.Option("--top-k", "-k", help="Documents shown per query.")]
QueryIds = Annotated[
    Optional[list[str]], typer.Option("--query", "-q", help="Show only this query id (repeat for more).")
]
FORMATS = ("table", "json", "csv")


def report(
    scores_dir: ScoresDir,
    out: Annotated[str, typer.Option("--out", "-o", help="HTML file to write (one self-contained page).")],
    top_k: TopK = 10,
    query: QueryIds = None,
) -> None:
    """Write a self-contained HTML page of the top documents, tokens coloured by influence.

    Example: attrib report run/scores --out run/report.html
    """
    from attrib.progress import message
    from attrib.report import write_report

    path = write_report(scores_dir, out, top_k, query)
    message(f"report written to {path} ({path.stat().st_size / 1024:,.0f} KiB); open it in a browser")


def top(
    scores_dir: ScoresDir,
    top_k: TopK = 10,
    query: QueryIds = None,
    output_format: Annotated[str, typer.Option("--format", "-f", help="table (for people), json (lines) or csv.")] = "table",
) -> None:
    """Print each query's top documents as a table, JSON or CSV.

    Example: attrib top run/scores --format csv
    """
    from attrib.report import open_scores, select_queries, top_rows

    if output_format not in FORMATS:
        raise InputError(f"--format {output_format} is not one of {', '.join(FORMATS)}")
    run = open_scores(scores_dir)
    rows = top_rows(run, top_k, select_queries(run, query))
    if output_format == "json":
        _print_json_lines(rows)
    elif output_format == "csv":
        _print_csv(rows)
    else:
        _print_table(rows)


def _print_json_lines(rows: list[dict]) -> None:
    import json

    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


def _print_csv(rows: list[dict]) -> None:
    import csv
    import sys

    chunk = ["chunk"] if rows and "chunk" in rows[0] else []  # self-influence ranks sequences
    writer = csv.DictWriter(
        sys.stdout, fieldnames=["query_id", "rank", "doc_id", *chunk, "score", "prefilter_rank", "snippet"],
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(rows)


def _print_table(rows: list[dict]) -> None:
    """One rich table per query; document text is shown as plain text, never as rich markup."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    prefiltered = any(row["prefilter_rank"] is not None for row in rows)
    chunked = any("chunk" in row for row in rows)  # self-influence ranks sequences, not documents
    for query_id in dict.fromkeys(row["query_id"] for row in rows):
        title = "training sequences by self-influence" if chunked else f"query {query_id}"
        table = Table(title=Text(title), title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("document", overflow="fold")
        if chunked:
            table.add_column("chunk", justify="right")
        table.add_column("score", justify="right")
        if prefiltered:
            table.add_column("tf-idf rank", justify="right")
        table.add_column("text around the strongest token", overflow="fold")
        for row in (r for r in rows if r["query_id"] == query_id):
            prefilter = [] if not prefiltered else ["" if row["prefilter_rank"] is None else str(row["prefilter_rank"])]
            table.add_row(
                str(row["rank"]), Text(row["doc_id"]), *([str(row["chunk"])] if chunked else []), f"{row['score']:+.4g}",
                *prefilter, Text(row["snippet"])
            )
        console.print(table)
