"""task: grpo on the shared loop: prompt data, seeded rollouts, the policy step, a whole run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_tiny_llama
from tunelab.config import RunConfig
from tunelab.data.prompts import read_prompts
from tunelab.data.sources import DataStats
from tunelab.errors import DataError
from tunelab.tasks import StepInfo
from tunelab.tasks import grpo

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompts_and_references_from_qa_chat_and_a_reference_field(tmp_path, tokenizer):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Tom has 3 pens and buys 4. How many?",
                                              "answer": "3 + 4 = 7\n#### 7"}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "What is 6 * 7?"}],
                                                  "reference": 42}])
    [p] = read_prompts(str(qa), tokenizer)
    assert p.reference == "3 + 4 = 7\n#### 7"
    assert p.text.endswith("How many?<|im_end|>\n<|im_start|>assistant\n")   # the generation prompt, not the answer
    assert "#### 7" not in p.text and p.ids == tokenizer(p.text, add_special_tokens=False)["input_ids"]
    [c] = read_prompts(str(chat), tokenizer)
    assert c.reference == "42" and c.text.endswith("What is 6 * 7?<|im_end|>\n<|im_start|>assistant\n")


def test_a_reference_without_a_number_is_a_file_line_error_or_skipped(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "2 + 2?", "answer": "#### 4"},
                                                {"question": "Name a colour.", "answer": "blue"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2.*reference answer has no number"):
        read_prompts(str(path), tokenizer)
    stats = DataStats()
    prompts = read_prompts(str(path), tokenizer, skip_invalid=True, stats=stats)
    assert len(prompts) == 1 and stats.invalid_skipped == 1
    assert len(read_prompts(str(path), tokenizer, need_number=False)) == 2   # no `correct` reward: any reference


def grpo_config(tmp_path: Path, data: Path, **overrides) -> RunConfig:
    raw = {
        "task": "grpo", "data": {"train": str(data), "eval_fraction": 0.25, "max_seq_length": 128},
        "grpo": {"num_generations": 4, "max_completion_length": 12, "log_completions_steps": 1,
                 "rewards": [{"name": "correct"}, {"name": "tests.test_grpo:letter_a", "weight": 0.5}]},
        "training": {"batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": 2, "learning_rate": 1e-3,
                     "warmup_steps": 0, "logging_steps": 1, "eval_steps": 2},
        "output": {"dir": str(tmp_path / "runs"), "name": "grpo"},
    }
    for key, value in overrides.items():
        section, name = key.split(".")
        raw[section][name] = value
    return RunConfig.model_validate(raw)


def letter_a(prompts, completions, references, **info):
    """A reward a random model's samples differ in: the share of 'a' characters."""
    return [c.count("a") / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    from tunelab.data.synthetic import reasoning_problems

    path = tmp_path_factory.mktemp("grpo-data") / "train.jsonl"
    return write_jsonl(path, reasoning_problems(8, seed=3))


def step(n: int, training: bool = True) -> StepInfo:
    return StepInfo(training=training, step=n, epoch=0, seed=7, rank=0, world=1, device=torch.device("cpu"))


def test_rollouts_are_seeded_by_step_and_score_every_completion(tmp_path, tokenizer, problems):
    config = grpo_config(tmp_path, problems)
    data = grpo.build_data(config, tokenizer)
    model = make_tiny_llama(seed=2)
    items = data.epoch_plan(2, seed=7, epoch=0)[:1]
    first, again, later = (grpo.make_batches(data, items, model, step(n)) for n in (0, 0, 1))
    batch = first.micro[0]
    assert batch["input_ids"].shape[0] == 2 * 4 and batch["completion_mask"].shape[1] <= 12
    assert torch.equal(batch["input_ids"], again.micro[0]["input_ids"])         # same step, same samples
    assert not torch.equal(batch["input_ids"], later.micro[0]["input_ids"])     # another step, new samples
    assert model.training                                                        # sampling left train mode on
    groups = batch["advantages"].view(2, 4)
    assert groups.sum(1).abs().max() < 1e-4                                      # group-relative: mean 0
    reward_sum, count = first.metrics["reward"]
    assert count == 8 and first.metrics["rewards/correct"][1] == 8
    assert 0 <= first.metrics["frac_reward_zero_std"][0] <= 2


def test_one_policy_step_raises_the_likelihood_of_above_average_completions(tmp_path, tokenizer, problems):
    config = grpo_config(tmp_path, problems)
    data = grpo.build_data(config, tokenizer)
    model = make_tiny_llama(seed=2)
    made = grpo.make_batches(data, data.epoch_plan(2, seed=7, epoch=0)[:1], model, step(0))
    batch = made.micro[0]
    loss_module = grpo.loss_module(model, data=data)
    width = batch["completion_mask"].shape[1]

    def sequence_logps() -> torch.Tensor:
        with torch.no_grad():
            logits = grpo.completion_logits(model, batch)
            logps, _ = grpo.completion_logps(logits, batch["input_ids"][:, -width:], config.grpo.temperature)
        return (logps * batch["completion_mask"]).sum(1)

    before = sequence_logps()
    out = loss_module(**batch)
    total, count = out.terms["policy"]
    (total / count).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    change = sequence_logps() - before
    advantages = batch["advantages"]
    assert advantages.abs().max() > 0
    assert float((advantages * change).sum()) > 0          # better-than-average answers became likelier
    assert float(change[advantages > 0].mean()) > float(change[advantages < 0].mean())


def test_train_grpo_end_to_end_writes_rewards_rollouts_and_selects_by_reward(tmp_path, tiny_model_dir, problems):
    config = grpo_config(tmp_path, problems).model_dump(mode="json")
    config["model"] = {"name": str(tiny_model_dir)}
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "grpo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward", "reward_std", "rewards/correct", "rewards/tests.test_grpo:letter_a", "frac_reward_zero_std",
                "completions/mean_length", "completions/clipped_ratio", "entropy", "clip_ratio/region_mean",
                "rollout_tokens_per_s", "grad_norm"):
        assert key in train[0], key
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval_ppl" not in evals[0]
    summary = json.loads((run / "eval.json").read_text())
    assert summary["eval_reward"] == evals[-1]["eval_reward"]
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rollouts} == {1, 2} and {"prompt", "completion", "reward", "reference"} <= set(rollouts[0])
    assert (run / "final" / "adapter_model.safetensors").is_file()
