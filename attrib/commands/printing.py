"""What the commands print for people: tables of top documents and one-line summaries."""

from __future__ import annotations


def print_top(out: str, per_query: int = 3, queries_shown: int = 5, report: str | None = None) -> None:
    """The top documents of the first few queries, with a snippet, on stdout; then where the rest is."""
    import sys

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from attrib.report import open_scores
    from attrib.score_tables import read_token_rows, read_top_documents

    run = open_scores(out)
    query_ids = [q["id"] for q in run.queries]
    shown = query_ids[:queries_shown]
    top = read_top_documents(out, per_query, shown).to_pylist()
    snippets = {}
    for row in read_token_rows(out, [(r["query_id"], r["doc_id"]) for r in top]).to_pylist():
        snippets.setdefault((row["query_id"], row["doc_id"]), " ".join(row["text"].split())[:70])
    title = f"top documents per query ({len(shown)} of {len(query_ids)} queries; {out})"
    table = Table(title=Text(title))
    for column in ("query", "rank", "document", "score", "text"):
        table.add_column(column, overflow="fold")
    for row in top:
        table.add_row(Text(row["query_id"]), str(row["rank"]), Text(row["doc_id"]), f"{row['score']:.4g}",
                      Text(snippets.get((row["query_id"], row["doc_id"]), "")))
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(table)
    where = [f"every query: attrib top {out}"]
    if len(query_ids) > len(shown):
        where.append(f"one query: attrib top {out} --query {query_ids[len(shown)]}")
    where.append(f"the HTML page: {report}" if report else f"an HTML page: attrib report {out} --out report.html")
    where.append(f"the table itself: {out}/documents.parquet")
    console.print("\n".join(where), highlight=False, markup=False, soft_wrap=True)


def print_json_lines(rows: list[dict]) -> None:
    import json

    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


def print_csv(rows: list[dict]) -> None:
    import csv
    import sys

    chunk = ["chunk"] if rows and "chunk" in rows[0] else []  # self-influence ranks sequences
    writer = csv.DictWriter(
        sys.stdout, fieldnames=["query_id", "rank", "doc_id", *chunk, "score", "prefilter_rank", "snippet"],
        lineterminator="\n",
    )
    writer.writeheader()
    writer.writerows(rows)


def print_table(rows: list[dict]) -> None:
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
            table.add_column("prefilter rank", justify="right")  # TF-IDF, BM25 or the index
        table.add_column("text around the strongest token", overflow="fold")
        for row in (r for r in rows if r["query_id"] == query_id):
            prefilter = [] if not prefiltered else ["" if row["prefilter_rank"] is None else str(row["prefilter_rank"])]
            table.add_row(
                str(row["rank"]), Text(row["doc_id"]), *([str(row["chunk"])] if chunked else []), f"{row['score']:+.4g}",
                *prefilter, Text(row["snippet"])
            )
        console.print(table)


def fit_summary(manifest: dict, out: str) -> None:
    """One line for people: what was fitted, on how much, what was skipped."""
    from attrib.progress import message

    counts = manifest.get("counts", {})
    skipped = counts.get("rows_skipped") or {}
    empty = skipped.get("empty text", 0)
    bad = sum(skipped.values()) - empty
    notes = [f"{empty:,} empty documents skipped"] if empty else []
    notes += [f"{bad:,} bad rows skipped"] if bad else []
    message(
        f"factors ({manifest['settings']['strategy']}) for {len(manifest['model']['tracked_modules'])} layers "
        f"written to {out} ({counts.get('covariance_tokens', counts.get('correction_sequences', 0)):,} "
        f"{'tokens' if 'covariance_tokens' in counts else 'sequences'}"
        f"{''.join('; ' + note for note in notes)})"
    )
