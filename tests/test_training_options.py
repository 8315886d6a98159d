"""Documented training options, each shown to do what the README says, on a tiny random Llama.

Gradient checkpointing, TensorBoard logging, early stopping, eval_steps, the learning-rate
schedules, 8-bit optimizers and an 8-bit base (bitsandbytes on CPU).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.loss import TargetTokenLoss
from tunelab.train import build_optimizer, build_scheduler, train

from conftest import make_tiny_llama


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(40, seed=7)))
    return path


def run_config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"model.name={model_dir}", f"data.train={data}", f"output.dir={out.parent}", f"output.name={out.name}",
        "training.batch_size=4", "training.gradient_accumulation_steps=1", "training.learning_rate=5e-3",
        "training.warmup_steps=0", "training.logging_steps=1", "training.max_steps=4", "training.precision=fp32",
        "lora.r=2", "lora.alpha=4", "lora.dropout=0", "data.eval_fraction=0.2", "data.max_seq_length=256", *overrides,
    ])


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history if "loss" in r]


def evals(result) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in result.history if "eval_loss" in r]


# ----------------------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tokenizer):
    torch.manual_seed(0)
    ids = torch.randint(3, 1000, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100

    def loss_and_grads(checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
        model = make_tiny_llama(seed=1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls = []
        mlp = model.model.layers[0].mlp
        forward = mlp.forward  # counted by wrapping forward: module hooks stay outside the recompute

        def counted(*args, **kwargs):
            calls.append(1)
            return forward(*args, **kwargs)

        mlp.forward = counted
        loss_sum, count = TargetTokenLoss(model)(input_ids=ids, labels=labels)
        (loss_sum / count).backward()
        return float(loss_sum / count), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain_loss, plain_grads, plain_calls = loss_and_grads(False)
    ckpt_loss, ckpt_grads, ckpt_calls = loss_and_grads(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # checkpointing really recomputes the layer in backward
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_run_matches_the_plain_run(tiny_model_dir, train_file, tmp_path):
    plain = train(run_config(tiny_model_dir, train_file, tmp_path / "plain"), quiet=True)
    ckpt = train(run_config(tiny_model_dir, train_file, tmp_path / "ckpt", "training.gradient_checkpointing=true"), quiet=True)
    assert ckpt.model.get_base_model().model.gradient_checkpointing
    assert losses(ckpt) == pytest.approx(losses(plain), rel=1e-5)
    assert [e for _, e in evals(ckpt)] == pytest.approx([e for _, e in evals(plain)], rel=1e-5)


# ----------------------------------------------------------------------------- logging, eval, stopping


def test_tensorboard_event_files_hold_the_logged_loss(tiny_model_dir, train_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(run_config(tiny_model_dir, train_file, tmp_path / "tb", "logging.trackers=[tensorboard]"), quiet=True)
    # Scalars go to RUN/<logging.project>/; the config, as hparams, to a timestamped folder below it.
    events = sorted((result.run_dir / "tunelab").glob("events.out.tfevents.*"))
    assert len(events) == 1, sorted(p.relative_to(result.run_dir) for p in result.run_dir.rglob("*"))
    accumulator = EventAccumulator(str(events[0]))
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("loss")}
    expected = {r["step"]: r["loss"] for r in result.history if "loss" in r}
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4]
    for step, value in expected.items():
        assert logged[step] == pytest.approx(value, rel=1e-5)
    assert {e.step for e in accumulator.Scalars("eval_loss")} == {0, 4}


def test_eval_steps_sets_when_eval_runs(tiny_model_dir, train_file, tmp_path):
    result = train(run_config(tiny_model_dir, train_file, tmp_path / "every2", "training.eval_steps=2", "training.max_steps=6"),
                   quiet=True)
    assert [step for step, _ in evals(result)] == [0, 2, 4, 6]
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [0, 2, 4, 6]


def test_early_stopping_stops_after_patience_evals_without_improvement(tiny_model_dir, train_file, tmp_path):
    # A learning rate far too high for full fine-tuning makes the eval loss climb after a step or two.
    result = train(run_config(
        tiny_model_dir, train_file, tmp_path / "early", "method=full", "training.learning_rate=0.5",
        "training.max_grad_norm=0", "training.eval_steps=1", "training.max_steps=12", "training.early_stopping_patience=2",
    ), quiet=True)
    history = evals(result)
    best, without, expected_stop = math.inf, 0, None
    for step, loss in history:
        if loss < best:
            best, without = loss, 0
        else:
            without += 1
            if without == 2:
                expected_stop = step
                break
    assert expected_stop is not None and expected_stop < 12, history
    assert result.state.global_step == expected_stop == history[-1][0]
    assert (result.run_dir / "final").is_dir()  # the stopped run is still saved


# ----------------------------------------------------------------------------- schedules


def expected_lr(name: str, step: int, *, warmup: int, total: int) -> float:
    """The documented multiplier of the base learning rate after `step` optimizer steps."""
    if step < warmup:
        return step / warmup
    if name == "constant":
        return 1.0
    progress = (step - warmup) / (total - warmup)
    return max(0.0, 1 - progress) if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_each_scheduler_follows_its_curve(name):
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, name=name, warmup_steps=3, total_steps=10)
    seen = [scheduler.get_last_lr()[0]]
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        seen.append(scheduler.get_last_lr()[0])
    assert seen == pytest.approx([1e-3 * expected_lr(name, k, warmup=3, total=10) for k in range(11)], abs=1e-12)


def test_logged_learning_rates_follow_the_configured_schedule(tiny_model_dir, train_file, tmp_path):
    result = train(run_config(tiny_model_dir, train_file, tmp_path / "lin", "training.lr_scheduler=linear",
                              "training.warmup_steps=2", "training.max_steps=6"), quiet=True)
    logged = [r["lr"] for r in result.history if "lr" in r]
    assert logged == pytest.approx([5e-3 * expected_lr("linear", k, warmup=2, total=6) for k in range(1, 7)], abs=1e-12)


# ----------------------------------------------------------------------------- 8-bit (bitsandbytes on CPU)


@pytest.mark.parametrize("name", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_keep_uint8_state_and_train(name, tiny_model_dir, train_file, tmp_path):
    import bitsandbytes as bnb

    model = make_tiny_llama()
    optimizer = build_optimizer(model, name=name, learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.999))
    assert isinstance(optimizer, bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit)
    weight = model.model.layers[0].mlp.up_proj.weight  # 8192 values: above bitsandbytes' 4096 minimum for 8-bit state
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert optimizer.state[weight]["state1"].dtype == torch.uint8

    result = train(run_config(tiny_model_dir, train_file, tmp_path / name, f"training.optimizer={name}",
                              "training.max_steps=6"), quiet=True)
    assert losses(result)[-1] < losses(result)[0] and evals(result)[-1][1] < evals(result)[0][1]


def test_8bit_base_model_trains_lora_with_int8_weights_frozen(tiny_model_dir, train_file, tmp_path):
    import bitsandbytes as bnb

    result = train(run_config(tiny_model_dir, train_file, tmp_path / "int8", "quantization.bits=8", "training.max_steps=6"),
                   quiet=True)
    layer = result.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    assert not layer.weight.requires_grad
    assert evals(result)[-1][1] < evals(result)[0][1]
    assert (result.final_dir / "adapter_model.safetensors").is_file()
