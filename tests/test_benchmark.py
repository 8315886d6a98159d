"""Smoke test of the W1 benchmark script (tunelab side, tiny model): it runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_benchmark_script_runs_and_writes_json(tiny_model_dir, gsm8k_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "tunelab", "--model", str(tiny_model_dir), "--examples", "16",
         "--eval-examples", "4", "--max-length", "128", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W1: 16 GSM8K examples" in proc.stdout and "tunelab" in proc.stdout
    report = json.loads(out.read_text())
    assert report["meta"]["examples"] == 16
    (result,) = report["results"]
    assert result["framework"] == "tunelab"
    assert result["trained_tokens"] > 16 * 50 and result["tokens_per_s"] > 0
    assert 0 < result["eval_loss"] < 20 and result["peak_rss_mb"] > 0
