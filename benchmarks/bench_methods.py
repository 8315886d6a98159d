"""LoRA, DoRA, QLoRA and full fine-tuning on the same data and steps, in one invocation.

Each method trains the same model (default: the bundled SmolLM2-135M-Instruct) on the same
examples for the same number of optimizer steps with the same settings, in its own
subprocess (so peak memory is its own), through the real recipe (`tunelab.train.train`).
Printed per method:

  * trainable parameters (and the share of all parameters);
  * peak memory: the process's peak RSS on CPU; peak CUDA memory allocated on a GPU;
  * training throughput: target tokens per second of the training loop (no eval inside it);
  * eval loss: mean loss per target token (the reply tokens, as trained) on held-out
    examples, measured after training by the same scorer for every method.

Data: GSM8K (question -> worked answer) from ../shared/data/gsm8k when present, else
tunelab's synthetic word problems (`tunelab data synth`), so the script runs anywhere.

    python benchmarks/bench_methods.py                          # 4 methods x 20 steps
    python benchmarks/bench_methods.py --steps 10 --methods lora,qlora
    python benchmarks/bench_methods.py --json methods.json      # machine-readable too

Timings are only comparable within one invocation on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k"
METHODS = ("lora", "dora", "qlora", "full")


def write_data(folder: Path, train_n: int, eval_n: int) -> tuple[Path, Path, str]:
    """Train and held-out JSONL files (question/answer records) and a description of where they came from."""
    if (GSM8K / "train.jsonl").is_file() and (GSM8K / "test.jsonl").is_file():
        train = (GSM8K / "train.jsonl").read_text().splitlines()[:train_n]
        held = (GSM8K / "test.jsonl").read_text().splitlines()[:eval_n]
        name = f"GSM8K: first {train_n} train / first {eval_n} test problems"
    else:
        from tunelab.data.synthetic import reasoning_train_test

        train_records, test_records = reasoning_train_test(train_n, eval_n, seed=0)
        train = [json.dumps(r) for r in train_records]
        held = [json.dumps(r) for r in test_records]
        name = f"synthetic word problems: {train_n} train / {eval_n} held out"
    (folder / "train.jsonl").write_text("\n".join(train) + "\n")
    (folder / "held.jsonl").write_text("\n".join(held) + "\n")
    return folder / "train.jsonl", folder / "held.jsonl", name


def run_one(args: argparse.Namespace) -> dict:
    """Train one method in this process and measure it (called in a subprocess by `main`)."""
    import torch

    from tunelab.config import load_config
    from tunelab.data import load_tokenized
    from tunelab.loss import TargetTokenLoss
    from tunelab.train import train

    out = Path(args.workdir) / "runs" / args.one
    config = load_config(None, [
        f"method={args.one}", f"data.train={args.train}", f"output.dir={out.parent}", f"output.name={out.name}",
        f"training.max_steps={args.steps}", f"training.batch_size={args.batch_size}",
        f"training.gradient_accumulation_steps={args.accumulation}", f"training.learning_rate={args.lr}",
        f"training.precision={args.precision}", "training.warmup_steps=0", f"training.logging_steps={args.steps}",
        f"data.max_seq_length={args.max_length}", f"lora.r={args.rank}", f"lora.alpha={2 * args.rank}", "lora.dropout=0",
        f"training.seed={args.seed}", "output.overwrite=true",
        *([f"model.name={args.model}"] if args.model else []),
        *(["training.learning_rate=2e-5"] if args.one == "full" else []),
    ])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(config, quiet=True)
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None

    # Eval loss: the same scorer for every method, on the trained model still in memory.
    held, _ = load_tokenized(args.held, result.tokenizer, max_length=args.max_length, show_progress=False)
    model = result.model
    model.eval()
    loss_module = TargetTokenLoss(model)
    device = next(p for p in model.parameters() if p.device.type != "meta").device
    total = count = 0.0
    with torch.no_grad():
        for example in held:
            ids = torch.tensor([example.input_ids], device=device)
            labels = torch.tensor([example.labels], device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=result_precision_is_bf16(args, device)):
                loss_sum, n = loss_module(input_ids=ids, labels=labels)
            total += float(loss_sum)
            count += int(n)
    return {
        "method": args.one,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "steps": result.state.global_step,
        "train_tokens": result.state.targets_seen,
        "train_seconds": result.seconds,
        "tokens_per_s": result.targets_per_second,
        "train_loss": result.train_loss,
        "eval_loss": total / max(count, 1),
        "eval_tokens": int(count),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "peak_cuda_mb": peak_cuda,
        "device": str(device),
    }


def result_precision_is_bf16(args: argparse.Namespace, device) -> bool:
    """Score in the precision training computed in (bf16 autocast where training used bf16)."""
    from tunelab.models import resolve_dtype

    import torch

    return resolve_dtype(args.precision, device) == torch.bfloat16


def machine() -> str:
    import torch

    from tunelab.evaluate import cpu_model_name

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model_name()}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}"


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | share | peak memory | tokens/s | train loss | eval loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        memory = f"{r['peak_cuda_mb']:,.0f} MB CUDA" if r["peak_cuda_mb"] is not None else f"{r['peak_rss_mb']:,.0f} MB RSS"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {100 * r['trainable_params'] / r['total_params']:.2f}% | {memory} "
            f"| {r['tokens_per_s']:,.1f} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of lora,dora,qlora,full")
    parser.add_argument("--model", default=None, help="model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4, help="adapter methods; full uses 2e-5")
    parser.add_argument("--rank", type=int, default=16, help="LoRA/DoRA/QLoRA rank (alpha = 2 x rank)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="auto", help="training.precision for every method")
    parser.add_argument("--examples", type=int, default=None, help="training examples [default: steps x batch x accumulation]")
    parser.add_argument("--eval-examples", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--held", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:  # child: one method, result as the last stdout line
        print(json.dumps(run_one(args)))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    examples = args.examples or args.steps * args.batch_size * args.accumulation
    rows = []
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-methods-") as tmp:
        train_path, held_path, data_name = write_data(Path(tmp), examples, args.eval_examples)
        print(f"data: {data_name}; {args.steps} steps x batch {args.batch_size} x accumulation {args.accumulation}; "
              f"precision {args.precision}; machine: {machine()}", flush=True)
        for method in methods:
            command = [
                sys.executable, __file__, "--one", method, "--workdir", tmp, "--train", str(train_path), "--held", str(held_path),
                "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--accumulation", str(args.accumulation),
                "--lr", str(args.lr), "--rank", str(args.rank), "--max-length", str(args.max_length),
                "--precision", args.precision, "--seed", str(args.seed), *(["--model", args.model] if args.model else []),
            ]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            if done.returncode != 0:
                sys.exit(f"{method} failed:\n{done.stderr[-4000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["wall_seconds"] = time.perf_counter() - started
            rows.append(row)
            print(f"  {method}: {row['tokens_per_s']:.1f} tok/s, eval loss {row['eval_loss']:.4f} "
                  f"({row['wall_seconds']:.0f} s in all)", flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"data": data_name, "machine": machine(), "args": vars(args), "results": rows},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
