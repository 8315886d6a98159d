"""Generation speed: PyTorch (tunelab generate) vs ONNX Runtime fp32 and int8, one invocation.

The same prompts (the first N GSM8K test questions through the chat template), greedy,
one prompt at a time (batch 1, as in a chat), for each engine in its own subprocess (so
peak RSS is its own):

    torch-fp32   tunelab's PyTorch path (load_for_inference + model.generate), fp32
    torch-bf16   the same in bf16 (only on CPUs with bf16 units: tunelab's `auto` there)
    onnx-fp32    `tunelab export --format onnx`, run by ONNX Runtime with the KV cache
    onnx-int8    `tunelab export --format onnx --quantize int8`

Reported per engine: generated tokens/s (all new tokens / generation wall time),
first-token latency (median time of a 1-token generation: the prompt's prefill),
peak RSS, model size on disk, and answer agreement with torch-fp32 (identical greedy
answers, and the share of matching leading tokens).

    python benchmarks/bench_generate.py                          # bundled model, 8 prompts x 64 tokens
    python benchmarks/bench_generate.py --model runs/NAME --prompts 16 --max-new-tokens 128
    python benchmarks/bench_generate.py --exports /tmp/exports   # keep / reuse the ONNX exports
    python benchmarks/bench_generate.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
FALLBACK_PROMPTS = [
    "What is 12 * 7?", "Name three primary colors.", "Write a haiku about autumn.", "Explain what a CPU does in one sentence.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?", "Translate 'thank you' into French.",
    "What is the capital of Japan?", "Give one tip for better sleep.",
]


def load_prompts(n: int) -> list[str]:
    test = GSM8K / "test.jsonl"
    if test.is_file():
        return [json.loads(line)["question"] for line in test.read_text().splitlines()[:n]]
    return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".onnx", ".data", ".safetensors"))


def run_engine(engine: str, source: str, prompts: list[str], max_new_tokens: int) -> dict:
    """Inside the engine's subprocess: load, warm up, time first tokens and whole answers."""
    import torch

    from tunelab.generate import GenerationSettings, build_generation_config, encode_prompt, end_of_turn_ids, trim_at_stop, user_messages
    from tunelab.models import load_for_inference

    started = time.perf_counter()
    dtype = "bf16" if engine == "torch-bf16" else "fp32"
    model, tokenizer = load_for_inference(source, dtype=dtype, device="cpu")
    load_s = time.perf_counter() - started
    encoded = [encode_prompt(tokenizer, user_messages(p)) for p in prompts]
    stop = set(end_of_turn_ids(tokenizer, model))

    def generate(ids: list[int], new_tokens: int) -> list[int]:
        config = build_generation_config(tokenizer, model, GenerationSettings(max_new_tokens=new_tokens))
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=config)
        return trim_at_stop(out[0, len(ids):].tolist(), stop)

    generate(encoded[0], 4)  # warm-up (allocations, graph optimisation)
    first = []
    for ids in encoded:
        t = time.perf_counter()
        generate(ids, 1)
        first.append(time.perf_counter() - t)
    answers, tokens = [], 0
    t = time.perf_counter()
    for ids in encoded:
        answer = generate(ids, max_new_tokens)
        answers.append(answer)
        tokens += len(answer)
    seconds = time.perf_counter() - t
    return {
        "engine": engine, "load_s": load_s, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "first_token_ms": 1000 * statistics.median(first), "answers": answers,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def agreement(reference: list[list[int]], answers: list[list[int]]) -> tuple[int, float]:
    same = sum(a == b for a, b in zip(reference, answers))
    matched = total = 0
    for a, b in zip(reference, answers):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        matched += n
        total += max(len(a), 1)
    return same, matched / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="Run folder or model (default: the bundled SmolLM2-135M-Instruct).")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exports", type=Path, help="Folder for the ONNX exports (reused when present) [default: a temp dir].")
    parser.add_argument("--only", help="Comma-separated engines to run.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts = load_prompts(args.prompts)
    if args.engine:
        args.result.write_text(json.dumps(run_engine(args.engine, args.source, prompts, args.max_new_tokens)))
        return

    from tunelab.export import export_model
    from tunelab.models import cpu_has_fast_bf16

    exports = args.exports or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    folders = {}
    for engine, quantize in (("onnx-fp32", None), ("onnx-int8", "int8")):
        folder = exports / engine
        if not (folder / "export.json").is_file():
            export_model(args.model, "onnx", folder, quantize=quantize, overwrite=True)
        folders[engine] = folder
    engines = ["torch-fp32", *(["torch-bf16"] if cpu_has_fast_bf16() else []), "onnx-fp32", "onnx-int8"]
    if args.only:
        engines = [e for e in engines if e in args.only.split(",")]
    fp32_params = json.loads((folders["onnx-fp32"] / "export.json").read_text())["parameters"]
    results = []
    for engine in engines:
        result_file = exports / f"{engine}.json"
        source = str(folders.get(engine, args.model))
        subprocess.run([sys.executable, __file__, "--engine", engine, "--source", source, "--result", str(result_file),
                        "--prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        result = json.loads(result_file.read_text())
        result["size_mb"] = (dir_bytes(folders[engine]) if engine in folders else fp32_params * (2 if engine == "torch-bf16" else 4)) / 2**20
        results.append(result)
    reference = next((r for r in results if r["engine"] == "torch-fp32"), results[0])
    print(f"\nGeneration: {args.prompts} prompts x up to {args.max_new_tokens} new tokens, greedy, batch 1, model {args.model}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print(f"{'engine':<11} {'tok/s':>7} {'vs torch':>8} {'1st token':>10} {'peak RSS':>9} {'size':>9} {'same answers':>13} {'token agree':>11}")
    for r in results:
        same, share = agreement(reference["answers"], r["answers"])
        r.update(identical_answers=same, token_agreement=share, speedup=r["tokens_per_s"] / reference["tokens_per_s"])
        print(f"{r['engine']:<11} {r['tokens_per_s']:7.1f} {r['speedup']:7.2f}x {r['first_token_ms']:8.1f}ms {r['peak_rss_mb']:7.0f}MB "
              f"{r['size_mb']:7.0f}MB {same:>6}/{len(prompts):<6} {100 * share:10.1f}%")
    if args.json:
        meta = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "cpu_count": os.cpu_count(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        args.json.write_text(json.dumps({"meta": meta, "results": [{k: v for k, v in r.items() if k != "answers"} for r in results]}, indent=2))


if __name__ == "__main__":
    main()
