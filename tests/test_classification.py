"""Sequence classification on the shared loop: tiny BERT and Llama classifiers, labelled data, metrics,
resume, the run folder, predict / eval / validate / synth on the command line, and MiniLM for real."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.data.synthetic import classification_records
from tunelab.errors import ConfigError, DataError, TunelabError
from tunelab.metrics import classification_scores
from tunelab.tasks.classification import (
    ClassificationLoss,
    build_classification_data,
    classifier_model_dir,
    load_classifier_run,
    predict_probabilities,
)
from tunelab.train import accumulate_gradients, train

REPO = Path(__file__).resolve().parents[1]
LABELS = ["account", "billing", "shipping", "technical"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT with MiniLM's (uncased WordPiece) tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(classifier_model_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ticket_files(tmp_path_factory) -> tuple[Path, Path]:
    """400 train / 80 eval synthetic tickets at difficulty 1 (the label is decided by its keywords)."""
    path = tmp_path_factory.mktemp("tickets")
    records = classification_records(480, seed=0, difficulty=1)
    (path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:400]))
    (path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[400:]))
    return path / "train.jsonl", path / "eval.jsonl"


def cls_config(model_dir: Path, train_file: Path, eval_file: Path | None, out: Path, *overrides: str):
    eval_keys = [f"data.eval={eval_file}"] if eval_file else []
    return load_config(None, [
        "task=classification", f"model.name={model_dir}", f"data.train={train_file}", *eval_keys,
        f"output.dir={out.parent}", f"output.name={out.name}", "training.precision=fp32", "training.batch_size=16",
        "training.gradient_accumulation_steps=1", "training.warmup_steps=0", "training.logging_steps=1",
        "data.max_seq_length=64", "lora.r=8", "lora.alpha=16", *overrides,
    ])


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_tiny_classifiers_learn_a_separable_set(kind, tiny_bert_dir, tiny_model_dir, ticket_files, tmp_path):
    """Full fine-tuning of a 2-layer random encoder and decoder: > 90% on held-out tickets (majority 40%)."""
    model_dir = tiny_bert_dir if kind == "bert" else tiny_model_dir
    train_file, eval_file = ticket_files
    result = train(cls_config(model_dir, train_file, eval_file, tmp_path / kind, "method=full", "training.epochs=5",
                              "training.learning_rate=5e-3"), quiet=True)
    summary = json.loads((result.run_dir / "eval.json").read_text())
    scores = summary["classification"]
    assert scores["labels"] == LABELS
    assert summary["accuracy"] > 0.9, summary["accuracy"]
    assert scores["majority_baseline"] < 0.5
    assert sum(map(sum, scores["confusion_matrix"])) == 80
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert evals[-1] < evals[0] / 3, evals
    # Logged in the task's own words: examples, accuracy during training, no perplexity.
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval_ppl" in r or "tokens" in r or "tokens_per_s" in r for r in records)
    steps = [r for r in records if "loss" in r]
    assert steps[-1]["examples"] == result.state.targets_seen == 5 * 400 and 0 <= steps[-1]["accuracy"] <= 1
    assert summary["eval_accuracy"] == pytest.approx(summary["accuracy"], abs=1e-6)  # the loop's and the task's count
    assert summary["train_examples"] == 2000 and "eval_perplexity" not in summary and "eval_ppl" not in summary
    # The final model is a plain transformers classifier with the run's labels.
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(result.final_dir)
    assert reloaded.config.id2label == dict(enumerate(LABELS))
    if kind == "llama":  # a decoder finds each row's last real token by the pad id
        assert reloaded.config.pad_token_id == result.tokenizer.pad_token_id


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_adapter_methods_train_and_save_the_new_head(method, tiny_bert_dir, ticket_files, tmp_path):
    train_file, eval_file = ticket_files
    config = cls_config(tiny_bert_dir, train_file, eval_file, tmp_path / method, f"method={method}", "training.max_steps=4",
                        "training.learning_rate=5e-3", "lora.dropout=0.0")
    result = train(config, quiet=True)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert {"base_model.model.classifier.modules_to_save.default.weight",
            "base_model.model.classifier.modules_to_save.default.bias"} <= trainable
    assert all("lora_" in n or "modules_to_save" in n or "lora_magnitude" in n for n in trainable)
    saved = load_file(result.final_dir / "adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in saved and saved["base_model.model.classifier.weight"].shape == (4, 64)
    head = result.model.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(saved["base_model.model.classifier.weight"], head.detach().float().cpu())
    meta = json.loads((result.final_dir / "tunelab_model.json").read_text())
    assert meta == {"base_model": str(tiny_bert_dir), "method": method, "task": "classification", "labels": LABELS}
    if method == "qlora":
        import bitsandbytes as bnb

        layer = result.model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
        assert isinstance(layer, bnb.nn.Linear4bit)
        return
    # Reloading the run (base + adapter + head, merged) gives the trained model's probabilities.
    model, tokenizer, labels = load_classifier_run(str(result.run_dir), dtype="fp32", device="cpu")
    data = build_classification_data(train_source=str(train_file), eval_source=str(eval_file), tokenizer=tokenizer,
                                     fields={}, max_length=64)
    assert labels == LABELS
    expected = predict_probabilities(result.model, data.eval[:16], data.pad_id)
    torch.testing.assert_close(predict_probabilities(model, data.eval[:16], data.pad_id), expected, rtol=1e-4, atol=1e-5)


def test_loss_is_the_mean_over_examples_whatever_the_micro_batching(tiny_bert_dir, ticket_files):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    data = build_classification_data(train_source=str(ticket_files[0]), eval_source=None, tokenizer=tokenizer, fields={}, max_length=64)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=4, ignore_mismatched_sizes=True)
    model.eval()  # no dropout: the two splits must see the same network
    loss_module = ClassificationLoss(model)
    rows = [[i] for i in range(8)]

    def grads(micro):
        model.zero_grad(set_to_none=True)
        loss, count = accumulate_gradients(loss_module, micro, Accelerator(cpu=True))["loss/loss"]
        return loss, count, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, count_a, one = grads([data.collate(rows)])
    loss_b, count_b, eight = grads([data.collate([row]) for row in rows])
    assert count_a == count_b == 8
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in one:
        torch.testing.assert_close(eight[name], one[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- run folder and resume


EXPECTED_RUN_FILES = {
    "config.yaml", "metrics.jsonl", "eval.json", "report.html",
    "final/adapter_config.json", "final/adapter_model.safetensors", "final/tokenizer.json",
    "final/tokenizer_config.json", "final/tunelab_model.json", "final/README.md",
}
CHECKPOINT_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json",
    "tokenizer.json", "tokenizer_config.json", "tunelab_model.json", "README.md",
}


def test_classifier_run_folder_holds_exactly_the_documented_files(tiny_bert_dir, ticket_files, tmp_path):
    run_dir = tmp_path / "run"
    train(cls_config(tiny_bert_dir, ticket_files[0], ticket_files[1], run_dir, "training.max_steps=4", "training.save_steps=2"),
          quiet=True)
    files = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    assert files == EXPECTED_RUN_FILES
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
    assert {p.name for p in (run_dir / "checkpoints" / "step-2").iterdir()} == CHECKPOINT_FILES
    summary = json.loads((run_dir / "eval.json").read_text())
    assert {"accuracy", "macro_f1", "classification", "eval_loss"} <= summary.keys()
    assert summary["train_tokens"] == 4 * 16  # a classifier's targets are its examples
    report = (run_dir / "report.html").read_text()
    assert "<h2>Classification</h2>" in report and 'alt="confusion matrix' in report


KILL_AT_STEP_4 = textwrap.dedent("""
    import os, signal, sys
    import tunelab.checkpoint as checkpoint
    import tunelab.train as train_module
    from tunelab.config import load_config

    real_save = checkpoint.save_checkpoint

    def save_then_die(checkpoints_dir, **kwargs):
        path = real_save(checkpoints_dir, **kwargs)
        if kwargs["state"].global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    train_module.save_checkpoint = save_then_die
    train_module.train(load_config(None, sys.argv[1:]), quiet=True)
""")


def test_resumed_classifier_run_matches_an_uninterrupted_one(tiny_bert_dir, ticket_files, tmp_path):
    """LoRA with dropout (RNG state matters) on a BERT classifier, killed after the step-4 checkpoint."""
    def overrides(name: str) -> list[str]:
        return ["task=classification", f"model.name={tiny_bert_dir}", f"data.train={ticket_files[0]}",
                f"data.eval={ticket_files[1]}", f"output.dir={tmp_path}", f"output.name={name}", "training.precision=fp32",
                "training.batch_size=16", "training.gradient_accumulation_steps=2", "training.warmup_steps=0",
                "training.logging_steps=1", "data.max_seq_length=64", "lora.r=4", "lora.alpha=8", "lora.dropout=0.2",
                "training.save_steps=2", "training.max_steps=8", "training.keep_checkpoints=3", "training.learning_rate=5e-3"]

    straight = train(load_config(None, overrides("straight")), quiet=True)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, *overrides("killed")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "killed" / "final").exists()
    resumed = train(load_config(None, [*overrides("killed"), "training.resume=true"]), quiet=True)
    assert resumed.state.global_step == 8
    a = load_file(tmp_path / "straight" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and "base_model.model.classifier.weight" in a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert straight.eval_loss == pytest.approx(resumed.eval_loss, abs=1e-6)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(ln)]
    assert steps == list(range(1, 9))


# ----------------------------------------------------------------------------- data


def test_labels_strings_or_ints_pairs_mapping_and_unseen_eval_labels(tiny_bert_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    # Integer labels sort numerically (2 before 10); text pairs from CSV get token types.
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["premise", "hypothesis", "label"])
        for i in range(12):
            writer.writerow([f"a cat sat number {i}", f"an animal sat {i}", [2, 10, 0][i % 3]])
    data = build_classification_data(train_source=str(tmp_path / "pairs.csv"), eval_source=None, tokenizer=tokenizer, fields={}, max_length=32)
    assert data.labels == ["0", "2", "10"]
    batch = data.collate([[0], [1]])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["token_type_ids"][0].max() == 1  # the second text has token type 1
    assert batch["labels"].tolist() == [1, 2]  # labels 2 and 10 in id order
    assert 'pair "hypothesis"' in data.summary()

    # Fields named in the config; an eval label never seen in training is an error with its line.
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"review": f"text {i}", "stars": ["good", "bad"][i % 2]}) + "\n" for i in range(6)))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"review": "fine", "stars": "good"}) + "\n" + json.dumps({"review": "meh", "stars": "okay"}) + "\n")
    with pytest.raises(DataError, match="cannot find the classification fields") as missing:
        build_classification_data(train_source=str(tmp_path / "train.jsonl"), eval_source=None, tokenizer=tokenizer, fields={}, max_length=32)
    assert "classification.text_field" in str(missing.value) and "train.jsonl:1" in str(missing.value)
    with pytest.raises(DataError) as unseen:
        build_classification_data(train_source=str(tmp_path / "train.jsonl"), eval_source=str(tmp_path / "eval.jsonl"),
                                  tokenizer=tokenizer, fields={"text": "review", "label": "stars"}, max_length=32)
    assert f"{tmp_path / 'eval.jsonl'}:2" in str(unseen.value) and 'label "okay"' in str(unseen.value)
    assert "training labels: bad, good" in str(unseen.value)
    # A label must be a string or an integer.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": "a"}) + "\n" + json.dumps({"text": "y", "label": [1]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2.*must be a string or an integer"):
        build_classification_data(train_source=str(tmp_path / "bad.jsonl"), eval_source=None, tokenizer=tokenizer, fields={}, max_length=32)


def test_config_keys_for_classification():
    config = load_config(None, ["task=classification", "classification.text_field=review", "classification.label_field=stars"])
    assert config.task == "classification" and config.classification.text_field == "review"
    assert load_config(None).task == "causal_lm"
    with pytest.raises(ConfigError, match="data.packing: false"):
        load_config(None, ["task=classification", "data.packing=true"])
    with pytest.raises(ConfigError, match="task"):
        load_config(None, ["task=regression"])


def test_synthetic_tickets_are_seeded_unbalanced_and_not_single_word():
    records = classification_records(2000, seed=4)
    assert records == classification_records(2000, seed=4)
    counts = {label: sum(r["label"] == label for r in records) for label in LABELS}
    assert max(counts.values()) / len(records) == pytest.approx(0.35, abs=0.04)  # billing, the majority class
    assert min(counts.values()) / len(records) == pytest.approx(0.15, abs=0.04)
    ruled_out = [r for r in records if any(m in r["text"] for m in ("is fine, though", "not about", "No problem with", "nothing to do"))]
    assert 0.25 < len(ruled_out) / len(records) < 0.45
    assert not any(m in r["text"] for r in classification_records(300, seed=4, difficulty=1)
                   for m in ("is fine, though", "not about", "No problem with", "nothing to do"))
    with pytest.raises(TunelabError, match="1 .* or 2"):
        classification_records(5, difficulty=3)


def test_classification_scores_by_hand():
    labels = ["a", "b", "c"]
    scores = classification_scores([0, 0, 1, 1, 2, 0], [0, 1, 1, 1, 2, 2], labels)
    assert scores["confusion_matrix"] == [[1, 0, 0], [1, 2, 0], [1, 0, 1]]
    assert scores["accuracy"] == pytest.approx(4 / 6)
    assert scores["per_class"]["a"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "f1": pytest.approx(0.5), "support": 1}
    assert scores["per_class"]["b"]["precision"] == 1.0 and scores["per_class"]["b"]["recall"] == pytest.approx(2 / 3)
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert scores["majority_baseline"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- command line


def _tunelab(*args: str) -> tuple[int, str]:
    """Run a command in this process (imports paid once); returns (exit code, output)."""
    from typer.testing import CliRunner

    from tunelab.cli import app

    result = CliRunner().invoke(app, list(args), standalone_mode=False)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def test_cli_synth_validate_train_eval_predict(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _tunelab("data", "synth", "train.jsonl", "--kind", "classification", "-n", "200", "--test-output", "test.jsonl",
                         "--test-n", "40")
    assert code == 0 and "wrote 200 classification records" in out
    code, out = _tunelab("data", "validate", "train.jsonl", "--task", "classification", "--model", str(tiny_bert_dir))
    assert code == 0, out
    counts = {label: sum(json.loads(ln)["label"] == label for ln in (tmp_path / "train.jsonl").read_text().splitlines()) for label in LABELS}
    assert "Class balance" in out
    for label, count in counts.items():
        assert re.search(rf"{label}\W+{count}\W+{100 * count / 200:.1f}%", out), (label, count, out)

    code, out = _tunelab("train", "--model", str(tiny_bert_dir), "--data", "train.jsonl", "--eval-data", "test.jsonl",
                         "--max-steps", "3", "--output", "runs/cls", "task=classification", "training.precision=fp32",
                         "data.max_seq_length=64")
    assert code == 0 and "done 3 steps" in out and "examples/s)" in out and "perplexity" not in out, out

    code, out = _tunelab("eval", "runs/cls", "--data", "test.jsonl", "--dtype", "fp32")
    assert code == 0 and "macro F1" in out and "per class" in out, out
    (folder,) = (tmp_path / "runs/cls/eval").iterdir()  # named after the data: <parent folder>-test
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["examples"] == 40 and len(scores["confusion_matrix"]) == 4
    assert len((folder / "predictions.jsonl").read_text().splitlines()) == 40
    assert json.loads((tmp_path / "runs/cls/eval.json").read_text())["evaluations"][folder.name]["accuracy"] == scores["accuracy"]

    (tmp_path / "inputs.csv").write_text("text\nmy parcel never arrived\nthe app shows an error message\n")
    code, out = _tunelab("predict", "runs/cls", "--input", "inputs.csv", "--output", "out.jsonl", "--dtype", "fp32")
    assert code == 0, out
    rows = [json.loads(ln) for ln in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["inputs.csv:2", "inputs.csv:3"]
    for row in rows:
        assert set(row["probabilities"]) == set(LABELS) and sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)

    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hello", "label": "weather"}) + "\n")
    with pytest.raises(DataError, match=r'odd.jsonl:1: label "weather" does not occur in the training data'):
        _tunelab("eval", "runs/cls", "--data", "odd.jsonl")
    with pytest.raises(TunelabError, match="not a classifier run"):
        _tunelab("predict", str(tiny_bert_dir), "--input", "inputs.csv")
    with pytest.raises(TunelabError, match="is a classifier"):  # generate / chat need a language model
        _tunelab("generate", "runs/cls", "-p", "hello")


def test_cli_turns_a_classification_data_error_into_one_message(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", "--data", str(tmp_path / "train.jsonl"), "task=classification"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'train.jsonl'}:2" in proc.stderr and 'label field "label" is missing' in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_merged_classifier_loads_in_plain_transformers_with_the_runs_predictions(method, tiny_bert_dir, ticket_files, tmp_path):
    """`tunelab merge` / `export --format hf` of a classifier run: AutoModelForSequenceClassification loads it
    (no tunelab import) and gives the run's labels and class probabilities."""
    from tunelab.export import export_model, merge_model

    train_file, eval_file = ticket_files
    run = train(cls_config(tiny_bert_dir, train_file, eval_file, tmp_path / "run", f"method={method}",
                           "training.max_steps=6", "training.learning_rate=5e-3", "lora.dropout=0.0"), quiet=True).run_dir
    out, info = merge_model(str(run))
    assert out == run / "merged" and info["task"] == "classification" and info["format"] == "hf"
    assert info["verification"]["labels"] == LABELS and info["verification"]["max_rel_logit_diff"] <= 1e-4
    if method == "lora":
        assert info["source"]["merge_verification"]["top1_agreement"] == 1.0
    assert {"model.safetensors", "config.json", "export.json", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert "pipeline(\"text-classification\"" in (out / "README.md").read_text()

    texts = [json.loads(line)["text"] for line in eval_file.read_text().splitlines()[:8]]
    model, tokenizer, labels = load_classifier_run(str(run), dtype="fp32", device="cpu")
    rows = [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([ids])).logits.softmax(-1)[0].tolist() for ids in rows]
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.modules["tunelab"] = None  # plain transformers only
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
        out = []
        for text in {texts!r}:
            ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            with torch.no_grad():
                out.append(model(**ids).logits.softmax(-1)[0].tolist())
        print(json.dumps({{"labels": [model.config.id2label[i] for i in range(model.config.num_labels)], "p": out}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["labels"] == labels == LABELS
    torch.testing.assert_close(torch.tensor(got["p"]), torch.tensor(expected), atol=1e-5, rtol=1e-4)

    if method == "lora":
        folder, adapter_info = export_model(str(run), "hf", tmp_path / "adapter", adapter_only=True)
        assert adapter_info["format"] == "hf-adapter" and (folder / "adapter_model.safetensors").is_file()
        snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
        check = snippet + textwrap.dedent(f"""
            import json, torch
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
            with torch.no_grad():
                print(json.dumps(model.eval()(**tokenizer({texts[0]!r}, return_tensors="pt")).logits.softmax(-1)[0].tolist()))
        """)
        proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        torch.testing.assert_close(torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])), torch.tensor(expected[0]),
                                   atol=1e-5, rtol=1e-4)
    else:
        with pytest.raises(TunelabError, match="needs a LoRA/DoRA run"):
            export_model(str(run), "hf", tmp_path / "adapter", adapter_only=True)
    with pytest.raises(TunelabError, match="(?s)is a classifier .*--format hf"):
        export_model(str(run), "onnx", tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_ui_lists_a_classifier_run_with_its_scores_but_not_as_a_chat_model(tiny_bert_dir, ticket_files, tmp_path):
    from tunelab.ui.core import Workspace, model_choices, run_rows

    train_file, eval_file = ticket_files
    train(cls_config(tiny_bert_dir, train_file, eval_file, tmp_path / "runs" / "tickets", "training.max_steps=2"), quiet=True)
    accuracy = json.loads((tmp_path / "runs" / "tickets" / "eval.json").read_text())["accuracy"]
    workspace = Workspace(tmp_path / "runs")
    assert [value for _, value in model_choices(workspace)] == ["default"]
    [row] = run_rows(workspace)
    assert row[:3] == ["tickets", "done", "lora"] and row[-1].startswith(f"eval split: accuracy {accuracy:.1%}, macro F1 ")


def test_hpo_on_a_classifier_maximises_eval_split_accuracy(tiny_bert_dir, ticket_files, tmp_path):
    import yaml

    from tunelab.hpo import plan_study, run_study

    train_file, eval_file = ticket_files
    base = {"task": "classification", "model": {"name": str(tiny_bert_dir)},
            "data": {"train": str(train_file), "eval": str(eval_file), "max_seq_length": 64},
            "method": "full", "training": {"batch_size": 16, "max_steps": 40, "eval_steps": 20, "warmup_steps": 0,
                                           "precision": "fp32"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "space.yaml").write_text("training.learning_rate: [1.0e-6, 5.0e-3]\n")

    def plan(metric: str):
        return plan_study(tmp_path / "base.yaml", [f"output.dir={tmp_path / 'runs'}"], space_path=tmp_path / "space.yaml",
                          n_trials=None, timeout_s=None, study_name=metric, storage=None, sampler="grid", pruner="none",
                          metric=metric, direction=None)

    with pytest.raises(TunelabError, match="scores generated answers; a classifier run offers accuracy, macro_f1"):
        plan("exact_match")
    study = run_study(plan("accuracy"))
    assert study.direction.name == "MAXIMIZE" and len(study.trials) == 2
    for trial in study.trials:
        run = tmp_path / "runs" / "hpo" / "accuracy" / f"trial-{trial.number}"
        assert trial.value == json.loads((run / "eval.json").read_text())["accuracy"]
    by_rate = {t.params["training.learning_rate"]: t.value for t in study.trials}
    assert by_rate[5.0e-3] > 0.6 > by_rate[1.0e-6]  # majority class 41%; lr 1e-6 barely moves the random model
    assert study.best_trial.params["training.learning_rate"] == 5.0e-3


def test_classification_benchmark_script_runs_both_frameworks(tiny_bert_dir, tmp_path):
    out = tmp_path / "c1.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_classify.py"), "--model", str(tiny_bert_dir),
                           "--train", "64", "--test", "16", "--epochs", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "C1: 64 tickets x 1 epochs" in proc.stdout and "vs Trainer" in proc.stdout
    results = {r["framework"]: r for r in json.loads(out.read_text())["results"]}
    assert results.keys() == {"tunelab", "trainer"}
    for result in results.values():
        assert result["examples"] == 64 and result["examples_per_s"] > 0 and result["peak_rss_mb"] > 100
        assert 0 <= result["accuracy"] <= 1 and result["majority_baseline"] == results["trainer"]["majority_baseline"]


# ----------------------------------------------------------------------------- the real default model


@pytest.mark.real_model
def test_minilm_lora_on_synthetic_tickets_beats_the_majority_class(tmp_path):
    """The bundled all-MiniLM-L6-v2, LoRA (r 8) + head, 2 epochs on 400 tickets (difficulty 2), 200 held out."""
    records = classification_records(600, seed=0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:400]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[400:]))
    config = load_config(None, [
        "task=classification", f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'test.jsonl'}",
        f"output.dir={tmp_path}", "output.name=minilm", "training.precision=fp32", "training.batch_size=16",
        "training.gradient_accumulation_steps=1", "training.epochs=2", "training.learning_rate=2e-3",
        "training.warmup_steps=0", "data.max_seq_length=64", "lora.r=8", "lora.alpha=16",
    ])
    result = train(config, quiet=True)
    summary = json.loads((result.run_dir / "eval.json").read_text())
    majority = summary["classification"]["majority_baseline"]
    assert majority == pytest.approx(0.42)
    assert summary["accuracy"] > majority + 0.4, summary["accuracy"]
    assert summary["macro_f1"] > 0.85
    assert json.loads((result.final_dir / "tunelab_model.json").read_text())["base_model"] == "default"
