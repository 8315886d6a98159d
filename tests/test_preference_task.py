"""task: preference on the shared loop: batching equivalence, the reference model, resume, runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from tunelab.config import load_config
from tunelab.data.synthetic import iter_preference_pairs
from tunelab.tasks import StepInfo, task_module
from tunelab.tasks import preference as task
from tunelab.train import accumulate_gradients, train

REPO = Path(__file__).resolve().parents[1]
PAIR_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    import itertools

    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in itertools.islice(iter_preference_pairs(seed=5), 40)))
    return path


def run_config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(None, [
        "task=preference", f"model.name={model_dir}", f"data.train={data}", f"output.dir={out.parent}",
        f"output.name={out.name}", "training.batch_size=4", "training.gradient_accumulation_steps=1",
        "training.learning_rate=5e-3", "training.warmup_steps=0", "training.logging_steps=1", "training.max_steps=6",
        "lora.r=4", "lora.alpha=8", "data.eval_fraction=0.2", "data.max_seq_length=128", "training.precision=fp32",
        *overrides,
    ])


def test_task_is_looked_up_by_name():
    assert task_module("preference") is task


@pytest.mark.parametrize("name", ["dpo", "orpo", "kto"])
def test_example_configs_are_preference_runs(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert (config.task, config.preference.loss) == ("preference", name)
    if name == "dpo":
        assert config.model.name == "runs/quickstart"  # DPO after the quickstart SFT


# --- batching equivalence (the loop's accumulate_gradients, the task's make_batches) -----------------


@pytest.mark.parametrize("overrides", [["preference.sft_weight=0.5"], ["preference.loss=kto"], ["preference.loss=orpo"]])
def test_batch_4_x_accum_1_equals_batch_1_x_accum_4(tiny_model_dir, pairs_file, tmp_path, tokenizer, overrides):
    """The same gradient whatever the micro-batching: per-pair and per-token terms (dpo + sft, orpo)
    and KTO's step-level reference point, with adapters (the reference = adapters off)."""
    from accelerate import Accelerator

    from tunelab.models import add_lora

    config = run_config(tiny_model_dir, pairs_file, tmp_path / "x", *overrides)
    data = task.build_data(config, tokenizer, say=lambda *a, **k: None)
    model = add_lora(make_tiny_llama(), r=4, alpha=8, dropout=0.0, target_modules="all-linear", use_dora=False,
                     trainable_token_ids=[], task_type="CAUSAL_LM")
    with torch.no_grad():  # adapters that already moved, so policy != reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    loss = task.loss_module(model, data=data)
    accelerator = Accelerator(cpu=True)
    step = StepInfo(training=True, step=0, epoch=0, seed=0, rank=0, world=1, device=torch.device("cpu"))

    def grads(items):
        model.zero_grad(set_to_none=True)
        micro = task.make_batches(data, items, model, step).micro
        totals = accumulate_gradients(loss, micro, accelerator)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, totals

    one, one_totals = grads([(0, 1, 2, 3)])
    four, four_totals = grads([(0,), (1,), (2,), (3,)])
    assert one.keys() == four.keys() and one
    for name in one:
        torch.testing.assert_close(four[name], one[name], rtol=1e-4, atol=1e-7)
    for name in ("rewards/chosen", "logps/chosen"):
        assert four_totals[name][0] / four_totals[name][1] == pytest.approx(one_totals[name][0] / one_totals[name][1], rel=1e-5)


def test_adapter_reference_is_the_model_with_adapters_off(tiny_model_dir, pairs_file, tmp_path, tokenizer):
    from tunelab.models import add_lora
    from tunelab.preference_loss import sequence_logps

    data = task.build_data(run_config(tiny_model_dir, pairs_file, tmp_path / "x"), tokenizer, say=lambda *a, **k: None)
    base = make_tiny_llama()
    batch = data.collate((0, 1))
    expected, _ = sequence_logps(base, batch["input_ids"], batch["labels"], batch["attention_mask"])
    model = add_lora(base, r=4, alpha=8, dropout=0.1, target_modules="all-linear", use_dora=False, trainable_token_ids=[], task_type="CAUSAL_LM")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    step = StepInfo(training=True, step=0, epoch=0, seed=0, rank=0, world=1, device=torch.device("cpu"))
    made = task.make_batches(data, [(0, 1)], model.train(), step)
    torch.testing.assert_close(made.micro[0]["ref_logps"], expected.detach(), rtol=0, atol=1e-5)
    assert model.training  # make_batches restored train mode


# --- full fine-tuning: the precomputed reference -----------------------------------------------------


def test_full_reference_is_stored_and_read_back_on_resume_not_recomputed(tiny_model_dir, pairs_file, tmp_path, tokenizer):
    data = task.build_data(run_config(tiny_model_dir, pairs_file, tmp_path / "x", "method=full"), tokenizer, say=lambda *a, **k: None)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = make_tiny_llama()
    first = task.reference_logps(model, data, run_dir=run_dir)
    stored = load_file(run_dir / task.REFERENCE_FILE)
    assert stored.keys() == first.keys() and len(stored) == len(data.train) + len(data.eval)
    with torch.no_grad():  # training moved the weights ...
        for p in model.parameters():
            p.add_(0.01)
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)  # ... and a resume finds a checkpoint
    again = task.reference_logps(model, data, run_dir=run_dir)
    for key in first:
        torch.testing.assert_close(again[key], first[key], rtol=0, atol=0)
    data.train = data.train[1:]  # other data than the stored reference's: refused, not silently used
    with pytest.raises(Exception, match="holds reference log-probabilities of other data"):
        task.reference_logps(model, data, run_dir=run_dir)


# --- whole runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dpo"
    return train(run_config(tiny_model_dir, pairs_file, out, "preference.sft_weight=0.1", "lora.dropout=0.0"),
                 quiet=True), out


def test_dpo_run_logs_trl_metrics_and_learns(dpo_run):
    result, out = dpo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    for key in PAIR_KEYS:
        assert all(key in r for r in train_records), key
        assert all(f"eval_{key}" in r for r in eval_records), key
    assert {"loss/preference", "loss/sft", "pairs", "pairs_per_s"} <= train_records[-1].keys()
    # The tiny random model learns its training pairs (held-out arithmetic is beyond it).
    # Each step sees other pairs, so compare the first and last halves of the run, not two steps.
    curve = [(r["loss/preference"], r["rewards/margins"]) for r in train_records]
    half = len(curve) // 2
    first, last = [sum(v) / half for v in zip(*curve[:half])], [sum(v) / (len(curve) - half) for v in zip(*curve[half:])]
    assert last[0] < first[0] and last[1] > first[1], curve
    summary = json.loads((out / "eval.json").read_text())
    assert "eval_rewards/accuracies" in summary and "eval_ppl" not in summary
    assert json.loads((out / "final" / "tunelab_model.json").read_text())["task"] == "preference"


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    from tunelab.data.synthetic import reasoning_problems

    base = tmp_path_factory.mktemp("sft")
    data = base / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(24, seed=5)))
    config = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={data}", f"output.dir={base}", "output.name=sft",
        "training.batch_size=4", "training.max_steps=3", "training.learning_rate=5e-3", "training.warmup_steps=0",
        "lora.r=4", "lora.alpha=8", "data.max_seq_length=128", "training.precision=fp32",
    ])
    train(config, quiet=True)
    return base / "sft"


def test_dpo_from_an_sft_run_uses_the_merged_sft_model_as_reference(sft_run, pairs_file, tmp_path):
    from tunelab.models import load_for_inference

    result = train(run_config(sft_run, pairs_file, tmp_path / "dpo", "training.max_steps=2"), quiet=True)
    first = [r for r in result.history if "eval_loss" in r][0]  # the step-0 eval: policy == reference
    assert first["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert first["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    # The new adapter loads for inference on top of the merged SFT model.
    model, tokenizer = load_for_inference(str(tmp_path / "dpo"), dtype="fp32", device="cpu")
    sft, _ = load_for_inference(str(sft_run), dtype="fp32", device="cpu")
    ids = tokenizer("What is 2 + 2?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, sft(ids).logits)  # DPO moved it
        assert torch.allclose(model(ids).logits, sft(ids).logits, atol=1.0)  # ... from the SFT model


def test_warnings_for_chosen_collapse_and_early_overfitting(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "epoch": 0.1, "loss": 0.69, "logps/chosen": -20.0, "rewards/accuracies": 0.5},
        {"step": 5, "epoch": 0.5, "loss": 0.01, "logps/chosen": -31.0, "rewards/accuracies": 1.0},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    collapse, overfit = task.training_warnings(metrics)
    assert "logps/chosen fell from -20.00 to -31.00 (11.0 nats)" in collapse and "sft_weight" in collapse
    assert "rewards/accuracies reached 1.0 with loss 0.0100 at step 5" in overfit
    metrics.write_text(json.dumps(rows[0]) + "\n")
    assert task.training_warnings(metrics) == []


KILL_AT_STEP_4 = """
import os, signal, sys
import tunelab.checkpoint as checkpoint
import tunelab.train as train_module
from tunelab.config import load_config
real_save = checkpoint.save_checkpoint
def save_then_die(checkpoints_dir, **kwargs):
    path = real_save(checkpoints_dir, **kwargs)
    if kwargs["state"].global_step == 4:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash right after a checkpoint
    return path
train_module.save_checkpoint = save_then_die
train_module.train(load_config(None, sys.argv[1:]), quiet=True)
"""


def test_killed_and_resumed_full_dpo_equals_the_uninterrupted_run(tiny_model_dir, pairs_file, tmp_path):
    """kill -9 after the step-4 checkpoint, resume: the same weights as a straight run; the stored
    reference (computed before the first update) is what the resumed run uses."""
    extra = ("method=full", "training.learning_rate=1e-3", "training.save_steps=2", "training.max_steps=6",
             "training.keep_checkpoints=3", "preference.loss=ipo")
    straight = train(run_config(tiny_model_dir, pairs_file, tmp_path / "straight", *extra), quiet=True)
    args = ["task=preference", f"model.name={tiny_model_dir}", f"data.train={pairs_file}", f"output.dir={tmp_path}",
            "output.name=killed", "training.batch_size=4", "training.gradient_accumulation_steps=1",
            "training.warmup_steps=0", "training.logging_steps=1", "lora.r=4", "lora.alpha=8", "data.eval_fraction=0.2",
            "data.max_seq_length=128", "training.precision=fp32", *extra]
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, *args], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    reference_before = load_file(tmp_path / "killed" / task.REFERENCE_FILE)
    resumed = train(load_config(None, [*args, "training.resume=true"]), quiet=True)
    assert resumed.state.global_step == 6
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    reference_after = load_file(tmp_path / "killed" / task.REFERENCE_FILE)
    assert all(torch.equal(reference_after[k], reference_before[k]) for k in reference_before)
    assert straight.history[-1]["eval_loss"] == pytest.approx(resumed.history[-1]["eval_loss"], abs=1e-6)


@pytest.mark.real_model
def test_real_model_dpo_learns_the_synthetic_preferences(bundled_dir, pairs_file, tmp_path):
    """The bundled SmolLM2-135M-Instruct, LoRA DPO, a few steps: held-out reward accuracy rises above chance."""
    result = train(run_config(bundled_dir, pairs_file, tmp_path / "real", "training.learning_rate=1e-3",
                              "training.max_steps=8", "lora.r=8", "lora.alpha=16"), quiet=True)
    evals = [r for r in result.history if "eval_loss" in r]
    assert evals[0]["eval_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[-1]["eval_loss"] < 0.6 and evals[-1]["eval_rewards/accuracies"] > 0.6
