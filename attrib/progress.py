"""Progress bars on stderr with items/s, tokens/s and ETA; `--quiet` turns them off."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

QUIET = False


def set_quiet(quiet: bool) -> None:
    global QUIET
    QUIET = quiet


class Bar:
    """A handle to advance one progress bar; a no-op when quiet."""

    def __init__(self, progress=None, task=None):
        self._progress = progress
        self._task = task

    def advance(self, items: int = 1, tokens: int = 0) -> None:
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


@contextlib.contextmanager
def progress(description: str, total: int | None = None, unit: str = "seq") -> Iterator[Bar]:
    """Show one bar while the block runs."""
    if QUIET:
        yield Bar()
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
    """A status line for people (stderr), hidden by --quiet."""
    if not QUIET:
        print(text, file=sys.stderr)
