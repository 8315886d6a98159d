"""read -> normalise -> dedupe -> tokenize in one call, splits, validate/inspect and their CLI commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.pipeline import (
    highlight_trained,
    inspect_examples,
    load_tokenized,
    split_examples,
    validate_data,
)
from tunelab.errors import DataError, TunelabError


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def mixed_file(tmp_path: Path) -> Path:
    """5 good records (one exact duplicate), 2 invalid ones, 1 longer than 64 tokens."""
    return jsonl(
        tmp_path / "data.jsonl",
        [
            {"question": "What is 1 + 1?", "answer": "2"},
            {"question": "What is 2 + 2?", "answer": "4"},
            {"question": "What is 1 + 1?", "answer": "2"},
            "{broken json",
            {"question": "What is 3 + 3?"},
            {"question": "Count to fifty.", "answer": " ".join(str(i) for i in range(1, 51))},
            {"question": "What is 4 + 4?", "answer": "8"},
        ],
    )


def test_load_tokenized_reports_every_count(tmp_path, tokenizer):
    tokenized, stats = load_tokenized(mixed_file(tmp_path), tokenizer, max_length=64, skip_invalid=True, show_progress=False)
    assert (stats.read, stats.invalid_skipped, stats.duplicates_removed, stats.truncated, stats.dropped) == (6, 2, 1, 1, 0)
    assert stats.examples == len(tokenized) == 4
    assert stats.formats == {"qa": 4}
    assert [t.source.line for t in tokenized] == [1, 2, 6, 7]
    assert max(len(t) for t in tokenized) == 64
    assert stats.tokens == sum(len(t) for t in tokenized)
    assert "6 read, 2 invalid skipped, 1 duplicates removed" in stats.summary()

    dropped, drop_stats = load_tokenized(
        mixed_file(tmp_path), tokenizer, max_length=64, truncation="drop", skip_invalid=True, dedupe=False, show_progress=False
    )
    assert (drop_stats.duplicates_removed, drop_stats.truncated, drop_stats.dropped, drop_stats.examples) == (0, 0, 1, 4)

    short_only, filter_stats = load_tokenized(
        mixed_file(tmp_path), tokenizer, max_length=64, skip_invalid=True, min_tokens=64, show_progress=False
    )
    assert [t.source.line for t in short_only] == [6]
    assert (filter_stats.filtered, filter_stats.examples) == (3, 1)

    first_two, _ = load_tokenized(mixed_file(tmp_path), tokenizer, skip_invalid=True, limit=2, show_progress=False)
    assert [t.source.line for t in first_two] == [1, 2]


def test_load_tokenized_without_skip_invalid_fails_at_the_first_bad_line(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"data\.jsonl:4: invalid JSON"):
        load_tokenized(mixed_file(tmp_path), tokenizer, show_progress=False)


def test_split_is_deterministic_disjoint_and_ordered():
    items = list(range(100))
    train, evaluation = split_examples(items, eval_fraction=0.1, seed=7)
    assert (train, evaluation) == split_examples(items, eval_fraction=0.1, seed=7)
    assert evaluation != split_examples(items, eval_fraction=0.1, seed=8)[1]
    assert len(evaluation) == 10 and sorted(train + evaluation) == items
    assert train == sorted(train) and evaluation == sorted(evaluation)
    assert split_examples(items, eval_fraction=0.0, seed=7) == (items, [])
    assert [len(part) for part in split_examples([1, 2, 3], eval_fraction=0.01, seed=0)] == [2, 1]
    with pytest.raises(TunelabError, match="cannot split 1 example"):
        split_examples([1], eval_fraction=0.5, seed=0)


def test_validate_report_counts_and_histogram(tmp_path, tokenizer):
    report = validate_data(mixed_file(tmp_path), tokenizer, max_length=64, skip_invalid=True)
    assert report.stats.examples == len(report.lengths) == 4
    buckets = report.histogram(bins=5)
    assert sum(count for _, _, count in buckets) == 4
    assert buckets[0][0] == min(report.lengths) and buckets[-1][1] >= max(report.lengths)
    assert report.stats.problems[0].startswith(f"{tmp_path / 'data.jsonl'}:4: invalid JSON")


def test_inspect_marks_exactly_the_trained_text(tmp_path, tokenizer):
    path = jsonl(tmp_path / "d.jsonl", [{"instruction": "Greet", "output": "Hello!"}, {"text": "ignored"}])
    (example,) = inspect_examples(path, tokenizer, n=1)
    text = highlight_trained(example, tokenizer, markers=True).plain
    assert text.endswith("<|im_start|>user\nGreet<|im_end|>\n<|im_start|>assistant\n⟦Hello!<|im_end|>⟧\n")
    assert text.count("⟦") == 1


# --- CLI ---------------------------------------------------------------------------------------

runner = CliRunner()


def test_cli_validate_prints_counts_formats_and_histogram(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)])
    result = runner.invoke(app, ["data", "validate", str(path), "--max-length", "128"])
    assert result.exit_code == 0, result.output
    assert "examples kept" in result.output and "20" in result.output
    assert "qa" in result.output
    assert "Token lengths" in result.output and "█" in result.output
    assert "ok: 20 examples ready for training" in result.output


def test_cli_validate_skip_invalid_reports_the_skipped_lines(tmp_path):
    result = runner.invoke(app, ["data", "validate", str(mixed_file(tmp_path)), "--max-length", "64", "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "data.jsonl:5:" in result.output.replace("\n", "")
    assert "4 examples usable; 2 invalid records skipped" in result.output


def test_cli_inspect_shows_trained_tokens(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"question": "What is 2 + 2?", "answer": "It is 4."}])
    result = runner.invoke(app, ["data", "inspect", str(path), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "⟦It is 4.<|im_end|>⟧" in result.output
    assert "What is 2 + 2?<|im_end|>" in result.output and "⟦What" not in result.output


def test_cli_bad_file_exits_nonzero_with_one_located_message_and_no_traceback(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", "data", "validate", str(path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert f'{path}:2: field "output" is missing' in " ".join(result.stderr.split())
