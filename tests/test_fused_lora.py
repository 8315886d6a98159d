"""The fused LoRA layer computes what peft computes: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.fused_lora import LoraLinear, dropout_keep_mask, fuse_lora_layers
from tunelab.models import add_lora


def lora_model(dropout: float, *, dtype=torch.float32):
    model = make_tiny_llama(vocab_size=300).to(dtype)
    model = add_lora(model, r=4, alpha=8, dropout=dropout)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapter path matter
            param.data.normal_(0, 0.05)
    return model


def loss_and_grads(model, input_ids, seed=7):
    torch.manual_seed(seed)  # the same dropout draws for both paths
    model.train()
    logits = model(input_ids=input_ids).logits
    loss = logits.float().logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), logits.detach(), grads


def test_fused_lora_matches_peft():
    input_ids = torch.randint(0, 300, (3, 17))
    model = lora_model(0.0)
    want_loss, want_logits, want_grads = loss_and_grads(model, input_ids)

    assert fuse_lora_layers(model) == 14  # 7 linear layers x 2 blocks
    got_loss, got_logits, got_grads = loss_and_grads(model, input_ids)

    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert set(got_grads) == set(want_grads) and len(got_grads) == 28  # every A and B
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_lora_bf16_base_with_fp32_adapters():
    """The AMX/GPU layout: frozen base in bf16, adapters fp32; gradients agree to bf16 rounding."""
    input_ids = torch.randint(0, 300, (2, 13))
    model = lora_model(0.0, dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    _, want_logits, want_grads = loss_and_grads(model, input_ids)
    fuse_lora_layers(model)
    _, got_logits, got_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=2e-2, atol=2e-2)
    for name, grad in want_grads.items():
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_fused_layers_fall_back_when_merged_or_disabled():
    input_ids = torch.randint(0, 300, (2, 9))
    model = lora_model(0.0).eval()
    fuse_lora_layers(model)
    with torch.no_grad():
        adapted = model(input_ids=input_ids).logits
        with model.disable_adapter():
            base = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged = model(input_ids=input_ids).logits
    assert (adapted - base).abs().max() > 1e-3  # the adapter changes the output ...
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)  # ... and merging keeps it


def test_fused_lora_under_autocast():
    """fp16 training on GPUs runs LoRA under autocast; CPU bf16 autocast exercises the same casts."""
    input_ids = torch.randint(0, 300, (2, 11))
    model = lora_model(0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, want_logits, want_grads = loss_and_grads(model, input_ids)
        fuse_lora_layers(model)
        _, got_logits, got_grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(got_logits.float(), want_logits.float(), rtol=3e-2, atol=3e-2)
    for name, grad in want_grads.items():
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-1, atol=1e-2, msg=name)


def test_fused_dropout_equals_the_same_mask_by_hand():
    """With dropout the layer draws its mask with `dropout_keep_mask`; given that mask it
    computes x W^T + b + s * (x * mask / (1 - p)) A^T B^T and its exact gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    weight, bias = torch.randn(7, 12), torch.randn(7)
    lora_a = torch.randn(3, 12, requires_grad=True)
    lora_b = torch.randn(7, 3, requires_grad=True)
    p, s = 0.3, 2.0

    torch.manual_seed(42)
    mask = dropout_keep_mask(torch.Size([10, 12]), p, x.device)
    want = x @ weight.t() + bias + s * ((x * mask.view(2, 5, 12) / (1 - p)) @ lora_a.t()) @ lora_b.t()
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (x, lora_a, lora_b), grad_out)

    torch.manual_seed(42)  # the layer draws the same mask
    got = LoraLinear.apply(x, weight, bias, lora_a, lora_b, s, p)
    got_grads = torch.autograd.grad(got, (x, lora_a, lora_b), grad_out)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_keep_mask_drops_a_fraction_p(p):
    torch.manual_seed(0)
    mask = dropout_keep_mask(torch.Size([1001, 999]), p, torch.device("cpu"))  # odd size: a partial last word
    assert mask.dtype == torch.bool and mask.shape == (1001, 999)
    dropped = 1 - mask.float().mean().item()
    assert abs(dropped - p) < 0.002  # 1M draws: the standard error is < 0.0005
    rows = 1 - mask.float().mean(dim=1)  # no structure along rows either (each word feeds 4 elements)
    assert rows.std().item() < 2 * (p * (1 - p) / 999) ** 0.5


def test_dropout_training_runs_fused_and_changes_with_the_seed():
    """Whole model, dropout 0.3: the fused layers train (every adapter weight gets a gradient)
    and the dropout really drops (another seed, another loss)."""
    input_ids = torch.randint(0, 300, (3, 17))
    model = lora_model(0.3)
    fuse_lora_layers(model)
    loss_a, _, grads = loss_and_grads(model, input_ids, seed=7)
    loss_b, _, _ = loss_and_grads(model, input_ids, seed=8)
    loss_a2, _, _ = loss_and_grads(model, input_ids, seed=7)
    assert len(grads) == 28 and all(g.abs().sum() > 0 for g in grads.values())
    assert loss_a != loss_b and loss_a == loss_a2
