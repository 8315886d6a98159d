"""Smoke test of benchmarks/bench_methods.py on the tiny Llama: four methods, one invocation, exact counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"


def test_bench_methods_runs_every_method_on_the_same_data(tiny_model_dir, tmp_path):
    out = tmp_path / "methods.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--steps", "2", "--batch-size", "2",
         "--accumulation", "1", "--rank", "2", "--eval-examples", "3", "--max-length", "256", "--precision", "fp32",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | trainable params |" in proc.stdout
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["lora", "dora", "qlora", "full"]
    # Tiny Llama, rank 2 on every linear layer: per layer r x (in + out) summed over
    # q 64->64, k 64->32, v 64->32, o 64->64, gate 64->128, up 64->128, down 128->64 = 1024 r.
    assert rows["lora"]["trainable_params"] == rows["qlora"]["trainable_params"] == 2 * 1024 * 2
    # DoRA adds a magnitude per output feature: 64 + 32 + 32 + 64 + 128 + 128 + 64 per layer.
    assert rows["dora"]["trainable_params"] == 2 * 1024 * 2 + 2 * 512
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"] > 3_000_000
    for row in rows.values():
        assert row["steps"] == 2 and row["train_tokens"] == rows["lora"]["train_tokens"]  # same data, same steps
        assert row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0 and 0 < row["eval_loss"] < 20
        assert row["eval_tokens"] == rows["lora"]["eval_tokens"]
