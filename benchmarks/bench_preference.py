"""Benchmark P1: tunelab DPO vs TRL's DPOTrainer, one after the other, same model, pairs and settings.

P1 (issue 21): LoRA r=16, alpha 32, dropout 0, all linear layers, on the bundled
SmolLM2-135M-Instruct; synthetic preference pairs (`tunelab data synth --kind preference`:
the correct worked answer against one with a single arithmetic slip); sigmoid DPO, beta 0.1;
8 pairs per optimizer step; learning rate 2e-4, linear decay, no warmup; max length 256.
The reference model is the base with the adapters disabled in both frameworks.

Each framework runs in its own subprocess, so peak RSS is its own. Both are scored by the
same function afterwards (tunelab's DPO loss and reward accuracy on held-out pairs, the
reference again the adapter-disabled model). Throughput is pairs per second of the
training loop's wall time.

    python benchmarks/bench_preference.py                  # P1 (200 pairs)
    python benchmarks/bench_preference.py --pairs 48 --eval-pairs 16   # a few minutes
    python benchmarks/bench_preference.py --trl fp32,bf16   # TRL at both CPU settings
    python benchmarks/bench_preference.py --json results.json
"""

from __future__ import annotations

import argparse
import itertools
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
sys.path.insert(0, str(REPO))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def held_out_scores(model, tokenizer, pairs_file: Path, max_length: int, beta: float) -> dict:
    """DPO loss and reward accuracy of a PEFT model on held-out pairs (reference: adapters off)."""
    import torch

    from tunelab.data.preference import collate_pairs, load_preferences
    from tunelab.preference_loss import pair_terms, sequence_logps

    items, _ = load_preferences(str(pairs_file), tokenizer, max_length=max_length)
    model.eval()
    totals = {"loss": 0.0, "accuracy": 0.0}
    with torch.no_grad():
        for start in range(0, len(items), 8):
            batch = collate_pairs(items[start : start + 8], tokenizer.pad_token_id)
            args = (batch["input_ids"], batch["labels"], batch["attention_mask"])
            logps, tokens = sequence_logps(model, *args)
            with model.disable_adapter():
                ref, _ = sequence_logps(model, *args)
            terms, metrics = pair_terms("dpo", logps, tokens, ref, beta=beta)
            totals["loss"] += float(terms["preference"][0])
            totals["accuracy"] += float(metrics["rewards/accuracies"][0])
    return {"eval_loss": totals["loss"] / len(items), "eval_reward_accuracy": totals["accuracy"] / len(items)}


def run_tunelab(args: argparse.Namespace, work: Path) -> dict:
    from tunelab.config import load_config
    from tunelab.train import train

    config = load_config(None, [
        "task=preference", f"model.name={args.model}", f"data.train={work / 'train.jsonl'}", f"data.max_seq_length={args.max_length}",
        "data.dedupe=false", "method=lora", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear",
        "preference.loss=dpo", f"preference.beta={args.beta}", "training.batch_size=8", "training.gradient_accumulation_steps=1",
        "training.learning_rate=2e-4", "training.epochs=1", "training.warmup_steps=0", "training.lr_scheduler=linear",
        "training.logging_steps=1", f"training.precision={args.precision}", f"output.dir={work}", "output.name=tunelab",
        "output.overwrite=true",
    ])
    result = train(config, quiet=True)
    pairs = result.state.targets_seen
    return {
        "framework": "tunelab",
        "pairs": pairs,
        "train_seconds": result.seconds,
        "pairs_per_s": pairs / result.seconds,
        "final_train_reward_accuracy": [r for r in result.history if "rewards/accuracies" in r][-1]["rewards/accuracies"],
        **held_out_scores(result.model, result.tokenizer, work / "eval.jsonl", args.max_length, args.beta),
        "peak_rss_mb": peak_rss_mb(),
        "setting": f"precision {args.precision}, batch 8",
    }


def run_trl(args: argparse.Namespace, work: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from tunelab.models import bundled_model_dir

    source = str(bundled_model_dir()) if args.model == "default" else args.model
    bf16 = args.trl_setting == "bf16"
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    # The conversational form, so TRL renders with the chat template as tunelab does.
    dataset = load_dataset("json", data_files=str(work / "train.jsonl"), split="train").map(
        lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                   "rejected": [{"role": "assistant", "content": r["rejected"]}]}
    )
    config = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=2e-4,
        num_train_epochs=1, max_length=args.max_length, beta=args.beta, loss_type=["sigmoid"], bf16=bf16,
        use_cpu=not torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to=[], lr_scheduler_type="linear",
        warmup_steps=0, dataloader_num_workers=0, seed=42,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    accuracies = [h["rewards/accuracies"] for h in trainer.state.log_history if "rewards/accuracies" in h]
    return {
        "framework": f"TRL {args.trl_setting}",
        "pairs": len(rows),
        "train_seconds": seconds,
        "pairs_per_s": len(rows) / seconds,
        "final_train_reward_accuracy": accuracies[-1],
        **held_out_scores(trainer.model, tokenizer, work / "eval.jsonl", args.max_length, args.beta),
        "peak_rss_mb": peak_rss_mb(),
        "setting": f"DPOTrainer, {args.trl_setting}, batch 8",
    }


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runner = run_tunelab if args.child == "tunelab" else run_trl
    print("RESULT " + json.dumps(runner(args, Path(args.work))), flush=True)


def run_child(framework: str, args: argparse.Namespace, work: Path, trl_setting: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--child", framework, "--work", str(work), "--max-length", str(args.max_length),
           "--model", args.model, "--beta", str(args.beta), "--precision", args.precision, "--trl-setting", trl_setting]
    print(f"running {framework} {trl_setting if framework == 'trl' else ''}...", file=sys.stderr, flush=True)
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
    table = Table(title=f"P1: {meta['pairs']} pairs (eval {meta['eval_pairs']}), max length {meta['max_length']}, {meta['machine']}")
    for column in ("framework", "pairs/s", "wall s", "peak RSS MB", "train reward acc", "eval reward acc", "eval loss", "pairs/s vs TRL"):
        table.add_column(column, justify="right" if column != "framework" else "left")
    for r in results:
        ratio = f"{r['pairs_per_s'] / base['pairs_per_s']:.2f}x" if base else "-"
        table.add_row(r["framework"], f"{r['pairs_per_s']:.2f}", f"{r['train_seconds']:.0f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['final_train_reward_accuracy']:.3f}", f"{r['eval_reward_accuracy']:.3f}", f"{r['eval_loss']:.4f}", ratio)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200, help="training pairs (P1: 200)")
    parser.add_argument("--eval-pairs", type=int, default=50, help="held-out pairs scored (P1: 50)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--model", default="default", help="model for both frameworks (P1: the bundled default)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="tunelab precision")
    parser.add_argument("--trl", default="fp32", help="comma list of TRL settings: fp32, bf16")
    parser.add_argument("--only", choices=["tunelab", "trl"], help="run one framework only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--trl-setting", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    from tunelab.data.synthetic import iter_preference_pairs

    with tempfile.TemporaryDirectory(prefix="tunelab-bench-pref-") as tmp:
        work = Path(tmp)
        stream = iter_preference_pairs(seed=0)
        for name, n in (("train.jsonl", args.pairs), ("eval.jsonl", args.eval_pairs)):
            (work / name).write_text("".join(json.dumps(r) + "\n" for r in itertools.islice(stream, n)))
        results = []
        if args.only != "trl":
            results.append(run_child("tunelab", args, work))
        if args.only != "tunelab":
            for setting in args.trl.split(","):
                results.append(run_child("trl", args, work, setting))
    meta = {"model": args.model, "pairs": args.pairs, "eval_pairs": args.eval_pairs, "max_length": args.max_length,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    print_table(results, meta)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
