"""The fused head + cross-entropy gives the plain path's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.loss import TargetTokenLoss, head_matches_model, linear_cross_entropy


def reference_sum(hidden, weight, targets, bias=None):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_plain_in_float64(with_bias):
    """Chunks of 8 over 37 rows (a ragged last chunk): loss and all three gradients match."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (37,))

    fused = linear_cross_entropy(hidden, weight, targets, bias, chunk_rows=8)
    (fused * 0.5).backward()  # a non-unit upstream gradient must scale every gradient
    got = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    expected = reference_sum(hidden, weight, targets, bias)
    (expected * 0.5).backward()
    want = [t.grad for t in (hidden, weight, bias) if t is not None]

    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_frozen_weight_gets_no_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)  # frozen, as a LoRA base model's head
    linear_cross_entropy(hidden, weight, torch.tensor([0, 3, 10, 2, 2])).backward()
    assert weight.grad is None and hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_linear_cross_entropy_without_grad_only_scores():
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(9, 8), torch.randn(11, 8), torch.randint(0, 11, (9,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    torch.testing.assert_close(loss, reference_sum(hidden, weight, targets))


def test_linear_cross_entropy_keeps_a_float32_softmax_for_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, 11, (6,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    loss.backward()
    expected = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
    assert loss.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected)


def test_target_token_loss_fused_equals_plain_on_tiny_llama(tiny_llama):
    """Same batch through the fused head and through autograd's head (the fallback path):
    equal loss and equal gradients for every trainable weight, the tied embedding included."""
    model = tiny_llama.double()
    torch.manual_seed(3)
    ids = torch.randint(3, 1000, (3, 24))
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    labels[1, 17:] = -100

    def loss_and_grads(module):
        model.zero_grad(set_to_none=True)
        loss_sum, count = module(input_ids=ids, labels=labels, attention_mask=mask)
        (loss_sum / count).backward()
        return loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused = TargetTokenLoss(model)
    plain = TargetTokenLoss(model, fused_head=False)
    fused_loss, fused_grads = loss_and_grads(fused)
    plain_loss, plain_grads = loss_and_grads(plain)
    torch.testing.assert_close(fused_loss.double(), plain_loss.double(), rtol=1e-7, atol=1e-7)
    assert fused_grads.keys() == plain_grads.keys() and "model.embed_tokens.weight" in fused_grads
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-9, atol=1e-11)


def test_a_model_that_transforms_its_logits_is_caught_and_trained_on_its_own_logits(tiny_llama):
    """The fused head assumes logits == head(hidden). A model whose forward changes them (here:
    scaled by 1/4, as Granite does) must be detected by the start-up check, and the loss must
    then be the model's own cross-entropy."""
    from transformers import LlamaForCausalLM

    class ScaledLogitsLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits / 4.0
            return out

    with torch.no_grad():  # logits of a few units, as in a trained model (random init gives ~0.01)
        tiny_llama.lm_head.weight.mul_(30.0)
    scaled = ScaledLogitsLlama(tiny_llama.config)
    scaled.load_state_dict(tiny_llama.state_dict())
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (2, 16))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels}

    assert head_matches_model(TargetTokenLoss(tiny_llama), batch)
    loss_module = TargetTokenLoss(scaled)
    assert not head_matches_model(loss_module, batch)
    loss_module.use_model_logits = True
    loss_sum, count = loss_module(**batch)
    expected = F.cross_entropy(scaled(input_ids=ids).logits[:, :-1].reshape(-1, 49152), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(loss_sum / count, expected)

    # The causal-LM task makes this choice at start-up from one real batch, and says so.
    from tunelab.tasks import causal_lm

    notes = []
    assert not causal_lm.target_token_loss(tiny_llama, probe=batch, say=notes.append).use_model_logits and not notes
    assert causal_lm.target_token_loss(scaled, probe=batch, say=notes.append).use_model_logits
    assert notes and "transforms its logits" in notes[0]


def test_no_grad_evaluation_computes_no_head_gradient():
    """Under no_grad the fused head must do the forward matmuls only: before the fix it also
    built a (V x d) weight gradient (one extra matmul per chunk) for a trainable head."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "matmul"):
                CountMatmuls.calls += 1
            return func(*args, **(kwargs or {}))

    weight = torch.randn(50, 8, requires_grad=True)
    hidden = torch.randn(12, 8, requires_grad=True)
    targets = torch.randint(0, 50, (12,))
    with torch.no_grad(), CountMatmuls():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    assert CountMatmuls.calls == 3  # one logits matmul per chunk of 4 rows, nothing else
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"))


def test_fast_path_equals_transformers_loss_on_the_real_model(bundled_dir, tokenizer, gsm8k_dir):
    """Truth check on SmolLM2-135M with LoRA: the training loss path (causal-only batch with
    the mask dropped, fused head) gives transformers' own loss on the masked batch, and the
    same LoRA gradients."""
    import json

    from tunelab.data.dataset import causal_only
    from tunelab.data.packing import collate
    from tunelab.data.render import TokenizedExample
    from tunelab.data.sources import Location
    from tunelab.fused_lora import fuse_lora_layers
    from tunelab.models import add_lora, load_base_model

    model = add_lora(load_base_model(str(bundled_dir)), r=8, alpha=16, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero B, so every LoRA weight gets a gradient
            torch.nn.init.normal_(param, std=0.02)
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:3]]
    examples = []
    for r in rows:
        chat = [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
        ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
        examples.append(TokenizedExample(ids, ids, Location("t.jsonl", line=1), "chat"))
    batch = collate([[e] for e in examples], pad_id=tokenizer.pad_token_id)
    assert int((batch["attention_mask"] == 0).sum()) > 0

    def lora_grads():
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    reference = model(**batch).loss  # transformers: masked attention, full logits, mean over targets
    reference.backward()
    reference_grads = lora_grads()
    fuse_lora_layers(model)  # the training path: fused LoRA layers, causal-only batch, fused head
    loss_sum, count = TargetTokenLoss(model)(**causal_only(batch))
    (loss_sum / count).backward()
    fast_grads = lora_grads()

    torch.testing.assert_close(loss_sum / count, reference.detach(), rtol=2e-5, atol=0)
    assert fast_grads.keys() == reference_grads.keys() and len(fast_grads) == 30 * 7 * 2
    for name in fast_grads:  # fp32 through 30 layers in another order: compare whole tensors
        error = (fast_grads[name] - reference_grads[name]).norm() / reference_grads[name].norm()
        assert error < 1e-3, (name, float(error))  # bf16 rounding alone is ~4e-3

