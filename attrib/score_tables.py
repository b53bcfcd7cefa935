"""The tables `attrib query` writes and `attrib report`/`attrib top` read (docs/design.md §3).

documents.parquet — one row per scored (query, document); without candidates only each query's
    1,000 most positive and 1,000 most negative documents, at their ranks among all (unless
    `--keep-all-scores`):
    query_id str, doc_id str, score float64, rank int32 (1 = most positive influence),
    prefilter_rank int32 (null when the candidates did not come from the prefilter),
    layer_scores list<float64> (in the order of the manifest's "layers").
tokens/part-NNNNN.parquet — one row per (query, document, chunk) whose tokens were kept:
    query_id str, doc_id str, chunk int32, text str (the chunk's text),
    token_ids list<int32>, tokens list<str> (each token's text, text[start:end]),
    token_start / token_end list<int32> (character offsets into `text`),
    token_scores list<float32> (per-token influence; they sum to the chunk's score).
summary.parquet — one row per query, over every scored document (also those documents.parquet
    leaves out when it keeps only each query's most positive and most negative documents):
    query_id str, documents int64, mean float64, std float64, positive_sum float64.
The manifest also lists the queries ({"id", "prompt", "completion"}; a chat query also has its
"messages", and its prompt and completion are their rendering) and layer names. A conversation's
`text` and `tokens` are its rendering: role markers and special tokens appear as text.
Scores are positive when training on the document makes the completion more likely.

`attrib self-influence` writes, instead of documents.parquet and summary.parquet:
self_influence.parquet — one row per training sequence (chunk of a document), in the order scored:
    doc_id str, chunk int32, score float64 (⟨H⁻¹∇L_m, ∇L_m⟩ ≥ 0), rank int32 (1 = highest),
    tokens int32 (the sequence's length), loss float64 (its summed next-token loss),
    layer_scores list<float64> (in the order of the manifest's "layers").
and tokens/part-*.parquet as above for its top sequences, with query_id "self" and token_scores
⟨H⁻¹∇L_m, ∇ℓ_t⟩ (they sum to the sequence's score).
"""

from __future__ import annotations

from pathlib import Path

DOCUMENTS = "documents.parquet"
SUMMARY = "summary.parquet"
TOKENS_DIR = "tokens"
SELF_INFLUENCE = "self_influence.parquet"
SELF_QUERY = "self"  # the query_id of self-influence token rows


def documents_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("score", pa.float64()),
            ("rank", pa.int32()),
            ("prefilter_rank", pa.int32()),
            ("layer_scores", pa.list_(pa.float64())),
        ]
    )


def self_influence_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("chunk", pa.int32()),
            ("score", pa.float64()),
            ("rank", pa.int32()),
            ("tokens", pa.int32()),
            ("loss", pa.float64()),
            ("layer_scores", pa.list_(pa.float64())),
        ]
    )


def tokens_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("chunk", pa.int32()),
            ("text", pa.string()),
            ("token_ids", pa.list_(pa.int32())),
            ("tokens", pa.list_(pa.string())),
            ("token_start", pa.list_(pa.int32())),
            ("token_end", pa.list_(pa.int32())),
            ("token_scores", pa.list_(pa.float32())),
        ]
    )


def write_table(path: str | Path, rows: dict[str, list], schema) -> None:
    """One Parquet file from column lists, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attrib.storage import atomic_path

    table = pa.Table.from_pydict(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_top_documents(scores_dir: str | Path, top_k: int, query_ids: list[str] | None = None):
    """The `top_k` best-ranked rows per query as a pyarrow Table, read with a filter (not whole)."""
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(Path(scores_dir) / DOCUMENTS), format="parquet")
    condition = ds.field("rank") <= top_k
    if query_ids is not None:
        condition = condition & ds.field("query_id").isin(query_ids)
    return dataset.to_table(filter=condition).sort_by([("query_id", "ascending"), ("rank", "ascending")])


def read_top_sequences(scores_dir: str | Path, top_k: int):
    """The `top_k` highest self-influence rows, best first, with query_id "self" and no prefilter rank."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    dataset = ds.dataset(str(Path(scores_dir) / SELF_INFLUENCE), format="parquet")
    table = dataset.to_table(filter=ds.field("rank") <= top_k).sort_by("rank")
    return (table.append_column("query_id", pa.array([SELF_QUERY] * len(table), pa.string()))
            .append_column("prefilter_rank", pa.nulls(len(table), pa.int32())))


def read_token_rows(scores_dir: str | Path, pairs: list[tuple[str, str]]):
    """Token rows for the given (query_id, doc_id) pairs, all chunks, sorted by chunk."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    token_dir = Path(scores_dir) / TOKENS_DIR
    files = sorted(str(p) for p in token_dir.glob("part-*.parquet"))
    if not files or not pairs:
        return tokens_schema().empty_table()
    dataset = ds.dataset(files, format="parquet", schema=tokens_schema())
    query_ids = sorted({q for q, _ in pairs})
    doc_ids = sorted({d for _, d in pairs})
    table = dataset.to_table(filter=ds.field("query_id").isin(query_ids) & ds.field("doc_id").isin(doc_ids))
    wanted = {f"{q}\x00{d}" for q, d in pairs}
    keys = pc.binary_join_element_wise(table["query_id"], table["doc_id"], "\x00")
    table = table.filter(pc.is_in(keys, value_set=pa.array(sorted(wanted))))
    return table.sort_by([("query_id", "ascending"), ("doc_id", "ascending"), ("chunk", "ascending")])
