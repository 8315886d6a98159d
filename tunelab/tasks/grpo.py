"""Learning from rewards (GRPO): sample answers, score them with programs, reinforce the better ones.

Each optimizer step, `make_batches` takes the step's planned prompts and, with the live policy,
samples `grpo.num_generations` completions per prompt through the one generation engine
(tunelab/engine.py: batched, finished rows leave at once), scores them with the configured
rewards (tunelab/rewards.py), and turns each prompt's group of rewards into advantages
(tunelab/policy_loss.py). The micro-batches it returns hold prompt + completion tokens and the
advantages; the loss is TRL's clipped surrogate for `grpo.loss_type`. Precision,
accumulation, clipping, schedule, checkpoints, resume and logging are the shared loop's.

Sampling is seeded from (training.seed, step, rank, completion index), so a resumed run draws
the very completions the uninterrupted one drew, and the training RNG is left alone.
Evaluation: one greedy completion per eval prompt; `eval_reward` selects the best checkpoint
(higher is better).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.config import RunConfig
from tunelab.console import console
from tunelab.data.packing import plan_batches
from tunelab.data.prompts import Prompt, read_prompts
from tunelab.data.sources import DataStats
from tunelab.policy_loss import PolicyLossSettings, completion_logps, group_advantages, policy_loss_terms, policy_term_counts
from tunelab.rewards import RewardSpec, score
from tunelab.tasks import LossOutput, Selection, StepBatches, StepInfo, Units
from tunelab.tasks import causal_lm

PEFT_TASK_TYPE = "CAUSAL_LM"
DEFAULT_MODEL = causal_lm.DEFAULT_MODEL
# Throughput counts the policy term's normaliser: completion tokens for the default dapo loss
# (completions for grpo, completion-token slots for dr_grpo).
UNITS = Units(term="policy", key="targets", label="policy-loss targets", rate="targets/s")
SELECT = Selection("eval_reward", higher_is_better=True)
resolve_source = causal_lm.resolve_source
load_model = causal_lm.load_model
ROLLOUT_SAMPLES = 4  # completions per logged step written to RUN/rollouts.jsonl


def needs_chat_template(config: RunConfig) -> bool:  # noqa: ARG001
    return True  # prompts are conversations, rendered with their generation prompt


# --- data ----------------------------------------------------------------------------------


@dataclass
class PromptData:
    """The run's prompts with reference answers; a batch plan over prompts (each planned prompt
    becomes `num_generations` completions when the step samples)."""

    train: list[Prompt]
    eval: list[Prompt]
    tokenizer: object
    settings: object  # config.grpo
    stats: DataStats = field(default_factory=DataStats)
    zero_std_steps: int = 0  # consecutive training steps with >90% zero-std groups
    warned_clipped: bool = False

    def summary(self) -> str:
        skipped = f" ({self.stats.invalid_skipped} invalid skipped)" if self.stats.invalid_skipped else ""
        return (f"train: {len(self.train)} prompts{skipped}; eval {len(self.eval)} prompts; "
                f"{self.settings.num_generations} completions per prompt, at most {self.settings.max_completion_length} tokens")

    def epoch_plan(self, batch_size: int, *, seed: int, epoch: int) -> list:
        """Micro-batches of `batch_size` prompts, shuffled per (seed, epoch)."""
        return plan_batches([len(p) for p in self.train], batch_size, seed=seed, epoch=epoch, by_length=False)

    def eval_plan(self, batch_size: int) -> list:
        return plan_batches([len(p) for p in self.eval], batch_size, seed=0, epoch=0, shuffle=False,
                            by_length=False) if self.eval else []


def _indices(item) -> list[int]:
    """The prompt indices of one planned micro-batch (rows of indices, one per row)."""
    return [int(i) for row in item for i in (row if isinstance(row, (list, tuple)) else [row])]


def build_data(config: RunConfig, tokenizer, *, say=console.print) -> PromptData:
    """Prompts + references from data.train (and data.eval, or an eval_fraction split)."""
    from tunelab.data.pipeline import split_examples

    d, g = config.data, config.grpo
    need_number = any(r.name == "correct" for r in g.rewards)
    common = dict(fmt=d.format, fields=d.fields.model_dump() if d.fields else None, hf_config=d.hf_config,
                  system_prompt=d.system_prompt, reference_field=g.reference_field,
                  max_prompt_tokens=max(8, d.max_seq_length - g.max_completion_length), need_number=need_number,
                  skip_invalid=d.skip_invalid)
    stats = DataStats()
    train = read_prompts(d.train, tokenizer, split=d.split, limit=d.limit, stats=stats, **common)
    if d.eval is not None or d.eval_split is not None:
        evals = read_prompts(d.eval or d.train, tokenizer, split=d.eval_split or d.split, **common)
    else:
        train, evals = split_examples(train, eval_fraction=d.eval_fraction, seed=config.training.seed)
    if config.evaluation.limit is not None:
        evals = evals[: config.evaluation.limit]
    return PromptData(train=list(train), eval=list(evals), tokenizer=tokenizer, settings=g, stats=stats)


# --- rollouts ------------------------------------------------------------------------------------


def _sampling_seed(step: StepInfo, index: int) -> int:
    """A distinct, reproducible seed per (run seed, step, rank, completion)."""
    return (step.seed * 1_000_003 + step.step * 10_007 + step.rank * 101 + index) % (2**63 - 1)


def sample_completions(model, tokenizer, prompts: list[Prompt], *, copies: int, settings, step: StepInfo):
    """`copies` completions of every prompt (a prompt's copies adjacent), from the live policy.

    Training samples at grpo.temperature / top_p; evaluation decodes greedily. The model is
    put in eval mode (no dropout) for sampling and back in train mode after.
    """
    from tunelab.engine import Engine, SamplingParams

    was_training = model.training
    requests, params = [], []
    for p_index, prompt in enumerate(prompts):
        for copy in range(copies):
            requests.append(prompt.ids)
            params.append(SamplingParams(
                max_new_tokens=settings.max_completion_length,
                temperature=settings.temperature if step.training else 0.0,
                top_p=settings.top_p, seed=_sampling_seed(step, p_index * copies + copy)))
    model.eval()  # no dropout while sampling: the completions come from the policy itself
    engine = Engine(model, tokenizer, max_batch_size=len(requests))
    try:
        with torch.no_grad():
            results = engine.generate(requests, params)
    finally:
        engine.close()
        model.train(was_training)
    return results


def _pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def rollout_batch(prompts: list[Prompt], completions: list[list[int]], advantages: torch.Tensor, pad_id: int):
    """One micro-batch: left-padded prompts then right-padded completions, with each row's
    position ids counted over its real tokens (as the sampler saw them)."""
    from tunelab.generate import left_pad

    copies = len(completions) // len(prompts)
    prompt_ids, prompt_mask = left_pad([p.ids for p in prompts for _ in range(copies)], pad_id)
    completion_ids, completion_mask = _pad_right(completions, pad_id)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": attention,
        "position_ids": (attention.cumsum(1) - 1).clamp(min=0),
        "completion_mask": completion_mask,
        "advantages": advantages.float(),
    }


def make_batches(data: PromptData, items: list, model, step: StepInfo) -> StepBatches:
    """Sample, score and batch one step's prompts (training) or one eval item (greedy, 1 each)."""
    settings = data.settings
    copies = settings.num_generations if step.training else 1
    pool = data.train if step.training else data.eval
    specs = [RewardSpec(r.name, r.weight) for r in settings.rewards]
    pad_id = data.tokenizer.pad_token_id if data.tokenizer.pad_token_id is not None else 0
    micro, metrics, samples = [], {}, []
    started, generated = time.perf_counter(), 0
    for item in items:
        prompts = [pool[i] for i in _indices(item)]
        results = sample_completions(model, data.tokenizer, prompts, copies=copies, settings=settings, step=step)
        completions = [r.token_ids for r in results]
        lengths = [len(c) for c in completions]
        generated += sum(lengths)
        texts = [r.text for r in results]
        scores = score(specs, [p.text for p in prompts for _ in range(copies)], texts,
                       [p.reference for p in prompts for _ in range(copies)],
                       completion_lengths=lengths, max_completion_length=settings.max_completion_length)
        rewards = torch.tensor(scores.total)
        advantages, zero_std = group_advantages(rewards, copies, settings.scale_rewards)
        batch = rollout_batch(prompts, [c or [pad_id] for c in completions], advantages, pad_id)
        batch["completion_mask"][[i for i, c in enumerate(completions) if not c], 0] = 0  # an empty completion trains nothing
        if settings.beta:
            batch["ref_logps"] = reference_logps(model, batch, settings.temperature)
        micro.append(batch)
        _add(metrics, "reward", sum(scores.total), len(texts))
        for name, values in scores.per_function.items():
            _add(metrics, f"rewards/{name}", sum(values), len(values))
        if copies > 1:
            stds = rewards.view(-1, copies).std(dim=1)
            _add(metrics, "reward_std", float(stds.sum()), len(stds))
            _add(metrics, "frac_reward_zero_std", float(zero_std.view(-1, copies)[:, 0].sum()), len(stds))
        _add(metrics, "completions/mean_length", sum(lengths), len(lengths))
        clipped = sum(r.finish_reason == "length" for r in results)
        _add(metrics, "completions/clipped_ratio", clipped, len(results))
        samples += [{"prompt": prompts[i // copies].text, "completion": texts[i], "reference": prompts[i // copies].reference,
                     "reward": scores.total[i], **{f"rewards/{k}": v[i] for k, v in scores.per_function.items()}}
                    for i in range(min(len(texts), ROLLOUT_SAMPLES - len(samples)))]
    if step.training:
        _add(metrics, "rollout_tokens_per_s", generated / max(time.perf_counter() - started, 1e-9), 1)
        log_rollouts(data, step, samples)
        if step.rank == 0:
            warn_about_rollouts(data, metrics)
    return StepBatches(micro, metrics)


def _add(metrics: dict, name: str, total: float, count: float) -> None:
    old_total, old_count = metrics.get(name, (0.0, 0.0))
    metrics[name] = (old_total + float(total), old_count + float(count))


def reference_logps(model, batch: dict, temperature: float) -> torch.Tensor:
    """Completion log-probs under the reference policy: the same model with its adapters off
    (no second copy in memory). Only for `grpo.beta > 0` with an adapter method."""
    with torch.no_grad(), model.disable_adapter():
        logits = completion_logits(model, batch)
    return completion_logps(logits, batch["input_ids"][:, -batch["completion_mask"].shape[1]:], temperature)[0]


def log_rollouts(data: PromptData, step: StepInfo, samples: list[dict]) -> None:
    """Every `grpo.log_completions_steps` steps, a few sampled completions with their rewards
    go to RUN/rollouts.jsonl (report.html and the UI's Runs tab show them)."""
    every = data.settings.log_completions_steps
    if step.rank != 0 or step.run_dir is None or not every or (step.step + 1) % every:
        return
    with open(step.run_dir / "rollouts.jsonl", "a", encoding="utf-8") as out:
        for sample in samples:
            out.write(json.dumps({"step": step.step + 1, **sample}, ensure_ascii=False) + "\n")


# --- loss ------------------------------------------------------------------------------------------


def completion_logits(model, batch: dict) -> torch.Tensor:
    """Logits at the positions that predict each completion token (B, T, vocab): only the last
    T + 1 positions go through the output head (`logits_to_keep`), not the prompt's."""
    width = batch["completion_mask"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=width + 1, use_cache=False)
    return out.logits[:, :-1]


class GrpoLoss(torch.nn.Module):
    """The clipped policy-gradient loss on sampled completions, one term "policy"."""

    def __init__(self, model: torch.nn.Module, settings: PolicyLossSettings, temperature: float):
        super().__init__()
        self.model = model
        self.settings = settings
        self.temperature = temperature

    def count_targets(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"policy": policy_term_counts(batch["completion_mask"], self.settings)}

    def forward(self, **batch: torch.Tensor) -> LossOutput:
        width = batch["completion_mask"].shape[1]
        logps, entropy = completion_logps(completion_logits(self.model, batch), batch["input_ids"][:, -width:],
                                          self.temperature)
        # One optimizer step per rollout: the sampling policy is the live one, so the ratio is 1
        # and the gradient is the policy gradient A * grad(log p).
        terms, metrics = policy_loss_terms(logps, logps.detach(), batch["advantages"], batch["completion_mask"],
                                           self.settings, ref_logps=batch.get("ref_logps"), entropy=entropy.detach())
        return LossOutput(terms, metrics)


def loss_module(model: torch.nn.Module, *, data: PromptData, run_dir: Path | None = None, say=print) -> GrpoLoss:  # noqa: ARG001
    g = data.settings
    settings = PolicyLossSettings(loss_type=g.loss_type, epsilon=g.epsilon, epsilon_high=g.epsilon_high, beta=g.beta,
                                  max_completion_length=g.max_completion_length)
    return GrpoLoss(model, settings, g.temperature)


# --- metrics and the saved run ---------------------------------------------------------------------


def eval_record(means: dict[str, float]) -> dict[str, float]:  # noqa: ARG001
    return {}  # eval_reward and the per-reward means come from make_batches' metrics


def run_meta(data: PromptData) -> dict:  # noqa: ARG001
    return {"prompt_format": "chat"}


def final_scores(model, data: PromptData, *, config: RunConfig, tokenizer, run_dir: Path, device, say=print) -> dict:  # noqa: ARG001
    """The configured generation metrics (e.g. exact_match) on the eval data, as for SFT runs
    (`evaluation.metrics`; saved under run_dir/eval/ and merged into eval.json)."""
    from tunelab.config import GENERATION_METRICS
    from tunelab.evaluate import evaluate_after_training

    d, ev = config.data, config.evaluation
    if not any(m in GENERATION_METRICS for m in ev.metrics):
        return {}
    evaluate_after_training(
        model, tokenizer, run_dir, metrics=ev.metrics, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
        answer_regex=ev.answer_regex, limit=ev.limit, source=d.eval or (d.train if d.eval_split else None),
        split=d.eval_split or d.split, fmt=d.format, fields=d.fields.model_dump() if d.fields else None,
        prompt_format="chat", say=say,
    )
    return {}


ZERO_STD_PATIENCE = 20  # steps in a row with >90% zero-std groups before warning (TRL users' rule of thumb)


def warn_about_rollouts(data: PromptData, metrics: dict, say=console.print) -> None:
    """The two signs that a GRPO run cannot learn: prompt groups whose rewards never differ
    (steps in a row), and completions cut at the length limit (a cut answer states no result)."""
    total, count = metrics.get("frac_reward_zero_std", (0.0, 0.0))
    data.zero_std_steps = data.zero_std_steps + 1 if count and total / count > 0.9 else 0
    if data.zero_std_steps == ZERO_STD_PATIENCE:
        say(f"[yellow]warning[/]: for {ZERO_STD_PATIENCE} steps over 90% of prompt groups got identical rewards (no "
            "learning signal): the problems are too hard or too easy for this model; change the data's difficulty "
            "or raise grpo.num_generations", highlight=False)
    clipped, n = metrics.get("completions/clipped_ratio", (0.0, 0.0))
    if n and clipped / n > 0.3 and not data.warned_clipped:
        data.warned_clipped = True
        say(f"[yellow]warning[/]: {clipped / n:.0%} of completions hit grpo.max_completion_length "
            f"({data.settings.max_completion_length} tokens); raise it, or add the `length` reward", highlight=False)
