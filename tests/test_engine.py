"""The continuous-batching engine against `model.generate` and a plain forward pass, on tiny random models.

The models are initialised with large weights (initializer_range 0.5, untied head) so that
greedy answers vary token to token: a model that repeats one token would hide wrong
positions or masks.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tunelab.engine import Engine, SamplingParams
from tunelab.errors import TunelabError

TEXTS = ["Hello there", "A much longer prompt about the cats and dogs of the world, and more", "x", "What is 2+2?"]


def varied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.5,
    )
    return LlamaForCausalLM(config).eval()


def varied_gpt2():
    """GPT-2 has learned absolute positions: a wrong position id changes its output at once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=256, tie_word_embeddings=False,
        initializer_range=0.5, bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama():
    return varied_llama()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(t)["input_ids"] for t in TEXTS]


def hf_greedy(model, prompt, max_new_tokens, **extra):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=2, **extra
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("make_model", [varied_llama, varied_gpt2], ids=["llama", "gpt2"])
def test_greedy_equals_model_generate_alone_and_batched(make_model, tokenizer, prompts):
    model = make_model()
    expected = [hf_greedy(model, p, 10) for p in prompts]
    assert all(len(set(tokens)) > 5 for tokens in expected)  # the model really varies its answers
    alone = [Engine(model, tokenizer, stop_token_ids=[]).generate([p], SamplingParams(max_new_tokens=10))[0] for p in prompts]
    assert [r.token_ids for r in alone] == expected
    # Two slots for four prompts of different lengths: the last two join mid-batch, left-padded to
    # the running rows; per-request lengths make rows leave at different steps.
    lengths = [10, 4, 10, 7]
    engine = Engine(model, tokenizer, max_batch_size=2, stop_token_ids=[])
    batched = engine.generate(prompts, [SamplingParams(max_new_tokens=n) for n in lengths])
    assert [r.token_ids for r in batched] == [tokens[:n] for tokens, n in zip(expected, lengths)]
    assert [r.finish_reason for r in batched] == ["length"] * 4
    assert [r.prompt_tokens for r in batched] == [len(p) for p in prompts]
    assert [r.text for r in batched] == [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(expected, lengths)]
    assert engine.active == 0 and engine.waiting == 0


def test_repetition_penalty_matches_model_generate(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer, stop_token_ids=[])
    results = engine.generate(prompts[:2], SamplingParams(max_new_tokens=12, repetition_penalty=3.0))
    assert [r.token_ids for r in results] == [hf_greedy(llama, p, 12, repetition_penalty=3.0) for p in prompts[:2]]


def test_seeded_samples_do_not_depend_on_batch_mates(llama, tokenizer, prompts):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=200, min_p=0.01, seed=7)
    alone = Engine(llama, tokenizer, stop_token_ids=[]).generate([prompts[0]], params)[0]
    mates = [SamplingParams(max_new_tokens=5), params, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8)]
    batched = Engine(llama, tokenizer, max_batch_size=3, stop_token_ids=[]).generate([prompts[1], prompts[0], prompts[0]], mates)
    assert batched[1].token_ids == alone.token_ids
    assert batched[2].token_ids != alone.token_ids  # another seed, another sample
    assert alone.token_ids != hf_greedy(llama, prompts[0], 12)
    # top_k 1 leaves only the argmax, whatever the temperature and seed.
    top1 = Engine(llama, tokenizer, stop_token_ids=[]).generate([prompts[0]], SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1))
    assert top1[0].token_ids == hf_greedy(llama, prompts[0], 12)


def test_stop_strings_and_stop_tokens(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer, stop_token_ids=[])
    full = engine.generate([prompts[0]], SamplingParams(max_new_tokens=16))[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip()
    request = engine.submit(prompts[0], SamplingParams(max_new_tokens=16, stop=(stop, "never appears")))
    streamed = "".join(request.stream())
    result = request.wait()
    assert result.finish_reason == "stop"
    assert result.text == full.text[: full.text.index(stop)] == streamed
    assert result.token_ids == full.token_ids[: len(result.token_ids)] and len(result.token_ids) < 16
    # An end-of-turn token ends the answer and is kept as its last token.
    stopper = Engine(llama, tokenizer, stop_token_ids=[full.token_ids[3]])
    ended = stopper.generate([prompts[0]], SamplingParams(max_new_tokens=16))[0]
    assert ended.token_ids == full.token_ids[:4] and ended.finish_reason == "stop"


def test_stream_deltas_concatenate_to_text(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer, stop_token_ids=[])
    request = engine.submit(prompts[3], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3))
    deltas = list(request.stream())
    assert len(deltas) > 5 and "".join(deltas) == request.result.text
    assert request.result.completion_tokens == 20


def test_cancel_frees_the_slot(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer, max_batch_size=1, stop_token_ids=[])
    engine.start()
    try:
        long = engine.submit(prompts[0], SamplingParams(max_new_tokens=200))
        while not long.token_ids:
            time.sleep(0.01)
        queued = engine.submit(prompts[1], SamplingParams(max_new_tokens=3))
        dropped = engine.submit(prompts[2], SamplingParams(max_new_tokens=3))
        assert engine.active == 1 and engine.waiting == 2  # one slot, held by the long request
        dropped.cancel()
        long.cancel()
        assert queued.wait(timeout=60).completion_tokens == 3  # got the freed slot
        assert long.result.finish_reason == "cancelled" and 0 < long.result.completion_tokens < 200
        assert dropped.wait(timeout=1).finish_reason == "cancelled" and dropped.result.token_ids == []
        assert engine.active == 0 and engine.waiting == 0
    finally:
        engine.close()


def test_logprobs_match_a_forward_pass(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer, max_batch_size=2, stop_token_ids=[])
    params = [SamplingParams(max_new_tokens=8, logprobs=True), SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, logprobs=True)]
    results = engine.generate(prompts[:2], params)
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            logits = llama(ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(result.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(result.logprobs), expected, atol=1e-4, rtol=1e-4)
    assert engine.generate([prompts[0]], SamplingParams(max_new_tokens=2))[0].logprobs is None


def test_bad_requests_are_clear_errors(llama, tokenizer):
    engine = Engine(llama, tokenizer)
    with pytest.raises(TunelabError, match="top_p must be in"):
        engine.submit([5], SamplingParams(top_p=0))
    with pytest.raises(TunelabError, match="empty prompt"):
        engine.submit([], SamplingParams())
    with pytest.raises(TunelabError, match="model's context is 256"):
        engine.submit([5] * 300, SamplingParams())


def test_threads_submitting_at_once_get_their_own_answers(llama, tokenizer, prompts):
    engine = Engine(llama, tokenizer, max_batch_size=4, stop_token_ids=[])
    engine.start()
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        results[i] = engine.submit(prompts[i], SamplingParams(max_new_tokens=6)).wait(timeout=120).token_ids

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.close()
    assert [results[i] for i in range(len(prompts))] == [hf_greedy(llama, p, 6) for p in prompts]


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(llama, tokenizer, prompts, monkeypatch):
    engine = Engine(llama, tokenizer, stop_token_ids=[])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(llama, "forward", broken)
    request = engine.submit(prompts[0], SamplingParams(max_new_tokens=3))
    with pytest.raises(RuntimeError, match="out of memory"):
        request.wait()
    assert request.done and engine.active == 0
    monkeypatch.undo()
    assert engine.generate([prompts[0]], SamplingParams(max_new_tokens=3))[0].token_ids == hf_greedy(llama, prompts[0], 3)
