"""What differs per task; the training loop (tunelab/train.py) is shared by all of them.

A task is a module (tunelab/tasks/NAME.py) with the attributes of the `Task` protocol below,
which the recipe in `train.py` calls in this order:

    resolve_source(name)                     model name -> what from_pretrained loads (task defaults)
    needs_chat_template(config)              does a tokenizer without one get data.chat_template?
    build_data(config, tokenizer, say=)      records -> the run's data: a `TaskData` whose batch plan
                                             is a pure function of (seed, epoch)
    load_model(source, data=, tokenizer=, loading=)   the base model with the task's head
    loss_module(model, data=, run_dir=, say=)   an nn.Module (called before the first update and before
                                             a resume loads weights; run_dir: where it may store state): count_targets(batch) -> {term: count},
                                             forward(**batch) -> LossOutput (named (sum, count) terms)
    make_batches(data, items, model, step)   one step's planned items -> micro-batches, with the live
                                             model at hand (`collate_each` for most tasks)
    eval_record(means)                       eval keys derived from the eval means (causal LM: eval_ppl)
    run_meta(data)                           what inference needs besides weights (tunelab_model.json)
    final_scores(model, data, ...)           the task's end-of-run metrics, merged into eval.json

plus constants: PEFT_TASK_TYPE, DEFAULT_MODEL (the name shown when model.name is unset),
UNITS (what progress counts: target tokens, examples, pairs) and SELECT (the eval metric that
picks the best checkpoint, and its direction).

Precision, accumulation, clipping, schedule, checkpoints, resume, logging and the run folder
do not know which task runs. Each objective term is normalised by its own global count
across gradient accumulation and processes, so a task may mix a per-token term with a
per-pair one (ORPO) and still get exact means whatever the micro-batching.

A new task is a new module plus its name in `TASKS` and `task_module`'s dict: no registry, no
base class. The protocols here only document (and type-check) the module interface.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from pathlib import Path

    from tunelab.config import RunConfig
    from tunelab.models import ModelLoading

# The one list of task names (config.py's `Task` literal and the CLI read it).
TASKS = ("causal_lm", "classification", "preference", "grpo")


# --- what a task declares --------------------------------------------------------------------


@dataclass(frozen=True)
class Units:
    """What a task's progress counts: the count of objective term `term`, named `key` in
    metrics.jsonl ("tokens", "tokens_per_s") and eval.json ("train_tokens", "tokens_per_second"),
    `label` in sentences ("target tokens") and `rate` on the progress bar ("tok/s")."""

    term: str
    key: str
    label: str
    rate: str


@dataclass(frozen=True)
class Selection:
    """The eval record key that selects the best checkpoint (and drives early stopping and
    HPO pruning), and whether larger is better (a reward) or smaller (a loss)."""

    metric: str = "eval_loss"
    higher_is_better: bool = False

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.higher_is_better else value < best)


# --- what flows through the loop ----------------------------------------------------------


@dataclass
class LossOutput:
    """A loss module's forward result.

    terms: objective terms, name -> (summed value over the batch, its count). The loop divides
        each sum by the term's global count for the whole optimizer step (all micro-batches,
        all processes) and adds the terms: the objective is sum_t mean_t. A weight on a term
        (an SFT coefficient) goes into its sum.
    metrics: logged only, name -> (sum, count), reported as sum / count over a logging window
        or an eval. Detach them (the loop reads them with float()).
    """

    terms: dict[str, tuple[torch.Tensor, torch.Tensor | int]]
    metrics: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepInfo:
    """Where the loop is when it asks for batches: enough for a task that samples (GRPO) to
    seed its own generator from (seed, epoch, step, rank) and leave the training RNG alone."""

    training: bool  # False: eval items
    step: int  # optimizer steps done before this one (eval: the step being evaluated)
    epoch: int
    seed: int  # training.seed
    rank: int
    world: int
    device: torch.device
    run_dir: Path | None = None  # the run folder, for what a task writes as it goes (GRPO's rollouts.jsonl)


@dataclass
class StepBatches:
    """One optimizer step's micro-batches (or one eval item's), plus metrics made on the way
    (rollout rewards, completion lengths) as name -> (sum, count), logged like loss metrics."""

    micro: list[dict[str, torch.Tensor]]
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


# --- the interface, as protocols (documentation and type checking; nothing inherits them) ---


class TaskData(Protocol):
    """A run's tokenized train/eval sets (built before the model exists)."""

    train: Sequence
    eval: Sequence

    def summary(self) -> str: ...

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int) -> list:
        """The epoch's micro-batch items: a pure function of (seed, epoch), so step counting and
        exact resume never depend on the task. The loop takes every world-th item per process
        and `gradient_accumulation_steps` consecutive items per optimizer step."""
        ...

    def eval_plan(self, batch_size: int) -> list:
        """The eval set's items in a fixed order; each process evaluates every world-th."""
        ...

    def collate(self, item: Any, *, split: str = "train") -> dict[str, torch.Tensor]:
        """One planned item of `split` ("train" or "eval") as a batch of tensors."""
        ...


class LossModule(Protocol):
    """An nn.Module (Accelerate wraps it for DDP) around the model."""

    def count_targets(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """The count of every objective term of `batch`, known before the forward pass."""
        ...

    def __call__(self, **batch: torch.Tensor) -> LossOutput: ...


class Task(Protocol):
    """The module interface of tunelab/tasks/*.py (see this module's docstring)."""

    PEFT_TASK_TYPE: str
    DEFAULT_MODEL: str
    UNITS: Units
    SELECT: Selection

    def resolve_source(self, name: str | None) -> str: ...

    def needs_chat_template(self, config: RunConfig) -> bool: ...

    def build_data(self, config: RunConfig, tokenizer, *, say=print) -> TaskData: ...

    def load_model(self, source: str, *, data: TaskData, tokenizer, loading: ModelLoading) -> torch.nn.Module: ...

    def loss_module(self, model: torch.nn.Module, *, data: TaskData, run_dir: Path | None = None, say=print) -> LossModule: ...

    def make_batches(self, data: TaskData, items: list, model: torch.nn.Module, step: StepInfo) -> StepBatches: ...

    def eval_record(self, means: dict[str, float]) -> dict[str, float]: ...

    def run_meta(self, data: TaskData) -> dict: ...

    def final_scores(self, model, data: TaskData, *, config: RunConfig, tokenizer, run_dir: Path, device,
                     say=print) -> dict: ...


def collate_each(data: TaskData, items: list, model: torch.nn.Module, step: StepInfo) -> StepBatches:  # noqa: ARG001
    """The usual `make_batches`: each planned item collated on its own, no model needed."""
    split = "train" if step.training else "eval"
    return StepBatches([data.collate(item, split=split) for item in items])


def task_module(name: str) -> Task:
    """The module implementing the task named in the config (`task:`); an unknown name is an error."""
    from tunelab.tasks import causal_lm, classification, grpo, preference

    modules = {"causal_lm": causal_lm, "classification": classification, "preference": preference, "grpo": grpo}
    if name not in modules:
        from tunelab.errors import ConfigError

        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
        raise ConfigError([f'task: unknown task "{name}"{hint} (tasks: {", ".join(TASKS)})'])
    return modules[name]
