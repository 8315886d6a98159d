"""Smoke test of benchmarks/bench_serve.py on the tiny model: both servers measured at each level."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"


def test_bench_serve_reports_both_servers_at_each_level(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--clients", "1,2", "--requests", "2",
         "--max-tokens", "4", "--load-clients", "0", "--llama-server", "", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| clients | batched tok/s | one at a time tok/s |" in proc.stdout
    result = json.loads(out.read_text())
    assert [row["clients"] for row in result["levels"]] == [1, 2]
    for row in result["levels"]:
        for server in ("batched", "one-at-a-time"):
            assert row[server]["completed"] == 2 and row[server]["tokens"] == 8 and row[server]["tokens_per_s"] > 0
    assert result["load"] is None  # --load-clients 0 (the load test itself: tests/test_serve.py)
