"""Evaluate models and runs on prompt -> reference data, and compare several of them.

Two kinds of measurement, chosen with `metrics`:

  * teacher forcing (`loss`, `perplexity`): the reference reply is fed to the model and
    the mean negative log-likelihood of its tokens (the reply plus the end-of-turn token,
    exactly the tokens training scores) is measured; prompt tokens are masked. Plain-text
    records ({"text": ...}) are scored on every token (plus EOS), as training scores them.
  * generation (`exact_match`, `rouge`, `bleu`, `accuracy`): the model answers each
    prompt greedily with its chat template, and the answer is scored against the
    reference with the pure functions of `tunelab.metrics`.

Files written per model and data set (see `output_root`):

    <root>/eval/<data-name>/predictions.jsonl   one line per example
    <root>/eval/<data-name>/scores.json         the scores and how they were measured
    <root>/eval.json                            {"evaluations": {<data-name>: scores}} merged

`<root>` is the run folder for a run, `./eval-results/<model-name>` for any other model,
or `--output DIR` (`DIR/<model-name>` when several models are compared).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunelab.compare import add_intervals, add_paired_differences, format_interval
from tunelab.errors import TunelabError
from tunelab.generate import (
    GenerationSettings,
    encode_prompt,
    generate_completions,
    model_device,
    pad_token_id,
    write_jsonl_atomic,
)
from tunelab.files import write_text_atomic
from tunelab import metrics as scoring

METRICS = ("loss", "perplexity", "exact_match", "rouge", "bleu", "accuracy")
TEACHER_FORCED = frozenset({"loss", "perplexity"})
GENERATED = frozenset({"exact_match", "rouge", "bleu", "accuracy"})
DEFAULT_METRICS = ("loss", "perplexity", "exact_match")
DEFAULT_RESULTS_DIR = Path("eval-results")
# Split file names that say nothing about the data set ("test.jsonl"): prefix the folder name.
GENERIC_STEMS = frozenset({"test", "train", "validation", "valid", "val", "dev", "eval", "data"})
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EvalExample:
    """A prompt conversation (ending with the user's turn) and the reference reply; or, with
    `plain_text`, a text record (`reference` holds the text, `prompt` is empty) scored whole."""

    prompt: list[dict[str, str]]
    reference: str
    source: str  # "file:line", to point at the data in predictions and errors
    plain_text: bool = False


def parse_metrics(text: str) -> list[str]:
    """Parse `--metrics loss,perplexity,exact_match` into known metric names (order kept)."""
    names = [name.strip().lower().replace("-", "_") for name in text.split(",") if name.strip()]
    aliases = {"ppl": "perplexity", "em": "exact_match", "acc": "accuracy"}
    names = [aliases.get(name, name) for name in names]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise TunelabError(
            f"--metrics: unknown metric {', '.join(map(repr, unknown)) or '(none given)'}\n"
            f"  fix: choose from {', '.join(METRICS)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


def load_eval_examples(
    path: str,
    *,
    limit: int | None = None,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    split: str = "test",
) -> list[EvalExample]:
    """Read prompt/reference pairs with the training data pipeline (`tunelab.data`).

    Any conversation format works (qa/GSM8K, alpaca, dolly, chat, sharegpt, custom
    fields); the last assistant message is the reference and everything before it the
    prompt. Plain-text records become `plain_text` examples: loss and perplexity only.
    """
    from tunelab.data import normalise, read_source

    if limit is not None and limit < 1:
        raise TunelabError(f"--limit must be at least 1, got {limit}")
    examples = normalise(read_source(path, split=split), fmt=fmt, fields=fields)
    if limit is not None:
        examples = examples[:limit]
    pairs = []
    for example in examples:
        messages = example.messages
        if messages is None:
            pairs.append(EvalExample(prompt=[], reference=example.text or "", source=str(example.source), plain_text=True))
            continue
        if messages[-1]["role"] != "assistant":
            raise example.source.error("the conversation does not end with an assistant reply to compare against")
        pairs.append(EvalExample(prompt=messages[:-1], reference=messages[-1]["content"], source=str(example.source)))
    return pairs


# ----------------------------------------------------------------------------- teacher forcing


@dataclass
class LossStats:
    """Teacher-forced scores: mean NLL per target token, its exp, and throughput."""

    loss: float
    perplexity: float
    target_tokens: int
    tokens: int  # every non-padding token fed to the model
    seconds: float
    per_example: list[float] = field(default_factory=list)
    per_example_tokens: list[int] = field(default_factory=list)  # target tokens of each example (loss weights)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def reply_ids_and_labels(tokenizer, example: EvalExample, *, max_tokens: int, control_ids: frozenset[int]) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reference and labels scoring only the final reply and its end-of-turn token.

    The mask comes from `tunelab.data.render.conversation_ids_and_mask` (the prompt is
    `apply_chat_template(messages[:-1], add_generation_prompt=True)`), so evaluation
    scores exactly the tokens training does. Earlier assistant turns of a multi-turn
    prompt are context, not targets. Over-long examples keep their last `max_tokens`.
    """
    from tunelab.data.render import conversation_ids_and_mask, text_ids
    from tunelab.data.sources import Location
    from tunelab.generate import encode_text, has_chat_template, render_prompt

    if example.plain_text:  # every token is a target, as in training; over-long text keeps its start
        ids = text_ids(example.reference, tokenizer)[:max_tokens]
        return ids, [IGNORE_INDEX, *ids[1:]]
    messages = example.prompt + [{"role": "assistant", "content": example.reference}]
    if has_chat_template(tokenizer):
        ids, trained = conversation_ids_and_mask(messages, tokenizer, Location(example.source), control_ids)
    else:  # no template (a run trained on plain text): the raw prompt text, then the reply and EOS
        prompt_ids = encode_text(tokenizer, render_prompt(tokenizer, example.prompt, use_chat_template=False))
        reply_ids = list(tokenizer(example.reference, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
        ids, trained = prompt_ids + reply_ids, [False] * len(prompt_ids) + [True] * len(reply_ids)
    last_target = max(i for i, is_target in enumerate(trained) if is_target)
    first_target = last_target
    while first_target > 0 and trained[first_target - 1]:
        first_target -= 1
    labels = [token if first_target <= i <= last_target else IGNORE_INDEX for i, token in enumerate(ids)]
    ids, labels = ids[-max_tokens:], labels[-max_tokens:]
    labels[0] = IGNORE_INDEX  # no logits predict the first position
    return ids, labels


def right_pad(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) padded on the right; padding is never a target."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(row_labels)
    return input_ids, attention_mask, labels


def batch_nll(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed negative log-likelihood of each row's targets, and each row's target count.

    Logits are computed only from the first position that predicts a target onwards
    (`logits_to_keep`), which skips most of the vocabulary projection over prompts.
    """
    targets = labels[:, 1:]  # position t's logits predict token t + 1
    is_target = targets != IGNORE_INDEX
    first = int(is_target.any(dim=0).nonzero()[0])
    keep = torch.arange(first, targets.shape[1], device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    kept_targets = targets[:, first:]
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), kept_targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.sum(dim=1), (kept_targets != IGNORE_INDEX).sum(dim=1)


def score_loss(model: torch.nn.Module, tokenizer, examples: Sequence[EvalExample], *, batch_size: int = 8) -> LossStats:
    """Teacher-forced loss and perplexity over the reference replies, batched by length."""
    from rich.progress import TextColumn

    from tunelab.console import progress
    from tunelab.data.render import control_token_ids
    from tunelab.generate import context_limit

    control_ids = control_token_ids(tokenizer)
    max_tokens = context_limit(model, tokenizer)
    rows = [reply_ids_and_labels(tokenizer, ex, max_tokens=max_tokens, control_ids=control_ids) for ex in examples]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    device = model_device(model)
    pad_id = pad_token_id(tokenizer)
    nll_per_example = [0.0] * len(rows)
    count_per_example = [0] * len(rows)
    tokens = 0
    seconds = 0.0
    with progress(TextColumn("{task.fields[rate]}")) as bar, torch.inference_mode():
        task = bar.add_task("Scoring (teacher forcing)", total=len(rows), rate="")
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask, labels = right_pad([rows[i] for i in batch], pad_id)
            started = time.perf_counter()
            nll, counts = batch_nll(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
            seconds += time.perf_counter() - started
            tokens += int(attention_mask.sum())
            for row, index in enumerate(batch):
                nll_per_example[index] = float(nll[row])
                count_per_example[index] = int(counts[row])
            bar.update(task, advance=len(batch), rate=f"{tokens / max(seconds, 1e-9):.0f} tok/s")
    target_tokens = sum(count_per_example)
    loss = sum(nll_per_example) / max(target_tokens, 1)
    return LossStats(
        loss=loss,
        perplexity=math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        target_tokens=target_tokens,
        tokens=tokens,
        seconds=seconds,
        per_example=[n / max(c, 1) for n, c in zip(nll_per_example, count_per_example)],
        per_example_tokens=count_per_example,
    )


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    """Scores (metric name -> value, plus counts and timings) and one prediction row per example."""

    scores: dict[str, float | int | str | None]
    predictions: list[dict]


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[EvalExample],
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    answer_regex: str | None = None,
) -> EvalResult:
    """Score a loaded model on prompt/reference examples.

    Returns scores with the requested metrics (`exact_match`, `accuracy`, ROUGE as
    fractions; `bleu` 0-100; `loss` in nats per target token) plus `examples`,
    token counts, `score_tokens_per_s` and `generate_tokens_per_s`.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise TunelabError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if batch_size < 1:
        raise TunelabError(f"--batch-size must be at least 1, got {batch_size}")
    if not examples:
        raise TunelabError("no examples to evaluate")
    pattern = scoring.compile_answer_regex(answer_regex)
    generated = [m for m in metrics if m in GENERATED]
    text_example = next((ex for ex in examples if ex.plain_text), None)
    if generated and text_example is not None:
        raise TunelabError(
            f"{text_example.source}: a plain-text record; {', '.join(generated)} need a prompt and a reference answer "
            "to compare the generated one with.\n  fix: --metrics loss,perplexity for plain text, or evaluate on "
            'question/answer, instruction/output or chat "messages" records (or --prompt-field/--response-field)'
        )
    scores: dict[str, float | int | str | None] = {"examples": len(examples)}
    rows = [
        {"source": ex.source, "prompt": ex.prompt[-1]["content"] if ex.prompt else "", "reference": ex.reference}
        for ex in examples
    ]
    if TEACHER_FORCED & set(metrics):
        stats = score_loss(model, tokenizer, examples, batch_size=batch_size)
        scores.update(
            loss=stats.loss,
            perplexity=stats.perplexity,
            target_tokens=stats.target_tokens,
            score_tokens_per_s=stats.tokens_per_s,
            score_seconds=stats.seconds,
        )
        for row, loss, count in zip(rows, stats.per_example, stats.per_example_tokens):
            row["loss"], row["target_tokens"] = loss, count
    if GENERATED & set(metrics):
        scores.update(generation_scores(model, tokenizer, examples, rows, metrics, batch_size, max_new_tokens, pattern))
    add_intervals(scores, rows)  # scores["intervals"]: 95% interval of each score (tunelab.compare)
    return EvalResult(scores=scores, predictions=rows)


def generation_scores(model, tokenizer, examples, rows, metrics, batch_size, max_new_tokens, pattern) -> dict:
    """Generate greedy answers into `rows` (prediction, extracted answers, correct) and score them."""
    prompts = [encode_prompt(tokenizer, ex.prompt) for ex in examples]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    started = time.perf_counter()
    completions = generate_completions(model, tokenizer, prompts, settings, batch_size=batch_size, description="Generating answers")
    seconds = time.perf_counter() - started
    predictions = [samples[0].text for samples in completions]
    references = [ex.reference for ex in examples]
    generated = sum(samples[0].tokens for samples in completions)
    scores: dict = {"generated_tokens": generated, "generate_seconds": seconds, "generate_tokens_per_s": generated / max(seconds, 1e-9)}
    for row, prediction, samples in zip(rows, predictions, completions):
        row["prediction"] = prediction
        row["generated_tokens"] = samples[0].tokens
    if "exact_match" in metrics:
        scores["exact_match"] = scoring.exact_match(predictions, references, pattern)
        for row in rows:
            row["reference_answer"] = scoring.extract_answer(row["reference"])
            row["predicted_answer"] = scoring.extract_answer(row["prediction"], pattern)
            row["correct"] = scoring.answers_match(row["prediction"], row["reference"], pattern)
    if "accuracy" in metrics:
        scores["accuracy"] = scoring.accuracy(predictions, references)
        for row in rows:
            row["label_correct"] = scoring.generated_label(row["prediction"]) == scoring.normalise_text(row["reference"])
            row.setdefault("correct", row["label_correct"])
    if "rouge" in metrics:
        scores.update(scoring.rouge_scores(predictions, references))
        for row, per_example in zip(rows, scoring.rouge_per_example(predictions, references)):
            row["rougeL"] = per_example["rougeL"]
    if "bleu" in metrics:
        scores["bleu"] = scoring.bleu_score(predictions, references)
    return scores


# ----------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes on GPU, else process RSS.

    RSS is sampled every 50 ms by a background thread (Linux reports only a lifetime
    peak, which would carry over from the previous model in a comparison).
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.05):
        self.cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def kind(self) -> str:
        return "cuda" if self.cuda else "rss"

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.interval_s):
                return

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()


# ----------------------------------------------------------------------------- runs and files


def is_run_dir(path: Path) -> bool:
    """A tunelab run folder: has final/ or checkpoints/ (see the run folder contract)."""
    return path.is_dir() and ((path / "final").is_dir() or (path / "checkpoints").is_dir())


def model_label(source: str | None) -> str:
    """A short file-safe name for a model source, used in tables and output folder names."""
    if source is None or source == "default":
        return "default"
    path = Path(source).expanduser()
    if path.exists():
        resolved = path.resolve()
        if resolved.parent.name == "checkpoints":  # runs/NAME/checkpoints/step-N
            return f"{resolved.parent.parent.name}-{resolved.name}"
        if resolved.name == "final":
            return resolved.parent.name
        return resolved.stem if resolved.suffix == ".gguf" else resolved.name
    return source.replace("/", "--")


def unique_labels(sources: Sequence[str | None]) -> list[str]:
    """Labels for several sources, numbered when two would otherwise collide."""
    labels: list[str] = []
    for source in sources:
        label = model_label(source)
        candidate, n = label, 2
        while candidate in labels:
            candidate, n = f"{label}-{n}", n + 1
        labels.append(candidate)
    return labels


def data_label(path: str) -> str:
    """A name for the evaluation data: the file stem, prefixed by its folder for generic stems."""
    data_path = Path(path)
    if not data_path.exists():  # a hub dataset id
        return path.replace("/", "--")
    stem = data_path.stem if data_path.is_file() else data_path.name
    if stem.lower() in GENERIC_STEMS and data_path.resolve().parent.name:
        return f"{data_path.resolve().parent.name}-{stem}"
    return stem


def output_root(source: str | None, label: str, output: str | Path | None, *, several: bool) -> Path:
    """Where a model's results go: --output (per model when several), the run folder, or ./eval-results/<label>."""
    if output is not None:
        return Path(output) / label if several else Path(output)
    if source is not None and is_run_dir(Path(source).expanduser()):
        return Path(source).expanduser()
    return DEFAULT_RESULTS_DIR / label


def write_json_atomic(path: Path, data: dict) -> Path:
    """Write a JSON object atomically (temporary file, then rename)."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_evaluation(root: Path, data_name: str, result: EvalResult) -> Path:
    """Write predictions.jsonl and scores.json under root/eval/<data_name>/ and merge root/eval.json.

    An unreadable eval.json is kept as eval.json.bak rather than overwritten blindly.
    Returns the folder written.
    """
    from tunelab.console import console

    folder = root / "eval" / data_name
    write_jsonl_atomic(folder / "predictions.jsonl", result.predictions)
    write_json_atomic(folder / "scores.json", result.scores)
    summary_path = root / "eval.json"
    summary: dict = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            summary = {}
        if not isinstance(summary, dict) or not summary:
            backup = summary_path.with_name("eval.json.bak")
            os.replace(summary_path, backup)
            console.print(f"[yellow]warning:[/] {summary_path} was not a JSON object; kept it as {backup}")
            summary = {}
    evaluations = summary.get("evaluations")
    summary["evaluations"] = {**(evaluations if isinstance(evaluations, dict) else {}), data_name: result.scores}
    write_json_atomic(summary_path, summary)
    return folder


@dataclass
class ModelEvaluation:
    """One model's evaluation in a comparison: its name, source, scores, predictions and folder."""

    name: str
    source: str | None
    scores: dict
    predictions: list[dict]
    folder: Path


def describe_device(model: torch.nn.Module) -> str:
    """The accelerator (or CPU) a model runs on, for the scores file and the report."""
    device = model_device(model)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def cpu_model_name() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_evaluation_settings(sources: Sequence[str | None]) -> dict:
    """The `evaluation:` section of the first run folder among `sources` (its config.yaml), else {}.

    `tunelab eval RUN` takes its defaults from there: metrics, batch_size, max_new_tokens,
    answer_regex and limit, as the run's own post-training evaluation used them.
    """
    import yaml

    for source in sources:
        if source is None:
            continue
        path = Path(source).expanduser()
        config_file = path / "config.yaml"
        if is_run_dir(path) and config_file.is_file():
            section = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("evaluation") or {}
            keys = ("metrics", "batch_size", "max_new_tokens", "answer_regex", "limit")
            return {key: section[key] for key in keys if key in section}
    return {}


def evaluate_after_training(
    model: torch.nn.Module,
    tokenizer,
    run_dir: Path,
    *,
    metrics: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    answer_regex: str | None,
    limit: int | None,
    source: str | None,
    split: str,
    fmt: str,
    fields: dict[str, str] | None,
    prompt_format: str,
    say=print,
) -> EvalResult | None:
    """The run's own evaluation once training is done: the configured `evaluation.metrics` on
    the eval data, with the live model, saved under run_dir/eval/<data>/ and merged into eval.json.

    Runs only when a generation metric (exact_match, rouge, bleu, accuracy) is asked for:
    training already measured loss and perplexity on the eval set. Prompts are rendered as in
    training (raw text for a run trained on plain text).
    """
    if not GENERATED & set(metrics) or source is None:
        return None
    import copy

    examples = load_eval_examples(source, limit=limit, fmt=fmt, fields=fields, split=split)
    if prompt_format == "text" and tokenizer.chat_template:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = None
    model.eval()
    result = evaluate_model(
        model, tokenizer, examples, metrics=metrics, batch_size=batch_size, max_new_tokens=max_new_tokens,
        answer_regex=answer_regex,
    )
    result.scores.update(data=source, metrics=list(metrics), max_new_tokens=max_new_tokens, batch_size=batch_size,
                         answer_regex=answer_regex)
    folder = save_evaluation(run_dir, data_label(source), result)
    shown = {k: round(v, 4) for k, v in result.scores.items() if k in METRICS and isinstance(v, float)}
    say(f"[bold]evaluation[/] {shown} on {len(examples)} examples -> {folder}", highlight=False)
    return result


def evaluate_sources(
    sources: Sequence[str | None],
    data: str,
    *,
    metrics: Sequence[str] | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    answer_regex: str | None = None,
    output: str | Path | None = None,
    dtype: str = "auto",
    device: str | None = None,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    split: str = "test",
) -> list[ModelEvaluation]:
    """Evaluate each model/run on the same data, one after another, saving each one's files.

    Each model is loaded with `tunelab.models.load_for_inference` (the run's own tokenizer
    and chat template, or none for a run trained on plain text), evaluated, written out and
    freed before the next one is loaded. Settings left None come from the first run's
    `evaluation:` config section (`run_evaluation_settings`), else the built-in defaults;
    default metrics skip the generation metrics on plain-text data (asked-for ones are an error).
    """
    from tunelab.console import console
    from tunelab.generate import load_for_generation
    from tunelab.models import count_parameters

    run_settings = run_evaluation_settings(sources)
    metrics_given = metrics is not None
    metrics = list(metrics) if metrics is not None else list(run_settings.get("metrics", DEFAULT_METRICS))
    limit = limit if limit is not None else run_settings.get("limit")
    batch_size = batch_size if batch_size is not None else run_settings.get("batch_size", 8)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else run_settings.get("max_new_tokens", 256)
    answer_regex = answer_regex if answer_regex is not None else run_settings.get("answer_regex")
    scoring.compile_answer_regex(answer_regex)  # fail before loading anything
    examples = load_eval_examples(data, limit=limit, fmt=fmt, fields=fields, split=split)
    if not metrics_given and any(ex.plain_text for ex in examples) and GENERATED & set(metrics):
        skipped = [m for m in metrics if m in GENERATED]
        metrics = [m for m in metrics if m not in GENERATED] or ["loss", "perplexity"]
        console.print(f"[yellow]plain-text data[/]: scoring {', '.join(metrics)}; {', '.join(skipped)} need prompt/answer "
                      "records (question/answer, instruction/output or chat)", highlight=False)
    data_name = data_label(data)
    labels = unique_labels(sources)
    results = []
    for source, label in zip(sources, labels):
        console.print(f"[bold]Evaluating {label}[/] on {len(examples)} examples of {data_name}", highlight=False)
        started = time.perf_counter()
        with PeakMemory(device) as memory:
            model, tokenizer = load_for_generation(source, dtype=dtype, device=device)
            result = evaluate_model(
                model, tokenizer, examples, metrics=metrics, batch_size=batch_size,
                max_new_tokens=max_new_tokens, answer_regex=answer_regex,
            )
        result.scores.update(
            model=source or "default",
            data=data,
            metrics=list(metrics),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            answer_regex=answer_regex,
            params=count_parameters(model)[1],
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            device=describe_device(model),
            peak_memory_mb=memory.peak_bytes / 2**20,
            memory_kind=memory.kind,
            seconds=time.perf_counter() - started,
            time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        root = output_root(source, label, output, several=len(sources) > 1)
        folder = save_evaluation(root, data_name, result)
        console.print(f"[green]saved[/] {folder}/scores.json and predictions.jsonl", highlight=False)
        results.append(ModelEvaluation(label, source, result.scores, result.predictions, folder))
        del model, tokenizer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if len(results) > 1:  # every later model against the first, on the same examples
        add_paired_differences(results)
        for result in results[1:]:
            save_evaluation(result.folder.parent.parent, data_name, EvalResult(result.scores, result.predictions))
    return results


# ----------------------------------------------------------------------------- display

# (score key, column title, format) in table order; a column appears when any model has the key.
TABLE_COLUMNS = (
    ("params", "params", lambda v: f"{v / 1e6:.1f}M"),
    ("peak_memory_mb", "peak mem", lambda v: f"{v:,.0f} MB"),
    ("score_tokens_per_s", "score tok/s", lambda v: f"{v:,.0f}"),
    ("generate_tokens_per_s", "gen tok/s", lambda v: f"{v:,.1f}"),
    ("loss", "loss", lambda v: f"{v:.4f}"),
    ("perplexity", "ppl", lambda v: f"{v:.2f}"),
    ("exact_match", "exact match", lambda v: f"{100 * v:.1f}%"),
    ("accuracy", "accuracy", lambda v: f"{100 * v:.1f}%"),
    ("rouge1", "ROUGE-1", lambda v: f"{v:.4f}"),
    ("rouge2", "ROUGE-2", lambda v: f"{v:.4f}"),
    ("rougeL", "ROUGE-L", lambda v: f"{v:.4f}"),
    ("bleu", "BLEU", lambda v: f"{v:.2f}"),
)


def comparison_table(results: Sequence[ModelEvaluation]):
    """One Rich table: a row per model, a column per measured quantity."""
    from rich.table import Table

    kinds = {r.scores.get("memory_kind") for r in results}
    table = Table(title=f"Evaluation on {results[0].scores.get('data', '')} ({results[0].scores.get('examples')} examples)")
    table.add_column("model", style="bold")
    columns = [c for c in TABLE_COLUMNS if any(r.scores.get(c[0]) is not None for r in results)]
    for key, title, _ in columns:
        label = f"{title} ({'/'.join(sorted(k for k in kinds if k))})" if key == "peak_memory_mb" else title
        table.add_column(label, justify="right")
    for result in results:
        intervals = result.scores.get("intervals") or {}
        cells = [
            f"{fmt(result.scores[key])} {format_interval(key, intervals.get(key))}".strip() if result.scores.get(key) is not None else "-"
            for key, _, fmt in columns
        ]
        table.add_row(result.name, *cells)
    if any(result.scores.get("intervals") for result in results):
        table.caption = "[brackets]: 95% interval (Wilson for proportions, bootstrap over examples for loss, ppl, ROUGE-L)"
    return table


def differing_samples(results: Sequence[ModelEvaluation], count: int = 3) -> list[int]:
    """Indices of the first `count` examples where the models' predictions differ."""
    if len(results) < 2 or "prediction" not in results[0].predictions[0]:
        return []
    indices = []
    for i in range(len(results[0].predictions)):
        answers = {scoring.normalise_text(r.predictions[i]["prediction"]) for r in results}
        if len(answers) > 1:
            indices.append(i)
        if len(indices) == count:
            break
    return indices


def samples_table(results: Sequence[ModelEvaluation], indices: Sequence[int], width: int = 300):
    """Side-by-side predictions for the given examples (text shortened to `width` characters)."""
    from rich.markup import escape
    from rich.table import Table

    def short(text: str) -> str:
        return escape(text if len(text) <= width else text[: width - 1] + "…")

    table = Table(title="Samples where the models differ", show_lines=True)
    table.add_column("prompt / reference")
    for result in results:
        table.add_column(result.name)
    for i in indices:
        first = results[0].predictions[i]
        cells = []
        for result in results:
            row = result.predictions[i]
            mark = "" if "correct" not in row else ("[green]✓[/] " if row["correct"] else "[red]✗[/] ")
            cells.append(mark + short(row["prediction"]))
        table.add_row(f"{short(first['prompt'])}\n[dim]reference:[/] {short(first['reference'])}", *cells)
    return table
