"""Serving throughput: `tunelab serve` batching requests vs the same server one at a time, one invocation.

Two `tunelab serve` processes over the same model run side by side (the idle one waits
without using the CPU): "batched" (continuous batching, --max-batch-size 16) and
"one-at-a-time" (--max-batch-size 1: each request waits for the previous one, as in
servers that run `model.generate` per request). For each concurrency level, C client
threads (openai SDK, streaming, in this process) send the same requests, greedy with
`--max-tokens` each, first to one server, then to the other. Reported per level and server:
completion tokens/s (all generated tokens / wall time), p50 / p95 request latency, and the
batched / one-at-a-time ratio. Where llama.cpp's `llama-server` is installed (or given with
--llama-server), it serves the GGUF of the same model with C parallel slots and is measured
the same way.

Then a load test: 20 concurrent streaming clients with mixed lengths against a server with
a small queue (--max-batch-size 8 --max-queue 4): every request completes or gets 429, none
is lost, the server is still up afterwards.

    python benchmarks/bench_serve.py                      # bundled model, 1/4/8/16 clients, 64 tokens
    python benchmarks/bench_serve.py --model runs/NAME --clients 1,8 --requests 8
    python benchmarks/bench_serve.py --json serve.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-bench"
PROMPTS = [
    "What is 12 * 7? Explain step by step.", "Name three primary colors and describe each.", "Write a haiku about autumn.",
    "Explain what a CPU does.", "Tom has 3 apples and buys 5 more. How many apples does he have?",
    "Translate 'thank you' into French, Spanish and German.", "What is the capital of Japan? Tell me about it.",
    "Give three tips for better sleep.",
]


class ServerProcess:
    """`tunelab serve` in a subprocess on a free port; `ready()` waits until it answers."""

    def __init__(self, model: str, *options: str):
        command = [sys.executable, "-m", "tunelab", "serve", model, "--port", "0", "--api-key", KEY, "--dtype", "fp32",
                   "--device", "cpu", "--requests-per-minute", "0", *options]
        self.options = options
        self.proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": str(REPO)})
        self.url = self.model = None

    def ready(self) -> ServerProcess:
        for line in self.proc.stdout:
            found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                self.url = found.group(1)
                break
        if self.url is None:
            raise SystemExit(f"tunelab serve {' '.join(self.options)} did not start (exit code {self.proc.wait()})")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain the rest of the banner
        wait_healthy(self.url)
        self.model = json.loads(http_get(self.url + "/v1/models"))["data"][0]["id"]
        return self

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class LlamaServer:
    """llama.cpp's llama-server on the model's GGUF, `slots` parallel sequences (continuous batching)."""

    def __init__(self, binary: str, gguf: Path, slots: int, port: int = 8431):
        self.proc = subprocess.Popen([binary, "-m", str(gguf), "--port", str(port), "-np", str(slots), "-c", str(2048 * slots),
                                      "--api-key", KEY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url, self.model = f"http://127.0.0.1:{port}", "gguf"
        wait_healthy(self.url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def http_get(url: str) -> str:
    import httpx

    return httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text


def wait_healthy(url: str, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy in {seconds:.0f} s")


def one_request(url: str, model: str, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    """One streamed chat request: ("ok" | "429", latency s, completion tokens)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=600)
    started = time.perf_counter()
    try:
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                                                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    except openai.RateLimitError:
        return "429", time.perf_counter() - started, 0
    usage = chunks[-1].usage
    return "ok", time.perf_counter() - started, usage.completion_tokens if usage else 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(url: str, model: str, clients: int, requests: int, max_tokens: int, lengths: list[int] | None = None) -> dict:
    """`requests` requests from `clients` concurrent clients; tokens/s over the wall time, latencies."""
    jobs = [(PROMPTS[i % len(PROMPTS)], lengths[i] if lengths else max_tokens) for i in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        outcomes = list(pool.map(lambda job: one_request(url, model, *job), jobs))
    wall = time.perf_counter() - started
    done = [o for o in outcomes if o[0] == "ok"]
    latencies = [o[1] for o in done] or [0.0]
    tokens = sum(o[2] for o in done)
    return {"clients": clients, "requests": requests, "completed": len(done), "rate_limited": len(outcomes) - len(done),
            "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(latencies), 2), "p95_s": round(percentile(latencies, 0.95), 2)}


def find_gguf(model: str) -> Path | None:
    from tunelab.models import DEFAULT_MODEL, bundled_gguf_path

    if model == DEFAULT_MODEL:
        return bundled_gguf_path()
    path = Path(model)
    exported = sorted(path.glob("export/gguf/*.gguf")) if path.is_dir() else []
    return path if path.suffix == ".gguf" else (exported[0] if exported else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="run folder / model dir / .gguf / 'default' (bundled)")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per level (spread over the clients)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--load-clients", type=int, default=20, help="clients of the load test (0: skip it)")
    parser.add_argument("--llama-server", default=shutil.which("llama-server"), help="llama-server binary [default: on PATH]")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    batch = max(levels)

    print(f"Serving: {args.model}, {args.requests} requests per level x {args.max_tokens} new tokens (greedy, streamed); "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", flush=True)
    batched = ServerProcess(args.model, "--max-batch-size", str(batch), "--max-queue", str(args.requests))
    sequential = ServerProcess(args.model, "--max-batch-size", "1", "--max-queue", str(args.requests))
    batched.ready(), sequential.ready()  # both load at once
    servers = {"batched": batched, "one-at-a-time": sequential}
    rows = []
    try:
        measure(batched.url, batched.model, 2, 2, 4)  # warm-up: first-call allocations in both servers
        measure(sequential.url, sequential.model, 2, 2, 4)
        for clients in levels:
            result = {name: measure(s.url, s.model, clients, args.requests, args.max_tokens) for name, s in servers.items()}
            ratio = result["batched"]["tokens_per_s"] / max(result["one-at-a-time"]["tokens_per_s"], 1e-9)
            rows.append({"clients": clients, **{name: r for name, r in result.items()}, "speedup": round(ratio, 2)})
            print(f"  {clients:>2} clients: batched {result['batched']['tokens_per_s']:7.1f} tok/s "
                  f"(p50 {result['batched']['p50_s']:.1f}s, p95 {result['batched']['p95_s']:.1f}s) | one at a time "
                  f"{result['one-at-a-time']['tokens_per_s']:7.1f} tok/s (p50 {result['one-at-a-time']['p50_s']:.1f}s, "
                  f"p95 {result['one-at-a-time']['p95_s']:.1f}s) | {ratio:.2f}x", flush=True)
    finally:
        batched.stop()
        sequential.stop()

    llama_rows = []
    gguf = find_gguf(args.model)
    if args.llama_server and gguf is not None:
        for clients in levels:
            server = LlamaServer(args.llama_server, gguf, clients)
            try:
                llama_rows.append(measure(server.url, server.model, clients, args.requests, args.max_tokens))
            finally:
                server.stop()
            print(f"  {clients:>2} clients: llama-server ({gguf.name}) {llama_rows[-1]['tokens_per_s']:7.1f} tok/s", flush=True)
    else:
        print("  llama-server: not installed (or no GGUF for this model): not measured", flush=True)

    load = None
    if args.load_clients:
        server = ServerProcess(args.model, "--max-batch-size", "8", "--max-queue", "4").ready()
        try:
            lengths = [8 + (i * 37) % (2 * args.max_tokens) for i in range(args.load_clients)]  # mixed: 8 .. 2 x max tokens
            load = measure(server.url, server.model, args.load_clients, args.load_clients, args.max_tokens, lengths)
            health = json.loads(http_get(server.url + "/health"))
            load["server_up_after"] = health["status"] == "ok" and health["in_flight"] == 0
        finally:
            server.stop()
        lost = load["requests"] - load["completed"] - load["rate_limited"]
        print(f"  load test, {args.load_clients} clients (capacity 8 running + 4 queued): {load['completed']} completed, "
              f"{load['rate_limited']} got 429, {lost} lost; p50 {load['p50_s']:.1f}s p95 {load['p95_s']:.1f}s; "
              f"{load['tokens_per_s']:.1f} tok/s; server up afterwards: {load['server_up_after']}", flush=True)

    print("\n| clients | batched tok/s | one at a time tok/s | batched / one at a time | batched p50 / p95 s | one at a time p50 / p95 s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        b, s = row["batched"], row["one-at-a-time"]
        print(f"| {row['clients']} | {b['tokens_per_s']:.1f} | {s['tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
              f"{b['p50_s']:.1f} / {b['p95_s']:.1f} | {s['p50_s']:.1f} / {s['p95_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "requests": args.requests,
                                         "levels": rows, "llama_server": llama_rows, "load": load}, indent=2) + "\n")


if __name__ == "__main__":
    main()
