"""Preference tuning (task: preference): DPO, IPO, SimPO, ORPO and KTO on the shared loop.

The data are pairs (tunelab/data/preference.py), batched as 2B rows [chosen; rejected];
the objectives are tunelab/preference_loss.py's. What this module adds is the reference
model and the wiring to the loop:

- Adapter methods (lora, dora, qlora): the reference is the same model with its adapters
  disabled, so no second copy is held. `make_batches` scores each step's rows with the
  adapters off (eval mode, no gradient) and attaches them as `ref_logps`.
- Full fine-tuning: the model is the reference only before its first update, so
  `loss_module` (which the loop calls before any step and before a resume loads trained
  weights) scores every train and eval example once and stores the values in the run folder
  (`reference_logps.safetensors`, with a fingerprint of the data). A resumed run reads them
  back instead of scoring its trained weights (TRL #1962, PR #6443).
- KTO's reference point (the KL estimate) comes from mismatched prompt/completion rows: each
  example's prompt with the completion of the next example of another prompt (a fixed
  pairing, so full fine-tuning can store its reference too). It is computed without gradient
  over the whole optimizer step in `make_batches` and averaged over processes, so it does not
  depend on how the step is split into micro-batches.
- Starting from an SFT run (`model.name: runs/quickstart`): its adapter is merged into its base
  at load; that merged model is the reference, and a new adapter is trained on top.

Metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected, and kl for KTO), logged per step and per eval.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.console import console
from tunelab.data.preference import (
    TokenizedPreference,
    collate_completions,
    collate_pairs,
    load_preferences,
    plan_preference_batches,
)
from tunelab.errors import TunelabError
from tunelab.preference_loss import NEEDS_REFERENCE, kto_terms, pair_terms, sequence_logps
from tunelab.tasks import LossOutput, Selection, StepBatches, StepInfo, Units

PEFT_TASK_TYPE = "CAUSAL_LM"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
UNITS = Units(term="preference", key="pairs", label="pairs", rate="pairs/s")
SELECT = Selection("eval_loss", higher_is_better=False)
REFERENCE_FILE = "reference_logps.safetensors"
# Rows scored at once when precomputing full fine-tuning's reference (no gradient, so cheap).
REFERENCE_BATCH = 8


def resolve_source(name: str | None) -> str:
    """As causal LM (None -> the bundled SmolLM2-135M-Instruct); a run folder -> its final/ (adapter +
    tokenizer with the SFT run's chat template), which `load_model` merges into its base."""
    from tunelab.models import resolve_model_source, resolve_weights_dir

    source = resolve_model_source(name)
    weights = resolve_weights_dir(source) if Path(source).is_dir() else None
    return str(weights) if weights is not None else source


def needs_chat_template(config: RunConfig) -> bool:  # noqa: ARG001
    """Preference data is always chat-rendered (prompt turns, then a reply)."""
    return True


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceSettings:
    """The objective's hyperparameters (config `preference.*`)."""

    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @classmethod
    def from_config(cls, config: RunConfig) -> PreferenceSettings:
        p = config.preference
        sft = p.sft_weight if p.sft_weight is not None else (1.0 if p.loss == "orpo" else 0.0)
        return cls(p.loss, p.beta, p.label_smoothing, p.simpo_gamma, sft, p.desirable_weight, p.undesirable_weight)


@dataclass
class PreferenceData:
    """Tokenized pairs (or KTO completions), their batch plan, and how items become tensors."""

    train: list[TokenizedPreference]
    eval: list[TokenizedPreference]
    pad_id: int
    kto: bool
    settings: PreferenceSettings = None  # type: ignore[assignment]  (set by build_data)
    stats_line: str = ""
    # Filled by loss_module for full fine-tuning: (split, index) -> reference log-probs of the
    # example's rows (pairs: [chosen, rejected]; KTO: [completion, mismatched completion]).
    reference: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> str:
        what = "completions (KTO)" if self.kto else "pairs"
        return f"{len(self.train)} train / {len(self.eval)} eval {what}; {self.stats_line}"

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int) -> list[tuple[int, ...]]:
        return [tuple(batch) for batch in plan_preference_batches(self.train, batch_size, seed=seed, epoch=epoch)]

    def eval_plan(self, batch_size: int) -> list[tuple[int, ...]]:
        return [tuple(range(i, min(i + batch_size, len(self.eval)))) for i in range(0, len(self.eval), batch_size)]

    def examples(self, split: str) -> list[TokenizedPreference]:
        return self.train if split == "train" else self.eval

    def mismatched(self, split: str, index: int) -> TokenizedPreference:
        """KTO: the example whose completion pairs with `index`'s prompt for the KL estimate
        (the next one, cyclically, with a different prompt)."""
        items = self.examples(split)
        for step in range(1, len(items)):
            other = items[(index + step) % len(items)]
            if other.prompt != items[index].prompt:
                return other
        return items[(index + 1) % len(items)]

    def collate(self, item: tuple[int, ...], *, split: str = "train") -> dict[str, torch.Tensor]:
        examples = [self.examples(split)[i] for i in item]
        if not self.kto:
            batch = collate_pairs(examples, self.pad_id)
        else:
            batch = collate_completions(examples, self.pad_id)
            mismatched = [
                TokenizedPreference(e.prompt, self.mismatched(split, i).chosen, None, e.source, e.format)
                for i, e in zip(item, examples)
            ]
            kl = collate_completions(mismatched, self.pad_id)
            batch.update({f"kl_{k}": v for k, v in kl.items() if k != "desirable"})
        if self.reference:  # full fine-tuning: the stored reference, rows in the batch's order
            rows = torch.stack([self.reference[f"{split}/{i}"] for i in item])  # (B, 2)
            if self.kto:
                batch["ref_logps"], batch["kl_ref_logps"] = rows[:, 0], rows[:, 1]
            else:
                batch["ref_logps"] = torch.cat([rows[:, 0], rows[:, 1]])
        return batch


def build_data(config: RunConfig, tokenizer, *, say=console.print) -> PreferenceData:
    """Read, render and split the preference data named by `data.*` (before the model exists)."""
    from tunelab.data.pipeline import split_examples

    d, kto = config.data, config.preference.loss == "kto"
    options = dict(fmt=d.format, kto=kto, system_prompt=d.system_prompt, max_length=d.max_seq_length, truncation=d.truncation, skip_invalid=d.skip_invalid)
    train, stats = load_preferences(d.train, tokenizer, split=d.split, hf_config=d.hf_config, dedupe=d.dedupe, limit=d.limit, **options)
    if d.eval is not None or d.eval_split is not None:
        evaluation, _ = load_preferences(d.eval or d.train, tokenizer, split=d.eval_split or d.split, hf_config=d.hf_config, dedupe=d.dedupe, **options)
    else:
        train, evaluation = split_examples(train, eval_fraction=d.eval_fraction, seed=config.training.seed)
    if config.evaluation.limit is not None:
        evaluation = evaluation[: config.evaluation.limit]
    if stats.invalid_skipped:
        say(f"[yellow]skipped {stats.invalid_skipped} invalid records[/] (first: {stats.problems[0]})")
    line = f"{stats.truncated} truncated, {stats.dropped} dropped, {stats.invalid_skipped} invalid skipped, {stats.duplicates_removed} duplicates removed"
    return PreferenceData(train, evaluation, tokenizer.pad_token_id, kto, PreferenceSettings.from_config(config), line)


# --- model -----------------------------------------------------------------------------------------


def load_model(source: str, *, data, tokenizer, loading) -> torch.nn.Module:  # noqa: ARG001
    """The causal LM to tune. A run folder or adapter (an SFT run) is merged into its base first:
    that merged model is both the start and the reference."""
    from tunelab.models import load_merged_model

    return load_merged_model(source, loading)


# --- batches -------------------------------------------------------------------------------------


@torch.no_grad()
def _reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """Row log-probabilities under the reference: the PEFT model with its adapters disabled."""
    device = next(model.parameters()).device
    ids, labels, mask = (batch[f"{prefix}{k}"].to(device) for k in ("input_ids", "labels", "attention_mask"))
    with model.disable_adapter():
        return sequence_logps(model, ids, labels, mask)[0].float().cpu()


@torch.no_grad()
def _policy_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    device = next(model.parameters()).device
    ids, labels, mask = (batch[f"{prefix}{k}"].to(device) for k in ("input_ids", "labels", "attention_mask"))
    return sequence_logps(model, ids, labels, mask)[0].float().cpu()


def _all_reduce(values: torch.Tensor, step: StepInfo) -> torch.Tensor:
    if step.world > 1:
        import torch.distributed as dist

        values = values.to(step.device)
        dist.all_reduce(values)
    return values.cpu()


def make_batches(data: PreferenceData, items: list, model: torch.nn.Module, step: StepInfo) -> StepBatches:
    """Collate the step's items; attach reference log-probs (adapters disabled) and KTO's KL point.

    Runs in eval mode without gradient (no dropout, no RNG drawn), then restores train mode,
    so the training random streams and exact resume are untouched.
    """
    split = "train" if step.training else "eval"
    micro = [data.collate(item, split=split) for item in items]
    adapters = not data.reference and _has_adapters(model)
    if not (adapters or data.kto):
        return StepBatches(micro)
    was_training = model.training
    model.eval()
    try:
        if adapters:
            for batch in micro:
                batch["ref_logps"] = _reference_logps(model, batch)
                if data.kto:
                    batch["kl_ref_logps"] = _reference_logps(model, batch, prefix="kl_")
        if data.kto:  # the reference point: mean over the whole step (every micro-batch, every process)
            total = torch.zeros(2, dtype=torch.float64)
            for batch in micro:
                gap = _policy_logps(model, batch, prefix="kl_") - batch["kl_ref_logps"]
                total += torch.tensor([gap.sum().item(), gap.numel()], dtype=torch.float64)
            total = _all_reduce(total, step)
            kl = (total[0] / total[1]).clamp(min=0).float()
            for batch in micro:
                batch["kl"] = kl
    finally:
        model.train(was_training)
    return StepBatches(micro)


def _has_adapters(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


# --- the loss -------------------------------------------------------------------------------------


class PreferenceLoss(torch.nn.Module):
    """The loop's loss: {"preference": (sum, pairs), "sft": (weighted NLL sum, chosen reply tokens)}."""

    def __init__(self, model: torch.nn.Module, settings: PreferenceSettings):
        super().__init__()
        self.model = model
        self.settings = settings

    def count_targets(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        rows = batch["input_ids"].shape[0]
        counts = {"preference": rows if self.settings.loss == "kto" else rows // 2}
        if self.settings.sft_weight > 0:
            reply = batch["labels"][:, 1:] != -100
            chosen = reply[batch["desirable"]] if self.settings.loss == "kto" else reply[: rows // 2]
            counts["sft"] = int(chosen.sum())
        return counts

    def forward(self, input_ids, labels, attention_mask, ref_logps=None, desirable=None, kl=None, **_kl_rows) -> LossOutput:
        s = self.settings
        logps, tokens = sequence_logps(self.model, input_ids, labels, attention_mask)
        if s.loss == "kto":
            terms, metrics = kto_terms(
                logps, tokens, ref_logps, desirable, kl, beta=s.beta, desirable_weight=s.desirable_weight,
                undesirable_weight=s.undesirable_weight, sft_weight=s.sft_weight,
            )
        else:
            terms, metrics = pair_terms(
                s.loss, logps, tokens, ref_logps if s.loss in NEEDS_REFERENCE else None, beta=s.beta,
                label_smoothing=s.label_smoothing, simpo_gamma=s.simpo_gamma, sft_weight=s.sft_weight,
            )
        return LossOutput(terms, {name: (torch.as_tensor(v).detach(), c) for name, (v, c) in metrics.items()})


def loss_module(model: torch.nn.Module, *, data: PreferenceData, say=print, run_dir: Path | None = None) -> PreferenceLoss:
    """The preference loss; for full fine-tuning with a reference-based loss, first the stored
    (or now computed and stored) reference log-probabilities of every example."""
    settings = data.settings
    if settings.loss in NEEDS_REFERENCE and not _has_adapters(model):
        data.reference = reference_logps(model, data, run_dir=run_dir, say=say)
    return PreferenceLoss(model, settings)


def data_fingerprint(data: PreferenceData) -> str:
    """A hash of every example's token ids (and KTO labels): the stored reference belongs to these."""
    digest = hashlib.sha256()
    for split in ("train", "eval"):
        for item in data.examples(split):
            digest.update(json.dumps([split, item.prompt, item.chosen, item.rejected, item.desirable]).encode())
    return digest.hexdigest()


@torch.no_grad()
def reference_logps(model: torch.nn.Module, data: PreferenceData, *, run_dir: Path | None, say=print) -> dict[str, torch.Tensor]:
    """Every example's reference log-probs, read from `run_dir` when they were stored for this data
    (a resumed run), else computed now with the untrained model and stored (atomically)."""
    from safetensors.torch import load_file, save_file

    fingerprint = data_fingerprint(data)
    path = run_dir / REFERENCE_FILE if run_dir is not None else None
    if path is not None and path.is_file() and (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get("fingerprint")
        if stored != fingerprint:
            raise TunelabError(
                f"{path} holds reference log-probabilities of other data than this run's\n"
                "  fix: resume with the data the run started with, or start a new run (output.overwrite: true)"
            )
        say(f"[bold]reference[/] log-probs read from {path} (computed before the first update)")
        return load_file(str(path))
    from tunelab.console import progress

    was_training = model.training
    model.eval()
    values: dict[str, torch.Tensor] = {}
    try:
        with progress() as bar:
            task = bar.add_task("Reference log-probs", total=len(data.train) + len(data.eval))
            for split in ("train", "eval"):
                items = data.examples(split)
                for start in range(0, len(items), REFERENCE_BATCH):
                    indices = tuple(range(start, min(start + REFERENCE_BATCH, len(items))))
                    batch = data.collate(indices, split=split)
                    first = _policy_logps(model, batch)
                    if data.kto:
                        pairs = torch.stack([first, _policy_logps(model, batch, prefix="kl_")], dim=1)
                    else:
                        pairs = torch.stack(first.chunk(2), dim=1)
                    for i, row in zip(indices, pairs):
                        values[f"{split}/{i}"] = row.clone()
                    bar.advance(task, len(indices))
    finally:
        model.train(was_training)
    if path is not None:  # atomically: a temporary sibling renamed over the file
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(values, str(tmp), metadata={"fingerprint": fingerprint})
        tmp.replace(path)
        say(f"[bold]reference[/] log-probs of {len(values)} examples stored in {path}")
    return values


# --- metrics and the saved run ---------------------------------------------------------------------


def eval_record(means: dict[str, float]) -> dict[str, float]:  # noqa: ARG001
    """Nothing derived: the eval record already holds eval_rewards/accuracies and the rest."""
    return {}


def run_meta(data) -> dict:  # noqa: ARG001
    """Inference renders prompts with the saved chat template, as for any chat run."""
    return {"prompt_format": "chat", "task": "preference"}


def final_scores(model, data, *, config: RunConfig, tokenizer, run_dir: Path, device, say=print) -> dict:  # noqa: ARG001
    """Warnings on the logged curve (collapse, early overfitting); generation metrics are `tunelab eval`'s."""
    for warning in training_warnings(run_dir / "metrics.jsonl"):
        say(f"[yellow]warning[/]: {warning}")
    return {}


# Thresholds of the two warnings (anchors.md 2.3): a chosen reply whose mean log-prob falls
# this many nats below its first logged value is collapsing (likelihood displacement); reward
# accuracy 1.0 with a loss this small in the first epoch is memorisation.
COLLAPSE_NATS = 5.0
OVERFIT_LOSS = 0.05


def training_warnings(metrics_path: Path) -> list[str]:
    """The known failure signs in a run's metrics.jsonl: chosen log-prob collapse, early overfitting."""
    if not metrics_path.is_file():
        return []
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "logps/chosen" in r]
    warnings = []
    if train:
        start, lowest = train[0]["logps/chosen"], min(r["logps/chosen"] for r in train)
        if start - lowest > COLLAPSE_NATS:
            warnings.append(
                f"logps/chosen fell from {start:.2f} to {lowest:.2f} ({start - lowest:.1f} nats): the chosen replies are "
                "losing likelihood too (a known DPO failure). fix: lower training.learning_rate, raise preference.beta, "
                "or add preference.sft_weight (e.g. 0.5)"
            )
        early = [r for r in train if r.get("epoch", 0) < 1 and r.get("rewards/accuracies") == 1.0 and r.get("loss", 1.0) < OVERFIT_LOSS]
        if early:
            warnings.append(
                f"rewards/accuracies reached 1.0 with loss {early[0]['loss']:.4f} at step {early[0].get('step')} in the first "
                "epoch: the pairs are memorised, not learned. fix: lower training.learning_rate (DPO uses 5e-7 to 5e-6), "
                "fewer epochs, or more data"
            )
    return warnings
