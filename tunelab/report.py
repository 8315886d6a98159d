"""A self-contained HTML report of a run folder: curves, evaluation tables, samples, config.

`write_report(run_dir)` reads only the run folder contract files

    metrics.jsonl            training curves (loss, eval_loss, lr, tokens_per_s, grad_norm)
    eval.json                the trainer's summary (timings, device, parameters) and merged evaluations
    eval/*/scores.json       `tunelab eval` scores per data set
    eval/*/predictions.jsonl samples
    config.yaml              the resolved config

and writes `report.html` (atomically) with the plots embedded as base64 PNG, so the one
file can be mailed or archived. Missing pieces are left out with a note, never an error:
the trainer calls this at the end of every run, including runs without evaluation.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

from tunelab.errors import TunelabError

REPORT_FILE = "report.html"
SAMPLES_PER_DATASET = 5
SAMPLE_CHARS = 600  # longer prompts/answers are shortened in the report
# Plots: (title, y label, [(metrics key, legend label)], log scale?)
PLOTS = (
    ("Loss", "loss (nats / target token)", [("loss", "train"), ("eval_loss", "eval")], False),
    ("Learning rate", "learning rate", [("lr", "lr")], False),
    ("Throughput", "tokens / s", [("tokens_per_s", "tokens/s")], False),
    ("Gradient norm", "grad norm (before clipping)", [("grad_norm", "grad norm")], True),
)
# Score keys shown in evaluation tables, in order, with their formats.
SCORE_COLUMNS = (
    ("examples", "examples", "{:d}"),
    ("loss", "loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("macro_f1", "macro F1", "{:.3f}"),
    ("rouge1", "ROUGE-1", "{:.4f}"),
    ("rouge2", "ROUGE-2", "{:.4f}"),
    ("rougeL", "ROUGE-L", "{:.4f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("score_tokens_per_s", "score tok/s", "{:,.0f}"),
    ("generate_tokens_per_s", "gen tok/s", "{:,.1f}"),
    ("peak_memory_mb", "peak memory MB", "{:,.0f}"),
)

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2328; padding: 0 1rem; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; margin-top: 2rem; }
.muted { color: #656d76; } .note { color: #656d76; font-style: italic; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; white-space: pre-wrap; }
.plots { display: flex; flex-wrap: wrap; gap: 1rem; } .plots figure { margin: 0; }
.plots img { width: 520px; max-width: 100%; border: 1px solid #d0d7de; }
.ok { color: #1a7f37; font-weight: bold; } .bad { color: #cf222e; font-weight: bold; }
.sample td { white-space: pre-wrap; max-width: 330px; }
"""


# ----------------------------------------------------------------------------- reading


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """Records of metrics.jsonl and how many lines could not be read (e.g. a line cut off
    by a crash mid-write); unreadable lines are skipped, not fatal, for a report."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def read_json(path: Path) -> dict:
    """A JSON object file, or {} when it is absent or not a JSON object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def read_jsonl_head(path: Path, count: int) -> list[dict]:
    """The first `count` JSON objects of a JSONL file (bad lines skipped)."""
    rows: list[dict] = []
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
            if len(rows) == count:
                break
    return rows


def series(records: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over the records that have both a step and a number."""
    steps, values = [], []
    for record in records:
        value, step = record.get(key), record.get("step")
        if isinstance(value, (int, float)) and isinstance(step, (int, float)):
            steps.append(step)
            values.append(value)
    return steps, values


# ----------------------------------------------------------------------------- plots


def plot_png(title: str, ylabel: str, lines: Sequence[tuple[str, list[float], list[float]]], *, log_scale: bool = False) -> str:
    """A line chart as a base64 PNG string (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    axes = figure.subplots()
    for label, steps, values in lines:
        marker = "o" if len(steps) <= 30 else None
        axes.plot(steps, values, label=label, marker=marker, markersize=3, linewidth=1.5)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    if log_scale and all(v > 0 for _, _, values in lines for v in values):
        axes.set_yscale("log")
    axes.grid(alpha=0.3)
    if len(lines) > 1:
        axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots_section(records: Sequence[dict]) -> str:
    """HTML figures for every plot that has data in metrics.jsonl."""
    figures = []
    for title, ylabel, keys, log_scale in PLOTS:
        lines = [(label, *series(records, key)) for key, label in keys]
        lines = [line for line in lines if line[1]]
        if not lines:
            continue
        image = plot_png(title, ylabel, lines, log_scale=log_scale)
        figures.append(
            f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{image}">'
            f"<figcaption class=muted>{html.escape(title)}</figcaption></figure>"
        )
    if not figures:
        return "<p class=note>No training metrics (metrics.jsonl is missing or empty).</p>"
    return '<div class="plots">' + "".join(figures) + "</div>"


# ----------------------------------------------------------------------------- tables


def format_value(value, spec: str | None = None) -> str:
    """A cell's text: numbers formatted (with `spec` when given), None as a dash, the rest as text."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if spec is not None and isinstance(value, (int, float)):
        try:
            return spec.format(value)
        except ValueError:
            return spec.replace(":d", "").format(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def key_value_table(items: dict) -> str:
    """A two-column table of plain values (nested objects are skipped)."""
    rows = []
    for key, value in items.items():
        if isinstance(value, dict):
            continue
        css = ' class="num"' if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td{css}>{html.escape(format_value(value))}</td></tr>")
    return "<table>" + "".join(rows) + "</table>" if rows else ""


def score_cell(scores: dict, key: str, spec: str) -> str:
    """A score with its 95% interval underneath when `tunelab eval` stored one (scores["intervals"])."""
    from tunelab.compare import format_interval

    text = html.escape(format_value(scores.get(key), spec))
    intervals = scores.get("intervals")
    interval = format_interval(key, intervals.get(key)) if isinstance(intervals, dict) and scores.get(key) is not None else ""
    return f'<td class="num">{text}' + (f"<br><span class=muted>{html.escape(interval)}</span>" if interval else "") + "</td>"


def comparison_cell(scores: dict) -> str:
    """The paired differences to the comparison's first model (scores["compared_to"]), one per line."""
    from tunelab.compare import DIFFERENCE_TITLES, format_difference

    compared = scores.get("compared_to")
    if not isinstance(compared, dict):
        return "<td></td>"
    lines = [f"vs {compared.get('model', '?')}:"] + [
        f"{title} {format_difference(key, compared[key])}" for key, title in DIFFERENCE_TITLES.items() if isinstance(compared.get(key), dict)
    ]
    return "<td>" + "<br>".join(html.escape(line) for line in lines) + "</td>"


def scores_table(scores_by_data: dict[str, dict]) -> str:
    """One row per evaluated data set, one column per score any of them has; 95% intervals under
    the scores and, for a model compared with another, the paired differences in a last column."""
    columns = [c for c in SCORE_COLUMNS if any(s.get(c[0]) is not None for s in scores_by_data.values())]
    compared = any(isinstance(s.get("compared_to"), dict) for s in scores_by_data.values())
    head = ("<tr><th>data</th><th>model</th>" + "".join(f"<th>{html.escape(title)}</th>" for _, title, _ in columns)
            + ("<th>difference (paired bootstrap 95% interval; * excludes 0)</th>" if compared else "") + "</tr>")
    rows = []
    for name, scores in scores_by_data.items():
        cells = "".join(score_cell(scores, key, spec) for key, _, spec in columns)
        model = html.escape(str(scores.get("model", "")))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{model}</td>{cells}{comparison_cell(scores) if compared else ''}</tr>")
    note = ""
    if any(isinstance(s.get("intervals"), dict) for s in scores_by_data.values()):
        note = "<p class=note>Under each score: its 95% interval (Wilson for proportions, bootstrap over examples otherwise).</p>"
    return f'<table class="scores">{head}{"".join(rows)}</table>{note}'


def shorten(text: str, limit: int = SAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def samples_table(rows: Sequence[dict]) -> str:
    """Prompt, reference and prediction of a few examples, marked right/wrong when scored."""
    has_mark = any("correct" in row for row in rows)
    head = "<tr><th>prompt</th><th>reference</th><th>prediction</th>" + ("<th></th>" if has_mark else "") + "</tr>"
    body = []
    for row in rows:
        cells = [html.escape(shorten(str(row.get(key, "")))) for key in ("prompt", "reference", "prediction")]
        mark = ""
        if has_mark:
            mark = '<td class="ok">✓</td>' if row.get("correct") else '<td class="bad">✗</td>'
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + mark + "</tr>")
    return f'<table class="sample">{head}{"".join(body)}</table>'


# ----------------------------------------------------------------------------- sections


def evaluation_scores(run_dir: Path, summary: dict) -> dict[str, dict]:
    """Scores per data set: eval/*/scores.json, plus eval.json entries without a folder."""
    scores: dict[str, dict] = {}
    merged = summary.get("evaluations")
    if isinstance(merged, dict):
        scores.update({name: value for name, value in merged.items() if isinstance(value, dict)})
    for path in sorted((run_dir / "eval").glob("*/scores.json")):
        data = read_json(path)
        if data:
            scores[path.parent.name] = data
    return scores


def training_summary(records: Sequence[dict], summary: dict, bad_lines: int) -> str:
    """The trainer's summary (eval.json) and figures derived from metrics.jsonl."""
    derived: dict = {}
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if train:
        derived["logged steps"] = len(train)
        derived["last step"] = train[-1].get("step")
        derived["last train loss"] = train[-1].get("loss")
        elapsed = [r["time"] for r in train if isinstance(r.get("time"), (int, float))]
        if elapsed:
            derived["training time (s)"] = round(max(elapsed), 1)
        rates = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
        if rates:
            derived["mean tokens/s"] = round(sum(rates) / len(rates), 1)
    if evals:
        best = min(evals, key=lambda r: r["eval_loss"])
        derived["best eval loss"] = best["eval_loss"]
        derived["best eval step"] = best.get("step")
    parts = []
    if derived:
        parts.append("<h3>From metrics.jsonl</h3>" + key_value_table(derived))
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    if flat:
        parts.append("<h3>Run summary (eval.json)</h3>" + key_value_table(flat))
    if bad_lines:
        parts.append(f"<p class=note>{bad_lines} unreadable line(s) in metrics.jsonl were skipped.</p>")
    return "".join(parts) or "<p class=note>No training summary yet.</p>"


def hardware_section(summary: dict, scores_by_data: dict[str, dict]) -> str:
    """Where the run trained and was evaluated (device, precision, processes) and the software used."""
    import platform

    import torch
    import transformers

    from tunelab import __version__

    facts: dict = {}
    for key in ("device", "precision", "num_processes"):
        if key in summary:
            facts[f"training {key}"] = summary[key]
    for name, scores in scores_by_data.items():
        for key in ("device", "dtype", "params", "peak_memory_mb", "memory_kind", "seconds"):
            if key in scores:
                facts[f"eval {name}: {key}"] = scores[key]
    facts["report written with"] = (
        f"tunelab {__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}"
    )
    return key_value_table(facts)


def config_section(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "<p class=note>No config.yaml in the run folder.</p>"
    return f"<pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>"


def samples_section(run_dir: Path) -> str:
    parts = []
    for path in sorted((run_dir / "eval").glob("*/predictions.jsonl")):
        rows = read_jsonl_head(path, SAMPLES_PER_DATASET)
        if rows:
            parts.append(f"<h3>{html.escape(path.parent.name)}</h3>" + samples_table(rows))
    return "".join(parts) or "<p class=note>No predictions yet (run <code>tunelab eval</code> on this run).</p>"


def confusion_png(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    """A confusion-matrix heatmap (rows: true label, columns: predicted) with counts, as base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    size = max(3.6, 0.7 * len(labels) + 2.0)
    figure = Figure(figsize=(size + 1.0, size), dpi=100)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    top = max((v for row in matrix for v in row), default=0)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def classification_section(summary: dict, scores_by_data: dict[str, dict]) -> str:
    """Per-class precision / recall / F1 and a confusion heatmap for each classifier evaluation:
    the trainer's (eval.json "classification") and each `tunelab eval` data set's."""
    found = []
    if isinstance(summary.get("classification"), dict):
        found.append(("eval split at the end of training", summary["classification"]))
    found += [(name, scores) for name, scores in scores_by_data.items() if "confusion_matrix" in scores]
    parts = []
    for name, scores in found:
        labels, matrix, per_class = scores.get("labels"), scores.get("confusion_matrix"), scores.get("per_class")
        if not (isinstance(labels, list) and isinstance(matrix, list) and isinstance(per_class, dict)):
            continue
        head = "<tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
        rows = "".join(
            f"<tr><td>{html.escape(str(label))}</td>"
            + "".join(f'<td class="num">{format_value(per_class[label][k], "{:.3f}")}</td>' for k in ("precision", "recall", "f1"))
            + f'<td class="num">{per_class[label]["support"]}</td></tr>'
            for label in labels if label in per_class
        )
        summary_line = (
            f"accuracy {format_value(scores.get('accuracy'), '{:.1%}')}, macro F1 {format_value(scores.get('macro_f1'), '{:.3f}')}, "
            f"majority class {format_value(scores.get('majority_baseline'), '{:.1%}')}"
        )
        image = confusion_png(matrix, labels, f"Confusion matrix: {name}")
        parts.append(
            f"<h3>{html.escape(name)}</h3><p>{html.escape(summary_line)}</p><div class=plots>"
            f"<figure><img alt=\"confusion matrix {html.escape(name)}\" src=\"data:image/png;base64,{image}\"></figure>"
            f'<table class="scores">{head}{rows}</table></div>'
        )
    return "<h2>Classification</h2>" + "".join(parts) if parts else ""


def render_report(run_dir: Path) -> str:
    """The whole report as one HTML string."""
    records, bad_lines = read_metrics(run_dir / "metrics.jsonl")
    summary = read_json(run_dir / "eval.json")
    scores_by_data = evaluation_scores(run_dir, summary)
    name = html.escape(run_dir.resolve().name)
    evaluation = scores_table(scores_by_data) if scores_by_data else "<p class=note>No evaluations yet.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>tunelab run {name}</title><style>{STYLE}</style></head><body>"
        f"<h1>Run {name}</h1><p class=muted>{html.escape(str(run_dir.resolve()))} · report written "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
        f"<h2>Training curves</h2>{plots_section(records)}"
        f"<h2>Training summary and timings</h2>{training_summary(records, summary, bad_lines)}"
        f"<h2>Evaluation</h2>{evaluation}{classification_section(summary, scores_by_data)}"
        f"<h2>Samples</h2>{samples_section(run_dir)}"
        f"<h2>Hardware</h2>{hardware_section(summary, scores_by_data)}"
        f"<h2>Config</h2>{config_section(run_dir)}"
        "</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write RUN/report.html from the run folder's files (temporary file, then rename); returns its path."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise TunelabError(f"run folder not found: {run_dir}\n  fix: give a folder like runs/NAME")
    known = ("metrics.jsonl", "eval.json", "config.yaml", "final", "eval")
    if not any((run_dir / name).exists() for name in known):
        raise TunelabError(
            f"{run_dir} does not look like a run folder (none of {', '.join(known)} is there)\n"
            "  fix: give the folder a training run wrote, e.g. runs/NAME"
        )
    from tunelab.files import write_text_atomic

    return write_text_atomic(run_dir / REPORT_FILE, render_report(run_dir))
