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
    from attrib.commands.printing import print_csv, print_json_lines, print_table
    from attrib.report import open_scores, select_queries, top_rows

    if output_format not in FORMATS:
        raise InputError(f"--format {output_format} is not one of {', '.join(FORMATS)}")
    run = open_scores(scores_dir)
    rows = top_rows(run, top_k, select_queries(run, query))
    if output_format == "json":
        print_json_lines(rows)
    elif output_format == "csv":
        print_csv(rows)
    else:
        print_table(rows)
