"""Causal-LM fine-tuning (the default task): chat-rendered data, target-token loss, perplexity.

The parts live where they always have (tunelab/data, tunelab/loss.py, tunelab/evaluate.py);
this module gives them the task interface described in `tunelab/tasks/__init__.py`.
"""

from __future__ import annotations

import math

import torch

from tunelab.loss import TargetTokenLoss

PEFT_TASK_TYPE = "CAUSAL_LM"
# What the loss is averaged over, as progress lines and the final summary name it.
TARGETS, RATE_UNIT = "target tokens", "tok/s"


def resolve_source(name: str | None) -> str:
    """None / "default" -> the bundled SmolLM2-135M-Instruct; else as `resolve_model_source`."""
    from tunelab.models import resolve_model_source

    return resolve_model_source(name)


def load_model(source: str, *, data, tokenizer, **loading) -> torch.nn.Module:  # noqa: ARG001 (same signature for every task)
    """The causal LM (`loading` are `load_base_model`'s keyword arguments)."""
    from tunelab.models import load_base_model

    return load_base_model(source, **loading)


def loss_module(model: torch.nn.Module, *, probe: dict[str, torch.Tensor], say=print) -> TargetTokenLoss:
    """The fused-head target-token loss, unless the model's own logits differ from what the fused
    head computes on `probe` (one real batch: a model that transforms its logits, e.g. softcapping);
    then the loss takes the model's full logits."""
    from tunelab.loss import head_matches_model

    loss = TargetTokenLoss(model)
    if not head_matches_model(loss, probe):
        loss.use_model_logits = True
        say("[yellow]note[/]: this model transforms its logits; the loss takes its full logits (more memory)")
    return loss


def describe_eval_loss(loss: float) -> str:
    """Mean token cross-entropy, and its perplexity."""
    return f"eval loss {loss:.4f}  perplexity {math.exp(min(loss, 50)):.3f}"


def run_meta(data) -> dict:
    """How prompts were given in training: inference continues raw text for a plain-text run
    ("text"), and renders the saved chat template otherwise ("chat")."""
    plain_text = all(example.format == "text" for example in data.train)
    return {"prompt_format": "text" if plain_text else "chat"}


def final_scores(model, data, *, device, batch_size: int) -> dict:  # noqa: ARG001
    """Nothing beyond the loop's eval loss and perplexity; generation metrics are `tunelab eval`'s."""
    return {}
