"""Progress bars for long work (model preparation, block loading): on stderr, and only for a person.

A bar is drawn only when stderr is a terminal and the caller is not asked to be quiet: piped into
a log file, a journal or a test, a redrawn bar is noise, so nothing is printed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[], None]]:
    """Yields `advance()`, to call once per unit of work done (of `total`)."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda: progress.advance(task)
