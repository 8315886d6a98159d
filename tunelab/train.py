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
from tunelab.loss import TargetTokenLoss
from tunelab.runlock import RunLock, describe_holder
from tunelab.stopping import StopRequest, resume_command
from tunelab.tasks import task_module


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
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise TunelabError(f"checkpoint {checkpoint} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def fresh_accelerator(*, mixed_precision: str, log_with: list[str] | None, project_dir: str) -> Accelerator:
    """An Accelerator for this run alone.

    Accelerate keeps its settings in process-wide singletons, so a second run in the same
    process (a notebook, the Python API, HPO trials) with another precision would fail with
    "AcceleratorState has already been initialized". The per-run state is cleared first; the
    process group (PartialState: torchrun / accelerate launch) is kept.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(
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
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(loss_module: torch.nn.Module, batches: list[dict[str, torch.Tensor]], accelerator: Accelerator) -> float:
    """Mean loss per target token over the eval batches of all processes.

    Every process must call this, also one whose share of the eval batches is empty (it
    adds zeros): the sums meet in one collective. The forward passes go through the
    unwrapped module, so ranks with more batches than others run no DDP collectives
    (buffer broadcasts) that the others would not match. Sums are taken on the host in
    float64 (Apple MPS has no float64 tensors).
    """
    module = accelerator.unwrap_model(loss_module)
    module.eval()
    loss_sum, count = 0.0, 0
    for batch in batches:
        with accelerator.autocast():
            batch_loss, batch_count = module(**_to_device(batch, accelerator.device))
        loss_sum += float(batch_loss)
        count += int(batch_count)
    module.train()
    totals = gather_object([(loss_sum, count)])  # [(sum, count)] of every process
    return sum(t[0] for t in totals) / max(sum(t[1] for t in totals), 1)


def accumulate_gradients(
    loss_module: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], accelerator: Accelerator,
    count_targets=TargetTokenLoss.count_targets,
) -> tuple[float, int]:
    """Backward over one optimizer step's micro-batches; returns (summed loss, target tokens), all processes.

    Each micro-batch's summed token loss is divided by the step's global target-token
    count, so the accumulated gradient is that of the mean over every target token of
    the step, whatever the split into micro-batches and processes.
    """
    world = accelerator.num_processes
    local_tokens = sum(count_targets(b) for b in micro_batches)
    step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), reduction="sum").item())
    local_loss = 0.0
    for i, batch in enumerate(micro_batches):
        # Sync gradients across processes only on the last micro-batch.
        sync = accelerator.no_sync(loss_module) if i < len(micro_batches) - 1 else contextlib.nullcontext()
        with sync, accelerator.autocast():
            loss_sum, _ = loss_module(**_to_device(batch, accelerator.device))
            # DDP averages gradients over processes; x world makes it the global token mean.
            loss = loss_sum * (world / max(step_tokens, 1))
        accelerator.backward(loss)
        local_loss += loss_sum.item()
    step_loss = accelerator.reduce(torch.tensor(local_loss, device=accelerator.device), reduction="sum").item()
    return step_loss, step_tokens


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
    tokens_per_second: float
    seconds: float
    history: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None  # the trained model, still in memory (Python API)
    tokenizer: object | None = None


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


def load_run_tokenizer(config: RunConfig) -> tuple[str, object, list[str]]:
    """(resolved model source, tokenizer, tokens added) with the chat template this run trains with.

    The template is saved with the run (final/ tokenizer), so inference renders prompts
    exactly as training did. A tokenizer without one gets `data.chat_template` (default
    chatml); new special tokens mean the embeddings must be resized. A classifier renders
    no chat, so its tokenizer is left as it is.
    """
    from tunelab.data.render import set_chat_template
    from tunelab.models import load_tokenizer

    source = task_module(config.task).resolve_source(config.model.name)
    tokenizer = load_tokenizer(source, trust_remote_code=config.model.trust_remote_code)
    added: list[str] = []
    if not tokenizer.chat_template and not trains_on_plain_text(config) and config.task == "causal_lm":
        added = set_chat_template(tokenizer, config.data.chat_template or "chatml")
    return source, tokenizer, added


def trains_on_plain_text(config: RunConfig) -> bool:
    """True when every training record is plain text (format text, or detected as text): such a
    run is not prompted through a chat template, so a base model must not get one added."""
    from tunelab.data.pipeline import source_formats

    d = config.data
    if d.train is None:
        return d.format == "text"
    fields = d.fields.model_dump() if d.fields else None
    return source_formats(d.train, fmt=d.format, fields=fields, split=d.split, hf_config=d.hf_config) == {"text"}


def prepare_data(config: RunConfig, directory: Path):
    """`tunelab data prepare`: tokenize the config's data once and save it with its fingerprint."""
    from tunelab.data.dataset import build_datasets
    from tunelab.data.prepared import data_fingerprint, save_prepared

    if config.task != "causal_lm":
        raise TunelabError(f"task: {config.task} tokenizes its data at the start of each run; data prepare is for task: causal_lm")
    _, tokenizer, _ = load_run_tokenizer(config)
    args = dataset_arguments(config)
    data = build_datasets(tokenizer=tokenizer, **args)
    save_prepared(data, directory, data_fingerprint(args, tokenizer))
    return data


def load_training_data(config: RunConfig, tokenizer, say=console.print):
    """Tokenized train/eval sets: from `data.prepared` when it still matches, else built now."""
    from tunelab.data.dataset import build_datasets
    from tunelab.data.prepared import data_fingerprint, load_prepared

    if config.task != "causal_lm":  # the task reads and tokenizes its own kind of records
        return task_module(config.task).build_data(config, tokenizer)
    args = dataset_arguments(config)
    if config.data.prepared:
        data, why_not = load_prepared(Path(config.data.prepared), data_fingerprint(args, tokenizer), tokenizer.pad_token_id)
        if data is not None:
            return data
        say(f"[yellow]data.prepared not used[/]: {why_not}; tokenizing now", highlight=False)
    return build_datasets(tokenizer=tokenizer, **args)


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

    `on_eval(step, eval_loss)` is called after each evaluation during training (not the
    step-0 baseline); HPO uses it to report to the pruner. An exception it raises stops the
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
    """`train` inside the run folder's lock."""
    from tunelab.models import TORCH_DTYPES, add_lora, count_parameters, freeze_parameters

    # ---- setup: unpack the config -----------------------------------------------------------
    cfg_train, cfg_data, cfg_model = config.training, config.data, config.model
    method = config.method
    if cfg_data.train is None:
        raise TunelabError("data.train is not set.\n  fix: --data PATH, or data.train in the config")
    run_dir = Path(config.output.dir) / run_name(config, config_path)
    resume = cfg_train.resume in (True, "auto")
    if cfg_train.resume == "auto" and latest_checkpoint(run_dir / "checkpoints") is None:
        resume = False
    config_yaml = config_to_yaml(config)
    check_run_dir(run_dir, config_yaml, resume=resume, overwrite=config.output.overwrite)

    if cfg_train.num_threads:
        torch.set_num_threads(cfg_train.num_threads)
    trackers = config.logging.trackers
    check_trackers_installed(trackers)
    probe_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    precision = plan_precision(cfg_train.precision, method=method, device=probe_device, weights=cfg_model.dtype)
    accelerator = fresh_accelerator(
        mixed_precision=precision.mixed_precision, log_with=trackers or None, project_dir=str(run_dir)
    )
    if accelerator.device.type == "cpu":
        keep_freed_memory()  # reuse activation memory step after step: no page-fault storm
    set_seed(cfg_train.seed)
    say = (lambda *a, **k: None) if quiet or not accelerator.is_main_process else console.print

    # ---- model --------------------------------------------------------------------------------
    source, tokenizer, added_tokens = load_run_tokenizer(config)
    task_impl = task_module(config.task)  # what differs per task: model head, batches, loss, metrics
    data = load_training_data(config, tokenizer, say)  # before the model: a classifier's head size is its label count
    quant = config.quantization
    model = task_impl.load_model(
        source,
        data=data,
        tokenizer=tokenizer,
        dtype=precision.weights,
        bits=quant.bits,
        quant_type=quant.quant_type,
        double_quant=quant.double_quant,
        compute_dtype=precision.compute if quant.compute_dtype == "auto" else TORCH_DTYPES[quant.compute_dtype],
        attn_implementation=cfg_model.attn_implementation,
        trust_remote_code=cfg_model.trust_remote_code,
        device=accelerator.device,
    )
    if added_tokens:  # rows for the fallback chat template's tokens; trained below
        model.resize_token_embeddings(len(tokenizer))
    if cfg_train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    is_adapter = method in ADAPTER_METHODS
    if is_adapter:
        model = add_lora(
            model,
            r=config.lora.r,
            alpha=config.lora.alpha,
            dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
            use_dora=method == "dora",
            trainable_token_ids=tokenizer.convert_tokens_to_ids(added_tokens),
            task_type=task_impl.PEFT_TASK_TYPE,
        )
        # Plain LoRA layers run as one autograd function (same numbers, fewer memory passes).
        fuse_lora_layers(model)
    else:
        freeze_parameters(model, config.full.freeze)
    model.config.use_cache = False  # no KV cache in training: packed rows stay isolated
    trainable, total = count_parameters(model)
    say(
        f"[bold]model[/] {cfg_model.name or 'default (SmolLM2-135M-Instruct)'}  method={method}  "
        f"trainable {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)  precision: {precision.label}  "
        f"device: {accelerator.device}",
        highlight=False,
    )

    # ---- data ---------------------------------------------------------------------------------
    say(f"[bold]data[/] {data.summary()}", highlight=False)
    world, rank = accelerator.num_processes, accelerator.process_index
    accum = cfg_train.gradient_accumulation_steps

    def epoch_batches(epoch: int) -> list:
        """This process's micro-batches of an epoch: every world-th batch of the epoch's own
        plan (packing packs each epoch differently), cut to a length all processes share."""
        plan = data.epoch_plan(cfg_train.batch_size, seed=cfg_train.seed, epoch=epoch,
                               packing=cfg_data.packing, max_length=cfg_data.max_seq_length)
        return plan[rank : len(plan) // world * world : world]

    def steps_in_epoch(epoch: int) -> int:
        return len(epoch_batches(epoch)) // accum

    check_enough_batches(len(data.train), len(epoch_batches(0)), world=world, accum=accum)
    steps_per_epoch = steps_in_epoch(0)
    if cfg_train.max_steps:
        total_steps = cfg_train.max_steps
    else:
        total_steps = sum(steps_in_epoch(e) for e in range(cfg_train.epochs))
    warmup = round(cfg_train.warmup_ratio * total_steps) if cfg_train.warmup_ratio is not None else cfg_train.warmup_steps
    warmup = min(warmup, total_steps // 2) if cfg_train.warmup_ratio is None else warmup
    run_meta = task_impl.run_meta(data)  # saved with the weights: prompt format (causal LM), labels (classifier)
    if accelerator.is_main_process:  # only now: bad data or a bad model leave no half-made run folder
        init_run_dir(run_dir, config_yaml, resume=resume)
    accelerator.wait_for_everyone()

    # ---- optimizer, schedule, state -------------------------------------------------------------
    probe = _to_device(data.collate(epoch_batches(0)[0][:1], packing=cfg_data.packing), accelerator.device)
    loss_module = task_impl.loss_module(model, probe=probe, say=say)
    count_step_targets = loss_module.count_targets  # the task says what a target is (token, example, pair)
    optimizer = build_optimizer(
        model,
        name=cfg_train.optimizer,
        learning_rate=cfg_train.learning_rate,
        weight_decay=cfg_train.weight_decay,
        betas=cfg_train.adam_betas,
    )
    scheduler = build_scheduler(optimizer, name=cfg_train.lr_scheduler, warmup_steps=warmup, total_steps=total_steps)
    if cfg_train.compile:
        loss_module = torch.compile(loss_module)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    state = TrainState(num_processes=world, gradient_accumulation_steps=accum)
    checkpoints_dir = run_dir / "checkpoints"
    if resume:
        checkpoint = latest_checkpoint(checkpoints_dir)
        if checkpoint is None:
            raise TunelabError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        check_resumable(checkpoint, num_processes=world, accum=accum)
        load_trainable_weights(model, checkpoint, is_adapter=is_adapter)
        state = load_training_state(checkpoint, optimizer=optimizer, scheduler=scheduler, rank=rank,
                                    scaler=accelerator.scaler)
        say(f"[bold]resumed[/] from {checkpoint} (step {state.global_step}, epoch {state.epoch + 1})", highlight=False)
    if trackers:
        accelerator.init_trackers(config.logging.project, config=tracker_config(config))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator, resume_step=state.global_step)
    all_eval_batches = data.eval_batches(config.evaluation.batch_size, packing=cfg_data.packing, max_length=cfg_data.max_seq_length)
    has_eval = bool(all_eval_batches)  # the same on every process, even one whose share is empty
    eval_batches = all_eval_batches[rank::world]
    eval_every = cfg_train.eval_steps  # unset: at each epoch's end
    # Unset: each epoch's end, and at least every quarter of the run, so that even a
    # one-epoch run leaves a checkpoint to resume from.
    save_every = cfg_train.save_steps or max(1, math.ceil(total_steps / 4))

    def save_weights(directory: Path) -> None:
        # `model` is the very object inside the (DDP / compiled) loss wrapper.
        save_model_files(model, tokenizer, directory, base_model=cfg_model.name, method=method, meta=run_meta)

    say(
        f"[bold]plan[/] {total_steps} steps (epoch 1: {steps_per_epoch} steps); "
        f"{world} process(es) x batch {cfg_train.batch_size} x accumulation {accum}; warmup {warmup}; "
        f"lr {cfg_train.learning_rate:g} {cfg_train.lr_scheduler}",
        highlight=False,
    )

    # ---- train ----------------------------------------------------------------------------------
    from rich.progress import TextColumn

    from tunelab.console import progress

    loss_module.train()
    history: list[dict] = []
    last_eval: float | None = state.best_eval_loss
    window_loss = window_tokens = 0.0
    window_start = time.perf_counter()
    run_start = time.perf_counter()
    tokens_this_run = 0
    stop = False
    bar = progress(TextColumn("{task.fields[info]}"), plain_every=0)  # not a terminal: a line per logging step
    bar.disable = quiet or not accelerator.is_main_process
    with bar, StopRequest(announce=accelerator.is_main_process) as stop_request:
        task = bar.add_task("training", total=total_steps, completed=state.global_step, info="")
        if has_eval and state.global_step == 0:  # the baseline every later eval is compared with
            initial = evaluate_loss(loss_module, eval_batches, accelerator)
            metrics.log({"step": 0, "eval_loss": round(initial, 6), "eval_ppl": round(math.exp(min(initial, 50)), 4)})
            history.append({"step": 0, "eval_loss": initial})
            say(f"  step 0: {task_impl.describe_eval_loss(initial)}", highlight=False)
        while state.global_step < total_steps and not stop:
            my_batches = epoch_batches(state.epoch)
            while state.batch_index + accum <= len(my_batches) and state.global_step < total_steps:
                micro = [data.collate(my_batches[state.batch_index + i], packing=cfg_data.packing) for i in range(accum)]
                global_loss, step_tokens = accumulate_gradients(loss_module, micro, accelerator, count_step_targets)
                grad_norm = None
                if cfg_train.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg_train.max_grad_norm)
                    grad_norm = float(norm) if norm is not None else None  # DeepSpeed clips inside its step
                check_finite(global_loss, grad_norm, step=state.global_step + 1, total=total_steps,
                             learning_rate=cfg_train.learning_rate, weight_decay=cfg_train.weight_decay,
                             fp16=precision.mixed_precision == "fp16",
                             checkpoints_dir=checkpoints_dir)
                optimizer_step(optimizer, scheduler, accelerator)
                state.global_step += 1
                state.batch_index += accum
                state.tokens_seen += int(step_tokens)
                tokens_this_run += int(step_tokens)
                window_loss += global_loss
                window_tokens += step_tokens
                epoch_end = state.batch_index + accum > len(my_batches)

                if state.global_step % cfg_train.logging_steps == 0 or state.global_step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": state.global_step,
                        "epoch": round(state.epoch + state.batch_index / max(len(my_batches), 1), 4),
                        "loss": round(window_loss / max(window_tokens, 1), 6),
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": round(grad_norm, 6) if grad_norm is not None else None,
                        "tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 2),
                        "tokens": state.tokens_seen,
                        "time": round(time.perf_counter() - run_start, 3),
                    }
                    metrics.log(record)
                    history.append(record)
                    bar.update(task, completed=state.global_step, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:.0f} {task_impl.RATE_UNIT}")
                    window_loss = window_tokens = 0.0
                    window_start = time.perf_counter()
                bar.update(task, completed=state.global_step)

                due = state.global_step % eval_every == 0 if eval_every else epoch_end
                if has_eval and (due or state.global_step == total_steps):
                    last_eval = evaluate_loss(loss_module, eval_batches, accelerator)
                    record = {"step": state.global_step, "eval_loss": round(last_eval, 6),
                              "eval_ppl": round(math.exp(min(last_eval, 50)), 4)}
                    metrics.log(record)
                    history.append(record)
                    say(f"  step {state.global_step}: {task_impl.describe_eval_loss(last_eval)}", highlight=False)
                    if on_eval is not None:
                        on_eval(state.global_step, last_eval)
                    if state.best_eval_loss is None or last_eval < state.best_eval_loss:
                        state.best_eval_loss = last_eval
                        state.evals_without_improvement = 0
                    else:
                        state.evals_without_improvement += 1
                        patience = cfg_train.early_stopping_patience
                        if patience and state.evals_without_improvement >= patience:
                            say(f"[yellow]early stopping[/]: no eval improvement in {patience} evaluations")
                            stop = True

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
            if not stop and state.global_step < total_steps and state.batch_index + accum > len(my_batches):
                state.epoch += 1  # an epoch too short for one step (packing plans vary), or an old checkpoint
                state.batch_index = 0

    # ---- save -----------------------------------------------------------------------------------
    seconds = time.perf_counter() - run_start
    final_dir = run_dir / "final"
    if accelerator.is_main_process:
        tmp = run_dir / ".final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_weights(tmp)
        publish_directory(tmp, final_dir)
        train_losses = [r["loss"] for r in history if "loss" in r]
        eval_record = {
            "step": state.global_step,
            "eval_loss": last_eval,
            "eval_perplexity": math.exp(min(last_eval, 50)) if last_eval is not None else None,
            "train_loss": train_losses[-1] if train_losses else None,
            "train_tokens": state.tokens_seen,
            "train_seconds": round(seconds, 3),
            "tokens_per_second": round(tokens_this_run / max(seconds, 1e-9), 2),
            "trainable_params": trainable,
            "total_params": total,
            "precision": precision.label,
            "device": str(accelerator.device),
            "num_processes": world,
        }
        eval_record.update(task_impl.final_scores(model, data, device=accelerator.device, batch_size=cfg_train.batch_size))
        write_text_atomic(run_dir / "eval.json", json.dumps(eval_record, indent=2) + "\n")
        from tunelab.evaluate import evaluate_after_training
        from tunelab.report import write_report

        ev = config.evaluation
        evaluate_after_training(  # generation metrics, when evaluation.metrics asks for some (causal LM only)
            model, tokenizer, run_dir, metrics=ev.metrics, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
            answer_regex=ev.answer_regex, limit=ev.limit, source=cfg_data.eval or (cfg_data.train if cfg_data.eval_split else None),
            split=cfg_data.eval_split or cfg_data.split, fmt=cfg_data.format,
            fields=cfg_data.fields.model_dump() if cfg_data.fields else None,
            prompt_format=run_meta.get("prompt_format", "chat"), say=say,
        )

        write_report(run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    train_losses = [r["loss"] for r in history if "loss" in r]
    return TrainResult(
        run_dir=run_dir,
        final_dir=final_dir,
        state=state,
        eval_loss=last_eval,
        train_loss=train_losses[-1] if train_losses else None,
        trainable_params=trainable,
        total_params=total,
        tokens_per_second=tokens_this_run / max(seconds, 1e-9),
        seconds=seconds,
        history=history,
        model=model,
        tokenizer=tokenizer,
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
