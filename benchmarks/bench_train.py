"""Benchmark W1: tunelab vs TRL SFTTrainer, one after the other, same model, data and settings.

W1 (issue 6): LoRA r=16, alpha 32, dropout 0, all linear layers, on the bundled
SmolLM2-135M-Instruct; the first 160 GSM8K train problems as user/assistant chats; max
length 512; 1 epoch; 8 examples per optimizer step; learning rate 2e-4 (linear decay, no
warmup: TRL's default schedule); loss on all tokens (TRL's default for chat data).

Each framework runs in its own subprocess, so peak RSS is its own. Both are scored by
the same function afterwards: mean loss over all tokens of the first 100 GSM8K test
chats. Throughput is trained tokens per second of training-loop wall time, where a
trained token is a real (non-padding) target token: each example contributes its length
minus one (nothing predicts the first token), identical for both frameworks.

    python benchmarks/bench_train.py                       # full W1 (~30 min here)
    python benchmarks/bench_train.py --examples 40 --eval-examples 20   # a few minutes
    python benchmarks/bench_train.py --json results.json   # machine-readable output too
    python benchmarks/bench_train.py --only tunelab        # skip TRL (e.g. not installed)

TRL is a benchmark-only dependency: `pip install -e '.[bench]'` (or `make bench`).
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


def gsm8k_chats(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in rows]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def all_token_eval_loss(model, tokenizer, chats: list[dict], max_length: int) -> float:
    """Mean next-token loss over every token of each chat (the same scorer for both frameworks)."""
    import torch

    from tunelab.loss import TargetTokenLoss

    model.eval()
    loss_module = TargetTokenLoss(model)
    total = count = 0.0
    with torch.no_grad():
        for chat in chats:
            ids = tokenizer.apply_chat_template(chat["messages"], tokenize=True, return_dict=True)["input_ids"][:max_length]
            ids = torch.tensor([ids])
            loss_sum, n = loss_module(input_ids=ids, labels=ids)
            total += float(loss_sum)
            count += int(n)
    return total / count


def run_tunelab(args: argparse.Namespace, train_file: Path, eval_chats: list[dict], work: Path) -> dict:
    from tunelab.config import load_config
    from tunelab.train import train

    micro = args.micro_batch
    config = load_config(None, [
        f"model.name={args.model}", f"data.train={train_file}", "data.train_on_prompt=true", f"data.max_seq_length={args.max_length}",
        "data.dedupe=false", "method=lora", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear",
        f"training.batch_size={micro}", f"training.gradient_accumulation_steps={8 // micro}", "training.learning_rate=2e-4",
        "training.epochs=1", "training.warmup_steps=0", "training.lr_scheduler=linear", "training.logging_steps=1",
        f"training.precision={args.precision}", f"output.dir={work}", "output.name=tunelab", "output.overwrite=true",
    ])
    result = train(config, quiet=True)
    losses = [r["loss"] for r in result.history if "loss" in r]
    return {
        "framework": "tunelab",
        "trained_tokens": result.state.targets_seen,
        "train_seconds": result.seconds,
        "tokens_per_s": result.state.targets_seen / result.seconds,
        "final_train_loss": losses[-1],
        "eval_loss": all_token_eval_loss(result.model, result.tokenizer, eval_chats, args.max_length),
        "peak_rss_mb": peak_rss_mb(),
        "setting": f"{result.model.dtype if hasattr(result.model, 'dtype') else ''} micro-batch {micro} x accumulation {8 // micro}",
    }


def run_trl(args: argparse.Namespace, train_file: Path, eval_chats: list[dict], work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.models import bundled_model_dir

    source = str(bundled_model_dir()) if args.model == "default" else args.model
    bf16 = args.trl_setting in ("bf16", "bf16-packing")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16 if bf16 else torch.float32)
    dataset = load_dataset("json", data_files=str(train_file), split="train")
    sft = SFTConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=2e-4,
        num_train_epochs=1, max_length=args.max_length, bf16=False, use_cpu=not torch.cuda.is_available(),
        packing=args.trl_setting == "bf16-packing", logging_steps=1, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=42,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    # Real target tokens, as for tunelab: every non-padding token but each sequence's first.
    if args.trl_setting == "bf16-packing":
        trained = sum(len(s) - 1 for row in trainer.train_dataset for s in _packed_lengths(row))
    else:
        trained = sum(len(row["input_ids"]) - 1 for row in trainer.train_dataset)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "framework": f"TRL {args.trl_setting}",
        "trained_tokens": trained,
        "train_seconds": seconds,
        "tokens_per_s": trained / seconds,
        "final_train_loss": losses[-1],
        "eval_loss": all_token_eval_loss(trainer.model, tokenizer, eval_chats, args.max_length),
        "peak_rss_mb": peak_rss_mb(),
        "setting": f"SFTTrainer defaults, {args.trl_setting}",
    }


def _packed_lengths(row: dict) -> list[range]:
    """Sequence spans of a packed TRL row (its `seq_lengths` field)."""
    return [range(n) for n in row["seq_lengths"]]


def child(args: argparse.Namespace) -> None:
    """Run one framework and print its result as JSON (called in a subprocess)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work)
    train_file = work / "train.jsonl"
    eval_chats = gsm8k_chats(GSM8K / "test.jsonl", args.eval_examples)
    runner = run_tunelab if args.child == "tunelab" else run_trl
    print("RESULT " + json.dumps(runner(args, train_file, eval_chats, work)), flush=True)


def run_child(framework: str, args: argparse.Namespace, work: Path, trl_setting: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--work", str(work), "--max-length", str(args.max_length),
           "--model", args.model,
           "--eval-examples", str(args.eval_examples), "--micro-batch", str(args.micro_batch),
           "--precision", args.precision, "--trl-setting", trl_setting]
    print(f"running {framework} {trl_setting if framework == 'trl' else ''}...", file=sys.stderr, flush=True)
    # TRL runs with PyTorch's own allocator defaults, as its users get it (importing
    # tunelab would otherwise switch on transparent huge pages in that process too).
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1" if framework == "tunelab" else "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{framework} run failed (exit {proc.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def print_table(results: list[dict], meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base = next((r for r in results if r["framework"].startswith("TRL")), None)
    table = Table(title=f"W1: {meta['examples']} GSM8K examples, max length {meta['max_length']}, {meta['machine']}")
    for column in ("framework", "trained tok/s", "wall s", "peak RSS MB", "final train loss", "eval loss", "tok/s vs TRL"):
        table.add_column(column, justify="right" if column != "framework" else "left")
    for r in results:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        table.add_row(r["framework"], f"{r['tokens_per_s']:.1f}", f"{r['train_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['final_train_loss']:.4f}", f"{r['eval_loss']:.4f}", ratio)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=160, help="GSM8K train problems (W1: 160)")
    parser.add_argument("--eval-examples", type=int, default=100, help="GSM8K test problems scored (W1: 100)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--model", default="default", help="model for both frameworks (W1: the bundled default)")
    parser.add_argument("--micro-batch", type=int, default=8, choices=[1, 2, 4, 8], help="tunelab micro-batch (x accumulation = 8)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="tunelab precision")
    parser.add_argument("--trl", default="fp32", help="comma list of TRL settings: fp32, bf16, bf16-packing")
    parser.add_argument("--only", choices=["tunelab", "trl"], help="run one framework only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--trl-setting", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not (GSM8K / "train.jsonl").is_file():
        raise SystemExit(f"GSM8K not found at {GSM8K}")
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        work = Path(tmp)
        chats = gsm8k_chats(GSM8K / "train.jsonl", args.examples)
        (work / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
        results = []
        if args.only != "trl":
            results.append(run_child("tunelab", args, work))
        if args.only != "tunelab":
            for setting in args.trl.split(","):
                results.append(run_child("trl", args, work, setting))
    meta = {"model": args.model, "examples": args.examples, "eval_examples": args.eval_examples, "max_length": args.max_length,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d")}
    print_table(results, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
