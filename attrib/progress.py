"""Progress bars on stderr with items/s, tokens/s and ETA; `--quiet` turns them off.

Under torchrun or accelerate only rank 0 speaks (the rank comes from the World a stage
started, else the RANK or LOCAL_RANK environment variable; attrib.runtime); the other
ranks do with `--debug`.
Errors and warnings are not affected.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator


def silent() -> bool:
    """No bars or status lines: quiet, or a rank other than 0 without debug (attrib.runtime)."""
    from attrib import runtime

    return runtime.current().quiet or (runtime.rank() != 0 and not runtime.current().debug)


class Bar:
    """A handle to advance one progress bar (a no-op when quiet); it counts what it was advanced by."""

    def __init__(self, progress=None, task=None):
        self._progress = progress
        self._task = task
        self.items = 0
        self.tokens = 0

    def advance(self, items: int = 1, tokens: int = 0) -> None:
        self.items += items
        self.tokens += tokens
        if self._progress is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(
                self._task, advance=items, tokens=task.fields.get("tokens", 0) + tokens
            )


def _rate_columns():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class ItemRate(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.1f} {task.fields['unit']}/s" if speed else "")

    class TokenRate(ProgressColumn):
        def render(self, task):
            elapsed = task.elapsed or 0.0
            tokens = task.fields.get("tokens", 0)
            return Text(f"{tokens / elapsed:,.0f} tok/s" if elapsed > 0 and tokens else "")

    return ItemRate(), TokenRate()


def duration(seconds: float) -> str:
    """'42.0 s' or '3 min 05 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def _plural(unit: str, count: int) -> str:
    """'1 step', '2 steps', '2 queries'; abbreviations ('seq') and plurals ('docs') stay as they are."""
    if count == 1 or unit.endswith("s") or unit == "seq":
        return unit
    return unit[:-1] + "ies" if unit.endswith("y") else unit + "s"


@contextlib.contextmanager
def progress(description: str, total: int | None = None, unit: str = "seq") -> Iterator[Bar]:
    """Show one bar while the block runs; where stderr is no terminal (a log file, CI), one line
    when the block ends instead, with its count, time and rate."""
    if silent():
        yield Bar()
        return
    if not sys.stderr.isatty():
        bar, started = Bar(), time.perf_counter()
        yield bar
        seconds = time.perf_counter() - started
        rate = f", {bar.tokens / seconds:,.0f} tok/s" if bar.tokens and seconds > 0 else ""
        print(f"{description}: {bar.items:,} {_plural(unit, bar.items)} in {duration(seconds)}{rate}", file=sys.stderr)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *_rate_columns(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as bar:
        task = bar.add_task(description, total=total, unit=unit, tokens=0)
        yield Bar(bar, task)


def message(text: str) -> None:
    """A status line for people (stderr), hidden by --quiet and on ranks other than 0."""
    if not silent():
        from attrib.runtime import rank

        prefix = f"[rank {rank()}] " if rank() != 0 else ""
        print(prefix + text, file=sys.stderr)


@contextlib.contextmanager
def libraries_quiet(*load: str) -> Iterator[None]:
    """Log lines, warnings and progress bars of transformers and datasets off while attrib works.

    Their notices (the `loss_type=None` notice, save_pretrained's "Writing model shards" bar)
    are about their internals, not the user's run. `load` names libraries to import first
    (those the block is about to use); the others are quieted only if already imported.
    Everything is restored on exit; attrib's own errors and warnings are untouched.
    """
    import importlib
    import warnings

    restore = []
    try:
        for name in ("transformers", "datasets"):
            if name in load or name in sys.modules:
                logging = importlib.import_module(name).utils.logging
                restore.append((logging, logging.get_verbosity(), logging.is_progress_bar_enabled()))
                logging.set_verbosity_error()
                logging.disable_progress_bar()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(transformers|datasets|huggingface_hub)(\.|$)")
            yield
    finally:
        for logging, verbosity, bars in restore:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
