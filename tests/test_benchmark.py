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


def test_cpu_ceiling_counts_lora_flops_and_prints_the_ceiling(tiny_model_dir):
    """The FLOP count behind the ceiling, by hand for the tiny Llama, and the script's report."""
    import importlib.util

    from transformers import AutoConfig

    spec = importlib.util.spec_from_file_location("cpu_ceiling", SCRIPT.parent / "cpu_ceiling.py")
    ceiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ceiling)
    config = AutoConfig.from_pretrained(tiny_model_dir)  # d 64, ffn 128, 2 layers, 4 heads / 2 kv heads
    linears = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q o, k v, gate up down
    base = 2 * linears + 64 * 49152
    adapters = 2 * 4 * (64 + 64 + 64 + 32 + 64 + 32 + 64 + 64 + 64 + 128 + 64 + 128 + 128 + 64)
    attention = 2 * 10 * 64 * 2
    assert ceiling.lora_flops_per_token(config, rank=4, seq=10) == 4 * base + 6 * adapters + 6 * attention

    proc = subprocess.run([sys.executable, str(SCRIPT.parent / "cpu_ceiling.py"), "--model", str(tiny_model_dir),
                           "--tokens", "64"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "MFLOP per trained token" in lines[0]
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["float32", "bfloat16"]
    assert all("trained tokens/s" in ln for ln in lines[1:])
