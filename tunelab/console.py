"""The shared Rich console and progress helpers (long work always shows progress)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner for a step of unknown length (model conversion, loading)."""
    with console.status(message):
        yield
    console.print(f"[green]done[/] {message}", highlight=False)


def progress(*extra_columns) -> Progress:
    """A progress bar with count, rate/ETA and any extra columns (e.g. loss, tokens/s)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
