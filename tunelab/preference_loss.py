"""Preference objectives: DPO, IPO, SimPO, ORPO and KTO, as (sum, count) terms plus TRL's metrics.

A preference batch holds 2B rows, the B chosen replies first and then the B rejected ones
(TRL's layout), each `prompt + reply` with the prompt masked in `labels` (-100). Everything
below starts from one number per row: the summed log-probability of its reply tokens,
`sequence_logps`, and its reply length. With z the preference score of a pair:

    dpo    z = (c - c_ref) - (r - r_ref)                      -(1-e) log s(bz) - e log s(-bz)
    ipo    z = (c - c_ref)/|c| - (r - r_ref)/|r|              (z - 1/(2b))^2
    simpo  z = c/|c| - r/|r| - gamma/b  (no reference)       -(1-e) log s(bz) - e log s(-bz)
    orpo   z = log odds(c/|c|) - log odds(r/|r|)  (no ref)   -b log s(z)   + NLL of the chosen reply
    kto    one row per example, label desirable or not:      w_d (1 - s(b(logratio - KL)))
                                                             w_u (1 - s(b(KL - logratio)))

(c, r: reply log-probabilities under the policy; s: the sigmoid; e: label smoothing, the
"conservative DPO" form; |c|: reply tokens.) These are the formulas of TRL 1.16's
DPOTrainer (sigmoid, ipo), CPOTrainer (simpo, and sigmoid with label smoothing),
ORPOTrainer and KTOTrainer; tests/test_preference_loss.py checks loss and metrics against
those trainers on the same model and batch. One deliberate difference: TRL's ORPO takes its
NLL over prompt and reply, tunelab over the reply only (the prompt is masked everywhere
else in tunelab, and in the ORPO paper's L_SFT).

The returned terms are sums with their counts, so the training loop can make each one an
exact mean over a whole optimizer step (accumulation and processes): the preference term
counts pairs (KTO: examples), the `sft` term (an NLL on the chosen reply, `sft_weight`
inside the sum) counts chosen reply tokens. Metrics are (sum, count) too, named as TRL
names them: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}.

The vocabulary head: DPO's gradient per row is known only once both replies of a pair are
summed, so the fused cross-entropy of tunelab/loss.py (which bakes a uniform gradient into
its forward) does not apply. `linear_target_logprobs` is its per-row sibling: it returns
each target token's log-probability without keeping (tokens x vocab) logits; for a frozen
head (LoRA) it stores d logp / d hidden per row in forward and scales it by the incoming
gradient in backward; a trainable head recomputes the logits chunk by chunk in backward.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812

from tunelab.loss import HEAD_CHUNK_ROWS, IGNORE_INDEX, softmax_dtype, unwrap_peft

LossName = Literal["dpo", "ipo", "simpo", "orpo", "kto"]
LOSSES: tuple[str, ...] = ("dpo", "ipo", "simpo", "orpo", "kto")
# Losses that compare the policy with a reference model (the others are reference-free).
NEEDS_REFERENCE: frozenset[str] = frozenset({"dpo", "ipo", "kto"})

Terms = dict[str, tuple[torch.Tensor, torch.Tensor | int]]
Metrics = dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]


# --- per-token log-probabilities through the vocabulary head -------------------------------


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, t: torch.Tensor, dtype: torch.dtype):
    """(log-prob of each target, softmax - one_hot) for one chunk of rows; the second in the logits buffer."""
    logits = F.linear(h, weight, bias).to(dtype)
    logits.sub_(logits.amax(dim=-1, keepdim=True))
    target_logit = logits.gather(1, t[:, None]).squeeze(1)
    sums = logits.exp_().sum(dim=-1)
    logp = target_logit - sums.log()
    probs = logits.div_(sums[:, None])
    probs[torch.arange(len(t), device=t.device), t] -= 1.0
    return logp, probs


class _LinearTargetLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[i, targets[i]] per row, never holding all logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int):  # noqa: ANN001 (autograd signature)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = softmax_dtype(hidden)
        logps = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        # Frozen head: d logp_i / d hidden_i = (one_hot - softmax_i) @ W is stored per row now
        # (rows x hidden, small) and only scaled by the incoming gradient in backward. A
        # trainable head needs sum_i g_i (one_hot - softmax_i)^T h_i, which depends on g, so
        # backward recomputes the logits instead.
        recompute = need_weight or need_bias
        direction = torch.empty_like(hidden) if need_hidden and not recompute else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logp, probs = _chunk_logprobs(hidden[rows], weight, bias, targets[rows], dtype)
            logps[rows] = logp
            if direction is not None:
                direction[rows] = -(probs.to(weight.dtype) @ weight)
        if recompute:
            ctx.save_for_backward(hidden, weight, bias, targets)
        else:
            ctx.save_for_backward(direction)
        ctx.recompute, ctx.chunk_rows = recompute, chunk_rows
        return logps

    @staticmethod
    def backward(ctx, grad_logps):  # noqa: ANN001
        if not ctx.recompute:
            (direction,) = ctx.saved_tensors
            grad_hidden = None if direction is None else direction * grad_logps[:, None].to(direction.dtype)
            return grad_hidden, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        dtype = softmax_dtype(hidden)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=softmax_dtype(weight)) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=softmax_dtype(bias)) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows]
            _, probs = _chunk_logprobs(h, weight, bias, targets[rows], dtype)
            g = probs.mul_(-grad_logps[rows, None].to(dtype))  # d loss / d logits of these rows
            if need_hidden:
                grad_hidden[rows] = g.to(weight.dtype) @ weight
            if need_weight:
                grad_weight += g.t() @ h.to(grad_weight.dtype)
            if need_bias:
                grad_bias += g.sum(0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def linear_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int = HEAD_CHUNK_ROWS,
) -> torch.Tensor:
    """Log-probability of `targets[i]` under `hidden[i] @ weight.T + bias`, per row (float32).

    hidden: (N, d); weight: (V, d); targets: (N,). The (N x V) logits are never held: 512
    rows at a time (tunelab/loss.py's measured chunk size) in one reused buffer.
    """
    if not torch.is_grad_enabled():  # see tunelab.loss.linear_cross_entropy: no weight gradient buffers
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _LinearTargetLogprobs.apply(hidden, weight, bias, targets, chunk_rows)


def sequence_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    fused_head: bool = True,
    use_model_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its target tokens (labels != -100), and their count.

    Position t predicts token t+1 (labels aligned with input_ids). The head runs only at
    target positions. `use_model_logits` takes the model's own logits (for models that
    transform them, e.g. soft-capping; more memory); `fused_head=False` runs the head
    through autograd (same numbers).
    """
    targets = labels[:, 1:]
    is_target = targets != IGNORE_INDEX
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(targets)[is_target]
    target_ids = targets[is_target]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if use_model_logits:
        logits = model(**inputs).logits[:, :-1][is_target]
        token_logps = torch.log_softmax(logits.to(softmax_dtype(logits)), dim=-1).gather(1, target_ids[:, None]).squeeze(1)
    else:
        causal_lm = unwrap_peft(model)
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state[:, :-1][is_target]
        head = causal_lm.get_output_embeddings()
        if fused_head and type(head) is torch.nn.Linear:
            token_logps = linear_target_logprobs(hidden, head.weight, target_ids, head.bias)
        else:
            logits = head(hidden).to(softmax_dtype(hidden))
            token_logps = torch.log_softmax(logits, dim=-1).gather(1, target_ids[:, None]).squeeze(1)
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    return sums, is_target.sum(dim=1)


# --- the objectives ------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler's split)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid_loss(z: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """-(1-e) log s(b z) - e log s(-b z): the preference flipped with probability e (cDPO)."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * z) - label_smoothing * F.logsigmoid(-beta * z)


def pair_terms(
    loss: str,
    logps: torch.Tensor,
    tokens: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
) -> tuple[Terms, Metrics]:
    """Terms and metrics of a paired loss (dpo, ipo, simpo, orpo) over 2B rows [chosen; rejected].

    logps / tokens: per-row reply log-probability sums and reply token counts
    (`sequence_logps`); ref_logps: the same rows under the reference model (dpo, ipo).
    Returns ({loss: (sum over pairs, pairs), "sft": (sft_weight * chosen NLL sum, chosen
    tokens)}, metrics as (sum, count)). The sft term is present when sft_weight > 0.
    """
    if loss not in ("dpo", "ipo", "simpo", "orpo"):
        raise ValueError(f"not a paired preference loss: {loss!r}")
    chosen, rejected = logps.chunk(2)
    n_chosen, n_rejected = (count.clamp(min=1).to(logps.dtype) for count in tokens.chunk(2))
    pairs = chosen.shape[0]
    extra: Metrics = {}
    if loss in ("dpo", "ipo"):
        if ref_logps is None:
            raise ValueError(f"{loss} needs reference log-probabilities")
        ref_chosen, ref_rejected = ref_logps.to(logps.dtype).chunk(2)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if loss == "dpo":
            losses = _smoothed_sigmoid_loss(chosen_ratio - rejected_ratio, beta, label_smoothing)
        else:  # IPO on per-token log-ratios, as TRL (confirmed with the IPO authors, dpo_trainer.py)
            losses = (chosen_ratio / n_chosen - rejected_ratio / n_rejected - 1 / (2 * beta)) ** 2
        shown_chosen, shown_rejected = chosen, rejected
        chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    else:  # reference-free: length-normalised log-probabilities
        mean_chosen, mean_rejected = chosen / n_chosen, rejected / n_rejected
        if loss == "simpo":
            losses = _smoothed_sigmoid_loss(mean_chosen - mean_rejected - simpo_gamma / beta, beta, label_smoothing)
        else:  # orpo: log odds(p) = log p - log(1 - p), p the per-token mean probability
            log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen) - log1mexp(mean_rejected))
            log_sigmoid = F.logsigmoid(log_odds)
            losses = -beta * log_sigmoid
            extra = {
                "log_odds_ratio": (log_sigmoid.detach().sum(), pairs),
                "log_odds_chosen": (log_odds.detach().sum(), pairs),
            }
        shown_chosen, shown_rejected = mean_chosen, mean_rejected
        chosen_rewards, rejected_rewards = beta * mean_chosen.detach(), beta * mean_rejected.detach()
    terms: Terms = {loss: (losses.sum(), pairs)}
    if sft_weight > 0:
        terms["sft"] = (-sft_weight * chosen.sum(), tokens.chunk(2)[0].sum())
    metrics: Metrics = {
        "rewards/chosen": (chosen_rewards.sum(), pairs),
        "rewards/rejected": (rejected_rewards.sum(), pairs),
        "rewards/accuracies": ((chosen_rewards > rejected_rewards).sum().to(logps.dtype), pairs),
        "rewards/margins": ((chosen_rewards - rejected_rewards).sum(), pairs),
        "logps/chosen": (shown_chosen.detach().sum(), pairs),
        "logps/rejected": (shown_rejected.detach().sum(), pairs),
        **extra,
    }
    return terms, metrics


def kto_terms(
    logps: torch.Tensor,
    tokens: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    sft_weight: float = 0.0,
) -> tuple[Terms, Metrics]:
    """KTO's terms over B rows, each one prompt + completion labelled desirable (True) or not.

    `kl`: the reference point, an estimate of KL(policy || reference) from mismatched
    prompt/completion pairs, computed without gradient over the whole optimizer step
    (`kto_reference_point`) and clamped at 0 as in TRL. The sft term is the NLL of the
    desirable completions.
    """
    desirable = desirable.bool()
    ratio = logps - ref_logps.to(logps.dtype)
    kl = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards = beta * ratio.detach()
    n_good, n_bad = int(desirable.sum()), int((~desirable).sum())
    terms: Terms = {"kto": (losses.sum(), desirable.numel())}
    if sft_weight > 0:
        terms["sft"] = (-sft_weight * logps[desirable].sum(), tokens[desirable].sum())
    metrics: Metrics = {"kl": (float(kl), 1)}
    if n_good:
        metrics["rewards/chosen"] = (rewards[desirable].sum(), n_good)
        metrics["logps/chosen"] = (logps[desirable].detach().sum(), n_good)
    if n_bad:
        metrics["rewards/rejected"] = (rewards[~desirable].sum(), n_bad)
        metrics["logps/rejected"] = (logps[~desirable].detach().sum(), n_bad)
    if n_good and n_bad:  # TRL: the difference of this batch's two means
        margin = rewards[desirable].mean() - rewards[~desirable].mean()
        metrics["rewards/margins"] = (margin, 1)
    return terms, metrics


def kto_mismatched_rows(n: int) -> list[int]:
    """For KTO's KL estimate: row i's prompt is paired with row i-1's completion (TRL's rotation)."""
    return [(i - 1) % n for i in range(n)]
