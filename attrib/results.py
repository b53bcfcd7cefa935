"""The result of a stage: where its directory is, its manifest, and readers for its tables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attrib.errors import InputError


@dataclass
class StageResult:
    """A finished stage directory: where it is, its manifest, and readers for its tables."""

    out: Path
    manifest: dict
    already_complete: bool = False  # True when `out` was finished before this call and left as it was
    is_main: bool = True  # False on the processes other than rank 0 of a several-process run

    @classmethod
    def open(cls, out: str | Path) -> StageResult:
        """The result of a stage directory written earlier (by the API or the command line)."""
        from attrib.storage import read_manifest

        manifest = read_manifest(out)
        if manifest is None:
            raise InputError(f"{out} is not a stage directory (no manifest.json)")
        return cls(Path(out), manifest)

    @property
    def stage(self) -> str:
        return self.manifest.get("stage", "?")

    def documents(self, pandas: bool = False):
        """The ranked table: documents.parquet of `query`, candidates.parquet of `prefilter`,
        self_influence.parquet of `self_influence`.

        A pyarrow Table, or a pandas DataFrame with `pandas=True` (pandas must be installed).
        """
        import pyarrow.parquet as pq

        from attrib.score_tables import DOCUMENTS, SELF_INFLUENCE
        from attrib.stages.prefilter import CANDIDATES_FILE

        names = {"query": DOCUMENTS, "prefilter": CANDIDATES_FILE, "self-influence": SELF_INFLUENCE}
        if self.stage not in names:
            raise InputError(f"{self.out} holds `attrib {self.stage}` output, which has no documents table")
        return _maybe_pandas(pq.read_table(self.out / names[self.stage]), pandas)

    def to_pandas(self):
        """`documents(pandas=True)`."""
        return self.documents(pandas=True)

    def tokens(self, query_id: str, doc_id: str, pandas: bool = False):
        """Per-token scores of one (query, document) pair, one row per chunk (token offsets, ids and
        scores); empty when the pair's tokens were not kept (see `token_scores_top`)."""
        from attrib.score_tables import read_token_rows

        if self.stage != "query":
            raise InputError(f"{self.out} holds `attrib {self.stage}` output; token scores come from `attrib query`")
        return _maybe_pandas(read_token_rows(self.out, [(str(query_id), str(doc_id))]), pandas)


def _maybe_pandas(table, pandas: bool):
    if not pandas:
        return table
    try:
        import pandas  # noqa: F401
    except ImportError:
        raise InputError("pandas=True needs pandas (pip install pandas); without it you get a pyarrow Table") from None
    return table.to_pandas()
