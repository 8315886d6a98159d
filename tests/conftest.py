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


@pytest.fixture(scope="session")
def answer_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama trained for a few seconds to answer every question with "#### 4" and stop.

    It gets 2 of the 3 `qa_file` questions of tests/test_evaluate.py right (exact match 2/3).
    Session scope: test_evaluate.py and test_bench.py share the one training.
    """
    torch.manual_seed(0)
    model = make_tiny_llama(seed=1)
    rows = []
    for question in ("What is 1 plus 3?", "Add 2 and 2.", "What is 0 plus 4?", "How many legs has a dog?"):
        prompt = [{"role": "user", "content": question}]
        prompt_len = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "#### 4"}], tokenize=True, return_dict=True)["input_ids"]
        rows.append((ids, [-100] * prompt_len + ids[prompt_len:]))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [2] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    # Project only the positions that predict a target onto the 49k vocabulary: same loss, much faster.
    predicts_target = labels[:, 1:] != -100
    targets = labels[:, 1:][predicts_target]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # One thread: on a small shared CPU, torch's second OpenMP thread waits on a busy core and
    # makes this tiny loop tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(30):
            hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1][predicts_target]
            torch.nn.functional.cross_entropy(model.lm_head(hidden), targets).backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("answer-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
