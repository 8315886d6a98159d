"""One writer per run folder (tunelab/runlock.py): a second training into a folder that is being
trained stops with the holder's PID and host; a lock left by a killed process is taken over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.config import build_config
from tunelab.errors import TunelabError
from tunelab.runlock import LOCK_NAME, RunLock, read_holder, running_holder
from tunelab.train import train

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from tunelab.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)"


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding RUN/.lock until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_training_into_a_locked_run_folder_names_the_holder(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "runs" / "busy"
    holder = hold_lock(run_dir)
    try:
        config = build_config({"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "none.jsonl")},
                               "output": {"dir": str(tmp_path / "runs"), "name": "busy"}})
        with pytest.raises(TunelabError) as err:
            train(config, quiet=True)
        message = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "kill -INT" in message
        assert running_holder(run_dir)["pid"] == holder.pid  # what the UI shows as a running training
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_holder(run_dir / LOCK_NAME)["pid"] == holder.pid  # the dead holder's file is still there
    assert running_holder(run_dir) is None
    with RunLock(run_dir) as lock:
        assert lock.took_over["pid"] == holder.pid
        assert read_holder(run_dir / LOCK_NAME)["pid"] == os.getpid()
        with pytest.raises(TunelabError, match=f"pid {os.getpid()}"):  # a second holder in this process too
            RunLock(run_dir).acquire()
    assert not (run_dir / LOCK_NAME).exists()


def test_failed_training_leaves_no_run_folder_and_no_lock(tmp_path, tiny_model_dir):
    config = build_config({"model": {"name": str(tiny_model_dir)}, "data": {"train": str(tmp_path / "missing.jsonl")},
                           "output": {"dir": str(tmp_path / "runs"), "name": "bad"}})
    with pytest.raises(TunelabError):
        train(config, quiet=True)
    assert not (tmp_path / "runs" / "bad").exists()
    started = time.time()
    with RunLock(tmp_path / "runs" / "bad"):  # released: the next training takes it at once
        assert time.time() - started < 5
