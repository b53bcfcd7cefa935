"""The prefilter's candidates as the scoring stage reads them: arrays, not a Python object per pair.

Pairs (query, document[, chunk]) are held as numpy arrays grouped by document, so the
scoring stage can ask, for one training sequence, which queries want it, and skip
documents no query wants before tokenizing them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attrib.errors import InputError
from attrib.runtime import flag


class CandidateIndex:
    """Candidate pairs over the query order of the scoring stage; per document a slice of arrays."""

    def __init__(self, table, query_ids: list[str], source: str = ""):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.source = source
        position = {query_id: i for i, query_id in enumerate(query_ids)}
        self.unknown_queries = sorted(q for q in table["query_id"].unique().to_pylist() if q not in position)
        self.table = table.filter(pc.is_in(table["query_id"], value_set=pa.array(query_ids, pa.string())))
        doc_codes = pc.dictionary_encode(self.table["doc_id"].combine_chunks())
        query_codes = pc.dictionary_encode(self.table["query_id"].combine_chunks())
        self.doc_number = {doc_id: i for i, doc_id in enumerate(doc_codes.dictionary.to_pylist())}
        remap = np.array([position[q] for q in query_codes.dictionary.to_pylist()], dtype=np.int64)
        pair_doc = doc_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        pair_query = remap[query_codes.indices.to_numpy(zero_copy_only=False).astype(np.int64)]
        pair_chunk = self.table["chunk"].combine_chunks().fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        order = np.argsort(pair_doc, kind="stable")
        self.pair_query, self.pair_chunk = pair_query[order], pair_chunk[order]
        self.doc_start = np.searchsorted(pair_doc[order], np.arange(len(self.doc_number) + 1))

    def wants(self, doc_id: str) -> bool:
        return doc_id in self.doc_number

    def queries_for(self, doc_id: str, chunk: int) -> np.ndarray:
        """Positions (in the scoring stage's query order) of the queries that want this chunk."""
        number = self.doc_number.get(doc_id)
        if number is None:
            return np.empty(0, dtype=np.int64)
        start, stop = self.doc_start[number], self.doc_start[number + 1]
        chunks = self.pair_chunk[start:stop]
        return np.unique(self.pair_query[start:stop][(chunks < 0) | (chunks == chunk)])

    def most_per_query(self) -> int:
        """The most candidate documents any one query has."""
        counts = self.table.group_by("query_id").aggregate([("doc_id", "count_distinct")])
        return max(counts["doc_id_count_distinct"].to_pylist(), default=0)

    def document_ranks(self):
        """(query_id, doc_id, prefilter_rank) with the best rank over a document's chunks, as Arrow."""
        return self.table.group_by(["query_id", "doc_id"]).aggregate([("rank", "min")]).rename_columns(
            ["query_id", "doc_id", "prefilter_rank"]
        )


def open_candidates(directory: str | Path, query_ids: list[str]) -> CandidateIndex:
    """The candidates of a finished prefilter stage, indexed for `query_ids`."""
    import pyarrow.parquet as pq

    from attrib.stages.prefilter import CANDIDATES_FILE
    from attrib.storage import open_input

    open_input(directory, "prefilter", option=flag("candidates"))
    path = Path(directory) / CANDIDATES_FILE
    try:
        table = pq.read_table(path, columns=["query_id", "doc_id", "chunk", "rank"])
    except Exception as exc:  # pyarrow raises several types for a missing, damaged or incomplete file
        raise InputError(f"{flag('candidates', directory)}: {CANDIDATES_FILE} is unreadable ({exc}); rerun the prefilter") from exc
    return CandidateIndex(table, query_ids, str(directory))
