"""Plain-text data end to end, settings people bring from other tools, and the evaluation keys.

Text runs: no chat template is added to a base model, the run records `prompt_format: text`,
and generate / eval / the Python API continue raw text; chat runs keep using the template.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems, text_records
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import RUN_META_FILE, load_for_inference
from tunelab.train import train

from conftest import make_tiny_llama


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("text") / "text.jsonl", text_records(24, seed=1))


@pytest.fixture(scope="module")
def qa_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("qa")
    records = reasoning_problems(30, seed=4)
    return write_jsonl(folder / "train.jsonl", records[:24]), write_jsonl(folder / "held.jsonl", records[24:])


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama whose tokenizer has NO chat template (a base model)."""
    path = tmp_path_factory.mktemp("tiny-base")
    make_tiny_llama().save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def run_config(model_dir: Path, data: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"model.name={model_dir}", f"data.train={data}", f"output.dir={out.parent}", f"output.name={out.name}",
        "training.batch_size=4", "training.gradient_accumulation_steps=1", "training.learning_rate=5e-3",
        "training.warmup_steps=0", "training.logging_steps=1", "training.max_steps=2", "training.precision=fp32",
        "lora.r=2", "lora.alpha=4", "data.max_seq_length=256", *overrides,
    ])


def meta(run: Path) -> dict:
    return json.loads((run / "final" / RUN_META_FILE).read_text())


# ----------------------------------------------------------------------------- recorded format


def test_base_model_gets_no_template_for_text_and_one_for_chat(base_model_dir, text_file, qa_files, tmp_path):
    text_run = train(run_config(base_model_dir, text_file, tmp_path / "text"), quiet=True)
    assert meta(text_run.run_dir)["prompt_format"] == "text"
    assert not (text_run.final_dir / "chat_template.jinja").exists()
    assert not text_run.tokenizer.chat_template
    vocab = make_tiny_llama().config.vocab_size
    assert text_run.model.get_input_embeddings().weight.shape[0] == vocab  # no tokens added

    chat_run = train(run_config(base_model_dir, qa_files[0], tmp_path / "chat"), quiet=True)
    assert meta(chat_run.run_dir)["prompt_format"] == "chat"
    assert "<|im_start|>" in (chat_run.final_dir / "chat_template.jinja").read_text()


def test_text_run_continues_raw_text_and_chat_run_uses_the_template(tiny_model_dir, text_file, qa_files, tmp_path):
    from tunelab.generate import GenerationSettings, encode_prompt, generate_for_prompts, user_messages

    text_run = train(run_config(tiny_model_dir, text_file, tmp_path / "text"), quiet=True)
    assert meta(text_run.run_dir)["prompt_format"] == "text"
    model, tokenizer = load_for_inference(str(text_run.run_dir), dtype="fp32", device="cpu")
    assert tokenizer.chat_template is None  # the instruct tokenizer's template is not used for this run
    prompt = "The river ran"
    row = generate_for_prompts(model, tokenizer, [prompt], GenerationSettings(max_new_tokens=6))[0]
    ids = tokenizer(prompt, return_tensors="pt")
    direct = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert row["completion"] == tokenizer.decode(direct, skip_special_tokens=True).strip()
    from tunelab.generate import ChatSession

    session = ChatSession(model, tokenizer, settings=GenerationSettings(max_new_tokens=4))
    session.history.append({"role": "user", "content": prompt})
    assert tokenizer.decode(session.fit_prompt()) == prompt + "\n"  # chat continues raw text too, no <|im_start|>
    # Asked explicitly, the template is still there.
    _, templated = load_for_inference(str(text_run.run_dir), dtype="fp32", device="cpu", chat_template=True)
    assert templated.chat_template

    chat_run = train(run_config(tiny_model_dir, qa_files[0], tmp_path / "chat"), quiet=True)
    _, chat_tokenizer = load_for_inference(str(chat_run.run_dir), dtype="fp32", device="cpu")
    ids = encode_prompt(chat_tokenizer, user_messages("hi"))
    assert chat_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- eval on plain text


def test_eval_scores_every_token_of_plain_text(tiny_llama, tokenizer, tmp_path):
    from tunelab.evaluate import evaluate_model, load_eval_examples

    path = write_jsonl(tmp_path / "notes.jsonl", [{"text": "The cat sat on the mat."}, {"text": "Rivers run to the sea, slowly."}])
    examples = load_eval_examples(str(path))
    tiny_llama.eval()
    result = evaluate_model(tiny_llama, tokenizer, examples, metrics=["loss", "perplexity"], batch_size=2)
    nll, count = 0.0, 0
    for record in ({"text": "The cat sat on the mat."}, {"text": "Rivers run to the sea, slowly."}):
        ids = tokenizer(record["text"])["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = tiny_llama(torch.tensor([ids])).logits[0, :-1]
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    assert result.scores["target_tokens"] == count
    assert result.scores["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result.scores["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(TunelabError, match=r"notes.jsonl:1: a plain-text record; exact_match need a prompt and a reference"):
        evaluate_model(tiny_llama, tokenizer, examples, metrics=["loss", "exact_match"])


def test_default_metrics_on_plain_text_are_loss_and_perplexity(tiny_model_dir, text_file, tmp_path, capsys):
    from tunelab.evaluate import evaluate_sources

    (result,) = evaluate_sources([str(tiny_model_dir)], str(text_file), dtype="fp32", device="cpu", output=tmp_path / "out")
    assert result.scores["metrics"] == ["loss", "perplexity"] and result.scores["loss"] > 0
    assert "exact_match" not in result.scores
    assert "exact_match need prompt/answer records" in " ".join(capsys.readouterr().err.split())


# ----------------------------------------------------------------------------- evaluation keys


def test_evaluation_keys_drive_the_post_training_eval_and_eval_defaults(tiny_model_dir, qa_files, tmp_path):
    from tunelab.evaluate import evaluate_sources

    train_path, held = qa_files
    config = run_config(
        tiny_model_dir, train_path, tmp_path / "run", f"data.eval={held}", "evaluation.metrics=[loss,exact_match]",
        "evaluation.batch_size=3", "evaluation.max_new_tokens=4", r"evaluation.answer_regex=answer (\d+)",
    )
    result = train(config, quiet=True)
    scores = json.loads((result.run_dir / "eval" / "held" / "scores.json").read_text())
    assert scores["max_new_tokens"] == 4 and scores["batch_size"] == 3 and scores["answer_regex"] == r"answer (\d+)"
    assert scores["metrics"] == ["loss", "exact_match"] and scores["examples"] == 6
    assert "exact_match" in scores and "loss" in scores and "rouge1" not in scores
    predictions = [json.loads(line) for line in (result.run_dir / "eval" / "held" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and all(row["generated_tokens"] <= 4 for row in predictions)
    summary = json.loads((result.run_dir / "eval.json").read_text())
    assert summary["eval_loss"] is not None and "held" in summary["evaluations"]

    # `tunelab eval RUN` without options takes the run's evaluation settings.
    (again,) = evaluate_sources([str(result.run_dir)], str(held), dtype="fp32", device="cpu", output=tmp_path / "again")
    assert again.scores["metrics"] == ["loss", "exact_match"]
    assert (again.scores["max_new_tokens"], again.scores["batch_size"], again.scores["answer_regex"]) == (4, 3, r"answer (\d+)")
    (override,) = evaluate_sources([str(result.run_dir)], str(held), metrics=["loss"], batch_size=2,
                                   dtype="fp32", device="cpu", output=tmp_path / "override")
    assert override.scores["metrics"] == ["loss"] and override.scores["batch_size"] == 2


def test_generation_metrics_need_eval_data(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluation.metrics: exact_match are measured after training on prompt/answer "
                                          r"data from data.eval"):
        load_config(None, ["data.train=x.jsonl", "evaluation.metrics=[loss,exact_match]"])
    assert load_config(None, ["data.eval=y.jsonl", "evaluation.metrics=[exact_match]"]).evaluation.metrics == ["exact_match"]


# ----------------------------------------------------------------------------- Python API


def test_flat_finetune_config_builds_the_nested_config():
    from tunelab import FineTuneConfig

    config = FineTuneConfig(model_name="some/model", num_epochs=2, batch_size=8, learning_rate=1e-4, lora_r=8,
                            lora_alpha=16, max_seq_length=256, lora_dropout=0.0, warmup_steps=5, output_dir="out")
    assert (config.model.name, config.training.epochs, config.training.batch_size, config.training.learning_rate) == (
        "some/model", 2, 8, 1e-4)
    assert (config.lora.r, config.lora.alpha, config.lora.dropout, config.data.max_seq_length) == (8, 16, 0.0, 256)
    assert (config.training.warmup_steps, config.output.dir) == (5, "out")
    assert FineTuneConfig(training={"epochs": 4}, lora_r=2).training.epochs == 4
    with pytest.raises(ConfigError) as err:
        FineTuneConfig(num_train_epochs=3, lora_r=0)
    text = str(err.value)
    assert "num_train_epochs: unknown key (a transformers/peft/bitsandbytes name); tunelab's key is training.epochs" in text
    assert "lora.r: Input should be greater than or equal to 1 (got 0)" in text
    with pytest.raises(ConfigError, match="num_epochs: also given as training.epochs; keep one of them"):
        FineTuneConfig(num_epochs=3, training={"epochs": 2})


def test_python_api_text_run_generates_with_max_length(tiny_model_dir, text_file, tmp_path):
    from tunelab import FineTuneConfig, FineTuner

    config = FineTuneConfig(model_name=str(tiny_model_dir), max_steps=2, batch_size=4, gradient_accumulation_steps=1,
                            learning_rate=5e-3, lora_r=2, lora_alpha=4, max_seq_length=96, precision="fp32",
                            output={"dir": str(tmp_path), "name": "api"})
    tuner = FineTuner(config)
    tuner.train(str(text_file))
    prompt = "The river ran"
    prompt_ids = tuner.result.tokenizer(prompt)["input_ids"]
    text = tuner.generate(prompt, max_length=len(prompt_ids) + 5)
    model = tuner.result.model
    direct = model.generate(input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=5, do_sample=False, eos_token_id=tuner.result.tokenizer.eos_token_id)
    assert text == tuner.result.tokenizer.decode(direct[0, len(prompt_ids):], skip_special_tokens=True).strip()
    with pytest.raises(TunelabError, match="max_length=2 leaves no room to generate"):
        tuner.generate(prompt, max_length=2)


# ----------------------------------------------------------------------------- CLI flags, foreign keys, flash-attn


def _tunelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def test_train_flags_and_flash_attention_fallback(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "runs" / "flags"
    result = _tunelab(
        "train", "--model", str(tiny_model_dir), "--train-data", str(text_file), "--max-steps", "1", "--output", str(out),
        "--lora-r", "3", "--lora-alpha", "6", "--lora-dropout", "0.05", "--max-seq-length", "64", "--warmup-steps", "1",
        "--weight-decay", "0.5", "--gradient-accumulation", "3", "--batch-size", "2",
        "model.attn_implementation=flash_attention_2", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stderr = " ".join(result.stderr.split())
    assert "flash_attention_2 is not usable (it runs only on CUDA GPUs and this model is on the cpu); using sdpa instead" in stderr
    assert "pip install flash-attn" in stderr
    import yaml

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["train"] == str(text_file)
    assert (config["lora"]["r"], config["lora"]["alpha"], config["lora"]["dropout"]) == (3, 6.0, 0.05)
    assert config["data"]["max_seq_length"] == 64
    t = config["training"]
    assert (t["warmup_steps"], t["weight_decay"], t["gradient_accumulation_steps"]) == (1, 0.5, 3)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (3, 6.0)


def test_flash_attention_falls_back_to_sdpa_in_the_library(tiny_model_dir, capsys):
    from tunelab.models import ModelLoading, load_base_model

    model = load_base_model(str(tiny_model_dir), ModelLoading(attn_implementation="flash_attention_2", device="cpu"))
    assert model.config._attn_implementation == "sdpa"
    assert "using sdpa instead" in capsys.readouterr().err


@pytest.mark.parametrize(("key", "hint"), [
    ("torch_dtype: bfloat16", "torch_dtype: unknown key (a transformers/peft/bitsandbytes name); tunelab's key is model.dtype"),
    ("lora_alpha: 16", "lora_alpha: unknown key (a transformers/peft/bitsandbytes name); tunelab's key is lora.alpha"),
    ("load_in_4bit: true", "tunelab's key is quantization.bits: 4 (or method: qlora)"),
    ("num_train_epochs: 3", "num_train_epochs: unknown key (a transformers/peft/bitsandbytes name); tunelab's key is training.epochs"),
    ("per_device_train_batch_size: 8", "tunelab's key is training.batch_size"),
    ("gradient_accumulation_steps: 4", "tunelab's key is training.gradient_accumulation_steps"),
    ("device_map: auto", "device_map: unknown key (a transformers/peft/bitsandbytes name); tunelab has no such key: it places the model itself"),
    ("training:\n  num_train_epochs: 2", "training.num_train_epochs: unknown key (a transformers/peft/bitsandbytes name); tunelab's key is training.epochs"),
])
def test_keys_from_transformers_peft_bitsandbytes_name_tunelabs_key(key, hint, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"method: lora\n{key}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    line = 3 if key.startswith("training:") else 2
    assert f"{path}:{line}: " in str(err.value) and hint in str(err.value)


# ----------------------------------------------------------------------------- the seed-style workflow, real model


@pytest.mark.real_model
def test_seed_style_text_workflow_on_the_bundled_model(tmp_path):
    """`train --train-data text.jsonl`, `generate`, `evaluate` (loss, perplexity) on SmolLM2-135M-Instruct."""
    data = write_jsonl(tmp_path / "text.jsonl", text_records(16, seed=2))
    run = tmp_path / "runs" / "notes"
    trained = _tunelab("train", "--train-data", str(data), "--max-steps", "2", "--batch-size", "4", "--gradient-accumulation", "1",
                       "--lora-r", "4", "--max-seq-length", "64", "--output", str(run), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done 2 steps" in trained.stdout
    assert meta(run)["prompt_format"] == "text" and meta(run)["base_model"] == "default"

    generated = _tunelab("generate", str(run), "--prompt", "The old lighthouse", "--max-new-tokens", "8", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.strip()  # a continuation of the raw text

    evaluated = _tunelab("evaluate", str(run), "--data", str(data), cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "loss" in evaluated.stdout and "ppl" in evaluated.stdout
    scores = json.loads((run / "eval" / "text" / "scores.json").read_text())
    assert scores["metrics"] == ["loss", "perplexity"] and scores["examples"] == 16
    assert 0 < scores["loss"] < 10 and scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-6)


def test_gated_model_error_names_the_token_fix(monkeypatch):
    import transformers

    from tunelab.models import load_tokenizer

    def refuse(*args, **kwargs):
        raise OSError("You are trying to access a gated repo.\n401 Client Error. Access to model meta-llama/X is restricted.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(TunelabError) as err:
        load_tokenizer("meta-llama/X")
    text = str(err.value)
    assert "cannot load a tokenizer from 'meta-llama/X'" in text
    assert "accept its license on its huggingface.co page" in text and "export HF_TOKEN=hf_..." in text
