"""Model loading: sources, exact trainable-parameter counts per method, 4-bit base, real model."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_llama
from tunelab.errors import TunelabError
from tunelab.models import (
    add_lora,
    count_parameters,
    end_of_turn_ids,
    ModelLoading,
    freeze_parameters,
    load_base_model,
    load_for_inference,
    resolve_model_source,
)

# The tiny Llama: hidden 64, MLP 128, 4 query heads and 2 KV heads of 16 dims, 2 layers.
# Linear layers per block as (in, out): q, k, v, o, gate, up, down.
TINY_LINEARS = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
TINY_LAYERS = 2


def lora_params(r: int) -> int:
    """A (r x in) + B (out x r) per adapted linear layer."""
    return TINY_LAYERS * sum(r * (i + o) for i, o in TINY_LINEARS)


def test_lora_trainable_count_is_exact():
    model = add_lora(make_tiny_llama(), r=8, alpha=16, dropout=0.0)
    trainable, total = count_parameters(model)
    assert trainable == lora_params(8) == 16384
    base_total = sum(p.numel() for p in make_tiny_llama().parameters())
    assert total == base_total + trainable


def test_lora_on_chosen_modules_only():
    model = add_lora(make_tiny_llama(), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    assert count_parameters(model)[0] == TINY_LAYERS * (4 * (64 + 64) + 4 * (64 + 32))


def test_dora_adds_one_magnitude_per_output_feature():
    model = add_lora(make_tiny_llama(), r=8, alpha=16, dropout=0.0, use_dora=True)
    magnitudes = TINY_LAYERS * sum(o for _, o in TINY_LINEARS)
    assert count_parameters(model)[0] == lora_params(8) + magnitudes


def test_full_fine_tuning_trains_everything_but_frozen_patterns():
    model = make_tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    freeze_parameters(model, [])
    assert count_parameters(model) == (total, total)
    freeze_parameters(model, ["model.embed_tokens.*"])
    assert count_parameters(model) == (total - 49152 * 64, total)


def test_freeze_pattern_that_matches_nothing_is_an_error():
    with pytest.raises(TunelabError, match="full.freeze: no parameter name matches"):
        freeze_parameters(make_tiny_llama(), ["layers.99.*"])


def test_bad_target_module_is_a_clear_error():
    with pytest.raises(TunelabError, match="lora.target_modules"):
        add_lora(make_tiny_llama(), r=4, alpha=8, dropout=0.0, target_modules=["no_such_proj"])


def test_qlora_base_is_4bit_and_counts_match_lora(tiny_model_dir):
    import bitsandbytes as bnb

    base = load_base_model(str(tiny_model_dir), ModelLoading(bits=4, compute_dtype=torch.float32))
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.__class__.__name__ == "Params4bit"
    model = add_lora(base, r=8, alpha=16, dropout=0.0)
    trainable, total = count_parameters(model)
    assert trainable == lora_params(8)
    # 4-bit weights count at their unpacked size, so totals match the fp32 model.
    assert total == sum(p.numel() for p in make_tiny_llama().parameters()) + trainable
    out = model(input_ids=torch.tensor([[1, 5, 9, 2]]))
    assert torch.isfinite(out.logits).all()


def test_model_sources_resolve_or_fail_clearly(tmp_path, tiny_model_dir):
    assert resolve_model_source(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(TunelabError, match="model not found"):
        resolve_model_source(str(tmp_path / "missing-dir"))
    with pytest.raises(TunelabError, match="model file not found"):
        resolve_model_source(str(tmp_path / "missing.gguf"))
    with pytest.raises(TunelabError, match="holds no model"):
        load_for_inference(str(tmp_path))


def test_inference_load_of_a_model_dir(tiny_model_dir):
    model, tokenizer = load_for_inference(str(tiny_model_dir), dtype="fp32", device="cpu")
    assert not model.training
    assert model.generation_config.eos_token_id == end_of_turn_ids(tokenizer) == [2]
    assert tokenizer.pad_token_id is not None


@pytest.mark.real_model
def test_bundled_model_loads_offline_and_answers_through_its_chat_template(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = load_for_inference(None, dtype="fp32", device="cpu")
    assert count_parameters(model)[1] == 134_515_008
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert "Paris" in tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert new_tokens[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # stops at end of turn
