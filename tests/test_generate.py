"""Generation and chat on tiny random models: determinism, seeds, samples, padding, stop tokens, chat commands."""

from __future__ import annotations

import io
import json

import pytest
import torch
from typer.testing import CliRunner

from tunelab import generate as gen
from tunelab.cli import app
from tunelab.errors import DataError, TunelabError
from tunelab.generate import (
    ChatSession,
    GenerationSettings,
    build_generation_config,
    encode_prompt,
    end_of_turn_ids,
    generate_completions,
    generate_for_prompts,
    left_pad,
    read_prompts,
    run_chat,
    trim_at_stop,
    user_messages,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """The tiny saved model loaded the way every command loads a model."""
    return gen.load_for_generation(str(tiny_model_dir), dtype="fp32", device="cpu")


def test_stop_ids_include_end_of_turn(loaded, tokenizer):
    model, _ = loaded
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in end_of_turn_ids(tokenizer, model)
    config = build_generation_config(tokenizer, model, GenerationSettings(max_new_tokens=5))
    assert im_end in config.eos_token_id
    assert config.do_sample is False and config.pad_token_id == tokenizer.pad_token_id
    assert trim_at_stop([5, 7, im_end, 2, 2], {im_end}) == [5, 7, im_end]


def test_prompt_uses_chat_template_and_generation_prompt(tokenizer):
    ids = encode_prompt(tokenizer, user_messages("What is 2+2?", system="Be brief."))
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    # A control token typed by the user is escaped, not a real end of turn.
    escaped = encode_prompt(tokenizer, user_messages("hi <|im_end|> there"))
    assert escaped.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # system turn + user turn only


def test_left_pad_puts_prompts_at_the_right_edge():
    input_ids, mask = left_pad([[5, 6, 7], [8]], pad_id=2)
    assert input_ids.tolist() == [[5, 6, 7], [2, 2, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_left_padded_batch_scores_equal_unpadded(loaded, tokenizer):
    """With the attention mask, a short prompt padded in a batch gets the same next-token scores alone."""
    model, _ = loaded
    prompts = [encode_prompt(tokenizer, user_messages(text)) for text in ("Hi", "Tell me a much longer story about cats")]
    config = build_generation_config(tokenizer, model, GenerationSettings(max_new_tokens=2))
    input_ids, mask = left_pad(prompts, config.pad_token_id)
    batched = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config, output_scores=True, return_dict_in_generate=True)
    alone = model.generate(input_ids=torch.tensor([prompts[0]]), generation_config=config, output_scores=True, return_dict_in_generate=True)
    torch.testing.assert_close(batched.scores[0][0], alone.scores[0][0], atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_and_sampling_follows_the_seed(loaded, tokenizer):
    model, _ = loaded
    prompts = [encode_prompt(tokenizer, user_messages(t)) for t in ("Hello", "Write a poem")]
    greedy = GenerationSettings(max_new_tokens=6)
    first = generate_completions(model, tokenizer, prompts, greedy)
    assert first == generate_completions(model, tokenizer, prompts, greedy)
    assert all(c.tokens == 6 for samples in first for c in samples)  # a random model never says <|im_end|>

    sampled = GenerationSettings(max_new_tokens=6, temperature=1.0, num_samples=3)
    run_a = generate_completions(model, tokenizer, prompts, sampled, seed=7)
    run_b = generate_completions(model, tokenizer, prompts, sampled, seed=7)
    run_c = generate_completions(model, tokenizer, prompts, sampled, seed=8)
    assert run_a == run_b
    assert run_a != run_c
    assert [len(samples) for samples in run_a] == [3, 3]
    assert len({c.text for c in run_a[0]}) == 3  # K samples at temperature 1.0 differ


def test_settings_reject_bad_values():
    with pytest.raises(TunelabError, match="--temperature 0 would repeat one greedy answer"):
        GenerationSettings(num_samples=2).check()
    with pytest.raises(TunelabError, match="--top-p must be in"):
        GenerationSettings(temperature=1.0, top_p=0).check()
    with pytest.raises(TunelabError, match="--max-new-tokens must be at least 1"):
        GenerationSettings(max_new_tokens=0).check()


def test_read_prompts_text_and_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "first"}\n\n{"question": "second"}\n{"instruction": "Translate", "input": "chat"}\nplain line\n'
    )
    assert read_prompts(str(path)) == ["first", "second", "Translate\n\nchat", "plain line"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"answer": "no prompt"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: no prompt field; expected one of prompt, question, instruction"):
        read_prompts(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "ok"\n')
    with pytest.raises(DataError, match=r"broken.jsonl:1: invalid JSON"):
        read_prompts(str(broken))
    with pytest.raises(TunelabError, match="--input file not found"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_generate_for_prompts_rows(loaded, tokenizer):
    model, _ = loaded
    settings = GenerationSettings(max_new_tokens=4, temperature=1.0, num_samples=2)
    rows = generate_for_prompts(model, tokenizer, ["a", "b"], settings, seed=0)
    assert [(r["prompt"], r["sample"]) for r in rows] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    raw = generate_for_prompts(model, tokenizer, ["Once upon"], GenerationSettings(max_new_tokens=3), use_chat_template=False)
    assert raw[0]["tokens"] == 3
    with pytest.raises(TunelabError, match="--system needs a chat template, and this model is prompted with raw text"):
        generate_for_prompts(model, tokenizer, ["x"], GenerationSettings(), use_chat_template=False, system="s")


def test_generate_cli_writes_jsonl_and_reads_stdin(tiny_model_dir, tmp_path):
    def sample_to(out):
        args = ["generate", str(tiny_model_dir), "--input", "-", "--max-new-tokens", "3", "--temperature", "1",
                "-k", "2", "--seed", "3", "--output", str(out), "--dtype", "fp32"]
        result = runner.invoke(app, args, input='{"prompt": "one"}\ntwo\n')
        assert result.exit_code == 0, result.output
        return out.read_text()

    first = sample_to(tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in first.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("one", 0), ("one", 1), ("two", 0), ("two", 1)]
    assert sample_to(tmp_path / "again.jsonl") == first  # same seed, same samples

    printed = runner.invoke(app, ["generate", str(tiny_model_dir), "-p", "hi", "-p", "yo", "--max-new-tokens", "2", "--dtype", "fp32"])
    assert printed.exit_code == 0
    assert "### prompt 1, sample 1" in printed.stdout and "### prompt 2, sample 1" in printed.stdout


# ----------------------------------------------------------------------------- chat


@pytest.fixture
def recorded_prompts(monkeypatch, tokenizer):
    """Replace generation with a fixed reply and record the prompt text each turn sends."""
    prompts: list[str] = []

    def fake_reply(model, tok, prompt_ids, settings, on_text=None):
        prompts.append(tok.decode(prompt_ids))
        reply = f"reply {len(prompts)}"
        if on_text:
            on_text(reply)
        return reply

    monkeypatch.setattr(gen, "stream_reply", fake_reply)
    return prompts


def test_chat_commands_change_the_prompt(loaded, tokenizer, recorded_prompts):
    model, _ = loaded
    session = ChatSession(model, tokenizer, system="You are terse.")
    out, notes = io.StringIO(), []
    lines = ["hello", "/system You are a pirate.", "again", "/reset", "fresh start", "/temp 0.5", "/max 7", "/exit", "never sent"]
    replies = run_chat(session, lines, out, notes.append)
    assert replies == 3
    assert out.getvalue() == "reply 1\nreply 2\nreply 3\n"
    first, second, third = recorded_prompts
    assert "You are terse." in first and "hello" in first
    assert "You are a pirate." in second and "hello" in second and "reply 1" in second  # history kept
    assert "You are a pirate." in third and "hello" not in third and "fresh start" in third  # /reset cleared turns
    assert session.settings.temperature == 0.5 and session.settings.max_new_tokens == 7
    assert "never sent" not in "".join(recorded_prompts)
    assert notes == ["system message set: You are a pirate.", "conversation cleared", "temperature = 0.5", "max new tokens = 7"]


def test_chat_reports_bad_commands_and_continues(loaded, tokenizer, recorded_prompts):
    model, _ = loaded
    session = ChatSession(model, tokenizer)
    notes: list[str] = []
    run_chat(session, ["/temp hot", "/bogus", "/max -1", "hi"], io.StringIO(), notes.append)
    assert notes[0].startswith("error: expected a number: 'hot'")
    assert notes[1].startswith("error: unknown command '/bogus'")
    assert "--max-new-tokens must be at least 1" in notes[2]
    assert len(recorded_prompts) == 1


def test_chat_drops_oldest_turns_but_keeps_system(loaded, tokenizer, recorded_prompts):
    model, _ = loaded
    session = ChatSession(model, tokenizer, system="SYSTEM RULES", settings=GenerationSettings(max_new_tokens=10), context_tokens=90)
    for i in range(6):
        session.send(f"message number {i} with some extra words to fill the context")
    last = recorded_prompts[-1]
    assert "SYSTEM RULES" in last and "message number 5" in last
    assert "message number 0" not in last
    assert len(encode_prompt(tokenizer, session.messages()[:-1])) <= 90 - 10
    with pytest.raises(TunelabError, match="message too long"):
        session.send("word " * 200)


def test_stream_reply_streams_all_text(loaded, tokenizer):
    model, _ = loaded
    pieces: list[str] = []
    prompt = encode_prompt(tokenizer, user_messages("Hi"))
    settings = GenerationSettings(max_new_tokens=8, temperature=1.0)
    torch.manual_seed(0)
    reply = gen.stream_reply(model, tokenizer, prompt, settings, pieces.append)
    assert reply == "".join(pieces).strip() and reply


def test_chat_cli_with_piped_stdin(tiny_model_dir):
    script = "/system Be brief.\nhello\n/reset\nhi\n/exit\nignored\n"
    result = runner.invoke(
        app, ["chat", str(tiny_model_dir), "--max-new-tokens", "3", "--temperature", "0", "--dtype", "fp32"], input=script
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 2  # two replies, one line each; no prompt decorations
    assert "system message set: Be brief." in result.stderr
    assert "conversation cleared" in result.stderr
