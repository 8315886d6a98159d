"""The task seam (tunelab/tasks/__init__.py): named (sum, count) loss terms, each normalised by its
own global count; every term and metric logged; the task's selection metric and direction; unknown
task names. A toy two-term task runs through the one loop in train.py."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import ConfigError
from tunelab.tasks import LossOutput, Selection, Units, causal_lm, task_module
from tunelab.train import accumulate_gradients, track_best, train

IGNORE = -100


class TwoTermLoss(torch.nn.Module):
    """A toy objective with two counts: token cross-entropy ("nll", a mean over target tokens) plus
    each row's own mean token cross-entropy ("rows", a mean over rows: GRPO's per-sequence shape).
    Metric "toy/targets_per_row" = (target tokens, rows)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def count_targets(batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"nll": int((batch["labels"][:, 1:] != IGNORE).sum()), "rows": int(batch["labels"].shape[0])}

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None) -> LossOutput:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, :-1]
        targets = labels[:, 1:]
        is_target = targets != IGNORE
        token_ce = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp(min=0), reduction="none") * is_target
        per_row = token_ce.sum(1) / is_target.sum(1).clamp(min=1)
        tokens, rows = is_target.sum(), labels.shape[0]
        return LossOutput({"nll": (token_ce.sum(), tokens), "rows": (per_row.sum(), rows)},
                          metrics={"toy/targets_per_row": (tokens.detach(), rows)})


def toy_rows(lengths: list[int], seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 1000, (n,))
        labels = ids.clone()
        labels[: n // 2] = IGNORE  # the prompt half
        rows.append((ids, labels))
    return rows


def batch_of(rows) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), 2)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, : len(i)], labels[r, : len(lab)], mask[r, : len(i)] = i, lab, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_each_term_is_normalised_by_its_own_count_across_accumulation(tiny_llama):
    """Rows of very different target counts: one count for both terms would weight them differently
    per split. Each split into micro-batches gives the gradient of nll/T + rows/R over the whole step."""
    from accelerate import Accelerator

    tiny_llama.eval()  # no dropout: every split must see the same network
    rows = toy_rows([5, 19, 7, 13, 4, 17, 9, 6])
    loss = TwoTermLoss(tiny_llama)
    accelerator = Accelerator(cpu=True)

    def grads(micro):
        tiny_llama.zero_grad(set_to_none=True)
        totals = accumulate_gradients(loss, micro, accelerator)
        return totals, {n: p.grad.clone() for n, p in tiny_llama.named_parameters() if p.grad is not None}

    # The reference: the objective written out over all rows at once, with autograd.
    tiny_llama.zero_grad(set_to_none=True)
    full = loss(**batch_of(rows))
    (full.terms["nll"][0] / full.terms["nll"][1] + full.terms["rows"][0] / full.terms["rows"][1]).backward()
    reference = {n: p.grad.clone() for n, p in tiny_llama.named_parameters() if p.grad is not None}
    targets = sum(int((lab[1:] != IGNORE).sum()) for _, lab in rows)

    for split in ([rows], [rows[:2], rows[2:]], [[r] for r in rows]):
        totals, got = grads([batch_of(part) for part in split])
        assert totals["loss/nll"][1] == targets and totals["loss/rows"][1] == 8
        assert totals["toy/targets_per_row"] == pytest.approx((targets, 8))
        assert totals["loss/nll"][0] == pytest.approx(float(full.terms["nll"][0].detach()), rel=1e-5)
        assert got.keys() == reference.keys()
        for name in reference:
            torch.testing.assert_close(got[name], reference[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("seam-data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(24, seed=4)))
    return path


def test_a_two_term_task_logs_every_term_and_selects_by_its_own_metric(tiny_model_dir, toy_data, tmp_path,
                                                                       monkeypatch):
    """The causal-LM task with the toy loss, per-row term as the selection metric, higher is better."""
    toy = types.SimpleNamespace(**{name: getattr(causal_lm, name) for name in (
        "PEFT_TASK_TYPE", "DEFAULT_MODEL", "resolve_source", "needs_chat_template", "build_data", "load_model",
        "make_batches", "run_meta", "final_scores")})
    toy.UNITS = Units(term="nll", key="tokens", label="target tokens", rate="tok/s")
    toy.SELECT = Selection("eval_loss/rows", higher_is_better=True)
    toy.loss_module = lambda model, *, data, run_dir=None, say=print: TwoTermLoss(model)
    toy.eval_record = lambda means: {}
    monkeypatch.setattr("tunelab.train.task_module", lambda name: toy)
    config = load_config(None, [
        f"model.name={tiny_model_dir}", f"data.train={toy_data}", f"output.dir={tmp_path}", "output.name=toy",
        "training.batch_size=2", "training.gradient_accumulation_steps=2", "training.max_steps=3",
        "training.eval_steps=1", "training.logging_steps=1", "training.learning_rate=5e-3", "training.warmup_steps=0",
        "data.eval_fraction=0.2", "data.max_seq_length=128", "lora.r=2", "lora.dropout=0.0", "training.precision=fp32",
    ])
    reported: list[tuple[int, float]] = []
    result = train(config, quiet=True, on_eval=lambda step, value: reported.append((step, value)))

    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [0, 1, 2, 3]
    for r in steps:
        assert r["loss"] == pytest.approx(r["loss/nll"] + r["loss/rows"], abs=2e-6)
        assert r["toy/targets_per_row"] > 1 and r["tokens"] > 0 and r["tokens_per_s"] > 0
    assert sum(r["tokens"] - prev for r, prev in zip(steps, [0] + [s["tokens"] for s in steps])) == result.state.targets_seen
    for r in evals:
        assert r["eval_loss"] == pytest.approx(r["eval_loss/nll"] + r["eval_loss/rows"], abs=2e-6)
        assert "eval_toy/targets_per_row" in r and "eval_ppl" not in r
    # on_eval (HPO's pruner) and the best value follow the task's metric and direction.
    assert reported == [(r["step"], pytest.approx(r["eval_loss/rows"], abs=1e-6)) for r in evals[1:]]
    assert result.state.best_metric == pytest.approx(max(value for _, value in reported))
    summary = json.loads((result.run_dir / "eval.json").read_text())
    assert summary["eval_loss/rows"] == pytest.approx(evals[-1]["eval_loss/rows"], abs=1e-6)
    assert summary["train_tokens"] == result.state.targets_seen and "eval_perplexity" not in summary


def test_selection_direction_decides_best_and_early_stopping():
    from tunelab.checkpoint import TrainState

    lower, higher = TrainState(), TrainState()
    for value in (2.0, 1.0, 1.5):
        stop_lower = track_best(lower, value, Selection("eval_loss"), patience=1, say=lambda *a: None)
        stop_higher = track_best(higher, value, Selection("eval_reward", higher_is_better=True), patience=2,
                                 say=lambda *a: None)
    assert (lower.best_metric, higher.best_metric) == (1.0, 2.0)
    assert stop_lower and stop_higher  # lower: 1.5 after 1.0; higher: 1.0 and 1.5 after 2.0


def test_an_unknown_task_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'classification'") as from_config:
        load_config(None, ["task=clasification"])
    assert "command line: task:" in str(from_config.value)
    with pytest.raises(ConfigError, match='unknown task "causal"; did you mean "causal_lm"'):
        task_module("causal")
    assert task_module("causal_lm") is causal_lm
