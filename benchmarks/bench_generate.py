"""Generation speed: tunelab's engine vs plain transformers `generate` and ONNX Runtime, one invocation.

The same prompts (the first N GSM8K test questions through the chat template), greedy,
each engine in its own subprocess (so peak RSS is its own). Two workloads:

batch 1 (a chat): the first --prompts questions, one at a time
    hf-fp32      plain transformers `model.generate`, one prompt at a time (the reference)
    tunelab-fp32 tunelab's engine (`tunelab.engine.Engine`), one request at a time, fp32
    tunelab-bf16 the same in bf16 (only on CPUs with bf16 units: tunelab's `--dtype auto` there)
    onnx-fp32    `tunelab export --format onnx`, run by ONNX Runtime with the KV cache
    onnx-int8    `tunelab export --format onnx --quantize int8`

concurrent (eval, a server): --concurrency questions at once, answers of natural length
    hf-batch     plain `model.generate` on the left-padded batch of all of them (what a user
                 would write; the batch runs until its longest answer ends)
    tunelab-batch the engine with --concurrency slots, every request submitted at once
                 (finished rows leave at once)

Reported per engine: generated tokens/s (all new tokens / generation wall time), first-token
latency (batch 1: median time of a 1-token generation, i.e. the prefill; concurrent: mean time
from submission to a request's first token), peak RSS, model size on disk, and agreement with
hf-fp32's greedy answers (identical answers, and the share of matching leading tokens).

    python benchmarks/bench_generate.py                          # bundled model, 8 x 64 tokens; 16 at once
    python benchmarks/bench_generate.py --model runs/NAME --prompts 16 --max-new-tokens 128
    python benchmarks/bench_generate.py --exports /tmp/exports   # keep / reuse the ONNX exports
    python benchmarks/bench_generate.py --only hf-fp32,tunelab-fp32,hf-batch,tunelab-batch --json results.json
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


CONCURRENT = ("hf-batch", "tunelab-batch")


def run_engine(engine: str, source: str, prompts: list[str], max_new_tokens: int) -> dict:
    """Inside the engine's subprocess: load, warm up, time first tokens and whole answers."""
    import torch

    from tunelab.engine import Engine, SamplingParams
    from tunelab.generate import GenerationSettings, build_generation_config, encode_prompt, end_of_turn_ids, left_pad, trim_at_stop, user_messages
    from tunelab.models import load_for_inference

    started = time.perf_counter()
    model, tokenizer = load_for_inference(source, dtype="bf16" if engine == "tunelab-bf16" else "fp32", device="cpu")
    load_s = time.perf_counter() - started
    encoded = [encode_prompt(tokenizer, user_messages(p)) for p in prompts]
    stop = set(end_of_turn_ids(tokenizer, model))

    if engine.startswith("tunelab"):
        loop = Engine(model, tokenizer, max_batch_size=len(prompts))

        def generate(batch: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float]]:
            """Answers, and each request's seconds from submission to its first token."""
            requests = [loop.submit(ids, SamplingParams(max_new_tokens=new_tokens)) for ids in batch]
            answers = [r.wait().token_ids for r in requests]
            return answers, [r.first_token_at - r.submitted_at for r in requests]
    else:

        def generate(batch: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[float]]:
            """Answers of one left-padded `model.generate` (no per-request first-token times)."""
            config = build_generation_config(tokenizer, model, GenerationSettings(max_new_tokens=new_tokens))
            input_ids, attention_mask = left_pad(batch, config.pad_token_id)
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            return [trim_at_stop(row, stop) for row in out[:, input_ids.shape[1]:].tolist()], []

    batches = [encoded] if engine in CONCURRENT else [[ids] for ids in encoded]
    generate(batches[0][:2], 4)  # warm-up (allocations, graph optimisation)
    answers, first, seconds = [], [], 0.0
    for batch in batches:
        if engine != "tunelab-batch":  # first token = the time of a 1-token generation (the prefill)
            t = time.perf_counter()
            generate(batch, 1)
            first.append(time.perf_counter() - t)
        t = time.perf_counter()
        batch_answers, firsts = generate(batch, max_new_tokens)
        seconds += time.perf_counter() - t
        answers += batch_answers
        if engine == "tunelab-batch":
            first += firsts  # requests that waited for a slot count their wait
    tokens = sum(len(a) for a in answers)
    return {
        "engine": engine, "load_s": load_s, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "first_token_ms": 1000 * (statistics.mean(first) if engine in CONCURRENT else statistics.median(first)),
        "answers": answers, "requests": len(prompts), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def agreement(reference: list[list[int]], answers: list[list[int]]) -> tuple[int, float, int]:
    """Identical answers, the share of reference tokens matched before the first difference,
    and how many answers were compared (the questions both answered)."""
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
    return same, matched / max(total, 1), min(len(reference), len(answers))


BATCH1 = ("hf-fp32", "tunelab-fp32", "tunelab-bf16", "onnx-fp32", "onnx-int8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="Run folder or model (default: the bundled SmolLM2-135M-Instruct).")
    parser.add_argument("--prompts", type=int, default=8, help="Questions answered one at a time (batch 1).")
    parser.add_argument("--concurrency", type=int, default=16, help="Questions answered at once (concurrent engines).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--exports", type=Path, help="Folder for the ONNX exports (reused when present) [default: a temp dir].")
    parser.add_argument("--only", help="Comma-separated engines to run.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal: run one engine in this process
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        prompts = load_prompts(args.concurrency if args.engine in CONCURRENT else args.prompts)
        args.result.write_text(json.dumps(run_engine(args.engine, args.source, prompts, args.max_new_tokens)))
        return

    from tunelab.models import cpu_has_fast_bf16

    engines = [e for e in (*BATCH1, *CONCURRENT) if e != "tunelab-bf16" or cpu_has_fast_bf16()]
    if args.only:
        engines = [e for e in engines if e in args.only.split(",")]
    exports = args.exports or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    folders = {}
    for engine, quantize in (("onnx-fp32", None), ("onnx-int8", "int8")):
        folder = exports / engine
        if engine in engines and not (folder / "export.json").is_file():
            from tunelab.export import export_model

            export_model(args.model, "onnx", folder, quantize=quantize, overwrite=True)
        folders[engine] = folder
    results = {}
    exports.mkdir(parents=True, exist_ok=True)
    for engine in engines:
        result_file = exports / f"{engine}.json"
        source = str(folders[engine]) if engine in folders else args.model
        subprocess.run([sys.executable, __file__, "--engine", engine, "--source", source, "--result", str(result_file),
                        "--prompts", str(args.prompts), "--concurrency", str(args.concurrency),
                        "--max-new-tokens", str(args.max_new_tokens)], check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
        result = json.loads(result_file.read_text())
        weights = dir_bytes(folders[engine]) if engine in folders else None
        result["size_mb"] = weights / 2**20 if weights else None
        results[engine] = result

    reference = results.get("hf-fp32")
    print(f"\nGeneration, model {args.model}, greedy, up to {args.max_new_tokens} new tokens per answer")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("agreement: answers identical to hf-fp32's (one at a time, fp32) on the questions both answered")
    for title, group, base in ((f"batch 1: {args.prompts} questions one at a time", BATCH1, "hf-fp32"),
                               (f"concurrent: {args.concurrency} questions at once", CONCURRENT, "hf-batch")):
        rows = [results[e] for e in group if e in results]
        if not rows:
            continue
        print(f"\n{title}")
        print(f"{'engine':<14} {'tok/s':>7} {'vs ' + base:>12} {'1st token':>10} {'peak RSS':>9} {'same answers':>13} {'token agree':>11}")
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / results[base]["tokens_per_s"] if base in results else None
            same, share, compared = agreement(reference["answers"], r["answers"]) if reference else (0, 0.0, 0)
            r.update(identical_answers=same, token_agreement=share, compared_answers=compared)
            speedup = f"{r['speedup']:11.2f}x" if r["speedup"] is not None else f"{'-':>12}"
            print(f"{r['engine']:<14} {r['tokens_per_s']:7.1f} {speedup} {r['first_token_ms']:8.1f}ms {r['peak_rss_mb']:7.0f}MB "
                  f"{same:>6}/{compared:<6} {100 * share:10.1f}%")
    if args.json:
        meta = {"model": args.model, "prompts": args.prompts, "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens,
                "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.processor() or platform.machine()}
        rows = [{k: v for k, v in r.items() if k != "answers"} for r in results.values()]
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
