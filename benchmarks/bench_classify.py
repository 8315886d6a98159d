"""Benchmark C1: sequence classification with tunelab vs transformers.Trainer, one invocation.

C1: full fine-tuning of the bundled all-MiniLM-L6-v2 (a new 4-way head) on synthetic support
tickets (`tunelab data synth --kind classification`, difficulty 2: 35% of tickets name
another team's word in a sentence that rules it out); 2 epochs of 800 tickets, batch 16,
learning rate 5e-5 with linear decay and no warmup, weight decay 0.01, gradient clipping
at 1.0, max length 64, fp32. Both frameworks train the same model from the same files with
these settings and their own defaults otherwise (tunelab: length-bucketed batches;
Trainer: random batches padded per batch by DataCollatorWithPadding).

Each framework runs in its own subprocess, so the peak RSS is its own (model, data,
optimizer, activations). Throughput is training examples per second of the training
loop's wall time. Accuracy is scored by the same function for both: argmax of the
trained model's logits on 400 held-out tickets (majority class: 35%).

    python benchmarks/bench_classify.py                  # C1 (a few minutes on 2 CPU cores)
    python benchmarks/bench_classify.py --train 200 --test 100 --epochs 1 --json c1.json
    python benchmarks/bench_classify.py --model PATH     # another classifier base (e.g. a tiny test model)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("tunelab", "trainer")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def test_accuracy(model, tokenizer, test_file: Path, labels: list[str], max_length: int) -> dict:
    """The shared scorer: accuracy, macro F1 and the majority baseline on the held-out file."""
    from tunelab.metrics import classification_scores
    from tunelab.tasks.classification import read_inputs, predict_probabilities

    _, rows, _ = read_inputs(str(test_file), tokenizer, labels=labels, fields={}, max_length=max_length, need_label=True)
    probabilities = predict_probabilities(model, rows, tokenizer.pad_token_id, batch_size=64)
    scores = classification_scores(probabilities.argmax(-1).tolist(), [r.label for r in rows], labels)
    return {k: scores[k] for k in ("accuracy", "macro_f1", "majority_baseline")}


def run_tunelab(args: argparse.Namespace, work: Path) -> dict:
    from tunelab.config import load_config
    from tunelab.train import train

    overrides = [
        "task=classification", f"data.train={work / 'train.jsonl'}", "method=full", f"data.max_seq_length={args.max_length}",
        f"training.batch_size={args.batch_size}", "training.gradient_accumulation_steps=1", f"training.epochs={args.epochs}",
        f"training.learning_rate={args.learning_rate}", "training.lr_scheduler=linear", "training.warmup_steps=0",
        "training.weight_decay=0.01", "training.max_grad_norm=1.0", "training.precision=fp32", "training.logging_steps=10",
        f"training.save_steps={10**6}", f"output.dir={work}", "output.name=tunelab", "output.overwrite=true",
    ]
    if args.model:
        overrides.append(f"model.name={args.model}")
    result = train(load_config(None, overrides), quiet=True)
    labels = json.loads((result.final_dir / "tunelab_model.json").read_text())["labels"]
    examples = result.state.targets_seen  # a classifier's targets are its examples
    return {"examples": examples, "seconds": result.seconds, "final_train_loss": result.train_loss,
            **test_accuracy(result.model, result.tokenizer, work / "test.jsonl", labels, args.max_length)}


def run_trainer(args: argparse.Namespace, work: Path) -> dict:
    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments,
    )

    from tunelab.tasks.classification import resolve_source

    source = resolve_source(args.model)
    rows = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    labels = sorted({r["label"] for r in rows})
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        dtype=torch.float32, ignore_mismatched_sizes=True,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    index = {name: i for i, name in enumerate(labels)}
    dataset = datasets.Dataset.from_list([{"text": r["text"], "label": index[r["label"]]} for r in rows])
    dataset = dataset.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True,
                          remove_columns=["text"])
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=10, save_strategy="no", report_to=[], seed=42, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=DataCollatorWithPadding(tokenizer))
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    model.eval()
    return {"examples": len(rows) * args.epochs, "seconds": seconds, "final_train_loss": output.training_loss,
            **test_accuracy(model, tokenizer, work / "test.jsonl", labels, args.max_length)}


def worker(args: argparse.Namespace) -> None:
    """One framework, in this process; prints its result as the last line of JSON."""
    import torch

    work = Path(args.work)
    result = run_tunelab(args, work) if args.worker == "tunelab" else run_trainer(args, work)
    result.update(framework=args.worker, examples_per_s=result["examples"] / result["seconds"], peak_rss_mb=peak_rss_mb(),
                  threads=torch.get_num_threads())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Classifier base (default: the bundled all-MiniLM-L6-v2).")
    parser.add_argument("--train", type=int, default=800, help="Training tickets.")
    parser.add_argument("--test", type=int, default=400, help="Held-out tickets.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--only", choices=FRAMEWORKS, help="Run one framework.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    from tunelab.data.synthetic import synthesize_files

    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        work = Path(tmp)
        synthesize_files(work / "train.jsonl", kind="classification", n=args.train, seed=0,
                         test_output=work / "test.jsonl", n_test=args.test)
        results = []
        for framework in [args.only] if args.only else FRAMEWORKS:
            command = [sys.executable, __file__, "--worker", framework, "--work", str(work), "--train", str(args.train),
                       "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                       "--learning-rate", str(args.learning_rate), "--max-length", str(args.max_length)]
            if args.model:
                command += ["--model", args.model]
            started = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{framework} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["wall_s"] = time.perf_counter() - started
            results.append(result)

    print(f"C1: {args.train} tickets x {args.epochs} epochs, batch {args.batch_size}, full fine-tuning of "
          f"{args.model or 'all-MiniLM-L6-v2'}, fp32; accuracy on {args.test} held-out tickets")
    print(f"{'framework':<10} {'examples/s':>11} {'train s':>8} {'peak RSS MB':>12} {'accuracy':>9} {'macro F1':>9} {'majority':>9} {'vs Trainer':>11}")
    trainer_rate = next((r["examples_per_s"] for r in results if r["framework"] == "trainer"), None)
    for r in results:
        ratio = f"{r['examples_per_s'] / trainer_rate:.2f}x" if trainer_rate else "-"
        print(f"{r['framework']:<10} {r['examples_per_s']:>11.1f} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['accuracy']:>9.1%} {r['macro_f1']:>9.3f} {r['majority_baseline']:>9.1%} {ratio:>11}")
    if args.json:
        meta = {"train": args.train, "test": args.test, "epochs": args.epochs, "batch_size": args.batch_size,
                "learning_rate": args.learning_rate, "max_length": args.max_length, "model": args.model or "all-MiniLM-L6-v2",
                "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
