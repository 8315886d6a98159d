"""One writer per run folder: RUN/.lock, held by the training that writes RUN.

Two trainings into one folder (two CLI runs, the UI's Resume while an earlier training still
runs, two HPO workers on one trial) would both append to metrics.jsonl and rotate
checkpoints/. The lock is an `flock` on RUN/.lock, which the kernel releases when its
process dies, however it dies (SIGKILL included): a lock left by a dead process is
therefore never "held", and the next training takes it over. The file's content names the
holder (PID, host, start time, command) for the error message and for the UI, which lists
trainings still running after a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from tunelab.errors import TunelabError

LOCK_NAME = ".lock"


def read_holder(path: Path) -> dict:
    """The holder info written into a lock file ({} when unreadable or empty)."""
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def describe_holder(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"])) if info.get("started") else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} (since {started}: {info.get('command', '?')})"


class RunLock:
    """Context manager holding RUN/.lock for the duration of a training.

    `acquire` raises a TunelabError naming the holder when another live process holds it.
    The run folder itself is created here if needed and removed again on release when the
    training left nothing else in it (bad data stops a run before it writes anything).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.handle = None
        self.created_dir = False
        self.created: list[Path] = []  # folders made by acquire (the run folder, maybe runs/), innermost first
        self.took_over: dict | None = None  # the previous holder's info, when its lock was stale

    def acquire(self) -> RunLock:
        self.created_dir = not self.run_dir.exists()
        self.created = [d for d in [self.run_dir, *self.run_dir.parents] if not d.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = read_holder(self.path)
                handle.close()
                self._remove_dir_if_empty()
                raise TunelabError(
                    f"{self.run_dir} is being trained by another process: {describe_holder(info)}.\n"
                    "  fix: wait for that training to finish or stop it "
                    f"(kill -INT {info.get('pid', 'PID')}), or choose another output.name"
                ) from None
            # The previous holder may have unlinked the file between our open and flock:
            # then we hold a lock on a deleted inode, and must try again on the new file.
            try:
                same = os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        handle.seek(0)
        previous = handle.read()
        if previous.strip():  # a lock file nobody holds: its process died without releasing it
            self.took_over = read_holder(self.path)
        handle.seek(0)
        handle.truncate()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
        handle.write(json.dumps(info) + "\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: see the inode check above
        finally:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
        if self.created_dir:
            self._remove_dir_if_empty()

    def _remove_dir_if_empty(self) -> None:
        """Remove the folders acquire made (RUN, and `runs/` when it was new too) while empty."""
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:  # not empty: the training wrote into it (or another run did)
                return

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def running_holder(run_dir: Path) -> dict | None:
    """The holder's info if RUN/.lock names a live process of this host, else None.

    Read-only on purpose: probing with flock would make a training that starts at that very
    moment fail to take the lock. A PID is alive and the same process when it exists and was
    started no later than the lock (PIDs are reused).
    """
    import psutil

    info = read_holder(Path(run_dir) / LOCK_NAME)
    if not info.get("pid") or info.get("host") != socket.gethostname():
        return None
    try:
        started = psutil.Process(int(info["pid"])).create_time()
    except (psutil.Error, ValueError):
        return None
    return info if started <= float(info.get("started", 0)) + 1.0 else None
