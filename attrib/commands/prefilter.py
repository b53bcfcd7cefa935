"""`attrib prefilter`: TF-IDF (or BM25) candidates for each query."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    ChatTemplate, Corpus, IdField, Lines, LongDocuments, MaxDocs, MaxLength, Out, Overwrite, Queries, SkipBadRows, Split,
    TextField, TrustRemoteCode,
)

TopK = Annotated[int, typer.Option(help="Candidates kept per query.")]
Unit = Annotated[str, typer.Option(help="Rank whole documents, or the model's sequences (needs --model).")]
Analyzer = Annotated[str, typer.Option(help="word: lower-cased word n-grams; model: the --model tokenizer's tokens.")]
NgramRange = Annotated[str, typer.Option(help="Smallest and largest n of the n-grams, e.g. 1,2.")]
Scoring = Annotated[str, typer.Option(help="tfidf (cosine, sublinear tf, smooth idf) or bm25 (k1=1.5, b=0.75).")]
QueryText = Annotated[str, typer.Option(help="Which part of each query is searched: prompt, completion or both.")]
Backend = Annotated[
    str, typer.Option(help="exact (in memory, TfidfVectorizer), streaming (two passes, flat memory) or auto.")
]
TokenizerModel = Annotated[
    Optional[str], typer.Option("--model", "-m", help="Model whose tokenizer cuts sequences / reads text.")
]
HashFeatures = Annotated[int, typer.Option(help="Hashed feature space of the streaming backend.")]


def prefilter(
    corpus: Corpus,
    queries: Queries,
    out: Out,
    top_k: TopK = 10_000,
    unit: Unit = "document",
    analyzer: Analyzer = "word",
    ngram_range: NgramRange = "1,1",
    scoring: Scoring = "tfidf",
    query_text: QueryText = "both",
    backend: Backend = "auto",
    model: TokenizerModel = None,
    max_length: MaxLength = None,
    long_documents: LongDocuments = "chunk",
    chat_template: ChatTemplate = "auto",
    hash_features: HashFeatures = 2**22,
    text_field: TextField = "text",
    id_field: IdField = None,
    lines: Lines = False,
    max_docs: MaxDocs = None,
    skip_bad_rows: SkipBadRows = False,
    split: Split = "train",
    trust_remote_code: TrustRemoteCode = False,
    overwrite: Overwrite = False,
) -> None:
    """Narrow a corpus to the documents a TF-IDF search finds for each query.

    Example: attrib prefilter --corpus C --queries Q --top-k 10000 --out run/candidates
    """
    options = dict(locals())
    from attrib.api import prefilter as run

    run(**options)
