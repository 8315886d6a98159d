"""Classifier inference: class probabilities, `tunelab predict` and the classifier half of `tunelab eval`.

A classifier run (`task: classification`, see tunelab/tasks/classification.py) is loaded from its
run folder (base + adapter + head, merged, or the full model) with the labels saved in its
tunelab_model.json; inputs are read as labelled texts (tunelab/data/labelled.py), labels optional.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunelab.data.labelled import LabelledText, RawExample, check_known_labels, collate_labelled, load_labelled, tokenize_labelled
from tunelab.data.records import DataStats
from tunelab.errors import TunelabError
from tunelab.models import ModelLoading, read_model_meta
from tunelab.tasks.classification import load_classifier, resolve_source


@torch.no_grad()
def predict_probabilities(
    model: torch.nn.Module, rows: Sequence[LabelledText], pad_id: int, *, batch_size: int = 32, device=None
) -> torch.Tensor:
    """Class probabilities (N, C) in float32, in the order of `rows` (batched by length)."""
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    probabilities: list[torch.Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate_labelled([rows[i] for i in chunk], pad_id)
        batch.pop("labels")
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for i, p in zip(chunk, logits.float().softmax(-1).cpu()):
            probabilities[i] = p
    model.train(was_training)
    return torch.stack(probabilities) if probabilities else torch.empty(0)


def load_classifier_run(source: str, *, dtype: str = "auto", device: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, labels) of a classifier run folder, checkpoint or saved directory, in eval mode."""
    from tunelab.models import default_device, load_tokenizer, resolve_dtype, resolve_weights_dir

    weights_dir = resolve_weights_dir(source)
    meta = read_model_meta(weights_dir)
    if meta.get("task") != "classification":
        raise TunelabError(
            f"'{source}' is not a classifier run (its tunelab_model.json does not say task: classification)\n"
            "  fix: give the run folder of a `task: classification` training run"
        )
    torch_device = torch.device(device) if device else default_device()
    torch_dtype = resolve_dtype(dtype, torch_device)
    labels = meta["labels"]
    tokenizer = load_tokenizer(str(weights_dir), trust_remote_code=trust_remote_code)
    if (weights_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        loading = ModelLoading(dtype=torch_dtype, trust_remote_code=trust_remote_code, device=torch_device)
        base = load_classifier(resolve_source(meta["base_model"]), labels=labels, pad_token_id=tokenizer.pad_token_id,
                               loading=loading)
        model = PeftModel.from_pretrained(base, weights_dir).merge_and_unload()
    else:
        loading = ModelLoading(dtype=torch_dtype, trust_remote_code=trust_remote_code, device=torch_device)
        model = load_classifier(str(weights_dir), labels=labels, pad_token_id=tokenizer.pad_token_id, loading=loading)
    model.eval()
    return model, tokenizer, labels


def read_inputs(source: str, tokenizer, *, labels: Sequence[str], fields: dict[str, str | None], max_length: int,
                split: str = "test", limit: int | None = None, need_label: bool = False):
    """Records to classify: (raw examples, tokenized rows); labels are optional unless `need_label`."""
    stats = DataStats()
    raw, found = load_labelled(source, split=split, hf_config=None, fields=fields, skip_invalid=False, stats=stats,
                               need_label=need_label)
    raw = raw[:limit] if limit else raw
    if need_label:  # scoring needs labels the model knows; predict only shows them next to its answer
        check_known_labels(raw, labels)
    return raw, tokenize_labelled(raw, tokenizer, labels, max_length=max_length), found


def prediction_rows(raw: Sequence[RawExample], probabilities: torch.Tensor, labels: Sequence[str]) -> list[dict]:
    """One JSON-ready row per input: where it came from, the text(s), predicted label, class probabilities."""
    rows = []
    for example, p in zip(raw, probabilities.tolist()):
        row: dict[str, Any] = {"source": str(example.source), "text": example.text}
        if example.pair is not None:
            row["text_pair"] = example.pair
        best = max(range(len(labels)), key=lambda k: p[k])
        row["label"] = labels[best]
        row["probabilities"] = {name: round(value, 6) for name, value in zip(labels, p)}
        if example.label is not None:
            row["reference"] = example.label
            row["correct"] = example.label == labels[best]
        rows.append(row)
    return rows


def predict_file(run: str, input_path: str, *, fields: dict[str, str | None], batch_size: int = 32,
                 max_length: int = 512, dtype: str = "auto", device: str | None = None, split: str = "test") -> list[dict]:
    """`tunelab predict`: label and class probabilities for every record of a file (labels there are optional)."""
    model, tokenizer, labels = load_classifier_run(run, dtype=dtype, device=device)
    raw, rows, _ = read_inputs(input_path, tokenizer, labels=labels, fields=fields, max_length=max_length, split=split)
    probabilities = predict_probabilities(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
    return prediction_rows(raw, probabilities, labels)


def evaluate_classifiers(
    sources: Sequence[str], data: str, *, fields: dict[str, str | None], limit: int | None = None, batch_size: int = 32,
    max_length: int = 512, output: str | Path | None = None, dtype: str = "auto", device: str | None = None,
    split: str = "test",
):
    """`tunelab eval` for classifier runs: metrics, predictions.jsonl and scores.json per run (see evaluate.py)."""
    from tunelab.console import console
    from tunelab.evaluate import (
        EvalResult, ModelEvaluation, PeakMemory, data_label, describe_device, output_root, save_evaluation, unique_labels,
    )
    from tunelab.metrics import classification_scores
    from tunelab.models import count_parameters

    data_name = data_label(data)
    results = []
    for source, name in zip(sources, unique_labels(sources)):
        started = time.perf_counter()
        with PeakMemory(device) as memory:
            model, tokenizer, labels = load_classifier_run(source, dtype=dtype, device=device)
            raw, rows, _ = read_inputs(data, tokenizer, labels=labels, fields=fields, max_length=max_length,
                                       split=split, limit=limit, need_label=True)
            console.print(f"[bold]Evaluating {name}[/] on {len(rows)} examples of {data_name}", highlight=False)
            scored = time.perf_counter()
            probabilities = predict_probabilities(model, rows, tokenizer.pad_token_id, batch_size=batch_size)
            predict_seconds = time.perf_counter() - scored
        scores = classification_scores(probabilities.argmax(-1).tolist(), [x.label for x in rows], labels)
        scores = {"examples": len(rows), **scores}
        scores.update(
            model=source, data=data, metrics=["accuracy", "precision", "recall", "f1", "confusion_matrix"],
            batch_size=batch_size, params=count_parameters(model)[1],
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."), device=describe_device(model),
            peak_memory_mb=memory.peak_bytes / 2**20, memory_kind=memory.kind,
            examples_per_s=len(rows) / max(predict_seconds, 1e-9), seconds=time.perf_counter() - started,
            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        result = EvalResult(scores=scores, predictions=prediction_rows(raw, probabilities, labels))
        folder = save_evaluation(output_root(source, name, output, several=len(sources) > 1), data_name, result)
        console.print(f"[green]saved[/] {folder}/scores.json and predictions.jsonl", highlight=False)
        results.append(ModelEvaluation(name, source, scores, result.predictions, folder))
        del model
    return results


def scores_tables(results):
    """Rich tables: one row per run (accuracy, macro P/R/F1, majority baseline), then per-class F1 and confusion."""
    from rich.console import Group
    from rich.table import Table

    first = results[0].scores
    table = Table(title=f"Classification on {first.get('data', '')} ({first.get('examples')} examples)")
    for title in ("model", "accuracy", "macro P", "macro R", "macro F1", "majority class", "examples/s"):
        table.add_column(title, justify="left" if title == "model" else "right")
    for r in results:
        s = r.scores
        table.add_row(r.name, f"{s['accuracy']:.1%}", f"{s['macro_precision']:.3f}", f"{s['macro_recall']:.3f}",
                      f"{s['macro_f1']:.3f}", f"{s['majority_baseline']:.1%}", f"{s['examples_per_s']:,.1f}")
    parts = [table]
    for r in results:
        labels = r.scores["labels"]
        confusion = Table(title=f"{r.name}: per class (rows: true label, columns: predicted)")
        confusion.add_column("label")
        for column in ("precision", "recall", "F1", "support", *labels):
            confusion.add_column(column, justify="right")
        for name, row in zip(labels, r.scores["confusion_matrix"]):
            c = r.scores["per_class"][name]
            confusion.add_row(name, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]),
                              *[str(v) for v in row])
        parts.append(confusion)
    return Group(*parts)
