"""`attrib query-gradients` and `attrib query`: preconditioned query gradients and influence scores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    ChatTemplate, Corpus, Device, Dtype, IdField, Lines, LongDocuments, LossOn, MaxDocs, MaxLength, Model, Out,
    Overwrite, Queries,
    SkipBadRows, Split, TextField, TokensPerBatch, TrustRemoteCode,
)

Factors = Annotated[str, typer.Option(help="Output directory of `attrib fit-factors`.")]
QueryRank = Annotated[int, typer.Option(help="Rank of each preconditioned query gradient (0 = full).")]
Damping = Annotated[Optional[float], typer.Option(help="Damping λ, the same for every layer (default: --damping-scale × mean(Λ) per layer).")]
Solver = Annotated[Optional[str], typer.Option(help="ekfac: H⁻¹∇L_q from the fitted curvature (default); cg: refined by --solve-iterations steps of conjugate gradients on the damped Gauss-Newton system of all tracked layers, preconditioned by it (README: when to use it).")]
SolveIterations = Annotated[Optional[int], typer.Option(help="--solver cg: CG iterations per batch of queries (default 3; 0 = EK-FAC exactly); each costs a pass over the solve sample.")]
SolveTokens = Annotated[Optional[int], typer.Option(help="--solver cg: tokens of the Gauss-Newton sample, the first ones of --solve-corpus in file order (default 262144).")]
SolveCorpus = Annotated[Optional[str], typer.Option(help="--solver cg: corpus of the Gauss-Newton sample (default: the corpus the factors were fitted on, read with the fit's options and chunking).")]
DampingScale = Annotated[Optional[float], typer.Option(help="Damping as a multiple of each layer's mean eigenvalue (default 0.001; see docs/benchmarks.md).")]
MaxMemory = Annotated[Optional[str], typer.Option(help="Memory per process the stage may plan for, e.g. 80GiB: sets the queries per batch and per pass (default: 90% of the GPU, half the RAM on CPU).")]


def query_gradients(
    model: Model,
    factors: Factors,
    queries: Queries,
    out: Out,
    query_rank: QueryRank = 32,
    damping: Damping = None,
    damping_scale: DampingScale = None,
    max_length: MaxLength = None,
    tokens_per_batch: TokensPerBatch = 4096,
    max_memory: MaxMemory = None,
    solver: Solver = None,
    solve_iterations: SolveIterations = None,
    solve_tokens: SolveTokens = None,
    solve_corpus: SolveCorpus = None,
    chat_template: ChatTemplate = "auto",
    dtype: Dtype = "float32",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Compute, precondition and compress each query's gradient.

    Example: attrib query-gradients --model M --factors run/factors --queries Q --out run/query
    """
    options = dict(locals())
    from attrib.api import query_gradients as run
    from attrib.progress import message

    run(**options)
    message(f"query gradients written to {out}")


def query(
    model: Model,
    factors: Factors,
    corpus: Corpus,
    out: Out,
    queries: Annotated[Optional[str], typer.Option(help='JSONL of queries {"id", "prompt", "completion"} or {"id", "messages"} (not needed with --query-gradients).')] = None,
    query_gradients_dir: Annotated[Optional[str], typer.Option("--query-gradients", help="Output of `attrib query-gradients` (default: computed into OUT/query-gradients).")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="Output of `attrib prefilter`: score only these candidates.")] = None,
    prefilter: Annotated[Optional[int], typer.Option(help="Run the TF-IDF prefilter first and keep this many candidates per query.")] = None,
    token_scores_top: Annotated[str, typer.Option(help="Store per-token scores for the top K documents per query, 'all' or 'none'.")] = "100",
    query_rank: Annotated[Optional[int], typer.Option(help="Rank of each preconditioned query gradient (0 = full; default 32).")] = None,
    damping: Damping = None,
    damping_scale: DampingScale = None,
    solver: Solver = None,
    solve_iterations: SolveIterations = None,
    solve_tokens: SolveTokens = None,
    solve_corpus: Annotated[Optional[str], typer.Option(help="--solver cg: corpus of the Gauss-Newton sample (default: the corpus the factors were fitted on, as their manifest records it, else --corpus; read with the fit's options and chunking).")] = None,
    keep_all_scores: Annotated[bool, typer.Option(help="Without candidates, keep every (query, document) score in documents.parquet (default: each query's 1,000 most positive and 1,000 most negative, plus summary.parquet).")] = False,
    queries_per_pass: Annotated[int, typer.Option(help="Queries scored per pass over the corpus (0: as many as --max-memory allows; more passes cost more time, not memory).")] = 0,
    max_memory: MaxMemory = None,
    docs_per_part: Annotated[int, typer.Option(help="Documents per output part (resume granularity).")] = 2000,
    tokens_per_batch: TokensPerBatch = 4096,
    max_length: MaxLength = None,
    text_field: TextField = "text",
    id_field: IdField = None,
    lines: Lines = False,
    max_docs: MaxDocs = None,
    skip_bad_rows: SkipBadRows = False,
    split: Split = "train",
    long_documents: LongDocuments = "chunk",
    chat_template: ChatTemplate = "auto",
    loss_on: LossOn = "all",
    dtype: Dtype = "float32",
    device: Device = "auto",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Score training sequences against every query: per document, per layer and per token.

    Example: attrib query --model M --factors run/factors --queries Q --corpus C --out run/scores
    """
    options = dict(locals())
    from attrib.api import query as run
    from attrib.progress import current_rank

    result = run(**options)
    if current_rank() == 0 and not result.already_complete:
        print_top(out)


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
