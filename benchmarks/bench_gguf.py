"""GGUF in llama.cpp: size, perplexity and speed of each --quantize type against the f16 file, one invocation.

    python benchmarks/bench_gguf.py                           # the bundled SmolLM2-135M-Instruct
    python benchmarks/bench_gguf.py --source runs/NAME --json gguf.json

1. `tunelab export SOURCE --format gguf` for f16 and q8_0 (tunelab's own writer), each in its own
   process, so its peak RSS is the export's (the issue's bound: 2.5x the model's fp32 size).
2. The K-quants and legacy types from the f16 file with llama.cpp's quantizer, the call
   `--quantize q4_k_m` etc. make (`tunelab.export.llamacpp.quantize`).
3. For every file, llama.cpp (llama-cpp-python) computes perplexity on GSM8K test text the way
   `llama-perplexity -c 256` does (chunks of 256 tokens, second halves scored), and greedy
   generation speed (tokens/s, one thread, batch 1); PyTorch fp32 on the same text and prompts is the
   reference row. Ratios are against f16 (perplexity) and PyTorch fp32 (speed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
QUANTIZED = ("q6_k", "q5_k_m", "q4_k_m", "q4_0")

EXPORT_SCRIPT = """
import json, resource, sys
from tunelab.export import export_model
out, info = export_model(sys.argv[1], "gguf", sys.argv[2], quantize=sys.argv[3], overwrite=True)
print(json.dumps({"file": str(out / info["file"]), "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "verification": info["verification"], "parameters": info["parameters"]}))
"""


def export(source: str, out: Path, quantize: str) -> dict:
    """One `tunelab export` in its own interpreter: the file, its verification and the process's peak RSS."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, source, str(out), quantize], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    if result.returncode != 0:
        raise SystemExit(f"export {quantize} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "seconds": time.perf_counter() - started}


def gsm8k_text(records: int) -> str:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:records]]
    return "\n\n".join(f"{r['question']}\n{r['answer']}" for r in rows)


def speed(generate, prompts: list[list[int]], max_new_tokens: int) -> float:
    """Generated tokens per second over all prompts (greedy, batch 1)."""
    started, tokens = time.perf_counter(), 0
    for ids in prompts:
        tokens += len(generate(ids, max_new_tokens))
    return tokens / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="default", help="run folder, model directory or 'default'")
    parser.add_argument("--chunks", type=int, default=24, help="perplexity chunks of 256 tokens")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from tunelab.export import llamacpp, verify
    from tunelab.generate import encode_prompt, user_messages
    from tunelab.models import load_for_inference

    workdir = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    rows: dict[str, dict] = {}
    for quantize in ("f16", "q8_0"):
        result = export(args.source, workdir / quantize, quantize)
        rows[quantize] = {"file": Path(result["file"]), "peak_rss": result["peak_rss"], "export_seconds": result["seconds"],
                          "by": "tunelab (gguf-py)"}
        parameters = result["parameters"]
        print(f"exported {quantize}: peak RSS {result['peak_rss'] / 2**20:.0f} MiB "
              f"({result['peak_rss'] / (4 * parameters):.2f}x the fp32 weights), {result['seconds']:.0f} s", flush=True)
    for quantize in QUANTIZED:
        path = workdir / f"model-{quantize.upper()}.gguf"
        llamacpp.quantize(rows["f16"]["file"], path, quantize.upper())
        rows[quantize] = {"file": path, "by": "llama.cpp's quantizer"}

    torch.set_num_threads(1)
    model, tokenizer = load_for_inference(args.source, dtype="fp32", device="cpu")
    ids = tokenizer(gsm8k_text(400), add_special_tokens=False)["input_ids"]
    questions = [json.loads(line)["question"] for line in GSM8K.read_text().splitlines()[:args.prompts]]
    prompts = [encode_prompt(tokenizer, user_messages(q)) for q in questions]
    stop = {tokenizer.eos_token_id}
    reference = verify.perplexity(verify.torch_logits_fn(model), ids, chunks=args.chunks)

    def torch_generate(prompt, n):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=list(stop))
        return out[0, len(prompt):].tolist()

    torch_speed = speed(torch_generate, prompts, args.max_new_tokens)
    del model
    print(f"PyTorch fp32: perplexity {reference['perplexity']:.3f} on {reference['tokens_scored']} tokens, {torch_speed:.1f} tok/s",
          flush=True)
    for quantize, row in rows.items():
        runner = llamacpp.LlamaCppModel(row["file"], n_ctx=512)
        row["perplexity"] = verify.perplexity(runner.logits, ids, chunks=args.chunks)["perplexity"]
        row["tok_s"] = speed(lambda prompt, n: runner.greedy(prompt, n, stop), prompts, args.max_new_tokens)
        row["bytes"] = row["file"].stat().st_size
        runner.close()
    f16 = rows["f16"]["perplexity"]
    print(f"\n{'type':8} {'by':22} {'MiB':>7} {'perplexity':>10} {'vs f16':>7} {'tok/s':>6} {'vs torch':>8}")
    print(f"{'torch':8} {'PyTorch fp32':22} {4 * parameters / 2**20:7.1f} {reference['perplexity']:10.3f} {'':>7} {torch_speed:6.1f} {'1.00x':>8}")
    for quantize, row in rows.items():
        print(f"{quantize:8} {row['by']:22} {row['bytes'] / 2**20:7.1f} {row['perplexity']:10.3f} "
              f"{100 * (row['perplexity'] / f16 - 1):+6.1f}% {row['tok_s']:6.1f} {row['tok_s'] / torch_speed:7.2f}x")
    print(f"\nllama.cpp: {llamacpp.version()}; perplexity: GSM8K test text, -c 256, {reference['tokens_scored']} tokens scored; "
          f"speed: {args.prompts} GSM8K questions x up to {args.max_new_tokens} new tokens, greedy, 1 thread")
    if args.json:
        args.json.write_text(json.dumps({"torch": {"perplexity": reference["perplexity"], "tok_s": torch_speed, "parameters": parameters},
                                         **{k: {**v, "file": str(v["file"])} for k, v in rows.items()}}, indent=2))


if __name__ == "__main__":
    main()
