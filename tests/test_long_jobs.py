"""Long jobs survive: Ctrl-C / SIGTERM, a diverging loss, a failed checkpoint write, piped logs.

Signals are sent to a real `python -m tunelab train` subprocess on the tiny model; its
output is a pipe, so progress arrives as plain lines the test can wait for.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import TunelabError
from tunelab.train import train

REPO = Path(__file__).resolve().parents[1]
# `training 3/40 (8%)  loss 10.7180  lr 5.00e-03  4132 tok/s  elapsed 0:00:02  ETA 0:00:25`
TRAIN_LINE = re.compile(
    r"^training (\d+)/(\d+) \(\d+%\)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d+  \d+ tok/s  elapsed \d+:\d\d:\d\d  ETA \d+:\d\d:\d\d$"
)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(48, seed=3)))
    return path


def overrides(model_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "training.precision=fp32", f"model.name={model_dir}", f"data.train={data}", f"output.dir={out.parent}",
        f"output.name={out.name}", "training.batch_size=4", "training.gradient_accumulation_steps=1",
        "training.learning_rate=5e-3", "training.warmup_steps=0", "training.logging_steps=1", "lora.r=4",
        "lora.alpha=8", "data.eval_fraction=0.15", "data.max_seq_length=128", "lora.dropout=0.0", *extra,
    ]


def start(args: list[str], *, script: str | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "tunelab", "train", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, predicate, timeout: float = 120.0) -> list[str]:
    """stderr lines up to (and including) the first one that satisfies `predicate`."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if predicate(lines[-1]):
            return lines
    proc.kill()
    raise AssertionError("never saw the expected line:\n" + "\n".join(lines[-30:]))


def steps_logged(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_checkpoints_and_the_printed_command_resumes(
    signum, code, tiny_model_dir, train_file, tmp_path
):
    run_dir = tmp_path / "run"
    args = overrides(tiny_model_dir, train_file, run_dir, "training.max_steps=30", "training.save_steps=100")
    proc = start(args)
    before = read_until(proc, lambda line: bool(TRAIN_LINE.match(line)) and int(TRAIN_LINE.match(line)[1]) >= 3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    stopped = re.search(r"stopped by (SIG\w+) after step (\d+)/30; checkpoint: (\S+)\n  resume: (.+)", err)
    assert stopped, err[-3000:]
    name, step, checkpoint, command = stopped.groups()
    assert name == signal.Signals(signum).name and int(step) >= 3
    assert Path(checkpoint) == run_dir / "checkpoints" / f"step-{step}"
    assert json.loads((Path(checkpoint) / "state.json").read_text())["global_step"] == int(step)
    assert not (run_dir / "final").exists() and "Traceback" not in err
    assert steps_logged(run_dir) == list(range(1, int(step) + 1))
    # Piped output: one plain line per logging step, no live bar.
    lines = [m for m in map(TRAIN_LINE.match, before + err.splitlines()) if m]
    assert [int(m[1]) for m in lines] == list(range(1, int(step) + 1)) and all(m[2] == "30" for m in lines)
    assert "━" not in err and "━" not in "".join(before)
    if signum != signal.SIGTERM:
        return
    assert command.startswith("tunelab train ") and command.endswith(" --resume")
    resumed = subprocess.run([sys.executable, "-m", "tunelab", *_unquote(command)[1:]], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stderr.replace("\n", "")
    assert steps_logged(run_dir) == list(range(1, 31))  # no step lost or repeated
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()


def _unquote(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


SLOW_SECOND_SAVE = """
import sys, time
import tunelab.train as train_module
from tunelab.config import load_config

real_save = train_module.save_model_files
saves = []

def slow_save(*args, **kwargs):
    real_save(*args, **kwargs)
    saves.append(1)
    if len(saves) == 2:  # the checkpoint written after the first Ctrl-C
        print("WRITING-CHECKPOINT", file=sys.stderr, flush=True)
        time.sleep(60)

train_module.save_model_files = slow_save
train_module.train(load_config(None, sys.argv[1:]))
"""


def test_second_ctrl_c_stops_at_once_and_leaves_only_complete_checkpoints(tiny_model_dir, train_file, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(tiny_model_dir, train_file, run_dir, "training.max_steps=30", "training.save_steps=2")
    proc = start(args, script=SLOW_SECOND_SAVE)
    read_until(proc, lambda line: bool(TRAIN_LINE.match(line)) and int(TRAIN_LINE.match(line)[1]) >= 3)
    proc.send_signal(signal.SIGINT)
    read_until(proc, lambda line: line == "WRITING-CHECKPOINT")
    time.sleep(1.2)  # a second Ctrl-C, not the launcher's echo of the first
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 20  # did not sit out the 60 s write
    assert proc.returncode == 1 and "KeyboardInterrupt" in err  # `-c` script: Python's own exit for Ctrl-C
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-2"], names  # the interrupted write left no step-N and no temp directory
    assert json.loads((run_dir / "checkpoints" / "step-2" / "state.json").read_text())["global_step"] == 2
    assert not (run_dir / "final").exists()


def test_diverging_loss_stops_with_the_step_and_cause_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, train_file, tmp_path
):
    run_dir = tmp_path / "run"
    config = load_config(None, overrides(tiny_model_dir, train_file, run_dir, "training.learning_rate=1",
                                         "training.weight_decay=100", "training.lr_scheduler=constant",
                                         "training.save_steps=1", "training.max_steps=30", "training.keep_checkpoints=2"))
    with pytest.raises(TunelabError) as info:
        train(config, quiet=True)
    message = str(info.value)
    found = re.match(r"training diverged at step (\d+)/30: the loss is (nan|inf)", message)
    assert found, message
    step = int(found[1])
    assert "likely cause: a learning rate too high for this model (training.learning_rate=1) (with " \
           "training.weight_decay=100, learning rate x weight decay >= 1" in message
    last = run_dir / "checkpoints" / f"step-{step - 1}"
    assert f"the last good checkpoint is kept: {last}" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == last.name
    assert all(torch.isfinite(t).all() for t in load_file(last / "adapter_model.safetensors").values())
    assert not (run_dir / "final").exists()
    assert max(steps_logged(run_dir)) == step - 1  # the diverged step is not logged as a result


def test_failed_checkpoint_write_is_one_clear_error_and_the_previous_checkpoint_survives(
    tiny_model_dir, train_file, tmp_path, monkeypatch
):
    import tunelab.checkpoint as checkpoint

    real_torch_save = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if "step-4" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full_at_step_4)
    run_dir = tmp_path / "run"
    config = load_config(None, overrides(tiny_model_dir, train_file, run_dir, "training.save_steps=2",
                                         "training.max_steps=6"))
    with pytest.raises(TunelabError) as info:
        train(config, quiet=True)
    message = str(info.value)
    assert message.startswith(f"could not write checkpoint step-4 in {run_dir / 'checkpoints'}: the disk is full")
    assert f"the previous checkpoint {run_dir / 'checkpoints' / 'step-2'} is intact" in message
    assert "resume:" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    assert json.loads((run_dir / "checkpoints" / "step-2" / "state.json").read_text())["global_step"] == 2
    assert not (run_dir / "final").exists()


def test_plain_progress_lines_for_evaluation_and_generation(tiny_model_dir, tokenizer, capsys):
    from tunelab.evaluate import EvalExample, score_loss
    from tunelab.generate import GenerationSettings, encode_prompt, generate_completions, load_for_generation

    model, _ = load_for_generation(str(tiny_model_dir), dtype="fp32", device="cpu")
    examples = [EvalExample(prompt=[{"role": "user", "content": f"What is {i} + {i}?"}], reference=str(2 * i),
                            source=f"sums.jsonl:{i + 1}") for i in range(5)]
    score_loss(model, tokenizer, examples, batch_size=2)
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": f"Say {i}"}]) for i in range(3)]
    generate_completions(model, tokenizer, prompts, GenerationSettings(max_new_tokens=4), batch_size=2)
    err = capsys.readouterr().err
    assert re.search(r"^Scoring \(teacher forcing\) 5/5 \(100%\)  \d+ tok/s  elapsed 0:00:\d\d  ETA 0:00:00$", err, re.M), err
    assert re.search(r"^Generating 3/3 \(100%\)  \d+ tok/s  elapsed 0:00:\d\d  ETA 0:00:00$", err, re.M), err
    assert "━" not in err


def test_plain_progress_prints_reports_and_the_end_not_every_tick(capsys):
    from tunelab.console import PlainProgress

    with PlainProgress(every=3600) as bar:  # an hour between lines: only the end is printed
        task = bar.add_task("Tokenizing", total=50)
        for _ in range(50):
            bar.advance(task)
    with PlainProgress(every=0) as bar:  # training: every report (logging step) is a line
        task = bar.add_task("training", total=4, completed=1, info="")
        for step in (2, 3):
            bar.update(task, completed=step, info=f"loss {1 / step:.4f}")
            bar.update(task, completed=step)  # count-only update: no line
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("  elapsed")[0] for line in lines] == [
        "Tokenizing 50/50 (100%)",
        "training 2/4 (50%)  loss 0.5000",
        "training 3/4 (75%)  loss 0.3333",
    ]
    assert lines[0].endswith("ETA 0:00:00")


def test_fp16_divergence_names_the_overflow(tiny_model_dir, train_file, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, overrides(tiny_model_dir, train_file, run_dir, "training.precision=fp16",
                                         "training.learning_rate=1", "training.weight_decay=100",
                                         "training.lr_scheduler=constant", "training.save_steps=1", "training.max_steps=30"))
    with pytest.raises(TunelabError) as info:
        train(config, quiet=True)
    message = str(info.value)
    assert re.match(r"training diverged at step \d+/30: the loss is (nan|inf)", message), message
    assert "likely cause: an fp16 overflow in the forward pass (training.precision=bf16 or fp32 avoids it)" in message
    assert not (run_dir / "final").exists()
