"""`attrib prefilter`: TF-IDF (or BM25) candidates for each query."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from attrib.commands.options import (
    Corpus, IdField, Lines, LongDocuments, MaxDocs, MaxLength, Out, Overwrite, Queries, SkipBadRows, Split,
    TextField, TrustRemoteCode, checked_max_length, corpus_spec,
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
    from attrib.prefilter_stage import parse_ngram_range, run_prefilter

    run_prefilter(
        corpus_spec(corpus, text_field, id_field, lines, max_docs, skip_bad_rows, split, long_documents),
        queries,
        out,
        top_k,
        unit=unit,
        analyzer=analyzer,
        ngram_range=parse_ngram_range(ngram_range),
        scoring=scoring,
        query_text=query_text,
        backend=backend,
        model=model,
        max_length=checked_max_length(max_length),
        hash_features=hash_features,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
    )
