"""Atomic checkpoints of the full training state, and exact resume.

A checkpoint is `checkpoints/step-N/` holding the trainable weights (a PEFT adapter or
the full model, safetensors), `optimizer.pt`, `scheduler.pt`, `rng.pt` (every process's
random generators), `scaler.pt` (fp16 loss scale, when used) and `state.json` (epoch,
position in the epoch's batch plan, global step, and the process count and accumulation
that position is counted in). It is written into a
temporary sibling directory, fsynced, then renamed: a crash while saving leaves the
previous checkpoints untouched and no half-written `step-N` behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


@dataclass
class TrainState:
    """Where training stands: enough to continue at the exact next batch."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    batch_index: int = 0  # next micro-batch of this epoch's plan (per process)
    targets_seen: int = 0  # what the task's loss counts (target tokens, examples, pairs) trained on, all processes
    best_metric: float | None = None  # best value of the task's selection metric (`SELECT`) so far
    evals_without_improvement: int = 0
    # What `batch_index` is counted in: a resume with other values would continue elsewhere.
    num_processes: int | None = None
    gradient_accumulation_steps: int | None = None


def _fsync_tree(directory: Path) -> None:
    """Flush every file (and the directory entries) to disk before the rename publishes them."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(tmp: Path, final: Path) -> None:
    """Atomically move a fully written temp directory into place (replacing an old one)."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoints_dir: Path,
    *,
    save_weights,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    keep: int,
    rng_states: list[dict],
    scaler=None,
) -> Path:
    """Write `step-N` atomically, then delete all but the newest `keep` checkpoints.

    `save_weights(directory)` writes the trainable weights (adapter or full model) and
    whatever else inference needs (tokenizer, metadata) into the directory.
    `rng_states`: `rng_state()` of every process, by rank (each rank draws its own dropout
    masks, so each needs its own generators back). `scaler`: the fp16 GradScaler, if any.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{state.global_step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{state.global_step}-", dir=checkpoints_dir))
    try:
        save_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"per_rank": rng_states}, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n")
        publish_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(checkpoints_dir, keep)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints (those with state.json), oldest first; temp dirs are ignored."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(checkpoints_dir)
    return checkpoints[-1] if checkpoints else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, and leftovers of interrupted saves."""
    for path in list_checkpoints(checkpoints_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for path in checkpoints_dir.glob(".tmp-step-*"):
        shutil.rmtree(path, ignore_errors=True)


def load_training_state(
    checkpoint: Path, *, optimizer: torch.optim.Optimizer, scheduler, rank: int = 0, scaler=None
) -> TrainState:
    """Restore optimizer, scheduler, loss-scaler and this rank's RNG states; return where to continue.

    The weights are loaded by the caller (adapter vs full model differ). Tensors are read to
    the CPU first (`map_location`): without it every rank would put its optimizer state on
    the device it was saved from (cuda:0); `load_state_dict` moves it to the parameters'
    device. `rng.pt` is our own pickle of Python/NumPy generator states, hence
    `weights_only=False` for that file alone.
    """
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", map_location="cpu", weights_only=True))
    saved = torch.load(checkpoint / "rng.pt", map_location="cpu", weights_only=False)
    per_rank = saved["per_rank"] if "per_rank" in saved else [saved]  # older checkpoints: one state
    set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
    saved_state = json.loads((checkpoint / STATE_FILE).read_text())
    for old, new in (("tokens_seen", "targets_seen"), ("best_eval_loss", "best_metric")):  # names in older checkpoints
        if old in saved_state:
            saved_state[new] = saved_state.pop(old)
    return TrainState(**saved_state)
