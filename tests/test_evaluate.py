"""Evaluation: the loss mask, loss vs a hand computation, exact match end to end, files, comparison."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_tiny_llama
from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.evaluate import (
    EvalExample,
    data_label,
    evaluate_model,
    evaluate_sources,
    load_eval_examples,
    model_label,
    output_root,
    parse_metrics,
    reply_ids_and_labels,
    score_loss,
)
from tunelab.generate import load_for_generation

runner = CliRunner()
QUESTIONS = [("What is 1 plus 3?", "1 + 3 = 4\n#### 4"), ("What is 2 plus 2?", "#### 4"), ("What is 3 plus 4?", "3 + 4 = 7\n#### 7")]


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    """Three GSM8K-style records whose answers are 4, 4 and 7."""
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    return path


@pytest.fixture(scope="module")
def answer_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama trained for a few seconds to answer every question with "#### 4" and stop.

    It gets 2 of the 3 `qa_file` questions right, so exact match must come out as 2/3.
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


def test_parse_metrics():
    assert parse_metrics("loss, ppl,EM,rouge,loss") == ["loss", "perplexity", "exact_match", "rouge"]
    with pytest.raises(TunelabError, match="unknown metric 'f1'"):
        parse_metrics("loss,f1")


def test_load_eval_examples_reads_formats_and_reports_bad_data(tmp_path, qa_file):
    examples = load_eval_examples(str(qa_file), limit=2)
    assert [e.reference for e in examples] == ["1 + 3 = 4\n#### 4", "#### 4"]
    assert examples[0].prompt == [{"role": "user", "content": "What is 1 plus 3?"}]
    assert examples[0].source.endswith("sums.jsonl:1")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"},
    ]}) + "\n")
    (multi,) = load_eval_examples(str(chat))
    assert multi.reference == "A2" and [m["content"] for m in multi.prompt] == ["S", "U1", "A1", "U2"]
    text = tmp_path / "plain.jsonl"
    text.write_text('{"text": "just text"}\n')
    (plain,) = load_eval_examples(str(text))  # plain text: scored whole (loss, perplexity)
    assert plain.plain_text and plain.reference == "just text" and plain.prompt == []
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"review": "great film", "label": "positive"}\n')
    (labelled,) = load_eval_examples(str(labels), fields={"prompt": "review", "response": "label"})
    assert labelled.reference == "positive"


def test_only_the_final_reply_and_end_of_turn_are_targets(tokenizer):
    from tunelab.data.render import control_token_ids

    example = EvalExample(
        prompt=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sum?"}],
        reference="#### 4",
        source="x.jsonl:1",
    )
    ids, labels = reply_ids_and_labels(tokenizer, example, max_tokens=1024, control_ids=control_token_ids(tokenizer))
    targets = [token for token in labels if token != -100]
    assert tokenizer.decode(targets) == "#### 4<|im_end|>"  # not "Hello!", not the trailing "\n"
    short_ids, short_labels = reply_ids_and_labels(tokenizer, example, max_tokens=8, control_ids=control_token_ids(tokenizer))
    assert len(short_ids) == 8 and short_ids == ids[-8:]  # over-long examples keep their end (the reply)


def hand_loss(model, tokenizer, example: EvalExample) -> tuple[float, int]:
    """Summed NLL of the reply tokens, straight from the definition (no batching, no masks)."""
    messages = example.prompt + [{"role": "assistant", "content": example.reference}]
    prompt = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    end = full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(prompt))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([full])).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    nll = -sum(float(log_probs[t - 1, full[t]]) for t in range(len(prompt), end + 1))
    return nll, end + 1 - len(prompt)


def test_score_loss_matches_hand_computation_for_any_batch_size(tiny_model_dir, tokenizer, qa_file):
    model, _ = load_for_generation(str(tiny_model_dir), dtype="fp32", device="cpu")
    examples = load_eval_examples(str(qa_file))
    sums, counts = zip(*(hand_loss(model, tokenizer, e) for e in examples))
    expected = sum(sums) / sum(counts)
    one = score_loss(model, tokenizer, examples, batch_size=1)
    three = score_loss(model, tokenizer, examples, batch_size=3)
    assert one.target_tokens == three.target_tokens == sum(counts)
    assert one.loss == pytest.approx(expected, rel=1e-4)
    assert three.loss == pytest.approx(expected, rel=1e-4)  # right padding changes nothing
    assert three.perplexity == pytest.approx(math.exp(expected), rel=1e-3)
    assert three.per_example == pytest.approx([s / c for s, c in zip(sums, counts)], rel=1e-4)


def test_exact_match_of_a_model_that_answers_four(answer_model_dir, tokenizer, qa_file):
    model, tok = load_for_generation(str(answer_model_dir), dtype="fp32", device="cpu")
    examples = load_eval_examples(str(qa_file))
    result = evaluate_model(model, tok, examples, metrics=["exact_match", "accuracy", "rouge", "bleu"], batch_size=2, max_new_tokens=12)
    rows = result.predictions
    assert [r["prediction"] for r in rows] == ["#### 4"] * 3
    assert [r["correct"] for r in rows] == [True, True, False]
    assert [r["predicted_answer"] for r in rows] == [4.0, 4.0, 4.0]
    assert [r["reference_answer"] for r in rows] == [4.0, 4.0, 7.0]
    assert result.scores["exact_match"] == pytest.approx(2 / 3)
    assert result.scores["accuracy"] == pytest.approx(1 / 3)  # "#### 4" equals the whole reference once
    # Generation stopped at <|im_end|>: "#### 4" plus the end-of-turn token, not 12 tokens.
    reply_tokens = len(tokenizer("#### 4", add_special_tokens=False)["input_ids"]) + 1
    assert [r["generated_tokens"] for r in rows] == [reply_tokens] * 3
    # ROUGE tokens are alphanumeric: "#### 4" is ["4"]; vs ["1","3","4","4"] F1 = 2*(1*1/4)/(1+1/4) = 0.4,
    # vs ["4"] 1.0, vs ["3","4","7","7"] 0.4; the score is their mean.
    assert result.scores["rouge1"] == pytest.approx((0.4 + 1.0 + 0.4) / 3)
    assert 0 < result.scores["bleu"] < 100


def test_eval_cli_compares_two_models(answer_model_dir, tiny_model_dir, qa_file, tmp_path):
    out = tmp_path / "results"
    result = runner.invoke(app, [
        "eval", str(answer_model_dir), str(tiny_model_dir), "--data", str(qa_file), "--metrics", "loss,perplexity,exact_match",
        "--max-new-tokens", "6", "--batch-size", "2", "--output", str(out), "--dtype", "fp32",
    ])
    assert result.exit_code == 0, result.output
    table = result.stdout
    first, second = model_label(str(answer_model_dir)), model_label(str(tiny_model_dir))
    assert first in table and second in table
    for column in ("params", "peak mem", "tok/s", "loss", "ppl", "exact match"):
        assert column in table
    assert "66.7%" in table and "0.0%" in table
    assert "Samples where the models differ" in table and "#### 4" in table
    for label, expected_em in ((first, 2 / 3), (second, 0.0)):
        folder = out / label / "eval" / "sums"
        scores = json.loads((folder / "scores.json").read_text())
        assert scores["exact_match"] == pytest.approx(expected_em)
        assert scores["examples"] == 3 and scores["params"] > 0 and scores["peak_memory_mb"] > 0
        assert scores["loss"] > 0 and scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
        predictions = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
        assert [p["reference"] for p in predictions] == [a for _, a in QUESTIONS]
        assert {"prompt", "prediction", "predicted_answer", "reference_answer", "correct", "loss"} <= set(predictions[0])
        assert json.loads((out / label / "eval.json").read_text())["evaluations"]["sums"]["exact_match"] == pytest.approx(expected_em)
        # Every score carries its 95% interval: Wilson for exact match (2 of 3: [20.8%, 93.9%]), bootstrap for loss.
        intervals = scores["intervals"]
        assert intervals["exact_match"]["method"] == "wilson" and intervals["loss"]["method"] == "bootstrap"
        assert intervals["loss"]["low"] <= scores["loss"] <= intervals["loss"]["high"]
        assert {"target_tokens"} <= set(predictions[0])
    em = json.loads((out / first / "eval" / "sums" / "scores.json").read_text())["intervals"]["exact_match"]
    assert (em["low"], em["high"]) == pytest.approx((0.2077, 0.9385), abs=1e-4)
    assert "66.7% [20.8, 93.9]" in table
    # The second model against the first on the same 3 examples: -66.7 points, paired bootstrap interval.
    compared = json.loads((out / second / "eval" / "sums" / "scores.json").read_text())["compared_to"]
    assert compared["model"] == first and compared["exact_match"]["difference"] == pytest.approx(-2 / 3)
    assert compared["exact_match"]["high"] <= 0 and "loss" in compared
    assert "compared_to" not in json.loads((out / first / "eval" / "sums" / "scores.json").read_text())
    assert f"Difference to {first}" in table and "-66.7 pts" in table


def test_run_folder_results_go_into_the_run(tiny_model_dir, qa_file, tmp_path):
    run = tmp_path / "runs" / "myrun"
    shutil.copytree(tiny_model_dir, run / "final")
    (run / "eval.json").write_text(json.dumps({"step": 5, "eval_loss": 1.25}))
    (results,) = evaluate_sources([str(run)], str(qa_file), metrics=["loss"], batch_size=3)
    assert results.name == "myrun" and results.folder == run / "eval" / "sums"
    assert (run / "eval" / "sums" / "predictions.jsonl").is_file()
    merged = json.loads((run / "eval.json").read_text())
    assert merged["eval_loss"] == 1.25 and merged["step"] == 5  # the trainer's summary is kept
    assert merged["evaluations"]["sums"]["loss"] == pytest.approx(results.scores["loss"])
    assert not list(run.rglob("*.tmp"))


def test_output_locations_and_labels(tmp_path):
    run = tmp_path / "runs" / "r1"
    (run / "checkpoints" / "step-20").mkdir(parents=True)
    assert output_root(str(run), "r1", None, several=False) == run
    assert output_root("default", "default", None, several=False) == Path("eval-results/default")
    assert output_root("default", "default", tmp_path / "o", several=False) == tmp_path / "o"
    assert output_root("default", "default", tmp_path / "o", several=True) == tmp_path / "o" / "default"
    assert model_label(str(run / "checkpoints" / "step-20")) == "r1-step-20"
    assert model_label("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB--SmolLM2-135M-Instruct"
    assert model_label(None) == "default"
    data = tmp_path / "gsm8k" / "test.jsonl"
    data.parent.mkdir()
    data.write_text("")
    assert data_label(str(data)) == "gsm8k-test"


def test_bad_options_fail_before_loading(qa_file):
    with pytest.raises(TunelabError, match="is not a valid regular expression"):
        evaluate_sources(["/nonexistent/model"], str(qa_file), metrics=["exact_match"], answer_regex="(")
    with pytest.raises(TunelabError, match="--limit must be at least 1"):
        evaluate_sources(["/nonexistent/model"], str(qa_file), limit=0)
    result = runner.invoke(app, ["eval", "default", "--data", str(qa_file), "--prompt-field", "q"])
    assert isinstance(result.exception, TunelabError) and "go together" in str(result.exception)


@pytest.mark.real_model
def test_real_model_on_five_gsm8k_problems(gsm8k_dir):
    """The bundled SmolLM2-135M-Instruct on 5 GSM8K test problems: plausible loss, answers that end."""
    model, tokenizer = load_for_generation("default", dtype="auto", device="cpu")
    examples = load_eval_examples(str(gsm8k_dir / "test.jsonl"), limit=5)
    result = evaluate_model(model, tokenizer, examples, metrics=["loss", "exact_match"], batch_size=5, max_new_tokens=160)
    assert result.scores["examples"] == 5
    assert 0.5 < result.scores["loss"] < 3.0  # nats per reply token; a random model would be ~10.8
    assert 0.0 <= result.scores["exact_match"] <= 1.0
    predictions = [r["prediction"] for r in result.predictions]
    assert all(predictions) and all("<|im_end|>" not in p for p in predictions)
    assert any(r["generated_tokens"] < 160 for r in result.predictions)  # it ends its turn by itself
