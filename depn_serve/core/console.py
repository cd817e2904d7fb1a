"""The terminal: one console for every command's output, and progress bars for long work."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Logs and pipes get a wide console so tables are not wrapped.
console = Console(width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Bar:
    """Callbacks driving one progress bar: `start(total)` once the amount of work is known (again for the next
    piece of work: the bar starts over), `advance()` per item."""

    start: Callable[[int], None]
    advance: Callable[..., None]


@contextmanager
def progress(description: str) -> Iterator[Bar]:
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield Bar(lambda total: bar.reset(task, total=total), lambda *_: bar.advance(task))
