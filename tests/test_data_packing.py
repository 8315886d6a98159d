"""Batch plans (deterministic, exact resume) and collation; packed rows never attend across examples."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tunelab.data.formats import Example
from tunelab.data.packing import collate, pack_rows, plan_batches
from tunelab.data.render import IGNORE_INDEX, TokenizedExample, tokenize_examples
from tunelab.data.sources import Location

PAD = 2  # SmolLM2: pad == eos == <|im_end|>


def fake(ids: list[int], labels: list[int], line: int = 1) -> TokenizedExample:
    return TokenizedExample(ids, labels, Location("d.jsonl", line=line), "chat")


def random_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(count)]


def flat(plan) -> list[int]:
    return [index for batch in plan for row in batch for index in row]


def test_plan_is_deterministic_per_seed_and_epoch_and_covers_every_example_once():
    lengths = random_lengths(103, 5, 300, seed=0)
    plan = plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan == plan_batches(lengths, 8, seed=1, epoch=0)
    assert plan != plan_batches(lengths, 8, seed=1, epoch=1)
    assert plan != plan_batches(lengths, 8, seed=2, epoch=0)
    assert sorted(flat(plan)) == list(range(103))
    assert all(len(row) == 1 for batch in plan for row in batch)
    assert sorted(len(batch) for batch in plan) == [7] + [8] * 12


def test_by_length_batches_hold_neighbouring_lengths_and_need_less_padding():
    lengths = random_lengths(64, 1, 500, seed=3)
    plan = plan_batches(lengths, 4, seed=0, epoch=0)  # 64 examples < one chunk of 50 batches
    spans = sorted((min(lengths[r[0]] for r in b), max(lengths[r[0]] for r in b)) for b in plan)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:]))

    def padding(p):
        return sum(max(lengths[r[0]] for r in b) * len(b) - sum(lengths[r[0]] for r in b) for b in p)

    assert padding(plan) < padding(plan_batches(lengths, 4, seed=0, epoch=0, by_length=False)) / 4


def test_unshuffled_plan_keeps_the_order():
    assert plan_batches([3, 1, 2, 5, 4], 2, seed=0, epoch=0, shuffle=False, by_length=False) == [[[0], [1]], [[2], [3]], [[4]]]


def test_packing_plan_fills_rows_without_exceeding_max_length():
    lengths = random_lengths(200, 10, 200, seed=5)
    plan = plan_batches(lengths, 4, seed=0, epoch=0, packing=True, max_length=512)
    assert plan == plan_batches(lengths, 4, seed=0, epoch=0, packing=True, max_length=512)
    assert sorted(flat(plan)) == list(range(200))
    rows = [row for batch in plan for row in batch]
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    lower_bound = -(-sum(lengths) // 512)
    assert len(rows) <= lower_bound + 2  # best fit wastes almost nothing
    assert all(len(batch) == 4 for batch in plan[:-1])


def test_pack_rows_best_fit():
    assert pack_rows([0, 1, 2, 3], [6, 5, 4, 5], max_length=10) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="example 1 has 11 tokens, more than the packing length 10"):
        pack_rows([0, 1], [3, 11], max_length=10)


def test_padded_collate_pads_by_position_and_keeps_eos_targets_equal_to_pad_id():
    a = fake([1, 5, 6, 2], [-100, -100, 6, 2])  # ends with <|im_end|> (id 2 == pad) as a target
    b = fake([1, 7], [-100, 7])
    batch = collate([[a], [b]], pad_id=PAD)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 2, 2]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert collate([[a], [b]], pad_id=PAD, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_packed_collate_restarts_positions_and_masks_each_first_label():
    a = fake([1, 5, 6], [5, 5, 6])  # a label at position 0 is still cleared
    b = fake([1, 7], [1, 7])
    c = fake([9, 9, 9, 9], [-100, 9, 9, 9])
    batch = collate([[a, b], [c]], pad_id=PAD, packed=True)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [9, 9, 9, 9, 2]]
    assert batch["labels"].tolist() == [[-100, 5, 6, -100, 7], [-100, 9, 9, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    with pytest.raises(ValueError, match="exactly one example per row"):
        collate([[a, b]], pad_id=PAD)


# --- real models: packing isolation and padding invariance ------------------------------------


@pytest.fixture(scope="module")
def chat_examples(tokenizer) -> list[TokenizedExample]:
    """Chat-templated examples of different lengths, built by the render code."""
    conversations = [
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another one?"},
            {"role": "assistant", "content": "Green, and also a rather long explanation of why."},
        ],
        [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello there, friend!"}],
    ]
    examples = [Example(Location("d.jsonl", line=i + 1), "chat", messages=m) for i, m in enumerate(conversations)]
    tokenized, _ = tokenize_examples(examples, tokenizer, max_length=256)
    return tokenized


def alone_logits(model, example: TokenizedExample) -> torch.Tensor:
    return model(input_ids=torch.tensor([example.input_ids]), use_cache=False).logits[0]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses with the Hugging Face shift (logits at t score labels[t + 1])."""
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_packed_row_logits_equal_each_example_alone(tiny_llama, chat_examples, tokenizer, attn_implementation):
    model = tiny_llama.eval()
    model.set_attn_implementation(attn_implementation)
    row = chat_examples  # all three in one row; a second, shorter row gets a padding tail
    batch = collate([row, [chat_examples[0]]], pad_id=tokenizer.pad_token_id, packed=True)
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    alone = [alone_logits(model, example) for example in row]
    start = 0
    for example, expected in zip(row, alone):
        n = len(example)
        torch.testing.assert_close(packed[0, start : start + n], expected, atol=1e-4, rtol=1e-4)
        start += n
    torch.testing.assert_close(packed[1, : len(row[0])], alone[0], atol=1e-4, rtol=1e-4)
    # The summed loss of the packed batch is the sum of the examples' own losses.
    alone_total = sum(summed_loss(logits, torch.tensor(e.labels)) for e, logits in zip([*row, row[0]], [*alone, alone[0]]))
    torch.testing.assert_close(summed_loss(packed, batch["labels"]), alone_total, atol=1e-3, rtol=1e-5)
    # Control: the same row as one plain causal sequence lets the second example see the first.
    leaky = model(input_ids=batch["input_ids"][:1], use_cache=False).logits[0]
    first = len(row[0])
    assert not torch.allclose(leaky[first : first + len(row[1])], alone[1], atol=1e-3)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_padding_does_not_change_the_logits_of_real_positions(tiny_llama, chat_examples, tokenizer, attn_implementation):
    model = tiny_llama.eval()
    model.set_attn_implementation(attn_implementation)
    batch = collate([[e] for e in chat_examples], pad_id=tokenizer.pad_token_id)
    padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    for r, example in enumerate(chat_examples):
        torch.testing.assert_close(padded[r, : len(example)], alone_logits(model, example), atol=1e-4, rtol=1e-4)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch really is padded


def test_causal_only_drops_a_right_padding_mask_but_keeps_any_other():
    from tunelab.data.dataset import causal_only

    right = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    assert "attention_mask" not in causal_only(right)
    left = {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])}
    assert causal_only(left)["attention_mask"] is left["attention_mask"]
    gap = {"input_ids": torch.zeros(1, 4), "attention_mask": torch.tensor([[1, 0, 1, 0]])}
    assert "attention_mask" in causal_only(gap)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_right_padded_batch_without_mask_gives_the_same_loss_and_gradients(tiny_llama, chat_examples, tokenizer, attn_implementation):
    """Why training drops the mask of right-padded batches: targets see exactly the same tokens."""
    from tunelab.data.dataset import causal_only
    from tunelab.loss import TargetTokenLoss

    tiny_llama.set_attn_implementation(attn_implementation)
    batch = collate([[e] for e in chat_examples], pad_id=tokenizer.pad_token_id)
    assert int((batch["attention_mask"] == 0).sum()) > 0

    def loss_and_grads(inputs):
        tiny_llama.zero_grad(set_to_none=True)
        loss_sum, _ = TargetTokenLoss(tiny_llama)(**inputs)
        loss_sum.backward()
        return loss_sum.detach(), [p.grad.clone() for p in tiny_llama.parameters()]

    masked_loss, masked_grads = loss_and_grads(batch)
    causal_loss, causal_grads = loss_and_grads(causal_only(batch))
    torch.testing.assert_close(causal_loss, masked_loss, rtol=1e-5, atol=1e-4)
    for causal, masked in zip(causal_grads, masked_grads, strict=True):
        torch.testing.assert_close(causal, masked, rtol=1e-4, atol=1e-5)
