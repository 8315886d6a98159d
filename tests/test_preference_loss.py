"""Preference losses against TRL 1.16's own trainers, on the same tiny model and batch.

Each test builds the real TRL trainer (DPOTrainer, CPOTrainer, ORPOTrainer, KTOTrainer)
around the same tiny random Llama pair (policy, reference) that tunelab scores, calls the
trainer's own loss entry point on the same token ids, and compares the loss and every
metric TRL logs under the names tunelab uses.
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from tunelab.preference_loss import (
    IGNORE_INDEX,
    kto_mismatched_rows,
    kto_terms,
    linear_target_logprobs,
    pair_terms,
    sequence_logps,
)

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
TOL = dict(rel=1e-5, abs=1e-5)

# Three pairs with different prompt and reply lengths (token ids of the SmolLM2 vocabulary).
PROMPTS = [[1, 510, 2214, 77], [1, 903, 12], [1, 44, 881, 3001, 17, 9]]
CHOSEN = [[240, 551, 90, 2], [77, 2], [301, 302, 303, 304, 305, 2]]
REJECTED = [[240, 552, 2], [78, 79, 80, 81, 2], [306, 2]]
PAD = 2


def right_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [value] * (width - len(row)) for row in rows])


def tunelab_rows(prompts, replies_a, replies_b):
    """tunelab's layout: 2B rows [first replies; second replies], prompt and padding masked in labels."""
    rows = [p + r for p, r in zip(prompts + prompts, replies_a + replies_b)]
    labels = [[IGNORE_INDEX] * len(p) + r for p, r in zip(prompts + prompts, replies_a + replies_b)]
    input_ids = right_pad(rows, PAD)
    return input_ids, right_pad(labels, IGNORE_INDEX), (right_pad([[1] * len(r) for r in rows], 0))


def trl_dpo_inputs(prompts, chosen, rejected):
    """DPOTrainer's collated batch: input_ids / attention_mask / completion_mask, [chosen; rejected]."""
    input_ids, labels, attention_mask = tunelab_rows(prompts, chosen, rejected)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": (labels != IGNORE_INDEX).long()}


def trl_paired_batch(prompts, chosen, rejected):
    """CPOTrainer's / ORPOTrainer's batch: chosen_* and rejected_* tensors, prompt masked in the labels."""
    batch = {}
    for side, replies in (("chosen", chosen), ("rejected", rejected)):
        rows = [p + r for p, r in zip(prompts, replies)]
        batch[f"{side}_input_ids"] = right_pad(rows, PAD)
        batch[f"{side}_attention_mask"] = right_pad([[1] * len(r) for r in rows], 0)
        batch[f"{side}_labels"] = right_pad([[IGNORE_INDEX] * len(p) + r for p, r in zip(prompts, replies)], IGNORE_INDEX)
    return batch


@pytest.fixture(scope="module")
def models():
    """(policy, reference): two tiny Llamas with different random weights, so log-ratios are not zero."""
    return make_tiny_llama(seed=0), make_tiny_llama(seed=1).eval()


@pytest.fixture(scope="module")
def trl_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "Hi", "chosen": " yes", "rejected": " no"}] * 2)


def trl_args(config_cls, tmp_path, **kwargs):
    # bf16=False: TRL defaults to bf16 autocast, which would round its reference forward (5e-4 nats here).
    return config_cls(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=2, **kwargs)


def tunelab_pair(loss, models, **settings):
    """tunelab's loss (sum of term means, as the loop forms it) and metric means on the shared batch."""
    policy, reference = models
    input_ids, labels, attention_mask = tunelab_rows(PROMPTS, CHOSEN, REJECTED)
    logps, tokens = sequence_logps(policy, input_ids, labels, attention_mask)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, input_ids, labels, attention_mask)
    terms, metrics = pair_terms(loss, logps, tokens, ref_logps, **settings)
    total = sum(value / count for value, count in terms.values())
    return total, {name: float(value) / float(count) for name, (value, count) in metrics.items()}


def trl_metrics(trainer) -> dict[str, float]:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}


def assert_metrics_match(ours: dict[str, float], theirs: dict[str, float], names=PAIR_METRICS) -> None:
    for name in names:
        assert ours[name] == pytest.approx(theirs[name], **TOL), name


@pytest.mark.parametrize(
    ("loss_type", "loss", "settings"),
    [
        (["sigmoid"], "dpo", {"beta": 0.1}),
        (["ipo"], "ipo", {"beta": 0.5}),
        (["sigmoid", "sft"], "dpo", {"beta": 0.2, "sft_weight": 0.3}),
    ],
)
def test_dpo_and_ipo_equal_trl_dpo_trainer(models, trl_dataset, tmp_path, loss_type, loss, settings):
    from trl import DPOConfig, DPOTrainer

    policy, reference = models
    weights = [1.0, settings["sft_weight"]] if "sft" in loss_type else None
    args = trl_args(DPOConfig, tmp_path, beta=settings["beta"], loss_type=loss_type, loss_weights=weights)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=trl_dataset, processing_class=tokenizer_for_trl())
    theirs = trainer._compute_loss(trainer.model, trl_dpo_inputs(PROMPTS, CHOSEN, REJECTED), False)
    ours, metrics = tunelab_pair(loss, models, **settings)
    assert ours.item() == pytest.approx(theirs.item(), **TOL)
    assert_metrics_match(metrics, trl_metrics(trainer))
    # The gradient too: the per-row fused head's backward (a trainable, tied head here) against TRL's.
    policy.zero_grad()
    theirs.backward()
    expected = {name: p.grad.clone() for name, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad()
    ours.backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    policy.zero_grad()


def test_dpo_label_smoothing_equals_trl_conservative_sigmoid(models, trl_dataset, tmp_path):
    """cDPO: TRL 1.16 keeps the label-smoothed sigmoid in CPOTrainer.cpo_loss; given log-ratios it is DPO's."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, reference = models
    args = trl_args(CPOConfig, tmp_path, beta=0.1, loss_type="sigmoid", label_smoothing=0.2, cpo_alpha=0.0)
    trainer = CPOTrainer(model=policy, args=args, train_dataset=trl_dataset, processing_class=tokenizer_for_trl())
    input_ids, labels, attention_mask = tunelab_rows(PROMPTS, CHOSEN, REJECTED)
    with torch.no_grad():
        logps, _ = sequence_logps(policy, input_ids, labels, attention_mask)
        ref_logps, _ = sequence_logps(reference, input_ids, labels, attention_mask)
    ratios = (logps - ref_logps).chunk(2)
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(*ratios)
    ours, metrics = tunelab_pair("dpo", models, beta=0.1, label_smoothing=0.2)
    assert float(ours) == pytest.approx(float(losses.mean()), **TOL)
    assert metrics["rewards/chosen"] == pytest.approx(float(chosen_rewards.mean()), **TOL)
    assert metrics["rewards/margins"] == pytest.approx(float((chosen_rewards - rejected_rewards).mean()), **TOL)


_TOKENIZER = None


def tokenizer_for_trl():
    """The bundled SmolLM2 tokenizer (CPO/ORPO tokenize their dataset at init, DPO/KTO accept None)."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from tunelab.models import bundled_model_dir

        _TOKENIZER = AutoTokenizer.from_pretrained(bundled_model_dir())
    return _TOKENIZER


@pytest.mark.parametrize(("label_smoothing", "sft_weight"), [(0.0, 0.0), (0.1, 0.5)])
def test_simpo_equals_trl_cpo_trainer(models, trl_dataset, tmp_path, label_smoothing, sft_weight):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _ = models
    args = trl_args(
        CPOConfig, tmp_path, beta=2.0, loss_type="simpo", simpo_gamma=0.8, label_smoothing=label_smoothing, cpo_alpha=sft_weight
    )
    trainer = CPOTrainer(model=policy, args=args, train_dataset=trl_dataset, processing_class=tokenizer_for_trl())
    with torch.no_grad():
        theirs, their_metrics = trainer.get_batch_loss_metrics(policy, trl_paired_batch(PROMPTS, CHOSEN, REJECTED))
        ours, metrics = tunelab_pair(
            "simpo", models, beta=2.0, simpo_gamma=0.8, label_smoothing=label_smoothing, sft_weight=sft_weight
        )
    assert float(ours) == pytest.approx(float(theirs), **TOL)
    assert_metrics_match(metrics, their_metrics)


def test_orpo_equals_trl_orpo_trainer(models, trl_dataset, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy, _ = models
    trainer = ORPOTrainer(
        model=policy, args=trl_args(ORPOConfig, tmp_path, beta=0.25), train_dataset=trl_dataset, processing_class=tokenizer_for_trl()
    )
    with torch.no_grad():
        theirs, their_metrics = trainer.get_batch_loss_metrics(policy, trl_paired_batch(PROMPTS, CHOSEN, REJECTED))
        ours, metrics = tunelab_pair("orpo", models, beta=0.25, sft_weight=1.0)
        input_ids, labels, attention_mask = tunelab_rows(PROMPTS, CHOSEN, REJECTED)
    assert_metrics_match(metrics, their_metrics, PAIR_METRICS + ("log_odds_ratio", "log_odds_chosen"))
    # TRL's loss = NLL over the chosen rows' prompt AND reply tokens - beta * mean log s(log odds);
    # tunelab's NLL covers the reply only. The odds-ratio parts are equal ...
    odds_ratio_term = float(theirs) - their_metrics["nll_loss"]
    ours_without_nll, _ = tunelab_pair("orpo", models, beta=0.25)
    assert float(ours_without_nll) == pytest.approx(odds_ratio_term, **TOL)
    # ... and TRL's NLL is tunelab's sequence NLL with the prompt unmasked (same maths, other tokens).
    with torch.no_grad():
        full_labels = torch.where(attention_mask.bool(), input_ids, IGNORE_INDEX)
        full_logps, full_tokens = sequence_logps(policy, input_ids, full_labels, attention_mask)
    b = len(PROMPTS)
    assert float(-full_logps[:b].sum() / full_tokens[:b].sum()) == pytest.approx(their_metrics["nll_loss"], **TOL)
    # And the reply-only NLL is what tunelab adds: total - odds-ratio term.
    chosen_tokens = (labels[:b, 1:] != IGNORE_INDEX).sum()
    with torch.no_grad():
        logps, _ = sequence_logps(policy, input_ids, labels, attention_mask)
    assert float(ours) - float(ours_without_nll) == pytest.approx(float(-logps[:b].sum() / chosen_tokens), **TOL)


# KTO: four unpaired examples, two desirable, two not.
KTO_PROMPTS = PROMPTS + [[1, 77, 78]]
KTO_COMPLETIONS = [CHOSEN[0], REJECTED[1], CHOSEN[2], [900, 901, 2]]
KTO_LABELS = [True, False, True, False]


def kto_rows(prompts, completions):
    rows = [p + c for p, c in zip(prompts, completions)]
    labels = [[IGNORE_INDEX] * len(p) + c for p, c in zip(prompts, completions)]
    return right_pad(rows, PAD), right_pad(labels, IGNORE_INDEX), right_pad([[1] * len(r) for r in rows], 0)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_equals_trl_kto_trainer(models, tmp_path, weights):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    policy, reference = models
    dataset = Dataset.from_list([{"prompt": "Hi", "completion": " yes", "label": True}, {"prompt": "Ho", "completion": " no", "label": False}])
    args = trl_args(KTOConfig, tmp_path, beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1])
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer_for_trl())
    mismatched = kto_mismatched_rows(len(KTO_PROMPTS))
    kl_completions = [KTO_COMPLETIONS[j] for j in mismatched]
    input_ids, labels, attention_mask = kto_rows(KTO_PROMPTS, KTO_COMPLETIONS)
    kl_ids, kl_labels, kl_mask = kto_rows(KTO_PROMPTS, kl_completions)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": (labels != IGNORE_INDEX).long(),
        "label": torch.tensor(KTO_LABELS),
        "KL_input_ids": kl_ids,
        "KL_attention_mask": kl_mask,
        "KL_completion_mask": (kl_labels != IGNORE_INDEX).long(),
    }
    theirs = trainer._compute_loss(trainer.model, inputs, False)

    logps, tokens = sequence_logps(policy, input_ids, labels, attention_mask)
    with torch.no_grad():
        ref_logps, _ = sequence_logps(reference, input_ids, labels, attention_mask)
        kl = (sequence_logps(policy, kl_ids, kl_labels, kl_mask)[0] - sequence_logps(reference, kl_ids, kl_labels, kl_mask)[0]).mean()
    terms, metrics = kto_terms(
        logps, tokens, ref_logps, torch.tensor(KTO_LABELS), kl, beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    ours = sum(value / count for value, count in terms.values())
    assert ours.item() == pytest.approx(theirs.item(), **TOL)
    means = {name: float(value) / float(count) for name, (value, count) in metrics.items()}
    names = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    assert_metrics_match(means, trl_metrics(trainer), names)


def test_fused_target_logprobs_match_autograd_for_frozen_and_trainable_heads():
    """Values and gradients of the per-row fused head equal log_softmax + gather through autograd."""
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(101, 16, dtype=torch.float64)
    targets = torch.randint(0, 101, (37,))
    upstream = torch.randn(37, dtype=torch.float64)
    for head_trainable in (False, True):
        w = weight.clone().requires_grad_(head_trainable)
        expected = torch.log_softmax(hidden @ w.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        expected_grads = torch.autograd.grad((expected * upstream).sum(), [hidden] + ([w] if head_trainable else []))
        ours = linear_target_logprobs(hidden, w, targets, chunk_rows=8)
        grads = torch.autograd.grad((ours * upstream).sum(), [hidden] + ([w] if head_trainable else []))
        torch.testing.assert_close(ours, expected)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want)
