"""The training recipe: setup -> train -> save, on Accelerate.

Read `train()` top to bottom: it unpacks the config, loads the model and data, builds
the optimizer and schedule, runs the loop (gradient accumulation, clipping, eval,
logging, atomic checkpoints) and writes the run folder. The same code runs on CPU,
one GPU, or many GPUs/machines under `accelerate launch`.

Loss normalisation: every optimizer step's loss is the mean over ALL target tokens
of its micro-batches on all processes. Each micro-batch contributes its summed token
losses divided by that global count, so batch 8 x accumulation 1 and batch 1 x
accumulation 8 produce the same gradient.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from tunelab.allocator import keep_freed_memory
from tunelab.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_training_state,
    publish_directory,
    rng_state,
    save_checkpoint,
)
from tunelab.config import RunConfig, config_to_yaml
from tunelab.console import console
from tunelab.errors import TrainingInterrupted, TunelabError
from tunelab.files import write_text_atomic
from tunelab.fused_lora import fuse_lora_layers
from tunelab.runlock import RunLock, describe_holder
from tunelab.stopping import StopRequest, resume_command
from tunelab.tasks import StepInfo, task_module


# --- optimizer and schedule -------------------------------------------------------------------


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases (1-D tensors) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model, *, name: str, learning_rate: float, weight_decay: float, betas: tuple[float, float]):
    groups = parameter_groups(model, weight_decay)
    if name == "adamw":
        on_cuda = next(model.parameters()).is_cuda
        # fused on CUDA (one kernel for all tensors); foreach on CPU (vectorised across tensors).
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=on_cuda, foreach=not on_cuda)
    import bitsandbytes as bnb

    optimizer_class = bnb.optim.AdamW8bit if name == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return optimizer_class(groups, lr=learning_rate, betas=betas)


def build_scheduler(optimizer, *, name: str, warmup_steps: int, total_steps: int):
    from transformers import get_scheduler

    schedule = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[name]
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


# --- precision --------------------------------------------------------------------------------


@dataclass
class PrecisionPlan:
    """How numbers are stored and computed: frozen weights dtype, Accelerate autocast mode."""

    weights: torch.dtype  # dtype the base model is loaded in
    compute: torch.dtype  # dtype matmuls run in (and the 4-bit layers' compute dtype)
    mixed_precision: str  # Accelerate mode: "no", "bf16" or "fp16"
    label: str


ADAPTER_METHODS = ("lora", "dora", "qlora")


def plan_precision(precision: str, *, method: str, device: torch.device, weights: str = "auto") -> PrecisionPlan:
    """Pick storage and compute dtypes. Adapters and optimizer state stay fp32.

    `weights="auto"`: adapter methods keep the frozen base directly in the compute dtype
    (no autocast copies of the weights each step); full fine-tuning keeps fp32 master
    weights under autocast. fp16 always uses autocast with loss scaling. `weights` set
    (`model.dtype`) stores the base in that dtype instead: fp32 under bf16 autocast for
    adapter methods, or pure-bf16 full fine-tuning (half the memory, no fp32 master copy).
    """
    from tunelab.models import resolve_dtype

    compute = resolve_dtype(precision, device)
    adapters = method in ADAPTER_METHODS
    if weights != "auto":
        stored = resolve_dtype(weights, device)
        if stored == torch.float16 and not adapters:
            raise TunelabError(
                "model.dtype=fp16 with method: full: fp16 weights cannot be updated under loss scaling.\n"
                "  fix: model.dtype=bf16 or fp32 (or auto), or an adapter method"
            )
        if compute == torch.float16:
            return PrecisionPlan(stored, compute, "fp16", f"fp16 autocast + loss scaling, {weights} weights")
        if stored == torch.float16:  # fp16 weights compute in fp16 whatever the precision: gradients need the scaler
            return PrecisionPlan(stored, torch.float16, "fp16", f"fp16 weights (model.dtype) + loss scaling ({precision} asked)")
        if compute == torch.float32 or stored != torch.float32:
            # Without autocast a layer computes in its weights' dtype.
            return PrecisionPlan(stored, stored, "no", f"{weights} weights (model.dtype)")
        return PrecisionPlan(stored, compute, "bf16", "bf16 autocast, fp32 weights (model.dtype)")
    if compute == torch.float32:
        return PrecisionPlan(torch.float32, compute, "no", "fp32")
    if compute == torch.float16:
        return PrecisionPlan(torch.float16 if adapters else torch.float32, compute, "fp16", "fp16 autocast + loss scaling")
    if adapters:
        return PrecisionPlan(torch.bfloat16, compute, "no", "bf16 base weights, fp32 adapters")
    return PrecisionPlan(torch.float32, compute, "bf16", "bf16 autocast, fp32 weights")


def bf16_rounding_warning(learning_rate: float) -> str:
    """The start-up warning for pure-bf16 full fine-tuning, with its numbers.

    bf16 keeps 8 significant bits: for 2^k <= |w| < 2^(k+1) its spacing is 2^(k-7), so w + u
    rounds back to w when |u| is under half of that, 2^(k-8): always when |u| < |w|/512, and
    up to |u| < |w|/256 in the lower part of each power of two. Adam's update is about the
    learning rate per step, so every weight with |w| above 512 x lr never moves.
    """
    threshold = 512 * learning_rate
    return (
        f"warning: pure-bf16 full fine-tuning (model.dtype: bf16, method: full): bf16 rounds away an update smaller "
        f"than |w|/512 (up to |w|/256), and Adam's updates are about training.learning_rate={learning_rate:g}, so "
        f"every weight with |w| > {threshold:.2g} stays where it is (most of a model initialised at std 0.02).\n"
        "  fix: model.dtype: auto (fp32 master weights under bf16 autocast: updates accumulate; 2x weight memory), "
        "or a learning rate large enough for the weights to move"
    )


# --- the run folder ---------------------------------------------------------------------------


def check_run_dir(run_dir: Path, config_yaml: str, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, to clobber another run's results or resume a different run."""
    existing = run_dir / "config.yaml"
    has_results = (run_dir / "final").exists() or (run_dir / "checkpoints").exists()
    if resume:
        if existing.is_file() and _comparable(existing.read_text()) != _comparable(config_yaml):
            raise TunelabError(
                f"{run_dir} holds a run with a different config, so it cannot be resumed with this one.\n"
                "  fix: resume with the run's own config.yaml, or choose another output.name"
            )
    elif has_results and not overwrite:
        raise TunelabError(
            f"{run_dir} already holds a run.\n"
            "  fix: --resume to continue it, --overwrite (output.overwrite=true) to start it again, "
            "or another output.name / --output"
        )


def init_run_dir(run_dir: Path, config_yaml: str, *, resume: bool) -> None:
    """Create the run folder (clearing an overwritten run's results) and write config.yaml."""
    if not resume:
        for name in ("final", "checkpoints", "metrics.jsonl", "eval.json", "report.html", "eval"):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", config_yaml)


def _comparable(config_yaml: str) -> dict:
    """A config without the keys that may change between a run and its resumption."""
    import yaml

    data = yaml.safe_load(config_yaml) or {}
    for section, key in (("training", "resume"), ("output", "overwrite")):
        data.get(section, {}).pop(key, None)
    return data


def save_model_files(
    model,
    tokenizer,
    directory: Path,
    *,
    base_model: str | None,
    method: str,
    meta: dict | None = None,
) -> None:
    """Everything inference needs: adapter or full weights (safetensors), tokenizer + chat template,
    and the task's own facts (`meta`: a causal LM's prompt format, a classifier's labels) in
    tunelab_model.json."""
    from tunelab.models import write_model_meta

    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_model_meta(directory, base_model=base_model, method=method, extra=meta)


def load_trainable_weights(model, checkpoint: Path, *, is_adapter: bool) -> None:
    """Load a checkpoint's weights into the live model (adapter tensors, or the full state)."""
    from safetensors.torch import load_file

    if is_adapter:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
        return
    state = {}
    for shard in sorted(checkpoint.glob("model*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # safetensors stores a tied tensor once (an LM head tied to the embeddings): a missing name
    # that shares storage with a loaded one was loaded with it.
    live = model.state_dict()
    loaded = {live[name].data_ptr() for name in state if name in live}
    missing = [name for name in missing if live[name].data_ptr() not in loaded]
    if unexpected or missing:
        raise TunelabError(f"checkpoint {checkpoint} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def fresh_accelerator(*, mixed_precision: str, log_with: list[str] | None, project_dir: str,
                      timeout_s: int = 1800) -> Accelerator:
    """An Accelerator for this run alone.

    Accelerate keeps its settings in process-wide singletons, so a second run in the same
    process (a notebook, the Python API, HPO trials) with another precision would fail with
    "AcceleratorState has already been initialized". The per-run state is cleared first; the
    process group (PartialState: torchrun / accelerate launch) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(
        # How long a collective waits for a process doing solo work (rank 0 saving a checkpoint,
        # the post-training evaluation) before the job is torn down; NCCL's default is 10 min.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
        # cpu=True on CPU-only machines lets `torchrun`/`accelerate launch` run several CPU processes (gloo).
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
    )


# --- metrics ----------------------------------------------------------------------------------


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (and to Accelerate trackers)."""

    def __init__(self, path: Path, accelerator: Accelerator, *, resume_step: int):
        self.path = path
        self.accelerator = accelerator
        if accelerator.is_main_process:
            kept = []
            if resume_step > 0 and path.is_file():  # drop entries past the checkpoint we resume from
                kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            write_text_atomic(path, "".join(ln + "\n" for ln in kept))

    def log(self, record: dict) -> None:
        # An fp16 overflow step's gradient norm is inf: written as null, since strict JSON (jq,
        # JavaScript, pandas' default reader) has no Infinity or NaN.
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# --- the step and the eval: named (sum, count) terms ------------------------------------------


Totals = dict[str, tuple[float, float]]  # name -> (sum, count), over all processes


def reduce_totals(totals: Totals, accelerator: Accelerator) -> Totals:
    """Sum every (sum, count) over the processes in one collective (all must hold the same names).
    Float64 on the host: Apple MPS has no float64 tensors, and counts stay exact."""
    if accelerator.num_processes == 1 or not totals:
        return dict(totals)
    names = list(totals)
    dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64
    flat = torch.tensor([v for name in names for v in totals[name]], dtype=dtype, device=accelerator.device)
    flat = accelerator.reduce(flat, reduction="sum").cpu()
    return {name: (float(flat[2 * i]), float(flat[2 * i + 1])) for i, name in enumerate(names)}


def add_totals(into: dict[str, list[float]], totals) -> None:
    """Accumulate (sum, count) pairs by name (tensors read as floats)."""
    for name, (value, count) in totals.items():
        running = into.setdefault(name, [0.0, 0.0])
        running[0] += float(value)
        running[1] += float(count)


def loss_means(totals, *, prefix: str = "") -> dict[str, float]:
    """The logged view of a window's or an eval's totals: `loss` = the sum of the objective terms'
    means (each term's own mean), `loss/<term>` too when there are several, each metric's mean.
    Term totals are keyed "loss/<term>", metric totals by their own name."""
    terms = {name: total for name, total in totals.items() if name.startswith("loss/")}
    means = {name: value / max(count, 1) for name, (value, count) in totals.items()}
    record = {f"{prefix}loss": sum(means[name] for name in terms)}
    if len(terms) > 1:
        record.update({f"{prefix}{name}": means[name] for name in terms})
    record.update({f"{prefix}{name}": mean for name, mean in means.items() if name not in terms})
    return record


@torch.no_grad()
def evaluate(loss_module: torch.nn.Module, task, data, items: list, model: torch.nn.Module, accelerator: Accelerator,
             step: StepInfo) -> dict[str, float]:
    """The eval record (`eval_loss`, `eval_<metric>`, the task's extras) over the eval items of
    all processes: each objective term is its own mean over every eval target.

    Every process must call this, also one whose share of the eval items is empty: the sums
    meet in one collective. The forward passes go through the unwrapped module, so ranks with
    more batches than others run no DDP collectives (buffer broadcasts) that the others would
    not match. Batches are made again at each eval (with the current weights, for a task
    that generates).
    """
    module = accelerator.unwrap_model(loss_module)
    module.eval()
    totals: dict[str, list[float]] = {}
    for item in items:
        made = task.make_batches(data, [item], model, step)
        add_totals(totals, made.metrics)
        for batch in made.micro:
            with accelerator.autocast():
                out = module(**_to_device(batch, accelerator.device))
            add_totals(totals, {f"loss/{name}": term for name, term in out.terms.items()})
            add_totals(totals, out.metrics)
    module.train()
    merged: dict[str, list[float]] = {}
    for process_totals in gather_object([totals]):  # [totals] of every process (names may differ: empty shares)
        add_totals(merged, process_totals)
    record = loss_means(merged, prefix="eval_")
    record.update(task.eval_record(record))
    return record


def accumulate_gradients(loss_module: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                         accelerator: Accelerator) -> Totals:
    """Backward over one optimizer step's micro-batches; returns every term's and metric's
    (sum, count) over all processes (terms keyed "loss/<term>").

    Each objective term's summed value is divided by that term's global count for the step
    (`count_targets`, known before the forward), so the accumulated gradient is that of the
    sum of each term's mean over the whole step, whatever the split into micro-batches and
    processes: batch 8 x accumulation 1 equals batch 1 x accumulation 8.
    """
    world = accelerator.num_processes
    module = accelerator.unwrap_model(loss_module)
    local_counts: dict[str, list[float]] = {}
    for batch in micro_batches:
        add_totals(local_counts, {name: (count, 0) for name, count in module.count_targets(batch).items()})
    step_counts = {name: value for name, (value, _) in reduce_totals(
        {name: (c, 0.0) for name, (c, _) in local_counts.items()}, accelerator).items()}
    totals: dict[str, list[float]] = {}
    for i, batch in enumerate(micro_batches):
        # Sync gradients across processes only on the last micro-batch.
        sync = accelerator.no_sync(loss_module) if i < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync, accelerator.autocast():
            out = loss_module(**_to_device(batch, accelerator.device))
            # DDP averages gradients over processes; x world makes each term its global mean.
            objective = sum(value * (world / max(step_counts[name], 1)) for name, (value, _) in out.terms.items())
        accelerator.backward(objective)
        add_totals(totals, {f"loss/{name}": (value.detach(), 0.0) for name, (value, _) in out.terms.items()})
        add_totals(totals, out.metrics)
    reduced = reduce_totals({name: (value, count) for name, (value, count) in totals.items()}, accelerator)
    reduced.update({f"loss/{name}": (reduced[f"loss/{name}"][0], count) for name, count in step_counts.items()})
    return reduced


def optimizer_step(optimizer, scheduler, accelerator: Accelerator) -> None:
    """Step the optimizer, and the schedule only if the step was taken: under fp16 loss
    scaling a step with inf/NaN gradients is skipped, and the learning rate waits with it."""
    optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# --- surviving long jobs: signals, divergence, failed writes ------------------------------------


def any_process_max(value: int, accelerator: Accelerator) -> int:
    """The largest of every process's value (all processes must call it at the same point)."""
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor(value, device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())


def check_finite(loss: float, grad_norm: float | None, *, step: int, total: int, learning_rate: float,
                 weight_decay: float, fp16: bool, checkpoints_dir: Path) -> None:
    """Stop a diverged run before its update: a NaN/inf loss or gradient norm only gets worse.

    Under fp16 an infinite gradient norm is the loss scaler's business (it skips that step and
    lowers the scale), so only the loss is checked there. Nothing is written after the
    divergence: the newest checkpoint is the last good state.
    """
    bad = [f"the loss is {loss}"] if not math.isfinite(loss) else []
    if grad_norm is not None and not math.isfinite(grad_norm) and not fp16:
        bad.append(f"the gradient norm is {grad_norm}")
    if not bad:
        return
    if fp16:
        cause = ("an fp16 overflow in the forward pass (training.precision=bf16 or fp32 avoids it), "
                 f"or a learning rate too high (training.learning_rate={learning_rate:g})")
    elif step == 1:
        cause = ("the model itself: non-finite values before any update (broken weights, or a precision "
                 "too narrow for them: try training.precision=fp32)")
    else:
        decay = (f" (with training.weight_decay={weight_decay:g}, learning rate x weight decay >= 1 grows "
                 "the weights at every step)" if learning_rate * weight_decay >= 1 else "")
        cause = (f"a learning rate too high for this model (training.learning_rate={learning_rate:g}){decay}; "
                 "also: too little warmup (training.warmup_steps) or no clipping (training.max_grad_norm)")
    last_checkpoint = latest_checkpoint(checkpoints_dir)
    kept = (f"the last good checkpoint is kept: {last_checkpoint}" if last_checkpoint is not None
            else "no checkpoint had been written yet (training.save_steps saves more often)")
    raise TunelabError(
        f"training diverged at step {step}/{total}: {' and '.join(bad)}; stopped before applying that update.\n"
        f"  likely cause: {cause}\n  {kept}\n"
        "  fix: lower training.learning_rate (or warm up longer) and train again (--overwrite)"
    )


def write_failure(what: str, error: OSError, *, kept: Path | None, resume: str) -> TunelabError:
    """One clear message for a failed write (disk full, no permission) that says what survived."""
    import errno

    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
               errno.EACCES: "no permission to write there", errno.EPERM: "no permission to write there",
               errno.EROFS: "the file system is read-only"}
    reason = reasons.get(error.errno, "the write failed")
    intact = f"the previous checkpoint {kept} is intact" if kept is not None else "no earlier checkpoint exists"
    return TunelabError(
        f"could not write {what}: {reason} ({error}).\n"
        f"  {intact}; the partial write was removed.\n"
        f"  fix: free disk space or fix the folder's permissions, then resume: {resume}"
    )


def write_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, **save_args) -> None:
    """`save_checkpoint` on the main process, with every process told whether it worked.

    A failed write (OSError: disk full, permissions) leaves the earlier checkpoints as they
    were (the new one is written to a temporary directory first) and raises one clear error
    on every process, instead of a traceback on one while the others wait forever.
    """
    error: OSError | None = None
    kept = latest_checkpoint(checkpoints_dir)
    rng_states = gather_object([rng_state()])  # every rank's generators, by rank
    if accelerator.is_main_process:
        try:
            save_checkpoint(checkpoints_dir, rng_states=rng_states, **save_args)
        except OSError as err:
            error = err
    if any_process_max(int(error is not None), accelerator):  # also the barrier after the save
        what = f"checkpoint step-{save_args['state'].global_step} in {checkpoints_dir}"
        if error is None:
            raise TunelabError(f"the main process could not write {what}; see its message")
        raise write_failure(what, error, kept=kept, resume=resume_command(accelerator.num_processes))


def stop_on_signal(signum: int, accelerator: Accelerator, checkpoints_dir: Path, *, saved_now: bool,
                   total_steps: int, **save_args) -> None:
    """After a Ctrl-C / SIGTERM: checkpoint this step (unless the schedule just did), then stop."""
    import signal

    step = save_args["state"].global_step
    if not saved_now:
        write_checkpoint(accelerator, checkpoints_dir, **save_args)
    accelerator.end_training()
    raise TrainingInterrupted(
        f"stopped by {signal.Signals(signum).name} after step {step}/{total_steps}; "
        f"checkpoint: {checkpoints_dir / f'step-{step}'}\n"
        f"  resume: {resume_command(accelerator.num_processes)}",
        signum,
    )


# --- the recipe -------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    state: TrainState
    eval_loss: float | None
    train_loss: float | None
    trainable_params: int
    total_params: int
    targets_per_second: float  # the task's unit (target tokens, examples, pairs) per second
    seconds: float
    history: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)  # the last eval record (eval_loss, eval_<metric>, ...)
    model: torch.nn.Module | None = None  # the trained model, still in memory (Python API)
    tokenizer: object | None = None


def load_run_tokenizer(config: RunConfig) -> tuple[str, object, list[str]]:
    """(resolved model source, tokenizer, tokens added) with the chat template this run trains with.

    The template is saved with the run (final/ tokenizer), so inference renders prompts
    exactly as training did. When the task renders chat (`needs_chat_template`), a tokenizer
    without a template gets `data.chat_template` (default chatml); new special tokens mean the
    embeddings must be resized.
    """
    from tunelab.data.render import set_chat_template
    from tunelab.models import load_tokenizer

    task = task_module(config.task)
    source = task.resolve_source(config.model.name)
    tokenizer = load_tokenizer(source, trust_remote_code=config.model.trust_remote_code)
    added: list[str] = []
    if not tokenizer.chat_template and task.needs_chat_template(config):
        added = set_chat_template(tokenizer, config.data.chat_template or "chatml")
    return source, tokenizer, added


def build_model(config: RunConfig, task, source: str, *, data, tokenizer, added_tokens: list[str],
                precision: PrecisionPlan, device: torch.device) -> torch.nn.Module:
    """The task's model, loaded in the planned precision, with LoRA/DoRA adapters (fused) or the
    configured parameters frozen for full fine-tuning."""
    from tunelab.models import TORCH_DTYPES, ModelLoading, add_lora, freeze_parameters

    quant = config.quantization
    loading = ModelLoading(
        dtype=precision.weights, bits=quant.bits, quant_type=quant.quant_type, double_quant=quant.double_quant,
        compute_dtype=precision.compute if quant.compute_dtype == "auto" else TORCH_DTYPES[quant.compute_dtype],
        attn_implementation=config.model.attn_implementation, trust_remote_code=config.model.trust_remote_code,
        device=device,
    )
    model = task.load_model(source, data=data, tokenizer=tokenizer, loading=loading)
    if added_tokens:  # rows for the fallback chat template's tokens; trained below
        model.resize_token_embeddings(len(tokenizer))
    if config.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method in ADAPTER_METHODS:
        lora = config.lora
        model = add_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules,
                         use_dora=config.method == "dora", trainable_token_ids=tokenizer.convert_tokens_to_ids(added_tokens),
                         task_type=task.PEFT_TASK_TYPE)
        fuse_lora_layers(model)  # plain LoRA layers as one autograd function (same numbers, fewer memory passes)
    else:
        freeze_parameters(model, config.full.freeze)
    model.config.use_cache = False  # training never decodes: no KV cache (and packed rows stay isolated)
    return model


@dataclass
class BatchPlan:
    """This process's share of each epoch's plan: every world-th item of the data's own plan
    (a pure function of seed and epoch; packing packs each epoch differently), cut to a
    length all processes share, `accum` consecutive items per optimizer step."""

    data: object
    batch_size: int
    seed: int
    rank: int
    world: int
    accum: int

    def items(self, epoch: int) -> list:
        plan = self.data.epoch_plan(self.batch_size, seed=self.seed, epoch=epoch)
        return plan[self.rank : len(plan) // self.world * self.world : self.world]

    def steps(self, epoch: int) -> int:
        return len(self.items(epoch)) // self.accum


class Window:
    """What the loop logs between two logging steps: each term's and metric's (sum, count), and the time."""

    def __init__(self):
        self.totals: dict[str, list[float]] = {}
        self.start = time.perf_counter()

    def record(self, *, units, seen: int) -> dict:
        """`loss` (+ terms, metrics), `<unit>_per_s` over the window and `<unit>` seen so far; then reset."""
        elapsed = time.perf_counter() - self.start
        counted = self.totals.get(f"loss/{units.term}", [0.0, 0.0])[1]
        record = {k: round(v, 6) for k, v in loss_means(self.totals).items()}
        record.update({f"{units.key}_per_s": round(counted / max(elapsed, 1e-9), 2), units.key: seen})
        self.totals, self.start = {}, time.perf_counter()
        return record


def run_name(config: RunConfig, config_path: str | None) -> str:
    if config.output.name:
        return config.output.name
    return Path(config_path).stem if config_path else "run"


def train(
    config: RunConfig,
    *,
    config_path: str | None = None,
    quiet: bool = False,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune as the config says and write the run folder. Returns where and how it went.

    `on_eval(step, value)` is called after each evaluation during training (not the step-0
    baseline) with the task's selection metric (`task.SELECT`: eval_loss for causal LM and
    classification); HPO uses it to report to the pruner. An exception it raises stops the
    run there and propagates (the run folder keeps what was written so far, no final/).
    The run folder is locked for the whole training (tunelab/runlock.py): a second training
    into it stops at once with an error naming the first. Under a launcher only global rank
    0 holds the lock (a failure there ends the launch).
    """
    run_dir = Path(config.output.dir) / run_name(config, config_path)
    lock = RunLock(run_dir) if int(os.environ.get("RANK", "0")) == 0 else None
    with lock or contextlib.nullcontext():
        if lock is not None and lock.took_over and not quiet:
            console.print(f"[yellow]took over a stale lock[/] of {run_dir}: {describe_holder(lock.took_over)} is gone",
                          highlight=False)
        return _train(config, config_path=config_path, quiet=quiet, on_eval=on_eval)


def _train(config: RunConfig, *, config_path: str | None, quiet: bool,
           on_eval: Callable[[int, float], None] | None) -> TrainResult:
    """`train` inside the run folder's lock: setup -> loop -> save."""
    from tunelab.models import count_parameters

    # ---- setup: run folder, precision, tokenizer, data, model, plan --------------------------------
    cfg_train, cfg_model = config.training, config.model
    task = task_module(config.task)  # what differs per task: data, model head, batches, loss, metrics
    if config.data.train is None:
        raise TunelabError("data.train is not set.\n  fix: --data PATH, or data.train in the config")
    run_dir = Path(config.output.dir) / run_name(config, config_path)
    resume = cfg_train.resume is True or (cfg_train.resume == "auto" and latest_checkpoint(run_dir / "checkpoints") is not None)
    config_yaml = config_to_yaml(config)
    check_run_dir(run_dir, config_yaml, resume=resume, overwrite=config.output.overwrite)
    if resume and (done := finished_run(run_dir, units_key=task.UNITS.key)) is not None:
        return done  # nothing to continue: do not retrain its tail

    if cfg_train.num_threads:
        torch.set_num_threads(cfg_train.num_threads)
    check_trackers_installed(config.logging.trackers)
    probe_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = plan_precision(cfg_train.precision, method=config.method, device=probe_device, weights=cfg_model.dtype)
    accelerator = fresh_accelerator(mixed_precision=precision.mixed_precision, log_with=config.logging.trackers or None,
                                    project_dir=str(run_dir), timeout_s=cfg_train.distributed_timeout_s)
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # reuse activation memory step after step: no page-fault storm
    set_seed(cfg_train.seed)
    say = (lambda *a, **k: None) if quiet or not accelerator.is_main_process else console.print
    world, rank, accum = accelerator.num_processes, accelerator.process_index, cfg_train.gradient_accumulation_steps
    if config.method == "full" and precision.weights == torch.bfloat16 and precision.mixed_precision == "no":
        say(f"[yellow]{bf16_rounding_warning(cfg_train.learning_rate)}[/]", highlight=False)

    source, tokenizer, added_tokens = load_run_tokenizer(config)
    data = task.build_data(config, tokenizer, say=say)  # before the model: a classifier's head size is its label count
    model = build_model(config, task, source, data=data, tokenizer=tokenizer, added_tokens=added_tokens,
                        precision=precision, device=accelerator.device)
    # The same seed built the same initial weights on every process; from here each rank draws
    # its own dropout masks (nanoGPT's seed + rank), else DDP averages one mask pattern `world` times.
    torch.manual_seed(cfg_train.seed + rank)
    trainable, total = count_parameters(model)
    say(f"[bold]model[/] {cfg_model.name or f'default ({task.DEFAULT_MODEL})'}  method={config.method}  "
        f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)  precision: {precision.label}  "
        f"device: {accelerator.device}", highlight=False)
    say(f"[bold]data[/] {data.summary()}", highlight=False)
    plan = BatchPlan(data, cfg_train.batch_size, cfg_train.seed, rank, world, accum)
    check_enough_batches(len(data.train), len(plan.items(0)), world=world, accum=accum)
    total_steps = cfg_train.max_steps or sum(plan.steps(e) for e in range(cfg_train.epochs))
    warmup = schedule_warmup(cfg_train, total_steps)
    run_meta = task.run_meta(data)  # saved with the weights: prompt format (causal LM), labels (classifier)
    if accelerator.is_main_process:  # only now: bad data or a bad model leave no half-made run folder
        init_run_dir(run_dir, config_yaml, resume=resume)
    accelerator.wait_for_everyone()

    loss_module = task.loss_module(model, data=data, run_dir=run_dir, say=say)  # run_dir: what a task stores (DPO's full-FT reference)
    optimizer = build_optimizer(model, name=cfg_train.optimizer, learning_rate=cfg_train.learning_rate,
                                weight_decay=cfg_train.weight_decay, betas=cfg_train.adam_betas)
    scheduler = build_scheduler(optimizer, name=cfg_train.lr_scheduler, warmup_steps=warmup, total_steps=total_steps)
    if cfg_train.compile:
        loss_module = torch.compile(loss_module)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    state = TrainState(num_processes=world, gradient_accumulation_steps=accum)
    checkpoints_dir = run_dir / "checkpoints"
    if resume:
        state = resume_state(checkpoints_dir, model, optimizer, scheduler, accelerator,
                             is_adapter=config.method in ADAPTER_METHODS, accum=accum, say=say)
    if config.logging.trackers:
        accelerator.init_trackers(config.logging.project, config=tracker_config(config))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator, resume_step=state.global_step)
    all_eval_items = data.eval_plan(config.evaluation.batch_size)
    has_eval = bool(all_eval_items)  # the same on every process, even one whose share is empty
    eval_items = all_eval_items[rank::world]
    # Unset: each epoch's end, and at least every quarter of the run, so that even a
    # one-epoch run leaves a checkpoint to resume from.
    save_every = cfg_train.save_steps or max(1, math.ceil(total_steps / 4))

    def save_weights(directory: Path) -> None:
        # `model` is the very object inside the (DDP / compiled) loss wrapper.
        save_model_files(model, tokenizer, directory, base_model=cfg_model.name, method=config.method, meta=run_meta)

    def step_info(training: bool) -> StepInfo:
        return StepInfo(training=training, step=state.global_step, epoch=state.epoch, seed=cfg_train.seed, rank=rank,
                        world=world, device=accelerator.device, run_dir=run_dir)

    def run_eval() -> dict:
        record = {"step": state.global_step, **evaluate(loss_module, task, data, eval_items, model, accelerator,
                                                        step_info(False))}
        metrics.log({k: round(v, 6) if isinstance(v, float) else v for k, v in record.items()})
        history.append(record)
        say(f"  step {state.global_step}: " + "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"),
            highlight=False)
        return record

    say(f"[bold]plan[/] {total_steps} steps (epoch 1: {plan.steps(0)} steps); {world} process(es) x batch "
        f"{cfg_train.batch_size} x accumulation {accum}; warmup {warmup}; lr {cfg_train.learning_rate:g} "
        f"{cfg_train.lr_scheduler}", highlight=False)

    # ---- train --------------------------------------------------------------------------------
    from rich.progress import TextColumn

    from tunelab.console import progress

    loss_module.train()
    history: list[dict] = []
    last_eval: dict = {}
    window, run_start, seen_this_run, stop = Window(), time.perf_counter(), 0, False
    bar = progress(TextColumn("{task.fields[info]}"), plain_every=0)  # not a terminal: a line per logging step
    bar.disable = quiet or not accelerator.is_main_process
    with bar, StopRequest(announce=accelerator.is_main_process) as stop_request:
        bar_task = bar.add_task("training", total=total_steps, completed=state.global_step, info="")
        if has_eval and state.global_step == 0:  # the baseline every later eval is compared with
            last_eval = run_eval()
        while state.global_step < total_steps and not stop:
            my_items = plan.items(state.epoch)
            while state.batch_index + accum <= len(my_items) and state.global_step < total_steps:
                made = task.make_batches(data, my_items[state.batch_index : state.batch_index + accum], model,
                                         step_info(True))
                totals = accumulate_gradients(loss_module, made.micro, accelerator)
                totals.update(reduce_totals(made.metrics, accelerator))
                grad_norm = None
                if cfg_train.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg_train.max_grad_norm)
                    grad_norm = float(norm) if norm is not None else None  # DeepSpeed clips inside its step
                check_finite(sum(v for k, (v, _) in totals.items() if k.startswith("loss/")), grad_norm,
                             step=state.global_step + 1, total=total_steps, learning_rate=cfg_train.learning_rate,
                             weight_decay=cfg_train.weight_decay, fp16=precision.mixed_precision == "fp16",
                             checkpoints_dir=checkpoints_dir)
                optimizer_step(optimizer, scheduler, accelerator)
                counted = int(totals[f"loss/{task.UNITS.term}"][1])
                state.global_step += 1
                state.batch_index += accum
                state.targets_seen += counted
                seen_this_run += counted
                add_totals(window.totals, totals)
                epoch_end = state.batch_index + accum > len(my_items)

                if state.global_step % cfg_train.logging_steps == 0 or state.global_step == total_steps:
                    record = {"step": state.global_step,
                              "epoch": round(state.epoch + state.batch_index / max(len(my_items), 1), 4),
                              **window.record(units=task.UNITS, seen=state.targets_seen),
                              "lr": scheduler.get_last_lr()[0],
                              "grad_norm": round(grad_norm, 6) if grad_norm is not None else None,
                              "time": round(time.perf_counter() - run_start, 3)}
                    metrics.log(record)
                    history.append(record)
                    rate = record[f"{task.UNITS.key}_per_s"]
                    bar.update(bar_task, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {rate:.0f} {task.UNITS.rate}")
                bar.update(bar_task, completed=state.global_step)

                due = state.global_step % cfg_train.eval_steps == 0 if cfg_train.eval_steps else epoch_end
                if has_eval and (due or state.global_step == total_steps):
                    last_eval = run_eval()
                    value = last_eval[task.SELECT.metric]
                    if on_eval is not None:
                        on_eval(state.global_step, value)
                    stop = track_best(state, value, task.SELECT, patience=cfg_train.early_stopping_patience, say=say)

                if epoch_end and not stop and state.global_step < total_steps:
                    state.epoch += 1  # counted before saving: a resume starts the next epoch
                    state.batch_index = 0
                save_args = dict(save_weights=save_weights, optimizer=optimizer, scheduler=scheduler, state=state,
                                 keep=cfg_train.keep_checkpoints, scaler=accelerator.scaler)
                due = state.global_step % save_every == 0 or (epoch_end and not cfg_train.save_steps)
                saved_now = due and state.global_step < total_steps and not stop
                if saved_now:
                    write_checkpoint(accelerator, checkpoints_dir, **save_args)
                unfinished = state.global_step < total_steps and not stop
                signum = any_process_max(stop_request.signum or 0, accelerator) if unfinished else 0
                if signum:  # Ctrl-C / SIGTERM on any process: all stop at this same step
                    stop_on_signal(signum, accelerator, checkpoints_dir, saved_now=saved_now, total_steps=total_steps,
                                   **save_args)
                if stop or state.batch_index == 0:
                    break
            if not stop and state.global_step < total_steps and state.batch_index + accum > len(my_items):
                state.epoch += 1  # an epoch too short for one step (packing plans vary), or an old checkpoint
                state.batch_index = 0

    # ---- save -----------------------------------------------------------------------------------
    seconds = time.perf_counter() - run_start
    train_losses = [r["loss"] for r in history if "loss" in r]
    if accelerator.is_main_process:
        write_final(run_dir, save_weights)
        summary = {
            "step": state.global_step,
            "eval_loss": last_eval.get("eval_loss"),
            **{k: v for k, v in last_eval.items() if k not in ("step", "eval_loss")},
            "train_loss": train_losses[-1] if train_losses else None,
            f"train_{task.UNITS.key}": state.targets_seen,
            "train_seconds": round(seconds, 3),
            f"{task.UNITS.key}_per_second": round(seen_this_run / max(seconds, 1e-9), 2),
            "trainable_params": trainable, "total_params": total, "precision": precision.label,
            "device": str(accelerator.device), "num_processes": world,
        }
        write_text_atomic(run_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
        scores = task.final_scores(model, data, config=config, tokenizer=tokenizer, run_dir=run_dir,
                                   device=accelerator.device, say=say)
        if scores:  # re-read: final_scores may have merged its own evaluations into eval.json
            merged = {**json.loads((run_dir / "eval.json").read_text()), **scores}
            write_text_atomic(run_dir / "eval.json", json.dumps(merged, indent=2) + "\n")
        from tunelab.report import write_report

        write_report(run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(
        run_dir=run_dir, final_dir=run_dir / "final", state=state, eval_loss=last_eval.get("eval_loss"),
        train_loss=train_losses[-1] if train_losses else None, trainable_params=trainable, total_params=total,
        targets_per_second=seen_this_run / max(seconds, 1e-9), seconds=seconds, history=history, eval=last_eval,
        model=model, tokenizer=tokenizer,
    )


def schedule_warmup(cfg_train, total_steps: int) -> int:
    """Warmup steps: `warmup_ratio` of the run when set, else `warmup_steps` capped at half the run."""
    if cfg_train.warmup_ratio is not None:
        return round(cfg_train.warmup_ratio * total_steps)
    return min(cfg_train.warmup_steps, total_steps // 2)


def resume_state(checkpoints_dir: Path, model, optimizer, scheduler, accelerator: Accelerator, *, is_adapter: bool,
                 accum: int, say=print) -> TrainState:
    """Load the newest complete checkpoint into the live model, optimizer, schedule and RNGs."""
    checkpoint = latest_checkpoint(checkpoints_dir)
    if checkpoint is None:
        raise TunelabError(f"--resume: {checkpoints_dir.parent} has no complete checkpoint to resume from")
    check_resumable(checkpoint, num_processes=accelerator.num_processes, accum=accum)
    load_trainable_weights(model, checkpoint, is_adapter=is_adapter)
    state = load_training_state(checkpoint, optimizer=optimizer, scheduler=scheduler, rank=accelerator.process_index,
                                scaler=accelerator.scaler)
    say(f"[bold]resumed[/] from {checkpoint} (step {state.global_step}, epoch {state.epoch + 1})", highlight=False)
    return state


def track_best(state: TrainState, value: float, select, *, patience: int | None, say=print) -> bool:
    """Record an eval's selection value; True when early stopping says stop (no improvement in
    `patience` evals, better meaning as the task's `SELECT` says)."""
    if select.better(value, state.best_metric):
        state.best_metric = value
        state.evals_without_improvement = 0
        return False
    state.evals_without_improvement += 1
    if patience and state.evals_without_improvement >= patience:
        say(f"[yellow]early stopping[/]: no {select.metric} improvement in {patience} evaluations")
        return True
    return False


def write_final(run_dir: Path, save_weights) -> None:
    """final/: written to a temp folder, then published atomically."""
    tmp = run_dir / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp)
    publish_directory(tmp, run_dir / "final")


def finished_run(run_dir: Path, *, units_key: str) -> TrainResult | None:
    """The result of a run that already ended (final/ and eval.json, written last), read from its
    folder; None when the run is unfinished. Resuming such a run returns this at once."""
    summary_path = run_dir / "eval.json"
    if not (run_dir / "final").is_dir() or not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    if "step" not in summary:  # an eval.json of `tunelab eval` only: not the trainer's summary
        return None
    console.print(f"[bold]{run_dir} is finished[/] (step {summary['step']}): nothing to resume; its model is in "
                  f"{run_dir / 'final'} (--overwrite trains it again)", highlight=False)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line] \
        if (run_dir / "metrics.jsonl").is_file() else []
    return TrainResult(
        run_dir=run_dir, final_dir=run_dir / "final",
        state=TrainState(global_step=summary["step"], targets_seen=summary.get(f"train_{units_key}", 0)),
        eval_loss=summary.get("eval_loss"), train_loss=summary.get("train_loss"),
        trainable_params=summary.get("trainable_params", 0), total_params=summary.get("total_params", 0),
        targets_per_second=summary.get(f"{units_key}_per_second", 0.0), seconds=0.0,
        history=history, eval={k: v for k, v in summary.items() if k.startswith("eval_")},
    )


def check_enough_batches(examples: int, batches_per_process: int, *, world: int, accum: int) -> None:
    """Refuse a plan in which a process cannot fill one optimizer step (it would loop forever)."""
    if batches_per_process == 0:
        raise TunelabError(
            f"{examples} training examples make fewer batches than the {world} processes.\n"
            "  fix: more data or a smaller training.batch_size"
        )
    if batches_per_process < accum:
        raise TunelabError(
            f"{examples} training examples make {batches_per_process} micro-batch(es) per process, fewer than "
            f"training.gradient_accumulation_steps={accum}: not one optimizer step per epoch.\n"
            "  fix: more data, a smaller training.batch_size, or a smaller training.gradient_accumulation_steps"
        )


def check_resumable(checkpoint: Path, *, num_processes: int, accum: int) -> None:
    """A checkpoint's batch position counts micro-batches per process: the same split is needed to continue."""
    saved = json.loads((checkpoint / "state.json").read_text())
    for key, now, flag in (("num_processes", num_processes, "the launcher's process count"),
                           ("gradient_accumulation_steps", accum, "training.gradient_accumulation_steps")):
        if saved.get(key) not in (None, now):
            raise TunelabError(
                f"{checkpoint} was written with {key}={saved[key]}, this run has {now}: its position in the "
                f"data would mean other batches.\n  fix: resume with {flag} = {saved[key]}, or start the run again "
                "with --overwrite"
            )


def tracker_config(config: RunConfig) -> dict[str, int | float | str | bool]:
    """The config as flat `section.key` scalars: TensorBoard's hparams take only int, float, str
    and bool (a list or None there fails the run), and flat keys read better in every tracker."""

    def flatten(value, prefix: str) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
        scalar = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        return {prefix.rstrip("."): scalar}

    return flatten(config.model_dump(mode="json"), "")


def check_trackers_installed(trackers: list[str]) -> None:
    """Fail before loading anything if a configured tracker's package is missing."""
    import importlib.util

    packages = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    missing = [t for t in trackers if importlib.util.find_spec(packages[t]) is None]
    if missing:
        raise TunelabError(
            f"logging.trackers: {', '.join(missing)} not installed.\n"
            f"  fix: pip install {' '.join(packages[t] for t in missing)}   (or pip install 'tunelab[tracking]')"
        )
    if "wandb" in trackers and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")  # no key, no network: log locally
