"""Causal-LM fine-tuning (the default task): chat-rendered data, target-token loss, perplexity.

The parts live where they always have (tunelab/data, tunelab/loss.py, tunelab/evaluate.py);
this module gives them the task interface described in `tunelab/tasks/__init__.py`:
records -> `TrainingData` (read, render, tokenize, split; or a `data prepare` folder),
`TargetTokenLoss` (one term, "loss", counted in target tokens), perplexity as the eval
record's extra, and the configured generation metrics once training ends.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.console import console
from tunelab.loss import TargetTokenLoss
from tunelab.tasks import LossOutput, Selection, Units, collate_each

PEFT_TASK_TYPE = "CAUSAL_LM"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
UNITS = Units(term="loss", key="tokens", label="target tokens", rate="tok/s")
SELECT = Selection("eval_loss", higher_is_better=False)
make_batches = collate_each  # a step's items are collated as they are


def resolve_source(name: str | None) -> str:
    """None / "default" -> the bundled SmolLM2-135M-Instruct; else as `resolve_model_source`."""
    from tunelab.models import resolve_model_source

    return resolve_model_source(name)


# --- data ----------------------------------------------------------------------------------


def needs_chat_template(config: RunConfig) -> bool:
    """Chat data is rendered with a template; a run on plain text is not (a base model keeps none)."""
    return not trains_on_plain_text(config)


def trains_on_plain_text(config: RunConfig) -> bool:
    """True when every training record is plain text (format text, or detected as text): such a
    run is not prompted through a chat template, so a base model must not get one added."""
    from tunelab.data.pipeline import source_formats

    d = config.data
    if d.train is None:
        return d.format == "text"
    fields = d.fields.model_dump() if d.fields else None
    return source_formats(d.train, fmt=d.format, fields=fields, split=d.split, hf_config=d.hf_config) == {"text"}


def dataset_arguments(config: RunConfig) -> dict:
    """The config's data settings as explicit `build_datasets` arguments (tokenizer aside)."""
    d = config.data
    return dict(
        train_source=d.train, eval_source=d.eval, fmt=d.format, fields=d.fields.model_dump() if d.fields else None,
        hf_config=d.hf_config, split=d.split, eval_split=d.eval_split, system_prompt=d.system_prompt,
        max_length=d.max_seq_length, truncation=d.truncation, train_on_prompt=d.train_on_prompt, dedupe=d.dedupe,
        min_tokens=d.min_tokens, limit=d.limit, eval_fraction=d.eval_fraction, eval_limit=config.evaluation.limit,
        skip_invalid=d.skip_invalid, seed=config.training.seed,
    )


def build_data(config: RunConfig, tokenizer, *, say=console.print):
    """Tokenized train/eval sets: from `data.prepared` when it still matches, else built now."""
    from tunelab.data.dataset import build_datasets
    from tunelab.data.prepared import data_fingerprint, load_prepared

    args = dataset_arguments(config)
    data = None
    if config.data.prepared:
        data, why_not = load_prepared(Path(config.data.prepared), data_fingerprint(args, tokenizer), tokenizer.pad_token_id)
        if data is None:
            say(f"[yellow]data.prepared not used[/]: {why_not}; tokenizing now", highlight=False)
    data = data if data is not None else build_datasets(tokenizer=tokenizer, **args)
    return dataclasses.replace(data, packing=config.data.packing, max_length=config.data.max_seq_length)


def prepare_data(config: RunConfig, tokenizer, directory: Path):
    """`tunelab data prepare`: tokenize the config's data once and save it with its fingerprint."""
    from tunelab.data.dataset import build_datasets
    from tunelab.data.prepared import data_fingerprint, save_prepared

    args = dataset_arguments(config)
    data = build_datasets(tokenizer=tokenizer, **args)
    save_prepared(data, directory, data_fingerprint(args, tokenizer))
    return data


# --- model and loss --------------------------------------------------------------------------


def load_model(source: str, *, data, tokenizer, loading) -> torch.nn.Module:  # noqa: ARG001 (same signature for every task)
    """The causal LM, loaded as `loading` (a `tunelab.models.ModelLoading`) says."""
    from tunelab.models import load_base_model

    return load_base_model(source, loading)


class CausalLMLoss(torch.nn.Module):
    """`TargetTokenLoss` as the loop's one-term loss: "loss" = (summed token cross-entropy, target tokens)."""

    def __init__(self, target_tokens: TargetTokenLoss):
        super().__init__()
        self.target_tokens = target_tokens

    @staticmethod
    def count_targets(batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"loss": TargetTokenLoss.count_targets(batch)}

    def forward(self, **batch: torch.Tensor) -> LossOutput:
        return LossOutput({"loss": self.target_tokens(**batch)})


def loss_module(model: torch.nn.Module, *, data, run_dir: Path | None = None, say=print) -> CausalLMLoss:  # noqa: ARG001
    """The loop's loss: target-token cross-entropy, its head path checked on one real training row."""
    first = data.epoch_plan(1, seed=0, epoch=0)[0]
    probe = {k: v.to(model.device) for k, v in data.collate(first[:1]).items()}
    return CausalLMLoss(target_token_loss(model, probe=probe, say=say))


def target_token_loss(model: torch.nn.Module, *, probe: dict[str, torch.Tensor], say=print) -> TargetTokenLoss:
    """The fused-head target-token loss, unless the model's own logits differ from what the fused
    head computes on `probe` (a model that transforms its logits, e.g. softcapping); then the
    loss takes the model's full logits."""
    from tunelab.loss import head_matches_model

    loss = TargetTokenLoss(model)
    if not head_matches_model(loss, probe):
        loss.use_model_logits = True
        say("[yellow]note[/]: this model transforms its logits; the loss takes its full logits (more memory)")
    return loss


# --- metrics and the saved run -------------------------------------------------------------------


def eval_record(means: dict[str, float]) -> dict[str, float]:
    """Perplexity: exp of the mean token cross-entropy (capped, so a diverged run stays a number)."""
    return {"eval_ppl": round(math.exp(min(means["eval_loss"], 50)), 4)}


def run_meta(data) -> dict:
    """How prompts were given in training: inference continues raw text for a plain-text run
    ("text"), and renders the saved chat template otherwise ("chat")."""
    plain_text = all(example.format == "text" for example in data.train)
    return {"prompt_format": "text" if plain_text else "chat"}


def final_scores(model, data, *, config: RunConfig, tokenizer, run_dir: Path, device, say=print) -> dict:  # noqa: ARG001
    """The configured generation metrics (`evaluation.metrics`: exact_match, rouge, ...) on the eval
    data with the live model, saved under run_dir/eval/ and merged into eval.json by
    `evaluate_after_training`; nothing when only loss and perplexity are asked for."""
    from tunelab.evaluate import evaluate_after_training

    d, ev = config.data, config.evaluation
    evaluate_after_training(
        model, tokenizer, run_dir, metrics=ev.metrics, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
        answer_regex=ev.answer_regex, limit=ev.limit, source=d.eval or (d.train if d.eval_split else None),
        split=d.eval_split or d.split, fmt=d.format, fields=d.fields.model_dump() if d.fields else None,
        prompt_format=run_meta(data)["prompt_format"], say=say,
    )
    return {}
