"""The training loss: cross-entropy over target tokens, with the vocabulary head fused in.

A causal LM's last step (hidden -> 49k-vocabulary logits -> log-softmax -> loss) is
where the big tensors live: for 2,000 tokens the fp32 logits alone are 400 MB, and
autograd keeps them, their log-softmax and their gradient alive. `linear_cross_entropy`
instead walks the target rows in small chunks and, for each chunk, computes the logits,
the loss and right away the gradient (softmax - one_hot) pushed back through the head.
Only the (rows x hidden) gradient is kept for backward; the logits buffer is about
100 MB, reused chunk after chunk.

Numerically this is the plain path: fp32 logits and softmax, the same matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows of the vocabulary head computed at once: 512 rows x 49,152 vocab x 4 B = 100 MB
# of fp32 logits, reused chunk after chunk. Measured on 1,731 rows (2-core CPU): 128 rows
# 1.69 s, 256 1.44 s, 512 1.37 s, 1024 1.29 s for forward + backward of the head.
HEAD_CHUNK_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden_i @ weight.T + bias, target_i); gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int):  # noqa: ANN001 (autograd signature)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=softmax_dtype(weight)) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=softmax_dtype(bias)) if need_bias else None
        loss = torch.zeros((), dtype=softmax_dtype(hidden), device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, t = hidden[rows], targets[rows]
            logits = F.linear(h, weight, bias).to(loss.dtype)
            # A stable log-sum-exp, done in place on the one logits buffer (no temporaries):
            # shift by the row max, exponentiate, sum; loss_i = log(sum_i) - shifted target logit.
            logits.sub_(logits.amax(dim=-1, keepdim=True))
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            sums = logits.exp_().sum(dim=-1)
            loss += (sums.log() - target_logit).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = softmax - one_hot(target), made in the same buffer.
            probs = logits.div_(sums[:, None])
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            g = probs.to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = g @ weight
            if need_weight:
                grad_weight += g.t() @ h.to(weight.dtype)
            if need_bias:
                grad_bias += probs.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_loss
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None,
            None,
        )


def softmax_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs (softmax over 49k logits needs it), float64 for float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    chunk_rows: int = HEAD_CHUNK_ROWS,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T + bias` against `targets`, never holding all logits.

    hidden: (N, d) rows to score; weight: (V, d); targets: (N,) class ids. Returns a
    float32 scalar (float64 for float64 input): the sum, not the mean, as callers
    normalise by a global token count.

    Under `torch.no_grad()` (evaluation) only the loss is computed: autograd functions see
    `needs_input_grad` from the inputs' `requires_grad` whatever the grad mode, so without
    the detach a trainable head would still get a (V x d) fp32 weight gradient per chunk.
    """
    if not torch.is_grad_enabled():
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_rows)


def plain_head_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    chunk_rows: int = HEAD_CHUNK_ROWS * 8,
) -> torch.Tensor:
    """The same sum through autograd, for heads that are not a plain `nn.Linear` (adapted,
    quantized, trainable token rows)."""
    loss = torch.zeros((), dtype=softmax_dtype(hidden), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = head(hidden[start : start + chunk_rows]).to(loss.dtype)
        loss = loss + F.cross_entropy(logits, targets[start : start + chunk_rows], reduction="sum")
    return loss


class TargetTokenLoss(torch.nn.Module):
    """Wraps a causal LM; forward returns (summed cross-entropy over target tokens, their count).

    The vocabulary head runs only at positions whose next token is a target, through
    `linear_cross_entropy`: prompt and padding positions cost no head FLOPs and the
    (batch x length x vocab) logits tensor never exists. Being a Module, it is what
    Accelerate wraps for DDP, so gradient sync still happens.

    That shortcut assumes the model's logits are `head(hidden)`. Models that transform them
    (Gemma's soft-capping, Cohere's and Granite's scaling, anything custom) are caught once
    at start-up by `head_matches_model`; for those, `use_model_logits=True` takes the
    model's own forward (full logits, more memory, always right).
    """

    def __init__(self, model: torch.nn.Module, *, fused_head: bool = True, use_model_logits: bool = False):
        super().__init__()
        self.model = model
        self.fused_head = fused_head  # False: the head through autograd (same numbers, more memory)
        self.use_model_logits = use_model_logits

    @staticmethod
    def count_targets(batch: dict[str, torch.Tensor]) -> int:
        """Target tokens in a batch (positions 1.. whose label is not ignored), known before the forward pass."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Position t predicts token t+1 (labels are aligned with input_ids, HF style).
        targets = labels[:, 1:]
        is_target = targets != IGNORE_INDEX
        target_ids = targets[is_target]
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        if self.use_model_logits:
            logits = self.model(**inputs).logits[:, :-1][is_target]
            return F.cross_entropy(logits.to(softmax_dtype(logits)), target_ids, reduction="sum"), is_target.sum()
        causal_lm = unwrap_peft(self.model)
        hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
        hidden_at_targets = hidden[:, :-1][is_target]
        head = causal_lm.get_output_embeddings()
        if self.fused_head and type(head) is torch.nn.Linear:
            loss_sum = linear_cross_entropy(hidden_at_targets, head.weight, target_ids, head.bias)
        else:
            loss_sum = plain_head_cross_entropy(hidden_at_targets, head, target_ids)
        return loss_sum, is_target.sum()


@torch.no_grad()
def head_matches_model(loss_module: TargetTokenLoss, batch: dict[str, torch.Tensor], *, rtol: float = 2e-3) -> bool:
    """Does the head shortcut give the model's own loss on this batch? (eval mode, no dropout)

    rtol 2e-3 on the mean token loss: bf16 rounding moves it by ~1e-4, while a logit
    transform (soft-capping, scaling) moves it by percents.
    """
    model = loss_module.model
    was_training = model.training
    model.eval()
    try:
        ours, count = loss_module(**batch)
        reference, _ = TargetTokenLoss(model, use_model_logits=True)(**batch)
    finally:
        model.train(was_training)
    ours, reference = float(ours) / max(int(count), 1), float(reference) / max(int(count), 1)
    return abs(ours - reference) <= rtol * abs(reference) + 1e-6


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers are injected in place)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model
