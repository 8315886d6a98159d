"""report.html: self-contained plots, evaluation tables, samples, config and hardware from a run folder."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import TunelabError
from tunelab.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReportParser(HTMLParser):
    """Collects <img> sources, table cell texts and <pre> text."""

    def __init__(self):
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.cells: list[str] = []
        self.pre: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag in ("td", "th", "pre"):
            self._in = tag
            (self.pre if tag == "pre" else self.cells).append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "pre":
            self.pre[-1] += data
        elif self._in in ("td", "th"):
            self.cells[-1] += data


CONFIG_YAML = "model:\n  name: default\nmethod: lora\nlora:\n  r: 8\ntraining:\n  learning_rate: 0.0002  # <tuned>\n"


def make_run(root: Path) -> Path:
    """A run folder as the trainer and `tunelab eval` leave it (without weights: the report needs none)."""
    run = root / "runs" / "demo"
    (run / "eval" / "gsm8k-test").mkdir(parents=True)
    (run / "config.yaml").write_text(CONFIG_YAML)
    records = [
        {"step": s, "epoch": s / 10, "loss": 2.0 - 0.1 * s, "lr": 1e-4 * s / 10, "grad_norm": 1.5, "tokens_per_s": 900.0 + s, "time": 3.0 * s}
        for s in range(1, 11)
    ]
    records.insert(5, {"step": 5, "eval_loss": 1.7, "eval_ppl": 5.47})
    records.append({"step": 10, "eval_loss": 1.3125, "eval_ppl": 3.7155})
    lines = [json.dumps(r) for r in records] + ['{"step": 11, "loss": 0.9']  # last line cut off by a crash
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    scores = {"examples": 50, "loss": 0.98765, "perplexity": 2.685, "exact_match": 0.34, "model": "runs/demo",
              "device": "cpu (x86_64, 2 cores)", "dtype": "float32", "params": 134515008, "peak_memory_mb": 2153.0}
    (run / "eval" / "gsm8k-test" / "scores.json").write_text(json.dumps(scores))
    predictions = [
        {"prompt": "Tom has <3> apples & 2 pears?", "reference": "#### 5", "prediction": "He has 5.\n#### 5", "correct": True},
        {"prompt": "What is 6 times 7?", "reference": "#### 42", "prediction": "#### 41", "correct": False},
    ]
    (run / "eval" / "gsm8k-test" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    summary = {"step": 10, "eval_loss": 1.3125, "train_seconds": 30.5, "tokens_per_second": 905.2,
               "device": "cpu", "precision": "fp32", "num_processes": 1, "evaluations": {"gsm8k-test": scores}}
    (run / "eval.json").write_text(json.dumps(summary))
    return run


def parse(path: Path) -> tuple[str, ReportParser]:
    text = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(text)
    return text, parser


def test_report_has_plots_tables_samples_and_config(tmp_path):
    run = make_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    text, parser = parse(path)
    # Four plots (loss with eval, lr, throughput, grad norm), each an inline PNG.
    assert [img["alt"] for img in parser.images] == ["Loss", "Learning rate", "Throughput", "Gradient norm"]
    for img in parser.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix)
        assert base64.b64decode(img["src"][len(prefix):]).startswith(PNG_SIGNATURE)
    assert "http://" not in text.replace("http://www.w3.org", "") and "<script" not in text  # nothing fetched
    # Evaluation table values, formatted.
    for cell in ("gsm8k-test", "50", "0.9877", "2.685", "34.0%", "2,153"):
        assert cell in parser.cells
    # Derived and trainer summaries, hardware.
    cells = dict(zip(parser.cells[::2], parser.cells[1::2]))
    assert cells["best eval loss"] == "1.3125" and cells["best eval step"] == "10"
    assert cells["training time (s)"] == "30" and cells["logged steps"] == "10"
    assert "training device" in parser.cells and "fp32" in parser.cells
    assert "1 unreadable line(s) in metrics.jsonl were skipped" in text
    # Samples are escaped text, marked right and wrong.
    assert "Tom has <3> apples & 2 pears?" in parser.cells and "#### 41" in parser.cells
    assert "✓" in parser.cells and "✗" in parser.cells
    # The resolved config verbatim.
    assert parser.pre == [CONFIG_YAML]
    assert not list(run.glob("*.tmp"))


def test_report_of_a_run_without_metrics_or_evaluation(tmp_path):
    run = tmp_path / "fresh"
    (run / "final").mkdir(parents=True)
    text, parser = parse(write_report(run))
    assert parser.images == []
    assert "No training metrics" in text and "No evaluations yet." in text and "No config.yaml" in text


def test_report_rewrites_atomically_and_rejects_non_runs(tmp_path):
    run = make_run(tmp_path)
    (run / "report.html").write_text("old")
    write_report(run)
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(TunelabError, match="run folder not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="does not look like a run folder"):
        write_report(tmp_path / "empty")


def test_report_cli(tmp_path):
    run = make_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.stdout and (run / "report.html").is_file()


def test_report_shows_intervals_and_paired_differences(tmp_path):
    """Scores written by a `tunelab eval` comparison carry intervals and the paired difference to the first model."""
    run = make_run(tmp_path)
    scores_path = run / "eval" / "gsm8k-test" / "scores.json"
    scores = json.loads(scores_path.read_text())
    scores["intervals"] = {"level": 0.95, "exact_match": {"low": 0.2244, "high": 0.4776, "method": "wilson"},
                           "loss": {"low": 0.9012, "high": 1.0734, "method": "bootstrap"}}
    scores["compared_to"] = {"model": "default", "exact_match": {"difference": 0.12, "low": 0.02, "high": 0.22, "excludes_zero": True},
                             "loss": {"difference": -0.05, "low": -0.11, "high": 0.01, "excludes_zero": False}}
    scores_path.write_text(json.dumps(scores))
    (run / "eval.json").unlink()
    text, parser = parse(write_report(run))
    assert "34.0%[22.4, 47.8]" in parser.cells and "0.9877[0.9012, 1.0734]" in parser.cells
    assert any(h.startswith("difference (paired bootstrap 95% interval") for h in parser.cells)
    assert "vs default:exact match +12.0 pts [+2.0, +22.0] *loss -0.0500 [-0.1100, +0.0100]" in parser.cells
    assert "Under each score: its 95% interval" in text
