"""The fused LoRA layer computes what peft computes: same outputs, same gradients."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.fused_lora import fuse_lora_layers
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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_matches_peft(dropout):
    input_ids = torch.randint(0, 300, (3, 17))
    model = lora_model(dropout)
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
