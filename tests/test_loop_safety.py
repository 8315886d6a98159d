"""The loop's precision, bookkeeping and API edges: fp16 weights get a loss scaler, pure-bf16 full
fine-tuning is warned about with numbers that hold, metrics.jsonl stays strict JSON, a finished run
resumed returns at once, a classifier run refuses to generate, the process-group timeout is a setting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.config import build_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import TunelabError
from tunelab.train import MetricsLog, bf16_rounding_warning, fresh_accelerator, plan_precision, train


def strict_json(line: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_fp16_weights_under_other_compute_train_with_a_loss_scaler(compute):
    plan = plan_precision(compute, method="lora", device=torch.device("cpu"), weights="fp16")
    assert plan.mixed_precision == "fp16" and plan.weights == plan.compute == torch.float16
    assert "loss scaling" in plan.label and compute in plan.label


def test_bf16_warning_numbers_hold():
    lr = 2e-5
    message = bf16_rounding_warning(lr)
    threshold = 512 * lr
    assert "|w| > 0.01 " in message and "model.dtype: auto" in message
    above = torch.tensor([threshold * 1.2, 0.02, -0.05], dtype=torch.bfloat16)
    assert torch.equal(above + lr, above)  # rounded away: these weights never move
    below = torch.tensor([threshold * 0.2], dtype=torch.bfloat16)
    assert not torch.equal(below + lr, below)
    master = above.float() + lr  # the remedy: fp32 master weights accumulate the update
    assert not torch.equal(master, above.float())


def test_infinite_grad_norm_is_written_as_strict_json(tmp_path):
    accelerator = fresh_accelerator(mixed_precision="no", log_with=None, project_dir=str(tmp_path))
    log = MetricsLog(tmp_path / "metrics.jsonl", accelerator, resume_step=0)
    log.log({"step": 1, "loss": 1.5, "grad_norm": float("inf")})
    log.log({"step": 2, "loss": float("nan"), "grad_norm": 0.5})
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.5, "grad_norm": None}, {"step": 2, "loss": None, "grad_norm": 0.5}]


def test_process_group_timeout_is_a_setting(tmp_path):
    accelerator = fresh_accelerator(mixed_precision="no", log_with=None, project_dir=str(tmp_path), timeout_s=4321)
    assert accelerator.init_handler.timeout.total_seconds() == 4321
    assert build_config({}).training.distributed_timeout_s == 1800


def test_resuming_a_finished_run_returns_at_once(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(16, seed=1)))
    settings = {
        "model": {"name": str(tiny_model_dir)}, "data": {"train": str(data), "eval_fraction": 0.25, "max_seq_length": 128},
        "lora": {"r": 2, "alpha": 4}, "output": {"dir": str(tmp_path / "runs"), "name": "done"},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 3, "warmup_steps": 0,
                     "logging_steps": 1, "precision": "fp32", "num_threads": 1},
    }
    first = train(build_config(settings), quiet=True)
    run = first.run_dir
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "metrics.jsonl", run / "eval.json", run / "final")}
    settings["training"]["resume"] = "auto"
    again = train(build_config(settings))
    assert "is finished (step 3): nothing to resume" in " ".join(capsys.readouterr().err.split())
    assert {p.name: p.stat().st_mtime_ns for p in (run / "metrics.jsonl", run / "eval.json", run / "final")} == stamps
    assert again.state.global_step == 3 and again.eval_loss == pytest.approx(first.eval_loss)
    assert all(math.isfinite(r.get("loss", 0.0)) for r in again.history)

    from tunelab.tuner import FineTuner

    tuner = FineTuner(build_config(settings))
    tuner.result = again  # the finished run: generate loads final/ instead of "not trained yet"
    assert isinstance(tuner.generate("What is 2 + 2?", max_new_tokens=3), str)


def test_generate_on_a_classifier_run_is_a_clear_error(tmp_path):
    from tunelab.models import write_model_meta
    from tunelab.train import TrainResult
    from tunelab.tuner import FineTuner

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    write_model_meta(final, base_model="tiny-bert", method="full", extra={"task": "classification", "labels": ["a", "b"]})
    tuner = FineTuner()
    tuner.result = TrainResult(run_dir=tmp_path / "run", final_dir=final, state=None, eval_loss=None, train_loss=None,
                               trainable_params=0, total_params=0, targets_per_second=0.0, seconds=0.0)
    with pytest.raises(TunelabError, match="(?s)is a classifier .* tunelab predict"):
        tuner.generate("hello")
