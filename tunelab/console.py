"""The shared Rich console and progress helpers (long work always shows progress)."""

from __future__ import annotations

import contextlib
import time
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


def progress(*extra_columns, plain_every: float = 10.0) -> Progress | PlainProgress:
    """A progress bar with count, rate/ETA and any extra columns (e.g. loss, tokens/s).

    When the console is not a terminal (a log file, nohup, CI, a notebook's `!tunelab`),
    a live bar would show nothing until the end, so progress is printed as plain lines
    instead (see `PlainProgress`; `plain_every` seconds between lines, 0: every report).
    """
    if not console.is_terminal:
        return PlainProgress(every=plain_every)
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


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (the format of Rich's elapsed/remaining columns)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress as plain lines for logs: `description done/total (pct%)  fields  elapsed H:MM:SS  ETA H:MM:SS`.

    The same calls as the Rich bar that tunelab uses (`add_task`, `update`, `advance`, `disable`,
    a context manager). A line is printed when an update carries fields (a report such as a
    training logging step's loss/lr/tokens per second), at most one per `every` seconds
    (0: every report); count-only updates print once `every` seconds have passed (when
    `every` > 0); the line at completion (or at exit, if stopped early) is always printed.
    """

    def __init__(self, *, every: float = 10.0):
        self.every = every
        self.disable = False
        self.tasks: list[dict] = []

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        for task_id, task in enumerate(self.tasks):
            if task["printed"] != task["completed"]:
                self._print(task_id)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.perf_counter()
        self.tasks.append({"description": description, "total": total, "completed": completed, "start": completed,
                           "fields": fields, "started": now, "last": now, "printed": completed})
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, completed: float | None = None, advance: float | None = None, **fields) -> None:
        task = self.tasks[task_id]
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        task["fields"].update(fields)
        waited = time.perf_counter() - task["last"]
        finished = task["total"] is not None and task["completed"] >= task["total"]
        due = waited >= self.every if fields else self.every > 0 and waited >= self.every
        if (finished or due) and task["printed"] != task["completed"]:
            self._print(task_id)

    def _print(self, task_id: int) -> None:
        task = self.tasks[task_id]
        now = time.perf_counter()
        task["last"], task["printed"] = now, task["completed"]
        if self.disable:
            return
        elapsed = now - task["started"]
        done, total = task["completed"], task["total"]
        count = f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"
        parts = [f"{task['description']} {count}"]
        parts += [str(value) for value in task["fields"].values() if value not in ("", None)]
        parts.append(f"elapsed {clock(elapsed)}")
        if total:
            rate = (done - task["start"]) / elapsed if elapsed > 0 else 0.0
            left = max(total - done, 0)
            parts.append(f"ETA {clock(left / rate) if rate > 0 else clock(0) if not left else '?'}")
        console.print("  ".join(parts), markup=False, highlight=False, soft_wrap=True)
