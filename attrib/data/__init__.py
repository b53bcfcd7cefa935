"""Corpora, queries and their token sequences, one module per job: rows (documents and their
checks), readers (files and `datasets` streamed as documents), chat (conversations rendered with
a template), sequences (chunks with character offsets, batches, parts) and queries.

The names the stages use are importable from here.
"""

from attrib.data.chat import ChatFormat, chat_format, check_chat_agrees
from attrib.data.queries import Query, load_queries, query_sequence
from attrib.data.readers import check_corpus, corpus_files, iter_documents
from attrib.data.rows import EMPTY_TEXT, CorpusSpec, Document, RowStats
from attrib.data.sequences import (
    Part,
    Sequence,
    SequenceCaps,
    chunk_document,
    chunking_identity,
    collate,
    default_max_length,
    iter_sequence_parts,
    pack_batches,
    require_fast_tokenizer,
    special_prefix,
)

__all__ = [
    "EMPTY_TEXT", "ChatFormat", "CorpusSpec", "Document", "Part", "Query", "RowStats", "Sequence", "SequenceCaps",
    "check_chat_agrees", "check_corpus", "chat_format", "chunk_document", "chunking_identity", "collate",
    "corpus_files", "default_max_length", "iter_documents", "iter_sequence_parts", "load_queries", "pack_batches",
    "query_sequence", "require_fast_tokenizer", "special_prefix",
]
