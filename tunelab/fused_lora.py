"""LoRA linear layers as one autograd function: fewer passes over the big activations.

peft computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`. Every
piece is its own autograd node, so each layer pays, forward and backward, for a
(tokens x out_features) multiply by `scaling`, an add, and the temporaries both leave
behind; over the 210 adapted layers of SmolLM2 that is about a tenth of a CPU training
step spent streaming memory rather than multiplying matrices.

`LoraLinear` computes the same sums with the adapter folded into the matmuls:

    forward   y  = x W^T (+ b);  h = dropout(x) A^T;  y += s * h B^T      (addmm, in place)
    backward  dh = s * dy B;  dB = s * dy^T h;  dA = dh^T dropout(x);  dx = (dh A)[masked] + dy W (addmm)

so the only tensors of size (tokens x features) are the ones the matmuls write. The
frozen base weight gets no gradient (none is computed). Results equal peft's to float
rounding (tested). Dropout draws its masks from 16-bit random numbers (`dropout_keep_mask`),
4x cheaper than `bernoulli_`: the same distribution to within 2^-17, not the same draws.

`fuse_lora_layers(model)` switches a peft model's plain `lora.Linear` layers to it; any
layer in a state this path does not cover (merged, adapters disabled, several active
adapters, DoRA, a quantized or non-`nn.Linear` base) keeps peft's own forward, call by call.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F  # noqa: N812


class LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scaling * dropout(x) A^T B^T, with hand-written backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float):  # noqa: ANN001
        x2 = x.reshape(-1, x.shape[-1])
        adapter_dtype = lora_a.dtype
        xa = x2.to(adapter_dtype)
        dropped = None
        if dropout_p > 0:
            dropped = ~dropout_keep_mask(xa.shape, dropout_p, xa.device)  # negated once, used twice
            xa = xa.masked_fill(dropped, 0.0).mul_(1 / (1 - dropout_p))  # bool mask used as is: no float copy
        y = F.linear(x2, weight, bias)
        h = xa @ lora_a.t()
        if y.dtype == adapter_dtype:
            y.addmm_(h, lora_b.t(), alpha=scaling)
        else:  # bf16 base, fp32 adapters: the adapter's output is rounded once, as in peft
            y += ((h @ lora_b.t()) * scaling).to(y.dtype)
        ctx.save_for_backward(xa, h, weight, lora_a, lora_b, dropped)
        ctx.scaling, ctx.dropout_p = scaling, dropout_p
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):  # noqa: ANN001
        xa, h, weight, lora_a, lora_b, dropped = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        s = ctx.scaling
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        dy_a = dy.to(lora_a.dtype)
        dh = (dy_a @ lora_b).mul_(s)  # (tokens x r): gradient at the adapter's bottleneck
        grad_a = dh.t() @ xa if need_a else None
        # h.to: under fp16/bf16 autocast the forward's matmuls ran in half precision.
        grad_b = (dy_a.t() @ h.to(dy_a.dtype)).mul_(s) if need_b else None
        grad_bias = dy.sum(0) if need_bias else None
        grad_x = None
        if need_x:
            lora_part = dh @ lora_a  # (tokens x in): the adapter's share of dx
            if dropped is not None:
                lora_part.masked_fill_(dropped, 0.0).div_(1 - ctx.dropout_p)
            if lora_part.dtype == dy.dtype == weight.dtype:
                grad_x = lora_part.addmm_(dy, weight)  # dy W accumulated in place: no extra pass
            else:
                grad_x = (dy @ weight.to(dy.dtype)).add_(lora_part.to(dy.dtype))
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean keep-mask with P(False) = p to within 2^-17, from 16-bit random numbers.

    `bernoulli_` draws one random number per element and, on CPU, took ~16% of a LoRA
    training step with dropout (210 masks of ~1M elements). Four 16-bit uniforms cut from
    each random 64-bit word make the same mask 4x faster (measured: 2.3 vs 10 ms for
    2,056 x 576). The drop probability is rounded to a multiple of 2^-16 (0.05 -> 0.050003).
    """
    numel = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    uniform16 = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    return uniform16 >= -32768 + round(p * 65536)


def fused_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`forward` for a peft `lora.Linear`: the fused function when the layer is in the plain
    single-adapter state, peft's own forward otherwise."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    active = layer.active_adapters
    plain = (
        not args
        and not kwargs
        and not layer.disable_adapters
        and not layer.merged
        and len(active) == 1
        and active[0] in layer.lora_A
        and active[0] not in layer.lora_variant
        and type(layer.base_layer) is torch.nn.Linear
    )
    if not plain:
        return PeftLoraLinear.forward(layer, x, *args, **kwargs)
    name = active[0]
    base = layer.base_layer
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and layer.training else 0.0
    return LoraLinear.apply(
        x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], p
    )


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every plain peft `lora.Linear` of `model` through `LoraLinear`; returns how many.

    Only the instance's `forward` changes: parameters, state dict, saving and merging
    are peft's as before.
    """
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear:
            module.forward = types.MethodType(fused_forward, module)
            fused += 1
    return fused
