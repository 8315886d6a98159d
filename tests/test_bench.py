"""`tunelab bench`: lm-evaluation-harness on tiny models with local GSM8K files, offline; its
scores against `tunelab eval`'s; the messages for a missing extra, an unknown or uncached task."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError

lm_eval = pytest.importorskip("lm_eval")

from tunelab.bench import load_tasks, parse_task_data, require_lm_eval, run_bench  # noqa: E402

runner = CliRunner()
SUMS = [("What is 1 plus 3?", "1 + 3 = 4\n#### 4"), ("What is 2 plus 2?", "#### 4"), ("What is 3 plus 4?", "3 + 4 = 7\n#### 7")]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test: bench must not touch the hub."""
    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def gsm8k_small(tmp_path_factory, gsm8k_dir) -> Path:
    """The first 5 GSM8K test problems and 2 train problems (the 1-shot example comes from those)."""
    folder = tmp_path_factory.mktemp("gsm8k-small")
    for split, count in (("test", 5), ("train", 2)):
        lines = (gsm8k_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def adapter_run(tmp_path_factory, tiny_model_dir, tokenizer) -> Path:
    """A run folder whose final/ is a LoRA adapter (random, non-zero B) on the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path_factory.mktemp("runs") / "adapter-run"
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "final" / "tunelab_model.json").write_text(json.dumps({"base_model": str(tiny_model_dir), "prompt_format": "chat"}))
    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bench_adapter_run_with_baseline_offline(adapter_run, tiny_model_dir, gsm8k_small, no_network):
    result = runner.invoke(app, [
        "bench", str(adapter_run), "--tasks", "gsm8k", "--data", f"gsm8k={gsm8k_small}", "--limit", "5", "--num-fewshot", "1",
        "--max-new-tokens", "8", "--batch-size", "5", "--baseline", str(tiny_model_dir), "--dtype", "fp32",
        "--compare", "smollm2-135m-instruct",
    ])
    assert result.exit_code == 0, result.output
    folder = adapter_run / "bench"  # a run folder's results go into the run
    summary = json.loads((folder / "bench.json").read_text())
    assert summary["lm_eval_version"] == lm_eval.__version__ and summary["task_versions"] == {"gsm8k_local": 3.0}
    assert summary["n_shot"] == {"gsm8k_local": 1} and summary["n_samples"]["gsm8k_local"] == {"original": 5, "effective": 5}
    assert summary["chat_template"] is True and summary["seed"] == 1234 and summary["limit"] == 5
    generation = summary["generation_kwargs"]["gsm8k_local"]
    assert generation["max_gen_toks"] == 8 and generation["do_sample"] is False and "Question:" in generation["until"]
    # Both GSM8K filters, each with its standard error and a 95% interval over the 5 problems.
    scores = {s["filter"]: s for s in summary["scores"]}
    assert set(scores) == {"strict-match", "flexible-extract"}
    samples = read_jsonl(folder / "samples_gsm8k_local.jsonl")
    assert len(samples) == 10 and sorted({s["doc_id"] for s in samples}) == [0, 1, 2, 3, 4]
    for name, score in scores.items():
        values = [s["exact_match"] for s in samples if s["filter"] == name]
        assert score["n"] == 5 and score["value"] == pytest.approx(sum(values) / 5)
        assert score["stderr"] is not None and score["interval"]["method"] == "wilson"
        assert score["interval"]["low"] <= score["value"] <= score["interval"]["high"]
    # The per-sample log: the harness's 1-shot prompt in the run's chat template, from our local files.
    first = samples[0]
    assert first["prompt"].count("Question:") == 2 and "<|im_start|>assistant" in first["prompt"]
    assert first["source"].endswith("test.jsonl:1") and first["target"].endswith("#### 18")
    raw = json.loads((folder / "lm_eval_results.json").read_text())
    assert raw["results"]["gsm8k_local"]["exact_match,strict-match"] == pytest.approx(scores["strict-match"]["value"])
    # The baseline (the adapter's base) ran under the same settings; the adapter changed the answers.
    base_samples = read_jsonl(folder / "baseline" / "samples_gsm8k_local.jsonl")
    assert [s["prompt"] for s in base_samples] == [s["prompt"] for s in samples]
    assert [s["response"] for s in base_samples] != [s["response"] for s in samples]
    differences = {d["filter"]: d for d in summary["baseline"]["differences"]}
    base_scores = {s["filter"]: s for s in json.loads((folder / "baseline" / "bench.json").read_text())["scores"]}
    for name, diff in differences.items():
        assert diff["n"] == 5 and diff["difference"] == pytest.approx(scores[name]["value"] - base_scores[name]["value"])
        assert diff["low"] <= diff["difference"] <= diff["high"]
    # Published figures with their provenance and the harness caveat.
    published = summary["published"]
    assert published["rows"] == [{"task": "gsm8k", "published": 1.4, "published_setting": "5-shot", "measured": 100 * scores["flexible-extract"]["value"]}]
    assert "lighteval" in published["harness"] and "difference" in published["note"]
    assert "strict-match" in result.stdout and "flexible-extract" in result.stdout and "Published" in result.stdout


def test_harness_exact_match_equals_tunelab_eval(answer_model_dir, tmp_path, no_network):
    """The same 3 problems through lm-eval (local `qa` and `gsm8k` templates) and `tunelab eval`.

    `qa` prompts exactly as `tunelab eval` does (the question as the user turn, zero-shot), so
    the greedy answers are the same text and exact match is equal: 2/3 ("#### 4" for 4, 4, 7).
    lm-eval's `gsm8k` template asks "Question: ...\\nAnswer:" instead; this model still answers
    "#### 4", so it scores the same here (in general a different prompt gives different answers).
    """
    from tunelab.evaluate import evaluate_model, load_eval_examples
    from tunelab.generate import load_for_generation

    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in SUMS))
    harness, _ = run_bench(str(answer_model_dir), tasks=["qa", "gsm8k"], data=parse_task_data([f"qa={data}", f"gsm8k={data}"]),
                           num_fewshot=0, max_new_tokens=12, batch_size=1, output=tmp_path / "bench", dtype="fp32")
    model, tokenizer = load_for_generation(str(answer_model_dir), dtype="fp32", device="cpu")
    examples = load_eval_examples(str(data))
    ours = evaluate_model(model, tokenizer, examples, metrics=["exact_match"], batch_size=1, max_new_tokens=12)
    assert ours.scores["exact_match"] == pytest.approx(2 / 3)
    scores = {(s["task"], s["filter"]): s["value"] for s in harness.summary["scores"]}
    for key in (("qa_local", "strict-match"), ("qa_local", "flexible-extract"), ("gsm8k_local", "strict-match")):
        assert scores[key] == pytest.approx(ours.scores["exact_match"])
    strict = [s for s in harness.samples["qa_local"] if s["filter"] == "strict-match"]
    # Same prompt text, same greedy answer, same verdict per example.
    assert [s["prompt"] for s in strict] == [
        tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False) for ex in examples]
    assert [s["response"] for s in strict] == [row["prediction"] for row in ours.predictions] == ["#### 4"] * 3
    assert [bool(s["exact_match"]) for s in strict] == [row["correct"] for row in ours.predictions]


def test_where_harness_and_tunelab_answer_rules_differ():
    """lm-eval's GSM8K filters + exact_match against tunelab's `answers_match`, on hand-made answers.

    tunelab reads the number after the last "####", else the last number, and compares numerically.
    strict-match needs "#### N" and compares text; flexible-extract takes the last number-like token.
    """
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from tunelab.bench import harness_gsm8k_config
    from tunelab.metrics import answers_match

    config = harness_gsm8k_config()
    filters = {f["name"]: f["filter"][0] for f in config["filter_list"]}
    metric = config["metric_list"][0]

    def harness(name: str, prediction: str, reference: str) -> bool:
        spec = filters[name]
        regex = RegexFilter(regex_pattern=spec["regex_pattern"], group_select=spec.get("group_select", 0))
        extracted = list(regex.apply([[prediction]], [{}]))[0][0]
        score = exact_match_hf_evaluate([extracted], [reference], regexes_to_ignore=metric["regexes_to_ignore"],
                                        ignore_case=metric["ignore_case"], ignore_punctuation=metric["ignore_punctuation"])
        return bool(score["exact_match"])

    reference = "She has 16 - 3 = 13 left.\n#### 1000"
    cases = [  # prediction, tunelab, strict-match, flexible-extract
        ("13 left, so\n#### 1000", True, True, True),
        ("#### 1,000", True, True, True),          # separators: both drop ","
        ("#### $1000", True, False, True),         # strict's pattern has no "$"; flexible's "$" is ignored
        ("The answer is 1000.", True, False, True),  # no "####": strict gives [invalid]
        ("#### 1000.0", True, False, False),       # tunelab compares numbers, the harness text
        ("#### 1000 (or 999 by another count)", True, True, False),  # flexible takes the last number
        ("#### 999\nOops, 1000", False, False, True),  # tunelab and strict read after "####"
    ]
    for prediction, ours, strict, flexible in cases:
        assert (answers_match(prediction, reference), harness("strict-match", prediction, reference),
                harness("flexible-extract", prediction, reference)) == (ours, strict, flexible), prediction


def test_missing_extra_unknown_and_uncached_tasks(monkeypatch, tmp_path, no_network):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if `pip install 'tunelab[bench]'` had not run
    with pytest.raises(TunelabError, match=r"pip install 'tunelab\[bench\]'"):
        require_lm_eval()
    result = runner.invoke(app, ["bench", "default", "--tasks", "gsm8k", "--limit", "5"])
    assert result.exit_code != 0 and "lm-evaluation-harness" in str(result.exception)
    monkeypatch.undo()
    # Hub tasks read only the datasets cache (empty here): the message names the task and the fix.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-datasets-cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(TunelabError, match=r"task arc_easy: its data set is not in the local Hugging Face datasets cache[\s\S]*--download"):
        load_tasks(["arc_easy"], {}, None, download=False)
    with pytest.raises(TunelabError, match=r"no task 'arc_eesy' \(did you mean arc_easy"):
        load_tasks(["arc_eesy"], {}, None, download=False)
    with pytest.raises(TunelabError, match="expected TASK=PATH"):
        parse_task_data(["gsm8k"])
    with pytest.raises(TunelabError, match="'arc_easy' has no local-file template"):
        parse_task_data([f"arc_easy={tmp_path}"])
    with pytest.raises(TunelabError, match="5-shot prompts take their examples from a train.jsonl"):
        one = tmp_path / "one.jsonl"
        one.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
        load_tasks(["gsm8k"], {"gsm8k": one}, 5, download=False)
