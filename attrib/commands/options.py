"""Options shared by several commands, defined once with their help text."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Model = Annotated[str, typer.Option("--model", "-m", help="Hugging Face causal LM: a local directory or a hub id.")]
Dtype = Annotated[str, typer.Option(help="Model compute dtype: float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow the model's own code from the hub.")]
Modules = Annotated[
    Optional[str], typer.Option(help="Regex over module names to track instead of the MLP projections.")
]
Corpus = Annotated[
    str,
    typer.Option(help="JSONL/Parquet/CSV/text file, a directory or glob of them, or a `datasets` hub name."),
]
TextField = Annotated[str, typer.Option(help="Column holding the document text.")]
IdField = Annotated[
    Optional[str],
    typer.Option(
        help="Column holding the document id. Default: the `id` column/field where rows have one, else the row "
        "number (a corpus mixing rows with and without `id` is refused); 'none': always row numbers."
    ),
]
Lines = Annotated[bool, typer.Option(help="Text files hold one document per line (default: one per file).")]
MaxDocs = Annotated[Optional[int], typer.Option(help="Read at most this many documents.")]
SkipBadRows = Annotated[bool, typer.Option(help="Skip and count bad rows instead of stopping.")]
Split = Annotated[str, typer.Option(help="Split of a `datasets` hub corpus.")]
MaxLength = Annotated[
    Optional[int],
    typer.Option(min=2, help="Tokens per sequence (default: the model's context, capped at 2048)."),
]
LongDocuments = Annotated[
    str,
    typer.Option(
        help="Documents longer than --max-length: chunk (score every chunk; packed pre-training) or truncate "
        "(only the first --max-length tokens; models fine-tuned on truncated examples)."
    ),
]
Queries = Annotated[str, typer.Option(help='JSONL of queries {"id", "prompt", "completion"} or {"id", "messages"}.')]
ChatTemplate = Annotated[
    str,
    typer.Option(
        help="How conversations ('messages' rows and chat queries) are rendered: auto (the tokenizer's chat "
        "template), none (refuse conversations) or the path of a Jinja template file."
    ),
]
LossOn = Annotated[
    str,
    typer.Option(
        help="Tokens of a corpus sequence that carry loss: all, or assistant (only the assistant turns of "
        "conversations, as in supervised fine-tuning). Factors and scores must use the same."
    ),
]
Out = Annotated[str, typer.Option("--out", "-o", help="Output stage directory (rerun to resume).")]
Overwrite = Annotated[bool, typer.Option(help="Start over in --out instead of resuming.")]
TokensPerBatch = Annotated[int, typer.Option(help="Padded tokens per batch (length-sorted packing).")]
Seed = Annotated[int, typer.Option(help="Seed for sampled labels and shuffling.")]
