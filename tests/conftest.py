"""Shared fixtures: the real tokenizer, tiny random models, and the GSM8K path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GSM8K_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct converted to safetensors (cached across runs)."""
    from tunelab.models import bundled_model_dir

    return bundled_model_dir()


@pytest.fixture(scope="session")
def tokenizer(bundled_dir):
    """The real SmolLM2 tokenizer with its ChatML chat template (pad id == EOS id == 2)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


def make_tiny_llama(vocab_size: int = 49152, seed: int = 0):
    """A 2-layer randomly initialised Llama sharing SmolLM2's vocabulary (fast, offline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama + the real tokenizer: a model directory any command can load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").is_file():
        pytest.skip(f"GSM8K not present at {GSM8K_DIR}")
    return GSM8K_DIR
