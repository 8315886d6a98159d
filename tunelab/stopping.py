"""Stopping a long training job without losing it: signals, and the resume command.

The first Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, `kill`, `docker stop`)
only raises a flag: the loop finishes its optimizer step, writes a checkpoint and exits
with 128 + the signal number. A second Ctrl-C or SIGTERM, at least `REPEAT_SECONDS` after the
first, stops at once (KeyboardInterrupt); checkpoints and the final model are written into
temporary directories and renamed, so that leaves nothing half-written either.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

# Under torchrun / accelerate launch, the launcher forwards the terminal's Ctrl-C to every
# worker that already got it from the terminal: two SIGINTs within milliseconds are one Ctrl-C.
REPEAT_SECONDS = 1.0


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM ask the loop to stop after the current step.

    `signum` is the first signal received (None: none). Handlers can only be installed from
    the main thread; elsewhere (a UI worker thread) the default behaviour is kept.
    """

    def __init__(self, *, announce: bool = True):
        self.signum: int | None = None
        self.received_at = 0.0
        self.announce = announce
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.received_at = signum, now
            if self.announce:  # os.write: safe inside a signal handler, unlike a Rich console print
                name = signal.Signals(signum).name
                os.write(2, f"\n{name}: stopping after this step and writing a checkpoint "
                            "(Ctrl-C again to stop at once)\n".encode())
        elif now - self.received_at >= REPEAT_SECONDS:  # a second Ctrl-C, or a scheduler's second SIGTERM
            raise KeyboardInterrupt


def resume_command(num_processes: int) -> str:
    """The command that continues this run: the same `tunelab train` arguments plus --resume.

    Run from the CLI, it is rebuilt from this process's arguments; from Python it is the
    config setting to pass. Several processes: the same launcher and process count.
    """
    argv = sys.argv
    from_cli = len(argv) > 1 and Path(argv[0]).name in ("tunelab", "__main__.py") and argv[1] == "train"
    if not from_cli:
        return "train again with training.resume=true (or training.resume=auto)"
    dropped = ("--resume", "--overwrite")
    args = [a for a in argv[2:] if a not in dropped and not a.startswith(("training.resume=", "output.overwrite="))]
    command = f"train {shlex.join(args)} --resume".replace("  ", " ")
    if num_processes > 1:
        return f"the same launcher with {num_processes} processes, e.g. torchrun --nproc_per_node {num_processes} -m tunelab {command}"
    return f"tunelab {command}"
