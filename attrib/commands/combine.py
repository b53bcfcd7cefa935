"""`attrib combine`: influence across checkpoints, one scores directory from several."""

from __future__ import annotations

from typing import Annotated

import typer

from attrib.options import OUT, RunOptions, help_of

ScoresDirs = Annotated[list[str], typer.Argument(
    help="Output directories of `attrib query` at different checkpoints (same queries, candidates, corpus and "
         "chunking; run query with --keep-all-scores or --candidates).", show_default=False)]
Out = Annotated[str, typer.Option(*OUT.flags, help=OUT.help)]
Overwrite = Annotated[bool, typer.Option(help=help_of(RunOptions, "overwrite"))]
Weights = Annotated[str, typer.Option(
    help="equal (their mean), lr (each checkpoint's learning rate from the trainer_state.json of the model "
         "directory it was scored with; TracIn) or one number per SCORES_DIR, e.g. 3e-4,1e-4; normalised to sum 1.")]


def combine(scores_dirs: ScoresDirs, out: Out, weights: Weights = "equal", overwrite: Overwrite = False) -> None:
    """Combine the scores of several checkpoints into one scores directory (a weighted sum; ranks recomputed).

    Example: attrib combine run/ckpt-*/scores --out run/scores-combined
    """
    from attrib.progress import message
    from attrib.stages.combine import run_combine

    manifest = run_combine(scores_dirs, out, weights, overwrite)
    message(f"{len(manifest['combine'])} score directories combined into {out}; `attrib top {out}` shows them")
