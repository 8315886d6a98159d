"""`tunelab bench`: public benchmarks through EleutherAI's lm-evaluation-harness, in process, offline first.

The numbers people report for a fine-tune (GSM8K, ARC, HellaSwag, PIQA, MMLU) come from the
harness, so tunelab runs the harness itself rather than re-implementing its tasks:

    source (run folder, checkpoint, adapter, merged model, hub id, bundled default)
      -> tunelab.models.load_for_inference   adapter merged, the run's tokenizer and chat template
      -> lm_eval HFLM(pretrained=<that model object>)
      -> lm_eval.simple_evaluate(tasks, num_fewshot, limit, apply_chat_template, seeds)
      -> bench.json (scores per filter with stderr and a 95% interval, versions, settings),
         lm_eval_results.json (the harness's own results), samples_<task>.jsonl (per-sample logs)

Offline first: local tasks read a file with tunelab's data readers and use the harness's own
task definition (`gsm8k`: lm-eval's shipped gsm8k.yaml, data swapped for the file; `qa`: any
prompt/answer file, zero-shot, the question as the whole prompt, as `tunelab eval` prompts).
Hub tasks (`arc_easy`, ...) read the Hugging Face datasets cache; the hub is contacted only
with `download=True`, and a task whose data is not cached is an error naming the task.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

INSTALL_HINT = "pip install 'tunelab[bench]'  (or: pip install lm-eval==0.4.13)"
LOCAL_TEMPLATES = ("gsm8k", "qa")
DEFAULT_RESULTS_DIR = Path("bench-results")
SEED = 1234  # lm-eval's default seeds (python, numpy, torch, few-shot sampler), recorded in bench.json

# Published model-card scores (percent) to show beside measured ones; see docs/evaluation.md.
# Keys are our task names; "arc" is the card's average of ARC-Easy and ARC-Challenge.
PUBLISHED = {
    "smollm2-135m-instruct": {
        "source": "model card HuggingFaceTB/SmolLM2-135M-Instruct, section Evaluation",
        "harness": "lighteval (zero-shot unless stated)",
        "scores": {"gsm8k": (1.4, "5-shot"), "hellaswag": (40.9, "0-shot"), "arc": (37.3, "0-shot, ARC average"),
                   "piqa": (66.3, "0-shot"), "mmlu": (29.3, "0-shot, cloze")},
    },
    "smollm2-360m-instruct": {
        "source": "model card HuggingFaceTB/SmolLM2-360M-Instruct, section Evaluation",
        "harness": "lighteval (zero-shot unless stated)",
        "scores": {"gsm8k": (7.43, "5-shot"), "hellaswag": (52.1, "0-shot"), "arc": (43.7, "0-shot, ARC average"),
                   "piqa": (70.8, "0-shot"), "mmlu": (32.8, "0-shot, cloze")},
    },
    "qwen2.5-0.5b-instruct": {
        "source": "model card HuggingFaceTB/SmolLM2-360M-Instruct (its comparison column), section Evaluation",
        "harness": "lighteval (zero-shot unless stated); Qwen's own card reports GSM8K 49.6 with its own harness",
        "scores": {"gsm8k": (26.8, "5-shot"), "hellaswag": (48.0, "0-shot"), "arc": (37.3, "0-shot, ARC average"),
                   "piqa": (67.2, "0-shot"), "mmlu": (31.7, "0-shot, cloze")},
    },
}


def require_lm_eval():
    """The lm_eval package, or a message with the install command when the extra is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (fails on a broken install too)
    except ImportError as err:
        raise TunelabError(
            f"tunelab bench needs EleutherAI's lm-evaluation-harness, which is not installed ({err})\n"
            f"  fix: {INSTALL_HINT}"
        ) from err
    return lm_eval


# ----------------------------------------------------------------------------- options


def parse_tasks(text: str) -> list[str]:
    """`--tasks gsm8k,arc_easy` -> ["gsm8k", "arc_easy"] (order kept, duplicates dropped)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise TunelabError("--tasks: no task given\n  fix: e.g. --tasks gsm8k --data gsm8k=../shared/data/gsm8k")
    return list(dict.fromkeys(names))


def parse_task_data(items: Sequence[str]) -> dict[str, Path]:
    """`--data gsm8k=PATH` (repeatable) -> {"gsm8k": PATH}: local files for the local templates."""
    data: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise TunelabError(f"--data {item!r}: expected TASK=PATH\n  fix: e.g. --data gsm8k=../shared/data/gsm8k/test.jsonl")
        if name not in LOCAL_TEMPLATES:
            raise TunelabError(
                f"--data {item!r}: {name!r} has no local-file template\n"
                f"  fix: local tasks are {', '.join(LOCAL_TEMPLATES)}; hub tasks read the Hugging Face datasets cache"
            )
        if not Path(path).expanduser().exists():
            raise TunelabError(f"--data {item!r}: {path} does not exist\n  fix: give a JSONL file or a folder with test.jsonl")
        data[name] = Path(path).expanduser()
    return data


def test_and_train_files(path: Path) -> tuple[Path, Path | None]:
    """The test file of a local task and the file few-shot examples come from (train.jsonl beside it)."""
    test = path / "test.jsonl" if path.is_dir() else path
    if not test.is_file():
        raise TunelabError(f"{path}: no test.jsonl in this folder\n  fix: give the JSONL file itself or a folder with test.jsonl")
    train = test.parent / "train.jsonl"
    return test, (train if train.is_file() and train != test else None)


# ----------------------------------------------------------------------------- tasks


def records_for_harness(path: Path) -> list[dict]:
    """A prompt/answer file as lm-eval documents {"question", "answer"}, read with tunelab's readers
    (GSM8K question/answer, alpaca, chat messages, ... : the final user turn is the question)."""
    from tunelab.evaluate import load_eval_examples

    docs = []
    for example in load_eval_examples(str(path)):
        if example.plain_text or not example.prompt:
            raise TunelabError(f"{example.source}: a plain-text record; a benchmark task needs a question and an answer")
        docs.append({"question": example.prompt[-1]["content"], "answer": example.reference, "source": example.source})
    return docs


def local_dataset(test: Path, train: Path | None):
    """A `custom_dataset` callable for lm-eval: the local files as a DatasetDict (no hub access)."""

    def build(**_ignored):  # lm-eval passes the task's metadata and dataset_kwargs
        import datasets

        splits = {"test": datasets.Dataset.from_list(records_for_harness(test))}
        if train is not None:
            splits["train"] = datasets.Dataset.from_list(records_for_harness(train))
        return datasets.DatasetDict(splits)

    return build


def harness_gsm8k_config() -> dict:
    """lm-eval's own gsm8k task definition (the installed version's gsm8k.yaml)."""
    import importlib.resources

    import yaml

    text = (importlib.resources.files("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def local_task_config(name: str, path: Path, num_fewshot: int | None) -> dict:
    """The lm-eval task config of a local template over `path` (named `<name>_local` in results)."""
    test, train = test_and_train_files(path)
    config = harness_gsm8k_config()
    config.pop("tag", None)
    config.pop("dataset_name", None)
    config.update(task=f"{name}_local", dataset_path=str(test), custom_dataset=local_dataset(test, train))
    if name == "qa":  # the question alone, zero-shot, stopping only at end of turn: `tunelab eval`'s prompt
        config.update(doc_to_text="{{question}}", num_fewshot=0, generation_kwargs={**config["generation_kwargs"], "until": []})
        config["metadata"] = {"version": 1.0, "template": "tunelab qa (lm-eval gsm8k metrics and filters)"}
    shots = config.get("num_fewshot", 0) if num_fewshot is None else num_fewshot
    if train is None:
        if shots and name == "gsm8k":
            raise TunelabError(
                f"task gsm8k: {shots}-shot prompts take their examples from a train.jsonl beside {test}, and there is none\n"
                "  fix: put train.jsonl next to it, or --num-fewshot 0"
            )
        config.pop("training_split", None)
        config.pop("fewshot_split", None)
    return config


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """No Hugging Face hub requests while the block runs (datasets and huggingface_hub read their
    offline switches from module constants set at import, so those are switched too)."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
             datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_DATASETS_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for key, value in zip(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"), saved[:2]):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        datasets.config.HF_DATASETS_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved[2], saved[3]


@functools.lru_cache(maxsize=2)
def task_manager(*, include_defaults: bool):
    """lm-eval's task index; with the shipped tasks it scans thousands of YAML files (tens of
    seconds on a small CPU), so one index serves every load in the process (a baseline run too)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def load_tasks(names: Sequence[str], data: dict[str, Path], num_fewshot: int | None, *, download: bool) -> list:
    """lm-eval Task/Group objects for the names: local templates over their files, hub tasks from
    the datasets cache (or the hub with `download`). One message per task that cannot load."""
    unused = set(data) - set(names)
    if unused:
        raise TunelabError(f"--data given for {', '.join(sorted(unused))}, which is not in --tasks\n  fix: add it to --tasks")
    hub_names = [name for name in names if name not in data]
    manager = task_manager(include_defaults=bool(hub_names))
    loaded = []
    for name in names:
        try:
            with hub_offline(not download):
                if name in data:
                    loaded.extend(manager.load([local_task_config(name, data[name], num_fewshot)])["tasks"].values())
                else:
                    loaded.extend(_load_hub(manager, name))
        except TunelabError:
            raise
        except Exception as err:  # the harness raises many kinds (KeyError, ConnectionError, DatasetNotFoundError, ...)
            raise _task_error(name, err, download=download) from err
    return loaded


def _load_hub(manager, name: str) -> list:
    """A hub task or group by name, as the objects simple_evaluate takes."""
    if name not in manager.all_tasks:
        from difflib import get_close_matches

        close = get_close_matches(name, manager.all_tasks, n=3)
        raise TunelabError(
            f"--tasks: lm-eval has no task {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
            + "\n  fix: `lm-eval ls tasks` lists them; local files: --tasks gsm8k --data gsm8k=PATH"
        )
    result = manager.load([name])
    top = [group for group in result["groups"].values() if group.name == name] if result.get("groups") else []
    return top or list(result["tasks"].values())


def _task_error(name: str, err: Exception, *, download: bool) -> TunelabError:
    if download:
        return TunelabError(f"task {name}: its data could not be loaded: {type(err).__name__}: {err}\n"
                            "  fix: check the network and the task name")
    local = f"; or a local file: --tasks {name} --data {name}=PATH" if name in LOCAL_TEMPLATES else ""
    return TunelabError(
        f"task {name}: its data set is not in the local Hugging Face datasets cache, and tunelab bench does not "
        f"contact the hub unless asked ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})\n"
        f"  fix: run once with --download on a machine with a network (it fills the cache){local}"
    )


# ----------------------------------------------------------------------------- running


@dataclass
class BenchResult:
    """One model's harness run: the summary written to bench.json, and per-task sample logs."""

    name: str
    source: str | None
    summary: dict
    samples: dict[str, list[dict]] = field(default_factory=dict)
    folder: Path | None = None


def wrap_model(model, tokenizer, *, batch_size: int, max_length: int | None = None):
    """The loaded model object as an lm-eval `HFLM` (no second load, no hub access)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    if not isinstance(model, torch.nn.Module):
        raise TunelabError("tunelab bench runs PyTorch models; an ONNX export has its own runtime\n"
                           "  fix: bench the run folder (or a merged HF export) instead")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def score_rows(results: dict, samples: dict[str, list[dict]]) -> list[dict]:
    """One row per task, filter and metric: value, lm-eval's stderr, n and a 95% interval from the samples."""
    from tunelab.compare import bootstrap_interval, wilson_interval

    rows = []
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            per_sample = [float(s[metric]) for s in samples.get(task, []) if s.get("filter") == filter_name and metric in s]
            interval = None
            if per_sample:
                if set(per_sample) <= {0.0, 1.0}:
                    interval = ("wilson", *wilson_interval(int(sum(per_sample)), len(per_sample)))
                else:
                    interval = ("bootstrap", *bootstrap_interval(per_sample))
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            rows.append({
                "task": task, "filter": filter_name, "metric": metric, "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None, "n": len(per_sample) or None,
                **({"interval": {"method": interval[0], "low": interval[1], "high": interval[2]}} if interval else {}),
            })
    return rows


def sample_logs(raw_samples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """Per-sample rows to keep (JSON-safe): doc id, filter, prompt, response, extracted answer, target, metrics."""
    logs: dict[str, list[dict]] = {}
    for task, entries in raw_samples.items():
        rows = []
        for entry in entries:
            arguments = entry.get("arguments") or [[None]]
            first = arguments[0] if isinstance(arguments, (list, tuple)) and arguments else [None]
            row = {
                "doc_id": entry.get("doc_id"),
                "filter": entry.get("filter"),
                "prompt": first[0] if isinstance(first, (list, tuple)) else first,
                "response": (entry.get("resps") or [[None]])[0][0] if entry.get("resps") else None,
                "filtered": (entry.get("filtered_resps") or [None])[0],
                "target": entry.get("target"),
            }
            if isinstance(entry.get("doc"), dict) and "source" in entry["doc"]:
                row["source"] = entry["doc"]["source"]  # file:line of a local task's record
            for metric in entry.get("metrics", []):
                if metric in entry:
                    row[metric] = float(entry[metric])
            rows.append(row)
        logs[task] = rows
    return logs


def run_harness(
    source: str | None,
    tasks: list,
    *,
    manager,
    task_names: Sequence[str],
    num_fewshot: int | None,
    limit: int | None,
    chat_template: str,
    batch_size: int,
    max_new_tokens: int | None,
    dtype: str,
    device: str | None,
) -> BenchResult:
    """Load one source with tunelab, run the loaded tasks on it with lm-eval, and summarise.

    `manager` is the lm-eval TaskManager the tasks came from (`task_manager`)."""
    import lm_eval
    import transformers

    from tunelab.evaluate import describe_device, model_label
    from tunelab.generate import has_chat_template, load_for_generation

    if chat_template not in ("auto", "on", "off"):
        raise TunelabError(f"--chat-template {chat_template!r}: choose auto, on or off")
    model, tokenizer = load_for_generation(source, dtype=dtype, device=device,
                                           chat_template={"auto": None, "on": True, "off": False}[chat_template])
    if chat_template == "on" and not has_chat_template(tokenizer):
        raise TunelabError(f"--chat-template on: {source or 'default'} has no chat template\n  fix: --chat-template off")
    use_template = has_chat_template(tokenizer)
    lm = wrap_model(model, tokenizer, batch_size=batch_size)
    gen_kwargs = {"max_gen_toks": max_new_tokens} if max_new_tokens else None
    started = time.perf_counter()
    with hub_offline(True):  # the tasks are loaded: nothing below needs the hub
        output = lm_eval.simple_evaluate(
            lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=True, bootstrap_iters=1000,
            apply_chat_template=use_template, fewshot_as_multiturn=use_template, gen_kwargs=gen_kwargs,
            random_seed=SEED, numpy_random_seed=SEED, torch_random_seed=SEED, fewshot_random_seed=SEED,
            task_manager=manager,  # without it the harness builds its own full task index again
        )
    seconds = time.perf_counter() - started
    samples = sample_logs(output.get("samples", {}))
    configs = output.get("configs", {})
    summary = {
        "model": source or "default",
        "tasks": list(task_names),
        "scores": score_rows(output["results"], output.get("samples", {})),
        "lm_eval_version": getattr(lm_eval, "__version__", output.get("lm_eval_version")),
        "transformers_version": transformers.__version__,
        "task_versions": {k: v for k, v in output.get("versions", {}).items()},
        "n_shot": output.get("n-shot", {}),
        "n_samples": output.get("n-samples", {}),
        "limit": limit,
        "chat_template": use_template,
        "chat_template_option": chat_template,
        "fewshot_as_multiturn": use_template,
        "generation_kwargs": {task: cfg.get("generation_kwargs") for task, cfg in configs.items() if cfg.get("generation_kwargs")},
        "seed": SEED,
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": describe_device(model),
        "seconds": seconds,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    raw = {key: value for key, value in output.items() if key != "samples"}
    result = BenchResult(model_label(source), source, summary, samples)
    result.summary["_raw"] = raw  # written to lm_eval_results.json, then dropped from bench.json
    del lm, model
    return result


def paired_task_differences(baseline: BenchResult, result: BenchResult) -> list[dict]:
    """`result - baseline` per task, filter and metric on the same documents, with a paired bootstrap 95% interval."""
    from tunelab.compare import paired_bootstrap

    rows = []
    for task, samples in result.samples.items():
        base_samples = baseline.samples.get(task, [])
        for score in (s for s in result.summary["scores"] if s["task"] == task):
            metric, filter_name = score["metric"], score["filter"]

            def by_doc(entries):
                return {e["doc_id"]: e[metric] for e in entries if e.get("filter") == filter_name and metric in e}

            ours, theirs = by_doc(samples), by_doc(base_samples)
            docs = sorted(ours.keys() & theirs.keys())
            if not docs:
                continue
            diff = paired_bootstrap([theirs[d] for d in docs], [ours[d] for d in docs])
            rows.append({"task": task, "filter": filter_name, "metric": metric, "n": len(docs), **diff.as_dict()})
    return rows


def published_rows(name: str, scores: Sequence[dict]) -> dict:
    """The published model-card figures for `name` beside the measured ones (percent), with provenance."""
    key = name.lower()
    if key not in PUBLISHED:
        raise TunelabError(f"--compare {name!r}: no published table for it\n  fix: choose from {', '.join(PUBLISHED)}")
    card = PUBLISHED[key]
    measured: dict[str, float] = {}
    for score in scores:
        base = score["task"].removesuffix("_local")
        if base in ("arc_easy", "arc_challenge"):
            continue
        if base == "gsm8k" and score["filter"] != "flexible-extract":
            continue
        if score["metric"] in ("acc_norm", "exact_match") or (score["metric"] == "acc" and base not in measured):
            measured[base] = 100 * score["value"]
    arc = [100 * s["value"] for s in scores if s["task"] in ("arc_easy", "arc_challenge") and s["metric"] == "acc_norm"]
    if len(arc) == 2:
        measured["arc"] = sum(arc) / 2
    rows = [{"task": task, "published": value, "published_setting": setting, "measured": measured.get(task)}
            for task, (value, setting) in card["scores"].items() if task in measured]
    return {"model": key, "source": card["source"], "harness": card["harness"], "rows": rows,
            "note": "published with a different harness and prompts: compare the difference between your models, "
                    "not absolute numbers against the card"}


# ----------------------------------------------------------------------------- files and the command


def bench_root(source: str | None, label: str, output: str | Path | None) -> Path:
    """Where a model's bench results go: --output, RUN/bench for a run folder, else ./bench-results/<label>."""
    from tunelab.evaluate import is_run_dir

    if output is not None:
        return Path(output)
    if source is not None and is_run_dir(Path(source).expanduser()):
        return Path(source).expanduser() / "bench"
    return DEFAULT_RESULTS_DIR / label


def save_bench(folder: Path, result: BenchResult) -> Path:
    """bench.json, lm_eval_results.json and samples_<task>.jsonl under `folder` (each written atomically)."""
    from lm_eval.utils import handle_non_serializable

    from tunelab.evaluate import write_json_atomic
    from tunelab.files import write_text_atomic
    from tunelab.generate import write_jsonl_atomic

    raw = result.summary.pop("_raw", None)
    if raw is not None:
        write_text_atomic(folder / "lm_eval_results.json", json.dumps(raw, indent=2, default=handle_non_serializable) + "\n")
    for task, rows in result.samples.items():
        write_jsonl_atomic(folder / f"samples_{task}.jsonl", rows)
    write_json_atomic(folder / "bench.json", result.summary)
    result.folder = folder
    return folder


def run_bench(
    source: str | None,
    *,
    tasks: Sequence[str],
    data: dict[str, Path] | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    chat_template: str = "auto",
    baseline: str | None = None,
    compare: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    output: str | Path | None = None,
    dtype: str = "auto",
    device: str | None = None,
    download: bool = False,
) -> tuple[BenchResult, BenchResult | None]:
    """Benchmark `source` (and `baseline` under identical settings); write and return the results.

    The baseline goes to <output>/baseline/; the source's bench.json gets "baseline" with the
    paired differences, and "published" with `compare`'s model-card figures.
    """
    from tunelab.console import console
    from tunelab.evaluate import model_label

    require_lm_eval()
    # The harness logs each step at WARNING (pre-built model, custom data set kwargs, n-shot
    # overrides); its progress bars stay. Errors still show.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if limit is not None and limit < 1:
        raise TunelabError(f"--limit must be at least 1, got {limit}")
    if batch_size < 1:
        raise TunelabError(f"--batch-size must be at least 1, got {batch_size}")
    if compare is not None and compare.lower() not in PUBLISHED:
        raise TunelabError(f"--compare {compare!r}: no published table for it\n  fix: choose from {', '.join(PUBLISHED)}")
    data = data or {}
    manager = task_manager(include_defaults=any(name not in data for name in tasks))
    settings = dict(manager=manager, task_names=tasks, num_fewshot=num_fewshot, limit=limit, chat_template=chat_template,
                    batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype, device=device)
    root = bench_root(source, model_label(source), output)
    loaded = load_tasks(tasks, data, num_fewshot, download=download)  # every task error before any model loads
    console.print(f"[bold]Benchmarking {model_label(source)}[/] on {', '.join(tasks)}"
                  + (f" (first {limit} examples each)" if limit else ""), highlight=False)
    result = run_harness(source, loaded, **settings)
    base_result = None
    if baseline is not None:
        console.print(f"[bold]Baseline {model_label(baseline)}[/], same settings", highlight=False)
        base_result = run_harness(baseline, load_tasks(tasks, data, num_fewshot, download=download), **settings)
        save_bench(root / "baseline", base_result)
        result.summary["baseline"] = {
            "model": baseline, "folder": str(root / "baseline"), "level": 0.95, "method": "paired bootstrap over documents",
            "differences": paired_task_differences(base_result, result),
        }
    if compare is not None:
        result.summary["published"] = published_rows(compare, result.summary["scores"])
    save_bench(root, result)
    console.print(f"[green]saved[/] {root}/bench.json, lm_eval_results.json and samples_*.jsonl", highlight=False)
    return result, base_result


def bench_tables(result: BenchResult, baseline: BenchResult | None = None) -> list:
    """Rich tables: scores per task and filter (with the baseline and the paired difference), and the published figures."""
    from rich.table import Table

    from tunelab.compare import format_difference

    summary = result.summary
    shots = summary.get("n_shot", {})
    title = (f"lm-eval {summary.get('lm_eval_version')} on {result.name} (chat template "
             f"{'on' if summary.get('chat_template') else 'off'}, limit {summary.get('limit') or 'none'})")
    table = Table(title=title)
    for column in ("task", "n-shot", "filter", "metric", "n", "score", "± stderr", "95% interval"):
        table.add_column(column, justify="left" if column in ("task", "filter", "metric") else "right")
    base_scores = {}
    differences = {}
    if baseline is not None:
        table.add_column(f"baseline {baseline.name}", justify="right")
        table.add_column("difference [paired 95%]", justify="right")
        base_scores = {(s["task"], s["filter"], s["metric"]): s for s in baseline.summary["scores"]}
        differences = {(d["task"], d["filter"], d["metric"]): d for d in summary.get("baseline", {}).get("differences", [])}
    for score in summary["scores"]:
        key = (score["task"], score["filter"], score["metric"])
        interval = score.get("interval")
        cells = [score["task"], str(shots.get(score["task"], "")), score["filter"], score["metric"], str(score.get("n") or ""),
                 f"{100 * score['value']:.1f}%", f"{100 * score['stderr']:.1f}" if score.get("stderr") is not None else "-",
                 f"[{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]" if interval else "-"]
        if baseline is not None:
            base = base_scores.get(key)
            cells.append(f"{100 * base['value']:.1f}%" if base else "-")
            cells.append(format_difference("exact_match", differences[key]) if key in differences else "-")
        table.add_row(*cells)
    tables = [table]
    published = summary.get("published")
    if published:
        card = Table(title=f"Published: {published['source']} ({published['harness']})", caption=published["note"])
        for column in ("task", "published", "setting", "measured here"):
            card.add_column(column, justify="left" if column in ("task", "setting") else "right")
        for row in published["rows"]:
            card.add_row(row["task"], f"{row['published']:.1f}", row["published_setting"],
                         f"{row['measured']:.1f}" if row["measured"] is not None else "-")
        tables.append(card)
    return tables
