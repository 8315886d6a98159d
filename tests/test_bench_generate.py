"""Smoke test of benchmarks/bench_generate.py on the tiny model: every engine runs, is reported,
and tunelab's engine gives plain `generate`'s greedy answers alone and batched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


def test_bench_generate_reports_every_engine(tiny_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    engines = {"hf-fp32", "tunelab-fp32", "onnx-fp32", "onnx-int8", "tunelab-batch"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--prompts", "2", "--concurrency", "3",
         "--max-new-tokens", "4", "--exports", str(tmp_path / "exports"), "--only", ",".join(sorted(engines)),
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch 1: 2 questions one at a time" in proc.stdout and "concurrent: 3 questions at once" in proc.stdout
    results = {r["engine"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == engines
    assert results["hf-fp32"]["speedup"] == 1.0 and results["hf-fp32"]["identical_answers"] == 2
    assert results["tunelab-fp32"]["identical_answers"] == 2  # the engine's greedy answers are generate's
    assert results["tunelab-batch"]["identical_answers"] == 2 and results["tunelab-batch"]["requests"] == 3
    assert results["onnx-fp32"]["identical_answers"] == 2  # same greedy answers through the KV-cache graph
    for result in results.values():
        assert result["tokens_per_s"] > 0 and result["first_token_ms"] > 0 and result["peak_rss_mb"] > 0
    assert results["onnx-int8"]["size_mb"] > 0 and (tmp_path / "exports" / "onnx-int8" / "export.json").is_file()
