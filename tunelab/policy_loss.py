"""The GRPO objective: group-relative advantages and the clipped policy-gradient loss.

The maths follows TRL's `GRPOTrainer` (names included: `loss_type` grpo / dapo / dr_grpo,
`epsilon` / `epsilon_high`, `beta`, `scale_rewards`) and is tested against it. It is written
as named (sum, count) terms, the shape the training loop normalises across gradient
accumulation and processes, so each loss type's normaliser is a count:

    grpo     mean over completions of each completion's mean token loss
             sum = sum_i mean_t(loss_it), count = completions
    dapo     mean over every completion token of the global batch
             sum = sum_it loss_it,        count = completion tokens
    dr_grpo  sum over tokens / (completions * max_completion_length), no length bias
             sum = sum_it loss_it,        count = completions * max_completion_length

Shapes: B completions (prompts x num_generations), T completion positions; `mask` is 1 on a
completion's real tokens (up to and including its end-of-sequence token), 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tunelab.errors import TunelabError

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # added to the std before dividing, as TRL does: a zero-std group gets 0


def completion_logps(logits: Tensor, completion_ids: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the sampled tokens and the entropies, in nats, (B, T) each.

    `logits` are the model's logits at the positions that predict the completion tokens
    (B, T, vocab), divided here by the sampling temperature, as the sampler saw them.
    """
    scaled = logits.float() / temperature
    log_probs = scaled.log_softmax(dim=-1)
    chosen = log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return chosen, entropy


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> tuple[Tensor, Tensor]:
    """Advantages of B = prompts x num_generations rewards, and which rows had zero reward std.

    Each reward minus its group's mean; divided by the group's std ("group", GRPO), the whole
    batch's std ("batch") or nothing ("none", Dr. GRPO). Rows are grouped consecutively: the
    `num_generations` completions of one prompt are adjacent. A group whose completions all
    scored the same has advantage 0: it teaches nothing (`frac_reward_zero_std`).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise TunelabError(f"grpo.scale_rewards must be one of {', '.join(SCALE_REWARDS)}, not {scale_rewards!r}")
    if rewards.numel() % num_generations:
        raise TunelabError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    groups = rewards.view(-1, num_generations)
    mean = groups.mean(dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = groups.std(dim=1).repeat_interleave(num_generations) if num_generations > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + STD_EPSILON)
    return advantages, torch.isclose(std, torch.zeros_like(std))


@dataclass(frozen=True)
class PolicyLossSettings:
    """The objective's knobs, with TRL's names and meanings."""

    loss_type: str = "dapo"
    epsilon: float = 0.2               # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip (DAPO's clip-higher); None = epsilon
    beta: float = 0.0                  # weight of the k3 KL estimate to the reference policy
    max_completion_length: int = 128   # dr_grpo's fixed normaliser (tokens per completion)
    # Multiply the KL estimate by the importance ratio so its gradient is unbiased when the
    # rollout policy is stale (num_iterations > 1); TRL's `use_bias_correction_kl`, on by default.
    use_bias_correction_kl: bool = True


def policy_term_counts(mask: Tensor, settings: PolicyLossSettings) -> int:
    """The count the "policy" term is normalised by, known before the forward (see module doc)."""
    completions = mask.shape[0]
    if settings.loss_type == "grpo":
        return completions
    if settings.loss_type == "dapo":
        return int(mask.sum())
    if settings.loss_type == "dr_grpo":
        return completions * settings.max_completion_length
    raise TunelabError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, not {settings.loss_type!r}")


def policy_loss_terms(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: PolicyLossSettings,
    *,
    ref_logps: Tensor | None = None,
    entropy: Tensor | None = None,
) -> tuple[dict[str, tuple[Tensor, int]], dict[str, tuple[Tensor, Tensor]]]:
    """The clipped surrogate loss as one (sum, count) term, and TRL's metrics as (sum, count).

    ratio = exp(logps - old_logps) per token; loss = -min(ratio * A, clip(ratio) * A), plus
    beta * KL(policy || reference) by the k3 estimator when beta > 0. With one optimizer step
    per rollout (num_iterations 1), old_logps are the live logps detached and the ratio is 1:
    the gradient is then the plain policy gradient A * grad(log p).
    Metrics: `kl`, `entropy`, `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    `clip_ratio/region_mean`, each a mean over completion tokens.
    """
    mask = mask.to(logps.dtype)
    low = 1 - settings.epsilon
    high = 1 + (settings.epsilon if settings.epsilon_high is None else settings.epsilon_high)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, low, high) * adv)
    metrics: dict[str, tuple[Tensor, Tensor]] = {}
    tokens = mask.sum()
    if settings.beta != 0.0:
        if ref_logps is None:
            raise TunelabError("grpo.beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if settings.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + settings.beta * kl
        metrics["kl"] = ((kl * mask).sum().detach(), tokens)
    if entropy is not None:
        metrics["entropy"] = ((entropy * mask).sum().detach(), tokens)
    low_clipped = ((ratio < low) & (adv < 0)).to(logps.dtype)
    high_clipped = ((ratio > high) & (adv > 0)).to(logps.dtype)
    metrics["clip_ratio/low_mean"] = ((low_clipped * mask).sum().detach(), tokens)
    metrics["clip_ratio/high_mean"] = ((high_clipped * mask).sum().detach(), tokens)
    metrics["clip_ratio/region_mean"] = (((low_clipped + high_clipped).clamp(max=1) * mask).sum().detach(), tokens)

    count = policy_term_counts(mask, settings)
    if settings.loss_type == "grpo":
        total = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    else:
        total = (per_token * mask).sum()
    return {"policy": (total, count)}, metrics
