"""The `tunelab` command line: one short function per command, no logic of its own.

Each command parses its options, calls a library function and prints the result. User
errors (`TunelabError`) are printed as one message without a traceback (exit code 2).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from tunelab.errors import TrainingInterrupted, TunelabError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="tunelab",
    help="Fine-tune language models on your own data: LoRA, DoRA, QLoRA or full fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate and show run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Validate, inspect, prepare and synthesise training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

OverridesArg = Annotated[
    Optional[list[str]], typer.Argument(help="Dotted overrides, e.g. training.learning_rate=1e-4 lora.r=8", show_default=False)
]


def _config_and_overrides(config_file: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str]]:
    """`tunelab train key=value ...` without a config file: the first override lands in CONFIG."""
    overrides = list(overrides or [])
    if config_file is not None and "=" in str(config_file) and not config_file.exists():  # `model.name=/a/b` too
        return None, [str(config_file), *overrides]
    return config_file, overrides


@config_app.command("validate")
def config_validate(
    config_file: Annotated[Path, typer.Argument(help="YAML or JSON run config.")],
    overrides: OverridesArg = None,
) -> None:
    """Check a run config: every problem is listed with its key, line and a fix."""
    from tunelab.config import load_config

    config = load_config(config_file, overrides)
    console.print(f"[green]OK[/] {config_file}: method {config.method}, model {config.model.name or 'default'}", highlight=False)


@config_app.command("show")
def config_show(
    config_file: Annotated[Optional[Path], typer.Argument(help="YAML or JSON run config (omit for the defaults).")] = None,
    overrides: OverridesArg = None,
) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from tunelab.config import config_to_yaml, load_config

    config_file, overrides = _config_and_overrides(config_file, overrides)
    print(config_to_yaml(load_config(config_file, overrides)), end="")


@app.command()
def train(
    config_file: Annotated[Optional[Path], typer.Argument(help="YAML or JSON run config (optional).")] = None,
    overrides: OverridesArg = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Hub id, model dir, .gguf, or 'default'.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "--train-data", help="Training data file, directory or hub dataset.")] = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Evaluation data.")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="lora, dora, qlora or full.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", "--lr")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="lora.r: adapter rank.")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option("--lora-alpha", help="lora.alpha: updates scaled by alpha / r.")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option("--lora-dropout", help="lora.dropout.")] = None,
    max_seq_length: Annotated[Optional[int], typer.Option("--max-seq-length", help="data.max_seq_length: tokens per example.")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", help="training.warmup_steps.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="training.weight_decay.")] = None,
    gradient_accumulation: Annotated[
        Optional[int], typer.Option("--gradient-accumulation", "--gradient-accumulation-steps", help="training.gradient_accumulation_steps.")
    ] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Run folder (default runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint of this run.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder.")] = False,
) -> None:
    """Fine-tune a model and write the run folder (config, final weights, checkpoints, metrics)."""
    from tunelab.config import load_config
    from tunelab.tasks import task_module
    from tunelab.train import train as run_training

    config_file, overrides = _config_and_overrides(config_file, overrides)
    flags = {
        "model.name": model, "data.train": data, "data.eval": eval_data, "method": method,
        "training.epochs": epochs, "training.batch_size": batch_size, "training.learning_rate": learning_rate,
        "training.max_steps": max_steps, "data.max_seq_length": max_seq_length, "training.resume": True if resume else None,
        "output.overwrite": True if overwrite else None,
        "lora.r": lora_r, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout, "data.max_seq_length": max_seq_length,
        "training.warmup_steps": warmup_steps, "training.weight_decay": weight_decay,
        "training.gradient_accumulation_steps": gradient_accumulation,
    }
    extra = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if output is not None:
        extra += [f"output.dir={Path(output).parent}", f"output.name={Path(output).name}"]
    config = load_config(config_file, [*extra, *overrides])
    result = run_training(config, config_path=str(config_file) if config_file else None)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, report once
        return
    console.print(
        f"[green]done[/] {result.state.global_step} steps in {result.seconds:.0f}s "
        f"({result.tokens_per_second:.0f} {task_module(config.task).TARGETS}/s); "
        f"final train loss {result.train_loss}, "
        f"eval loss {result.eval_loss}; run folder: {result.run_dir}",
        highlight=False,
    )


@app.command()
def doctor(
    output_dir: Annotated[
        Path, typer.Option("--output-dir", help="Where runs will be written: checked for free space and write access.")
    ] = Path("runs"),
) -> None:
    """Check this machine: Python, torch and device, bf16, libraries, memory, disk, the default model."""
    from tunelab.doctor import has_failures, render_checks, run_checks

    checks = run_checks(output_dir)
    render_checks(checks, console)
    if has_failures(checks):
        raise typer.Exit(1)


@data_app.command("prepare")
def data_prepare(
    config_file: Annotated[Path, typer.Argument(help="Run config whose data section to tokenize.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write the tokenized data to.")],
    overrides: OverridesArg = None,
) -> None:
    """Tokenize a run's data once; set data.prepared=DIR to reuse it (checked against a fingerprint)."""
    from tunelab.config import load_config
    from tunelab.train import prepare_data

    config = load_config(config_file, overrides)
    data = prepare_data(config, output)
    console.print(f"[green]prepared[/] {data.summary()}\n  -> {output}  (train with data.prepared={output})", highlight=False)


@data_app.command("synth")
def data_synth(
    output: Annotated[Path, typer.Argument(help="JSONL file to write.", show_default=False)],
    kind: Annotated[str, typer.Option("--kind", help="reasoning (GSM8K-style word problems), preference (those problems: correct worked answer vs one arithmetic slip), text, chat or classification (labelled support tickets).")] = "reasoning",
    n: Annotated[int, typer.Option("-n", "--count", help="Number of records.")] = 500,
    seed: Annotated[int, typer.Option("--seed", help="Random seed: same seed and options, same file.")] = 0,
    difficulty: Annotated[
        Optional[int], typer.Option("--difficulty", help="reasoning, preference: 1..5, steps and number sizes; classification: 1 keywords only, 2 with ruled-out words (default 2).")
    ] = None,
    test_output: Annotated[
        Optional[Path], typer.Option("--test-output", help="Also write held-out records (none of them in OUTPUT) here.")
    ] = None,
    test_n: Annotated[int, typer.Option("--test-n", help="Number of held-out records for --test-output.")] = 100,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Write synthetic data as JSONL: arithmetic word problems with worked answers, plain text, chat or labelled texts."""
    from tunelab.data.synthetic import synthesize_files

    written = synthesize_files(
        output, kind=kind, n=n, seed=seed, difficulty=difficulty, test_output=test_output, n_test=test_n, overwrite=force
    )
    for path, count in written:
        console.print(f"wrote {count} {kind} records to {path}", highlight=False, soft_wrap=True)


DataSourceArg = Annotated[str, typer.Argument(help="Data file, directory of files, saved dataset dir or hub dataset id.", show_default=False)]
DataFormatOpt = Annotated[str, typer.Option("--format", help="auto, text, alpaca, dolly, chat, sharegpt, qa, preference or kto.")]
DataModelOpt = Annotated[Optional[str], typer.Option("--model", help="Model whose tokenizer and chat template to use [default: bundled].")]
DataSplitOpt = Annotated[str, typer.Option("--split", help="Split of a hub or saved dataset.")]
TaskOpt = Annotated[str, typer.Option("--task", help="causal_lm (chat / text data), classification (text + label) or preference (pairs; detected from the data too).")]
TextFieldOpt = Annotated[Optional[str], typer.Option("--text-field", help="Classification: the field holding the text [default: detected].")]
PairFieldOpt = Annotated[Optional[str], typer.Option("--text-pair-field", help="Classification: the field holding a second text [default: detected].")]
LabelFieldOpt = Annotated[Optional[str], typer.Option("--label-field", help="Classification: the field holding the label [default: detected].")]


@data_app.command("validate")
def data_validate(
    source: DataSourceArg,
    fmt: DataFormatOpt = "auto",
    model: DataModelOpt = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    truncation: Annotated[str, typer.Option("--truncation", help="truncate or drop examples over --max-length.")] = "truncate",
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Skip bad records and count them instead of failing.")] = False,
    split: DataSplitOpt = "train",
    task: TaskOpt = "causal_lm",
    text_field: TextFieldOpt = None,
    text_pair_field: PairFieldOpt = None,
    label_field: LabelFieldOpt = None,
) -> None:
    """Check training data: formats, chat template, label masks, token lengths (classification: class balance). Bad records are named by file:line."""
    from tunelab.data.pipeline import render_validation_report, validate_data
    from tunelab.data.preference import is_preference_source, validate_preferences
    from tunelab.models import load_tokenizer, resolve_model_source

    if task == "classification":
        from rich.console import Group

        from tunelab.tasks.classification import render_class_balance, resolve_source, validate_classification_data

        fields = {"text": text_field, "pair": text_pair_field, "label": label_field}
        report, balance, found = validate_classification_data(
            source, load_tokenizer(resolve_source(model)), fields=fields, split=split, max_length=max_length, skip_invalid=skip_invalid
        )
        console.print(Group(render_validation_report(report), render_class_balance(balance, found)))
        return
    if task not in ("causal_lm", "preference"):
        raise TunelabError(f"--task: unknown task {task!r}\n  fix: causal_lm, classification or preference")
    tokenizer = load_tokenizer(resolve_model_source(model))
    if task == "preference" or is_preference_source(source, fmt=fmt, split=split):
        report = validate_preferences(
            source, tokenizer, fmt=fmt, kto=fmt == "kto", max_length=max_length, truncation=truncation, skip_invalid=skip_invalid, split=split
        )
        console.print(render_validation_report(report))
        return
    report = validate_data(
        source, tokenizer, fmt=fmt, max_length=max_length, truncation=truncation, skip_invalid=skip_invalid, split=split
    )
    console.print(render_validation_report(report))


@data_app.command("inspect")
def data_inspect(
    source: DataSourceArg,
    n: Annotated[int, typer.Option("-n", "--count", help="How many examples to show.")] = 3,
    fmt: DataFormatOpt = "auto",
    model: DataModelOpt = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per example.")] = 512,
    train_on_prompt: Annotated[bool, typer.Option("--train-on-prompt", help="Show the mask when prompts are trained too.")] = False,
    split: DataSplitOpt = "train",
) -> None:
    """Show examples as the model sees them: trained tokens highlighted green, untrained dim (preference data: both replies of each pair)."""
    from tunelab.data.pipeline import inspect_examples, render_inspection
    from tunelab.data.preference import inspect_preferences, is_preference_source, render_preference_inspection
    from tunelab.models import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source(model))
    if is_preference_source(source, fmt=fmt, split=split):
        items = inspect_preferences(source, tokenizer, n=n, fmt=fmt, kto=fmt == "kto", max_length=max_length, split=split)
        console.print(render_preference_inspection(items, tokenizer, markers=console.color_system is None), soft_wrap=True)
        return
    examples = inspect_examples(source, tokenizer, n=n, fmt=fmt, max_length=max_length, train_on_prompt=train_on_prompt, split=split)
    # Without colours (a pipe, a file) trained text is also marked with ⟦ ⟧.
    console.print(render_inspection(examples, tokenizer, markers=console.color_system is None), soft_wrap=True)


ModelSourceArg = Annotated[str, typer.Argument(help="Run folder, checkpoint, adapter or model dir, .gguf, hub id, or 'default'.", show_default=False)]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32 (auto: bf16 only where it is fast).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, mps [default: best available].")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens generated per answer.")]


@app.command("evaluate", hidden=True)  # the seed's spelling: tunelab evaluate --model-path X --eval-data F
@app.command("eval")
def eval_command(
    sources: Annotated[Optional[list[str]], typer.Argument(help="One or more runs/models (several: one comparison table).", show_default=False)] = None,
    data: Annotated[str, typer.Option("--data", "--eval-data", help="Prompt/reference data: GSM8K-style question/answer, alpaca, chat, ...", show_default=False)] = "",
    model_path: Annotated[Optional[list[str]], typer.Option("--model-path", help="A run/model to evaluate (repeatable; same as the arguments).", show_default=False)] = None,
    metrics: Annotated[Optional[str], typer.Option("--metrics", help="Comma-separated: loss, perplexity, exact_match, rouge, bleu, accuracy [default: a run's evaluation.metrics, else loss,perplexity,exact_match; plain text: loss,perplexity].", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate only the first N examples [default: a run's evaluation.limit].")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per forward pass / generate call [default: a run's evaluation.batch_size, else 8].", show_default=False)] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Most tokens generated per answer [default: a run's evaluation.max_new_tokens, else 256].", show_default=False)] = None,
    answer_regex: Annotated[Optional[str], typer.Option("--answer-regex", help="Regex for the answer in predictions (group 1 if any) [default: a run's evaluation.answer_regex, else '#### N', else the last number].")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Results folder [default: the run folder; ./eval-results/<model> for other models].")] = None,
    fmt: DataFormatOpt = "auto",
    prompt_field: Annotated[Optional[str], typer.Option("--prompt-field", help="Custom data: the field holding the prompt.")] = None,
    response_field: Annotated[Optional[str], typer.Option("--response-field", help="Custom data: the field holding the reference.")] = None,
    split: DataSplitOpt = "test",
    samples: Annotated[int, typer.Option("--samples", help="Side-by-side samples shown where compared models differ.")] = 3,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    text_field: TextFieldOpt = None,
    text_pair_field: PairFieldOpt = None,
    label_field: LabelFieldOpt = None,
    max_length: Annotated[int, typer.Option("--max-length", help="Classification: tokens per text (longer ones are truncated).")] = 512,
) -> None:
    """Score runs/models on the same data: loss, perplexity, exact match, ROUGE, BLEU, accuracy.

    Plain-text data ({"text": ...}) is scored by loss and perplexity over every token. Classifier
    runs (task: classification) get accuracy, macro and per-class precision / recall / F1 and a
    confusion matrix instead. Writes <output>/eval/<data>/predictions.jsonl and scores.json per
    model (and merges the run's eval.json). Each score gets a 95% interval (Wilson for exact match
    and accuracy, bootstrap over examples for loss, perplexity and ROUGE-L); with several models,
    each later one gets its difference to the first on the same examples with a paired bootstrap
    95% interval, starred when it excludes zero.
    """
    from tunelab.compare import differences_table
    from tunelab.evaluate import comparison_table, differing_samples, evaluate_sources, parse_metrics, samples_table
    from tunelab.tasks.classification import evaluate_classifiers, is_classifier, scores_tables

    sources = [*(sources or []), *(model_path or [])]
    if not sources or not data:
        raise TunelabError("give the runs/models to evaluate and --data FILE, e.g. tunelab eval runs/NAME --data test.jsonl")
    classifiers = [is_classifier(source) for source in sources]
    if any(classifiers):
        if not all(classifiers):
            raise TunelabError("compare classifier runs with classifier runs: some of the given sources are not task: classification runs")
        fields = {"text": text_field, "pair": text_pair_field, "label": label_field}
        results = evaluate_classifiers(sources, data, fields=fields, limit=limit, batch_size=batch_size or 32, max_length=max_length,
                                       output=output, dtype=dtype, device=device, split=split)
        (console if console.is_terminal else Console(width=200)).print(scores_tables(results))
        return
    if (prompt_field is None) != (response_field is None):
        raise TunelabError("--prompt-field and --response-field go together: give both (e.g. --prompt-field text --response-field label)")
    fields = {"prompt": prompt_field, "response": response_field} if prompt_field else None
    results = evaluate_sources(
        sources, data, metrics=parse_metrics(metrics) if metrics is not None else None, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens,
        answer_regex=answer_regex, output=output, dtype=dtype, device=device, fmt=fmt, fields=fields, split=split,
    )
    # A pipe or file gets the whole table rather than Rich's 80-column default squeeze.
    out = console if console.is_terminal else Console(width=200)
    out.print(comparison_table(results))
    differences = differences_table(results)
    if differences is not None:
        out.print(differences)
    shown = differing_samples(results, samples)
    if shown:
        out.print(samples_table(results, shown))



@app.command()
def generate(
    source: Annotated[Optional[str], typer.Argument(help="Run folder, checkpoint, adapter or model dir, .gguf, ONNX export, hub id, or 'default'.", show_default=False)] = None,
    model_path: Annotated[Optional[str], typer.Option("--model-path", help="Same as SOURCE (the seed's spelling).", show_default=False)] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text (repeatable).")] = None,
    input_file: Annotated[Optional[str], typer.Option("--input", help="Prompts file: one per line, or JSONL with prompt/question/instruction; '-' = stdin.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Write JSONL rows {prompt, sample, completion, tokens} here.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max-length", help="Most tokens generated per answer (--max-length: the seed's spelling, also new tokens).")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")] = 1.0,
    num_samples: Annotated[int, typer.Option("--num-samples", "-k", help="Completions per prompt (needs --temperature > 0).")] = 1,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Make sampling reproducible.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System message before each prompt.")] = None,
    no_chat_template: Annotated[bool, typer.Option("--no-chat-template", help="Continue the raw prompt text.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")] = 8,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Generate completions for prompts with a run or model (its chat template; stops at end of turn).

    A run trained on plain text continues the raw prompt text, as in training.
    """
    from tunelab.generate import GenerationSettings, generate_for_prompts, load_for_generation, read_prompts, write_jsonl_atomic

    source = _one_source(source, model_path)
    if bool(prompt) == (input_file is not None):
        raise TunelabError("give prompts with --prompt TEXT (repeatable) or --input FILE ('-' for stdin), not both or neither")
    prompts = list(prompt) if prompt else read_prompts(input_file)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_samples=num_samples)
    settings.check()
    model, tokenizer = load_for_generation(source, dtype=dtype, device=device, chat_template=False if no_chat_template else None)
    rows = generate_for_prompts(
        model, tokenizer, prompts, settings, use_chat_template=not no_chat_template, system=system, seed=seed, batch_size=batch_size
    )
    if output is not None:
        write_jsonl_atomic(output, rows)
        err_console.print(f"wrote {len(rows)} completions to {output}", highlight=False)
        return
    for i, row in enumerate(rows):
        if len(rows) > 1:
            console.print(f"### prompt {i // num_samples + 1}, sample {row['sample'] + 1}", style="bold", highlight=False)
        console.print(row["completion"], markup=False, highlight=False, soft_wrap=True)


@app.command()
def predict(
    run: Annotated[str, typer.Argument(help="Classifier run folder (task: classification), or one of its checkpoints.", show_default=False)],
    input_file: Annotated[str, typer.Option("--input", help="Texts to classify: JSONL, JSON, CSV, Parquet, a directory or a hub dataset.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("--output", help="Write JSONL rows here [default: print them].")] = None,
    text_field: TextFieldOpt = None,
    text_pair_field: PairFieldOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Texts per forward pass.")] = 32,
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per text (longer ones are truncated).")] = 512,
    split: DataSplitOpt = "test",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Classify every record of a file: one JSONL row per record with the label and each class's probability.

    Records may carry a label too; then the row also has the reference and whether the prediction is correct.
    """
    import json

    from tunelab.generate import write_jsonl_atomic
    from tunelab.tasks.classification import predict_file

    fields = {"text": text_field, "pair": text_pair_field, "label": None}
    rows = predict_file(run, input_file, fields=fields, batch_size=batch_size, max_length=max_length, dtype=dtype, device=device, split=split)
    if output is not None:
        write_jsonl_atomic(output, rows)
        err_console.print(f"wrote {len(rows)} predictions to {output}", highlight=False)
        return
    for row in rows:
        print(json.dumps(row, ensure_ascii=False))


@app.command()
def chat(
    source: ModelSourceArg,
    system: Annotated[Optional[str], typer.Option("--system", help="System message.")] = None,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass.")] = 0.9,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Make sampling reproducible.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Chat in the terminal with streamed replies; /reset, /system TEXT, /temp X, /max N, /exit.

    Piped stdin is read line by line (one message or command per line) and only replies are printed.
    """
    from transformers import set_seed

    from tunelab.generate import ChatSession, GenerationSettings, load_for_generation, run_chat, terminal_lines

    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    settings.check()
    model, tokenizer = load_for_generation(source, dtype=dtype, device=device)
    if seed is not None:
        set_seed(seed)
    session = ChatSession(model, tokenizer, settings=settings, system=system)
    interactive = sys.stdin.isatty()
    if interactive:
        err_console.print(f"chatting with {source}; /help for commands, /exit or Ctrl-D to leave", style="dim", highlight=False)
    run_chat(
        session,
        terminal_lines() if interactive else sys.stdin,
        sys.stdout,
        notify=lambda message: err_console.print(message, style="dim", markup=False, highlight=False),
        reply_prefix="assistant> " if interactive else "",
        stream=interactive,
    )


def _one_source(source: str | None, model_path: str | None) -> str:
    """SOURCE as an argument or as --model-path (the seed's spelling), exactly one of them."""
    if (source is None) == (model_path is None):
        raise TunelabError("name the run or model once: as the first argument or with --model-path, not both or neither")
    return source if source is not None else model_path


@app.command()
def merge(
    source: Annotated[str, typer.Argument(help="Run folder, checkpoint or adapter (LoRA / DoRA / QLoRA).", show_default=False)],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Directory to write [default: RUN/merged, or ./NAME-merged].")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (the base's stored dtype), fp32, bf16 or fp16.")] = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing directory.")] = False,
) -> None:
    """Fold the adapter into the base weights: a plain Hugging Face model directory, verified against adapter-on-base."""
    from tunelab.export import merge_model
    from tunelab.export.verify import format_numbers

    out, info = merge_model(source, output, dtype=dtype, overwrite=overwrite)
    console.print(f"[green]merged[/] {out} ({info['dtype']}, {info['total_bytes'] / 2**20:,.1f} MiB); "
                  f"reloaded with transformers: {format_numbers(info['verification'])}", highlight=False, soft_wrap=True)


@app.command("export")
def export_command(
    source: Annotated[Optional[str], typer.Argument(help="Run folder, checkpoint, adapter, model dir, .gguf, hub id or 'default'.", show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf, gguf, onnx or torchscript.")] = "hf",
    output: Annotated[Optional[Path], typer.Option("-o", "--output", "--output-path", help="Export folder [default: RUN/export/FORMAT, or ./export/NAME-FORMAT].")] = None,
    quantize: Annotated[Optional[str], typer.Option("--quantize", "-q", help="gguf: f32, f16 (default), bf16, q8_0, q5_1, q5_0, q4_1, q4_0; onnx: int8.")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="hf: auto, fp32, bf16 or fp16.")] = "auto",
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="hf: the adapter alone, not merged.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export folder.")] = False,
    model_path: Annotated[Optional[str], typer.Option("--model-path", help="Same as SOURCE (the seed's spelling).", show_default=False)] = None,
) -> None:
    """Export a run or model (adapters merged first): hf, gguf, onnx (+int8) or torchscript, verified against PyTorch."""
    from tunelab.export import export_model
    from tunelab.export.verify import format_numbers

    out, info = export_model(_one_source(source, model_path), fmt, output, quantize=quantize, dtype=dtype,
                             overwrite=overwrite, adapter_only=adapter_only)
    numbers = format_numbers(info["verification"]) if info.get("verification") else "adapter files copied"
    console.print(f"[green]exported[/] {out} ({info['format']}, {info.get('quantization') or info.get('dtype')}, "
                  f"{info['total_bytes'] / 2**20:,.1f} MiB); verified: {numbers}", highlight=False, soft_wrap=True)


@app.command()
def report(
    run: Annotated[Path, typer.Argument(help="Run folder (runs/NAME).", show_default=False)],
) -> None:
    """Write RUN/report.html: loss and learning-rate curves, evaluation tables, samples, config, hardware."""
    from tunelab.report import write_report

    path = write_report(run)
    console.print(f"wrote {path}", highlight=False, soft_wrap=True)


@app.command()
def ui(
    runs_dir: Annotated[Path, typer.Argument(help="Runs folder to show and train into.")] = Path("runs"),
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 serves other machines (use --auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 7860,
    auth: Annotated[Optional[str], typer.Option("--auth", help="USER:PASS required to open the UI (default: a random token, printed in the URL).")] = None,
    auth_file: Annotated[Optional[Path], typer.Option("--auth-file", help="File with one USER:PASS per line.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="No token and no password: anything that reaches the port may use the UI (warned).")] = False,
    allow_host: Annotated[Optional[list[str]], typer.Option("--allow-host", help="Host name the UI may be reached under besides localhost, this machine's names and IP addresses (repeatable; * allows any).")] = None,
    allow_remote_code: Annotated[bool, typer.Option("--allow-remote-code", help="Let the Train tab run configs with model.trust_remote_code: true.")] = False,
    allow_overwrite: Annotated[bool, typer.Option("--allow-overwrite", help="Let the Train tab run configs with output.overwrite: true.")] = False,
    allow_hub: Annotated[bool, typer.Option("--allow-hub", help="Let trainings started from the UI download models and data from the Hugging Face Hub.")] = False,
    share: Annotated[bool, typer.Option("--share", help="Also make a public gradio.live link (needs internet).")] = False,
    data_dir: Annotated[Optional[list[Path]], typer.Option("--data-dir", help="Extra folder the UI may read data/models from (repeatable).")] = None,
    max_models: Annotated[int, typer.Option("--max-models", help="Models kept loaded (least recently used dropped).")] = 3,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Model loads + generations at once; the rest wait in the queue.")] = 2,
    max_upload_mb: Annotated[int, typer.Option("--max-upload-mb", help="Largest data file upload.")] = 50,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Web UI: chat with and compare models, browse runs, check data, start/stop/resume training."""
    from tunelab.ui import serve

    serve(
        runs_dir, host=host, port=port, auth=auth, auth_file=auth_file, no_auth=no_auth, allow_hosts=allow_host,
        allow_remote_code=allow_remote_code, allow_overwrite=allow_overwrite, allow_hub=allow_hub, share=share, data_dirs=data_dir,
        max_models=max_models, concurrency=concurrency, max_upload_mb=max_upload_mb, dtype=dtype, device=device,
    )


@app.command()
def serve(
    source: Annotated[str, typer.Argument(help="Run folder, checkpoint, adapter or model dir, .gguf, hub id, or 'default' (the base when adapters are given).", show_default=False)],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", help="NAME=RUN: serve RUN's LoRA adapter as model NAME over the one base (repeatable).", show_default=False)] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; another than loopback needs an API key (or --insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on (0: any free one).")] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Key clients send as 'Authorization: Bearer KEY' [default: $TUNELAB_API_KEY, else one is generated and printed].", show_default=False)] = None,
    api_keys_file: Annotated[Optional[Path], typer.Option("--api-keys-file", help="File with one accepted key per line ('#' comments).", show_default=False)] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve without any key (prints a warning).")] = False,
    requests_per_minute: Annotated[int, typer.Option("--requests-per-minute", help="Per key; more get 429 with Retry-After (0: unlimited).")] = 600,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Sequences decoded together per model (continuous batching).")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Generations that may wait beyond the running batch; more get 429.")] = 32,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Most new tokens a request may ask for (per choice).")] = 2048,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds a request may take, queueing included (then 504).")] = 600.0,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads torch uses [default: torch's choice].", show_default=False)] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models) with keys, rate limits and streaming."""
    from tunelab.serve import serve as run_server

    run_server(
        source, adapters=adapter, host=host, port=port, api_key=api_key, api_keys_file=api_keys_file, insecure=insecure,
        requests_per_minute=requests_per_minute, max_batch_size=max_batch_size, max_queue=max_queue, max_tokens=max_tokens,
        timeout=timeout, dtype=dtype, device=device, threads=threads,
    )


@app.command()
def hpo(
    config_file: Annotated[Path, typer.Argument(help="Run config to search around (or the word 'show').", show_default=False)],
    overrides: OverridesArg = None,
    space: Annotated[Optional[Path], typer.Option("--space", help="Search space YAML: dotted keys -> \\[choices] / {float: \\[lo, hi], log: true} / {int: \\[lo, hi]}.")] = None,
    trials: Annotated[Optional[int], typer.Option("--trials", help="Finished trials the study should hold \\[default: 20; grid: the whole grid].")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Seconds after which this worker starts no new trial.")] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name \\[default: CONFIG-SPACE file names]; folder runs/hpo/STUDY.")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL shared by workers \\[default: sqlite in the study folder].")] = None,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe, grid or random.")] = "tpe",
    pruner: Annotated[str, typer.Option("--pruner", help="median, hyperband or none (they watch the eval loss).")] = "median",
    metric: Annotated[str, typer.Option("--metric", help="eval_loss, eval_perplexity, train_loss, exact_match, accuracy, rouge1/2/L, bleu; classifier runs: accuracy, macro_f1 (eval split).")] = "eval_loss",
    direction: Annotated[Optional[str], typer.Option("--direction", help="minimize or maximize \\[default: by metric].")] = None,
    heartbeat: Annotated[float, typer.Option("--heartbeat", help="Seconds between a worker's heartbeats; a trial silent for 4 heartbeats belongs to a dead worker and is run again.")] = 30.0,
) -> None:
    """Search hyperparameters with Optuna: each trial a normal run under runs/hpo/STUDY/trial-K.

    `tunelab hpo show STUDY` prints a study's results table again (STUDY: name, folder, or name + --storage).
    """
    from tunelab import hpo as search

    out = console if console.is_terminal else Console(width=200)
    if str(config_file) == "show" and not config_file.exists():
        if not overrides or len(overrides) != 1:
            raise TunelabError("usage: tunelab hpo show STUDY [--storage URL]  (STUDY: a name under runs/hpo, or a study folder)")
        found = search.load_existing_study(overrides[0], storage=storage)
        out.print(search.results_table(found, found.user_attrs.get("metric", "value"), found.direction.name.lower()))
        out.print(search.show_summary(found), highlight=False)
        return
    if space is None:
        raise TunelabError("--space SPACE.yaml is required: the keys to search and their ranges")
    plan = search.plan_study(
        config_file, list(overrides or []), space_path=space, n_trials=trials, timeout_s=timeout, study_name=study,
        storage=storage, sampler=sampler, pruner=pruner, metric=metric, direction=direction, heartbeat_s=heartbeat,
    )
    result = search.run_study(plan)
    out.print(search.results_table(result, plan.metric, plan.direction))
    out.print(search.show_summary(result), highlight=False)
    console.print(f"study folder: {plan.directory}  (best.yaml, results.csv, report.html)", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point: run the app, turning user errors into one clean message."""
    # Library deprecation chatter (transformers/peft FutureWarnings) is not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        # Non-standalone click returns the code of `typer.Exit(code)` instead of raising it.
        exit_code = app(standalone_mode=False)
        if isinstance(exit_code, int) and exit_code != 0:
            sys.exit(exit_code)
    except TrainingInterrupted as stop:  # a requested stop, checkpoint written: not an error
        if int(os.environ.get("RANK", "0")) == 0:
            err_console.print(Text(str(stop), style="yellow"), highlight=False, soft_wrap=True)
        sys.exit(stop.exit_code)
    except TunelabError as err:
        # Text, not markup: messages quote user values such as "[q_proj]" verbatim.
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[yellow]aborted[/]")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # bad option values (typer >= 0.22 vendors its own click)
        err_console.print(Text.assemble(("error: ", "bold red"), exc.format_message()), highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode (older typer)
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
