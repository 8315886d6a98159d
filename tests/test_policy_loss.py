"""The GRPO objective equals TRL's GRPOTrainer on the same model, completions and advantages.

TRL computes its loss inside `GRPOTrainer._compute_loss`; a real trainer is built on the tiny
random Llama and that method is called on hand-made rollouts, so the comparison covers its
log-probabilities (temperature included), clipping, KL and each loss type's normaliser.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.errors import TunelabError
from tunelab.policy_loss import (PolicyLossSettings, completion_logps, group_advantages, policy_loss_terms,
                                 policy_term_counts)

trl = pytest.importorskip("trl")
TEMPERATURE = 0.7
PROMPT_LEN, COMPLETION_LEN, GENERATIONS = 5, 6, 4


@pytest.fixture(scope="module")
def rollout():
    """Two prompts x 4 completions of different lengths (right-padded), rewards, a reference policy."""
    gen = torch.Generator().manual_seed(0)
    batch = 2 * GENERATIONS
    prompt_ids = torch.randint(3, 500, (batch, PROMPT_LEN), generator=gen)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[:GENERATIONS, :2] = 0  # the first prompt is left-padded
    completion_ids = torch.randint(3, 500, (batch, COMPLETION_LEN), generator=gen)
    lengths = torch.tensor([6, 3, 5, 1, 4, 6, 2, 6])
    completion_mask = (torch.arange(COMPLETION_LEN)[None] < lengths[:, None]).long()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 0.0, 1.0])
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, rewards=rewards)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """The tiny Llama saved, so TRL can build its reference model from a path when beta > 0."""
    path = tmp_path_factory.mktemp("grpo-tiny")
    make_tiny_llama(seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trl_trainer(model, tokenizer, tmp_path, **grpo):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=GENERATIONS * 2,
                      num_generations=GENERATIONS, max_completion_length=COMPLETION_LEN,
                      temperature=TEMPERATURE, report_to=[], use_cpu=True, bf16=False, logging_steps=1, **grpo)
    data = Dataset.from_dict({"prompt": ["a", "b"]})
    return GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                       args=args, train_dataset=data, processing_class=tokenizer)


def ours(model, rollout, settings, old_logps=None, ref_logps=None):
    ids = torch.cat([rollout["prompt_ids"], rollout["completion_ids"]], dim=1)
    attention = torch.cat([rollout["prompt_mask"], rollout["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, PROMPT_LEN - 1:-1]
    logps, entropy = completion_logps(logits, rollout["completion_ids"], TEMPERATURE)
    advantages, _ = group_advantages(rollout["rewards"], GENERATIONS, "group")
    terms, metrics = policy_loss_terms(logps, logps.detach() if old_logps is None else old_logps, advantages,
                                       rollout["completion_mask"], settings, ref_logps=ref_logps, entropy=entropy)
    total, count = terms["policy"]
    return total / count, {k: float(s) / float(c) for k, (s, c) in metrics.items()}, logps.detach()


@pytest.mark.parametrize("loss_type, beta, off_policy", [
    ("grpo", 0.0, False), ("dapo", 0.0, False), ("dr_grpo", 0.0, False),
    ("dapo", 0.04, True), ("grpo", 0.1, True),
])
def test_loss_gradients_and_metrics_equal_trl(rollout, tokenizer, tiny_dir, tmp_path, loss_type, beta, off_policy):
    trainer = trl_trainer(str(tiny_dir), tokenizer, tmp_path, loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    model = trainer.model
    settings = PolicyLossSettings(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta,
                                  max_completion_length=COMPLETION_LEN)
    gen = torch.Generator().manual_seed(3)
    # Off-policy: the rollout's logps drift from the live ones, so ratios leave 1 and get clipped.
    with torch.no_grad():
        _, _, live = ours(model, rollout, PolicyLossSettings(loss_type))
    old = live + 0.3 * torch.randn(live.shape, generator=gen) if off_policy else None
    ref = live + 0.2 * torch.randn(live.shape, generator=gen) if beta else None

    model.zero_grad()
    loss, metrics, _ = ours(model, rollout, settings, old_logps=old, ref_logps=ref)
    loss.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    advantages, _ = group_advantages(rollout["rewards"], GENERATIONS, "group")
    inputs = {k: rollout[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs.update(advantages=advantages, num_items_in_batch=rollout["completion_mask"].sum())
    if old is not None:
        inputs["old_per_token_logps"] = old
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()

    assert float(loss) == pytest.approx(float(trl_loss), abs=1e-6)
    for ours_g, p in zip(our_grads, model.parameters(), strict=True):
        torch.testing.assert_close(ours_g, p.grad, atol=1e-6, rtol=1e-5)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    names = ["entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] + (["kl"] if beta else [])
    for name in names:
        assert metrics[name] == pytest.approx(trl_metrics[name], abs=1e-6), name
    if off_policy:
        assert metrics["clip_ratio/region_mean"] > 0  # the comparison covered clipping


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls_formula(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 2.0, 2.0, 2.0])
    advantages, zero_std = group_advantages(rewards, 4, scale)
    groups = rewards.view(2, 4)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    std = {"group": groups.std(1).repeat_interleave(4), "batch": rewards.std().expand(8), "none": None}[scale]
    expected = centred if std is None else centred / (std + 1e-4)
    torch.testing.assert_close(advantages, expected)
    assert advantages[4:].abs().max() == 0  # an all-equal group teaches nothing
    if scale != "batch":
        assert zero_std.tolist() == [False] * 4 + [True] * 4


def test_counts_follow_the_loss_type_and_bad_names_are_errors():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert policy_term_counts(mask, PolicyLossSettings("grpo")) == 2
    assert policy_term_counts(mask, PolicyLossSettings("dapo")) == 3
    assert policy_term_counts(mask, PolicyLossSettings("dr_grpo", max_completion_length=64)) == 128
    with pytest.raises(TunelabError, match="grpo.loss_type must be one of grpo, dapo, dr_grpo, not 'ppo'"):
        policy_term_counts(mask, PolicyLossSettings("ppo"))
    with pytest.raises(TunelabError, match="grpo.scale_rewards must be one of"):
        group_advantages(torch.zeros(4), 2, "global")
    with pytest.raises(TunelabError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
