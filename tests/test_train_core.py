"""Regression tests for the training core's review findings (each failed before its fix)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import TunelabError
from tunelab.train import optimizer_step, plan_precision, train


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("core-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(40, seed=11)))
    return path


def config_for(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"model.name={model_dir}", f"data.train={data}", f"output.dir={out.parent}", f"output.name={out.name}",
        "training.batch_size=4", "training.gradient_accumulation_steps=1", "training.learning_rate=5e-3",
        "training.warmup_steps=0", "training.logging_steps=1", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "data.max_seq_length=128", "training.precision=fp32", *overrides,
    ])


def test_too_few_batches_for_one_accumulated_step_is_a_clear_error(tiny_model_dir, tmp_path):
    """4 examples x batch 4 = 1 micro-batch < accumulation 2: before, the epoch counter climbed forever."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(4, seed=1)))
    config = config_for(tiny_model_dir, small, tmp_path / "run", "training.gradient_accumulation_steps=2")
    with pytest.raises(TunelabError, match="fewer than training.gradient_accumulation_steps=2"):
        train(config, quiet=True)


def test_auto_precision_on_a_gpu_that_only_emulates_bf16_is_fp16(monkeypatch):
    from tunelab.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert resolve_dtype("auto", "cuda") == torch.float16


def test_runs_with_different_precisions_in_one_process(tiny_model_dir, train_file, tmp_path):
    """Before: "AcceleratorState has already been initialized" on the second run."""
    first = train(config_for(tiny_model_dir, train_file, tmp_path / "a", "method=full", "training.max_steps=1"), quiet=True)
    second = train(config_for(tiny_model_dir, train_file, tmp_path / "b", "method=full", "training.max_steps=1",
                              "training.precision=bf16"), quiet=True)
    assert first.state.global_step == second.state.global_step == 1
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["precision"] == "bf16 autocast, fp32 weights"


def test_model_dtype_is_honoured():
    cpu = torch.device("cpu")
    fp32_base = plan_precision("bf16", method="lora", device=cpu, weights="fp32")
    assert (fp32_base.weights, fp32_base.mixed_precision) == (torch.float32, "bf16")
    pure_bf16 = plan_precision("fp32", method="full", device=cpu, weights="bf16")
    assert (pure_bf16.weights, pure_bf16.mixed_precision) == (torch.bfloat16, "no")
    assert plan_precision("bf16", method="lora", device=cpu).weights == torch.bfloat16  # auto: unchanged
    with pytest.raises(TunelabError, match="model.dtype=fp16 with method: full"):
        plan_precision("fp32", method="full", device=cpu, weights="fp16")


def test_pure_bf16_full_fine_tuning_trains_bf16_weights(tiny_model_dir, train_file, tmp_path):
    result = train(config_for(tiny_model_dir, train_file, tmp_path / "run", "method=full", "model.dtype=bf16",
                              "training.max_steps=2"), quiet=True)
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}


def test_evaluation_makes_no_float64_tensors(tiny_llama):
    """Apple MPS has no float64: the eval sums must stay off the device."""
    from accelerate import Accelerator
    from torch.utils._python_dispatch import TorchDispatchMode

    from tunelab.loss import TargetTokenLoss
    from tunelab.tasks import StepInfo, causal_lm
    from tunelab.train import evaluate

    class Prebuilt:  # eval items that are their own batches
        def collate(self, item, *, split):
            return item

    class Float64Watch(TorchDispatchMode):
        seen = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                Float64Watch.seen = True
            return out

    ids = torch.randint(3, 1000, (2, 12))
    batch = {"input_ids": ids, "labels": ids.clone()}
    loss_module = causal_lm.CausalLMLoss(TargetTokenLoss(tiny_llama))
    step = StepInfo(training=False, step=0, epoch=0, seed=0, rank=0, world=1, device=torch.device("cpu"))
    with Float64Watch():
        record = evaluate(loss_module, causal_lm, Prebuilt(), [batch, batch], tiny_llama, Accelerator(cpu=True), step)
    assert not Float64Watch.seen
    with torch.no_grad():
        expected = float(TargetTokenLoss(tiny_llama)(**batch)[0]) / (2 * 11)  # the same batch twice: its own mean
    assert record["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert record["eval_ppl"] == pytest.approx(math.exp(expected), rel=1e-4)


def test_resume_with_another_process_count_is_refused(tiny_model_dir, train_file, tmp_path):
    config = config_for(tiny_model_dir, train_file, tmp_path / "run", "training.max_steps=4", "training.save_steps=2")
    train(config, quiet=True)
    state_file = tmp_path / "run" / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    assert (state["num_processes"], state["gradient_accumulation_steps"]) == (1, 1)
    state["num_processes"] = 2
    state_file.write_text(json.dumps(state))
    (tmp_path / "run" / "final").rename(tmp_path / "run" / "final.old")
    resumed = config_for(tiny_model_dir, train_file, tmp_path / "run", "training.max_steps=4", "training.save_steps=2",
                         "training.resume=true")
    with pytest.raises(TunelabError, match="num_processes=2, this run has 1"):
        train(resumed, quiet=True)


def test_one_epoch_run_leaves_a_checkpoint_by_default(tiny_model_dir, train_file, tmp_path):
    result = train(config_for(tiny_model_dir, train_file, tmp_path / "run", "training.epochs=1"), quiet=True)
    assert result.state.global_step == 10  # 40 examples / batch 4
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps and steps[-1] < 10


def test_each_packed_epoch_trains_every_example_once(tiny_model_dir, train_file, tmp_path):
    """Packing packs each epoch differently; the step count and batches come from each epoch's own plan."""
    from tunelab.tasks.causal_lm import build_data
    from tunelab.train import load_run_tokenizer

    config = config_for(tiny_model_dir, train_file, tmp_path / "run", "data.packing=true", "training.batch_size=1",
                        "data.max_seq_length=256",
                        "training.epochs=3")
    _, tokenizer, _ = load_run_tokenizer(config)
    data = build_data(config, tokenizer)
    plans = [data.epoch_plan(1, seed=42, epoch=e) for e in range(3)]
    assert len({len(p) for p in plans}) > 1, "the test needs epochs that pack into different row counts"
    targets = sum(sum(1 for label in x.labels[1:] if label != -100) for x in data.train)
    result = train(config, quiet=True)
    assert result.state.global_step == sum(len(p) for p in plans)
    assert result.state.targets_seen == 3 * targets


def test_loss_scaler_state_is_checkpointed(tmp_path):
    from tunelab.checkpoint import TrainState, load_training_state, rng_state, save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.load_state_dict({**scaler.state_dict(), "scale": 256.0, "_growth_tracker": 7})
    path = save_checkpoint(tmp_path, save_weights=lambda d: None, optimizer=optimizer, scheduler=scheduler,
                           state=TrainState(global_step=3), keep=2, rng_states=[rng_state()], scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_training_state(path, optimizer=optimizer, scheduler=scheduler, scaler=fresh)
    assert fresh.state_dict()["scale"] == 256.0 and fresh.state_dict()["_growth_tracker"] == 7


def test_a_skipped_optimizer_step_does_not_advance_the_schedule():
    class Skipping:
        optimizer_step_was_skipped = True

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    optimizer_step(optimizer, scheduler, Skipping())
    assert scheduler.last_epoch == 0
    Skipping.optimizer_step_was_skipped = False
    optimizer_step(optimizer, scheduler, Skipping())
    assert scheduler.last_epoch == 1


def test_qlora_computes_in_the_plan_dtype_with_non_reentrant_checkpointing(tiny_model_dir, train_file, tmp_path):
    """Before: prepare_model_for_kbit_training upcast norms to fp32 and made checkpointing reentrant."""
    import bitsandbytes as bnb

    result = train(config_for(tiny_model_dir, train_file, tmp_path / "run", "method=qlora", "training.precision=bf16",
                              "training.gradient_checkpointing=true", "training.max_steps=1"), quiet=True)
    llama = result.model.get_base_model()
    assert llama.model.norm.weight.dtype == torch.bfloat16
    q_proj = llama.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.compute_dtype == torch.bfloat16
    checkpoint_fn = llama.model.layers[0]._gradient_checkpointing_func
    assert checkpoint_fn.keywords["use_reentrant"] is False
