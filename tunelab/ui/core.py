"""What the web UI does, without the web: paths it may read, loaded models, runs, data, training.

`tunelab/ui/app.py` lays these functions out as Gradio tabs; tests call them directly too.
Everything here reads run folders, data files and configs through the same functions the
CLI uses (`tunelab.report`, `tunelab.data.pipeline`, `tunelab.config`, `tunelab.generate`,
`tunelab.models`) and writes only into the runs folder (a training's config and log go
to RUNS/.ui/, the run itself to RUNS/NAME/ as `tunelab train` writes it).
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import yaml

from tunelab.errors import TunelabError
from tunelab.runlock import describe_holder, running_holder

if TYPE_CHECKING:
    from tunelab.engine import Engine, GenerationRequest

DEFAULT_SOURCE = "default"  # the bundled SmolLM2-135M-Instruct, as `tunelab chat default`
UI_DIR = ".ui"  # RUNS/.ui/: configs and logs of trainings started from the UI
LOG_TAIL_LINES = 200
LOG_TAIL_BYTES = 64 * 1024
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENGINE_SLOTS = 8  # requests one model decodes at once in the UI (more wait in its queue)


# ----------------------------------------------------------------------------- paths


@dataclass
class Workspace:
    """The folders the UI may read: the runs folder, ./data and the --data-dir folders.

    Every path typed into the UI (a model, a data file, a run) goes through `check_path`,
    so a user of a shared UI cannot read /etc/passwd or another user's home through it.
    Relative paths are taken from the working directory, which is not a root itself: started
    from $HOME, the UI would otherwise serve the whole home directory.
    """

    runs_dir: Path
    data_dirs: list[Path] = field(default_factory=list)
    cwd: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        self.runs_dir = Path(self.runs_dir).expanduser().resolve()
        self.data_dirs = [Path(d).expanduser().resolve() for d in self.data_dirs]
        self.cwd = Path(self.cwd).resolve()

    @property
    def roots(self) -> list[Path]:
        return [self.runs_dir, (self.cwd / "data").resolve(), *self.data_dirs]

    @property
    def configs_dir(self) -> Path:
        return self.cwd / "configs"

    @property
    def ui_dir(self) -> Path:
        return self.runs_dir / UI_DIR

    def check_path(self, text: str, what: str) -> Path:
        """The resolved path (relative paths are taken from the working directory), if it lies
        inside one of the allowed folders (symlinks resolved first); else a TunelabError."""
        path = Path(text.strip()).expanduser()
        resolved = (path if path.is_absolute() else self.cwd / path).resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(root) for root in self.roots)
            raise TunelabError(
                f"{what} {text.strip()!r} is outside the folders this UI may read ({allowed})\n"
                "  fix: move it into one of them, or start the UI with --data-dir FOLDER"
            )
        return resolved

    def model_source(self, text: str | None) -> str | None:
        """A model choice as `load_for_inference` takes it: None for the bundled model, else a checked path."""
        text = (text or "").strip()
        if text in ("", DEFAULT_SOURCE):
            return None
        path = self.check_path(text, "model")
        if not path.exists():
            raise TunelabError(f"model not found: {text}\n  fix: pick a run from the list, 'default', or an existing folder")
        return str(path)

    def run_dir(self, name: str) -> Path:
        """RUNS/NAME for a run name picked in the UI: plain folder names, `/`-separated for
        runs in subfolders (HPO trials: hpo/STUDY/trial-3); no `..`, no hidden folders."""
        name = (name or "").strip()
        parts = name.split("/")
        if not name or "\\" in name or any(not part or part.startswith(".") for part in parts):
            raise TunelabError(f"not a run name: {name!r}\n  fix: pick a run from the table")
        return self.runs_dir.joinpath(*parts)


# ----------------------------------------------------------------------------- access


def parse_auth(auth: str | None, auth_file: Path | None) -> list[tuple[str, str]] | None:
    """USER:PASS pairs from --auth and/or --auth-file (one USER:PASS per line, # comments)."""
    pairs: list[tuple[str, str]] = []
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise TunelabError("--auth must be USER:PASS (e.g. --auth alice:s3cret)")
        pairs.append((user, password))
    if auth_file is not None:
        if not auth_file.is_file():
            raise TunelabError(f"--auth-file not found: {auth_file}\n  fix: a text file with one USER:PASS per line")
        for number, line in enumerate(auth_file.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, password = line.partition(":")
            if not sep or not user or not password:
                raise TunelabError(f"{auth_file}:{number}: expected USER:PASS\n  fix: one USER:PASS per line")
            pairs.append((user, password))
        if not pairs:
            raise TunelabError(f"{auth_file}: no USER:PASS lines\n  fix: add at least one")
    return pairs or None


def exposure_warning(host: str, auth: list | None, share: bool) -> str | None:
    """The warning for a UI reachable from other machines without a password (None when safe)."""
    if auth:
        return None
    if share:
        return "warning: --share makes a public link and no --auth is set: anyone with the link can use this UI and its runs"
    if host not in ("127.0.0.1", "localhost", "::1"):
        return f"warning: --host {host} serves this UI to other machines without a password; add --auth USER:PASS or --auth-file FILE"
    return None


# ----------------------------------------------------------------------------- models


def memory_mb() -> float:
    """Resident memory of this process in MB (what the OS charges for the loaded models)."""
    return psutil.Process().memory_info().rss / 2**20


class ModelCache:
    """Loaded models kept for reuse: at most `capacity`, least recently used dropped first.

    A model is loaded once even when many users ask for it at the same moment: the first
    caller loads under that model's lock, the others wait for it and share the result.
    """

    def __init__(self, capacity: int = 3, *, dtype: str = "auto", device: str | None = None):
        if capacity < 1:
            raise TunelabError(f"--max-models must be at least 1, got {capacity}")
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.loads = 0  # how many loads happened (tests check that concurrent users share one)
        self._models: OrderedDict[str, tuple[object, object]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        self._engines: dict[str, Engine] = {}  # source key -> its model's engine (see `engine`)

    def get(self, source: str | None):
        """(model, tokenizer) for a source as `load_for_inference` names it (None = bundled)."""
        from tunelab.generate import load_for_generation

        key = source or DEFAULT_SOURCE
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            loaded = load_for_generation(source, dtype=self.dtype, device=self.device)
            with self._lock:
                self._models[key] = loaded
                self.loads += 1
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
        return loaded

    def engine(self, source: str | None) -> Engine:
        """The generation engine of a source's model (loaded if needed), running in its own
        thread and shared by every chat and compare request on that model, so concurrent users
        are decoded in one batch. Engines of models the cache dropped are closed once idle."""
        from tunelab.engine import Engine

        model, tokenizer = self.get(source)
        key = source or DEFAULT_SOURCE
        with self._lock:
            self._drop_idle_engines()
            engine = self._engines.get(key)
            if engine is None or engine.model is not model:
                engine = self._engines[key] = Engine(model, tokenizer, max_batch_size=ENGINE_SLOTS)
                engine.start()
        return engine

    def _drop_idle_engines(self) -> None:
        """Close the engines of models no longer cached, once they have no request (call with the lock)."""
        for name, old in list(self._engines.items()):
            stale = name not in self._models or self._models[name][0] is not old.model
            if stale and old.active == 0 and old.waiting == 0:
                del self._engines[name]
                old.close()

    def unload(self) -> str:
        """Drop every cached model and hand the memory back (the Unload button; a training on
        the same GPU needs it). A reply still streaming keeps its model (and engine) until it ends."""
        import gc

        import torch

        with self._lock:
            self._models.clear()
            self._drop_idle_engines()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self.describe()

    def describe(self) -> str:
        """One line per loaded model (parameters, weight memory) and the process's memory."""
        with self._lock:
            items = list(self._models.items())
        lines = []
        for key, (model, _) in items:
            params = sum(p.numel() for p in model.parameters())
            weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            lines.append(f"{key}: {params / 1e6:.1f}M parameters, {weights:.0f} MB of weights")
        head = f"{len(items)} of {self.capacity} model slots used; this process holds {memory_mb():.0f} MB"
        return "\n".join([head, *lines])


def model_choices(workspace: Workspace) -> list[tuple[str, str]]:
    """(label, value) pairs: the bundled model, then every finished language-model run (with
    final/); classifier runs do not chat, they are listed under Runs only."""
    from tunelab.models import is_classifier

    choices = [("default (bundled SmolLM2-135M-Instruct)", DEFAULT_SOURCE)]
    for run in run_folders(workspace.runs_dir):
        if (run / "final").is_dir() and not is_classifier(str(run)):
            choices.append((f"run: {run_label(workspace.runs_dir, run)}", str(run)))
    return choices


def text_of(content) -> str:
    """The text of a chat message's content (a string, or Gradio's list of typed parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or "")
    if isinstance(content, list):
        return "".join(text_of(part) for part in content)
    return ""


def chat_stream(
    model,
    tokenizer,
    history: list[dict],
    message: str,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    system: str | None = None,
    engine: Engine | None = None,
    on_request: Callable[[GenerationRequest], None] | None = None,
) -> Iterator[str]:
    """The reply to `message` after `history`, yielded as the text so far after each new piece.

    The prompt is built by `ChatSession` (the run's chat template, oldest turns dropped to
    fit the context) and decoded by `engine` (the model's shared one, `ModelCache.engine`;
    a private one if None). `on_request` gets the request at once, so Stop / Clear / closing
    the tab can cancel it; if the consumer stops reading (a closed tab), it is cancelled too.
    """
    from tunelab.engine import Engine, SamplingParams
    from tunelab.generate import ChatSession, GenerationSettings

    settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature), top_p=float(top_p))
    settings.check()
    turns = [{"role": m["role"], "content": text_of(m["content"])} for m in history if m.get("role") in ("user", "assistant")]
    session = ChatSession(model, tokenizer, settings=settings, system=(system or "").strip() or None, history=turns)
    session.history.append({"role": "user", "content": message})
    prompt_ids = session.fit_prompt()
    engine = engine or Engine(model, tokenizer, max_batch_size=1)
    request = engine.submit(prompt_ids, SamplingParams(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p
    ))
    if on_request is not None:
        on_request(request)
    text = ""
    try:
        yield text  # submitted: a caller with several replies (Compare) starts them all before reading one
        for piece in request.stream():
            text += piece
            yield text
    finally:
        request.cancel()  # a no-op when finished; frees the slot when the reader went away
    yield text.strip()


# ----------------------------------------------------------------------------- runs


def run_folders(runs_dir: Path, depth: int = 3) -> list[Path]:
    """Run folders under RUNS (those with a config.yaml), newest first, also in subfolders up to
    `depth` levels (HPO trials: RUNS/hpo/STUDY/trial-K); a run's own folders are not searched."""
    runs: list[Path] = []
    folders = [runs_dir] if runs_dir.is_dir() else []
    for _ in range(depth):
        deeper = []
        for folder in folders:
            for path in folder.iterdir():
                if not path.is_dir() or path.name.startswith("."):
                    continue
                (runs if (path / "config.yaml").is_file() else deeper).append(path)
        folders = deeper
    return sorted(runs, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)


def run_label(runs_dir: Path, run: Path) -> str:
    """A run's name in the UI: its path under RUNS (`tiny`, `hpo/lr/trial-3`)."""
    return run.relative_to(runs_dir).as_posix()


def external_evaluations(workspace: Workspace, run: Path) -> dict[str, dict]:
    """Scores of `run` written outside its folder by `tunelab eval --output DIR` under
    ./eval-results (its default place): each scores.json names the model it measured."""
    from tunelab.report import read_json

    found: dict[str, dict] = {}
    results = workspace.cwd / "eval-results"
    if not results.is_dir():
        return found
    for path in sorted(results.glob("**/eval/*/scores.json")):
        scores = read_json(path)
        model = scores.get("model")
        if isinstance(model, str) and model != "default":
            measured = Path(model).expanduser()
            if (measured if measured.is_absolute() else workspace.cwd / measured).resolve() == run.resolve():
                found[f"{path.parent.name} ({path.parents[2].relative_to(results).as_posix()})"] = scores
    return found


def for_people(value):
    """A number as people read it in a table (4 decimals: eval loss 0.0514); others unchanged."""
    return round(value, 4) if isinstance(value, float) else value


def _score_text(scores_by_data: dict[str, dict], summary: dict) -> str:
    parts = []
    if isinstance(summary.get("classification"), dict):  # a classifier run: its eval split, scored at the end
        parts.append(f"eval split: accuracy {summary['accuracy']:.1%}, macro F1 {summary['macro_f1']:.3f}")
    for name, scores in scores_by_data.items():
        for key in ("exact_match", "accuracy"):
            if isinstance(scores.get(key), (int, float)):
                parts.append(f"{name}: {key} {scores[key]:.1%}")
        for key in ("rougeL", "bleu", "perplexity"):
            if isinstance(scores.get(key), (int, float)):
                parts.append(f"{name}: {key} {scores[key]:.4g}")
    return "; ".join(parts)


RUN_COLUMNS = ["run", "status", "method", "model", "data", "steps", "train loss", "eval loss", "eval scores"]


def run_rows(workspace: Workspace, active: str | None = None) -> list[list]:
    """One row per run: name, status, method, model, data, steps, last train / eval loss, scores."""
    from tunelab.checkpoint import latest_checkpoint
    from tunelab.report import evaluation_scores, read_json, read_metrics

    rows = []
    for run in run_folders(workspace.runs_dir):
        config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        records, _ = read_metrics(run / "metrics.jsonl")
        summary = read_json(run / "eval.json")
        scores_by_data = {**evaluation_scores(run, summary), **external_evaluations(workspace, run)}
        train = [r for r in records if "loss" in r]
        evals = [r for r in records if "eval_loss" in r]
        name = run_label(workspace.runs_dir, run)
        if name == active or running_holder(run) is not None:
            status = "training"
        elif (run / "final").is_dir():
            status = "done"
        else:
            checkpoint = latest_checkpoint(run / "checkpoints")
            status = f"stopped at {checkpoint.name}" if checkpoint else "incomplete"
        rows.append([
            name,
            status,
            config.get("method"),
            (config.get("model") or {}).get("name") or DEFAULT_SOURCE,
            str((config.get("data") or {}).get("train") or ""),
            train[-1]["step"] if train else 0,
            for_people(summary.get("train_loss", train[-1]["loss"] if train else None)),
            for_people(summary.get("eval_loss", evals[-1]["eval_loss"] if evals else None)),
            _score_text(scores_by_data, summary),
        ])
    return rows


def curves(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl as plot rows: loss (train and eval, one `series` column) and learning rate."""
    from tunelab.report import read_metrics, series

    records, _ = read_metrics(run_dir / "metrics.jsonl")
    loss = [{"step": s, "loss": v, "series": "train"} for s, v in zip(*series(records, "loss"))]
    loss += [{"step": s, "loss": v, "series": "eval"} for s, v in zip(*series(records, "eval_loss"))]
    lr = [{"step": s, "lr": v} for s, v in zip(*series(records, "lr"))]
    return loss, lr


@dataclass
class RunDetails:
    """What the Runs tab shows for one run."""

    name: str
    loss: list[dict]
    lr: list[dict]
    scores: list[list]
    score_columns: list[str]
    samples: list[list]
    config: str
    summary: str
    report: Path | None


def run_details(workspace: Workspace, name: str) -> RunDetails:
    """One run's curves, evaluation table, sample predictions, config and report (report.py's readers)."""
    from tunelab.report import SAMPLES_PER_DATASET, SCORE_COLUMNS, evaluation_scores, format_value, read_json, read_jsonl_head

    run = workspace.run_dir(name)
    if not (run / "config.yaml").is_file():
        raise TunelabError(f"no run named {name!r} in {workspace.runs_dir}\n  fix: pick a run from the table (Refresh)")
    loss, lr = curves(run)
    summary = read_json(run / "eval.json")
    scores_by_data = {**evaluation_scores(run, summary), **external_evaluations(workspace, run)}
    keys = [c for c in SCORE_COLUMNS if any(s.get(c[0]) is not None for s in scores_by_data.values())]
    scores = [[data, *(format_value(s.get(key), spec) for key, _, spec in keys)] for data, s in scores_by_data.items()]
    samples = []
    for path in sorted((run / "eval").glob("*/predictions.jsonl")):
        for row in read_jsonl_head(path, SAMPLES_PER_DATASET):
            mark = "" if "correct" not in row else ("✓" if row["correct"] else "✗")
            samples.append([path.parent.name, str(row.get("prompt", "")), str(row.get("reference", "")), str(row.get("prediction", "")), mark])
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    summary_text = "\n".join(f"{k}: {format_value(v)}" for k, v in flat.items()) or "no eval.json yet"
    report = run / "report.html"
    return RunDetails(
        name=run_label(workspace.runs_dir, run),
        loss=loss,
        lr=lr,
        scores=scores,
        score_columns=["data", *(title for _, title, _ in keys)],
        samples=samples,
        config=(run / "config.yaml").read_text(encoding="utf-8"),
        summary=summary_text,
        report=report if report.is_file() else None,
    )


# ----------------------------------------------------------------------------- data


_TOKENIZERS: dict[str, object] = {}
_TOKENIZER_LOCK = threading.Lock()


def tokenizer_for(source: str | None):
    """The tokenizer (and chat template) of a model, loaded once per source."""
    from tunelab.models import load_tokenizer, resolve_model_source, resolve_weights_dir

    key = source or DEFAULT_SOURCE
    with _TOKENIZER_LOCK:
        if key not in _TOKENIZERS:
            weights = resolve_weights_dir(source) if source else None
            _TOKENIZERS[key] = load_tokenizer(str(weights) if weights else resolve_model_source(source))
        return _TOKENIZERS[key]


@dataclass
class DataCheck:
    """What the Data tab shows after validating a file."""

    counts: list[list]
    formats: list[list]
    histogram: list[dict]
    problems: str
    verdict: str


def validate_file(path: Path, tokenizer, *, fmt: str = "auto", max_length: int = 512, truncation: str = "truncate") -> DataCheck:
    """`tunelab data validate` as data: counts, examples per format, token-length histogram and
    every bad record with its `file:line` (the records are skipped and listed, not fatal)."""
    from tunelab.data.pipeline import validate_data

    report = validate_data(path, tokenizer, fmt=fmt, max_length=int(max_length), truncation=truncation, skip_invalid=True)
    stats = report.stats
    counts = [
        ["records read", stats.read],
        ["invalid records skipped", stats.invalid_skipped],
        ["exact duplicates removed", stats.duplicates_removed],
        [f"truncated to {report.max_length} tokens", stats.truncated],
        [f"dropped (longer than {report.max_length} tokens)", stats.dropped],
        ["examples kept", stats.examples],
        ["tokens", stats.tokens],
        ["trained tokens (targets)", stats.trained_tokens],
    ]
    histogram = [{"tokens": f"{low}-{high}", "examples": count} for low, high, count in report.histogram()]
    problems = ""
    if stats.problems:
        problems = f"{stats.invalid_skipped} invalid record(s); first {len(stats.problems)}:\n" + "\n".join(stats.problems)
    if stats.invalid_skipped:
        verdict = f"{stats.examples:,} examples usable; {stats.invalid_skipped:,} invalid records (see below)"
    else:
        verdict = f"ok: {stats.examples:,} examples ready for training"
    if report.chat_template_fallback:
        verdict += f" (the tokenizer has no chat template; used the fallback {report.chat_template_fallback!r})"
    formats = [[name, count] for name, count in sorted(stats.formats.items())]
    return DataCheck(counts, formats, histogram, problems, verdict)


def inspect_file_html(path: Path, tokenizer, *, n: int = 3, fmt: str = "auto", max_length: int = 512, train_on_prompt: bool = False) -> str:
    """`tunelab data inspect` as HTML: each example as the model sees it, trained tokens marked.

    The highlighting is `highlight_trained`'s own (a Rich Text whose spans carry the trained
    style); this only turns its spans into <mark> (trained) and <span class=untrained>.
    """
    from tunelab.data.pipeline import TRAINED_STYLE, highlight_trained, inspect_examples

    examples = inspect_examples(path, tokenizer, n=int(n), fmt=fmt, max_length=int(max_length), train_on_prompt=train_on_prompt)
    parts = ['<div class="tl-legend"><mark>trained (loss on these tokens)</mark> <span class="untrained">not trained</span></div>']
    for number, example in enumerate(examples, start=1):
        text = highlight_trained(example, tokenizer)
        pieces = []
        for span in text.spans:
            chunk = html.escape(text.plain[span.start : span.end])
            pieces.append(f"<mark>{chunk}</mark>" if str(span.style) == TRAINED_STYLE else f'<span class="untrained">{chunk}</span>')
        truncated = ", truncated" if example.truncated else ""
        header = f"example {number}: {example.source} ({example.format}, {len(example)} tokens, {example.num_trained} trained{truncated})"
        parts.append(f'<h4>{html.escape(header)}</h4><pre class="tl-example">{"".join(pieces)}</pre>')
    return "\n".join(parts)


# ----------------------------------------------------------------------------- configs and training


def config_files(workspace: Workspace) -> list[str]:
    """Example configs in ./configs (YAML and JSON), by name."""
    if not workspace.configs_dir.is_dir():
        return []
    return sorted(p.name for p in workspace.configs_dir.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def check_config_text(text: str, overrides: list[str] | None = None, source: str = "editor"):
    """Validate config text exactly as `tunelab config validate` does a file (same messages,
    located as `editor:LINE`); returns the RunConfig or raises ConfigError."""
    from tunelab.config import build_config, parse_config_text

    data, lines = parse_config_text(text, source)
    return build_config(data, overrides, source=source, lines=lines)


def newest_checkpoint(run_dir: Path) -> Path | None:
    from tunelab.checkpoint import latest_checkpoint

    return latest_checkpoint(run_dir / "checkpoints")


@dataclass
class TrainingJob:
    """A `tunelab train` process: started from this UI (`process`), or found running when the UI
    started (`process` None: a training of an earlier UI or the CLI, known by its run-folder lock)."""

    name: str
    run_dir: Path
    command: list[str]
    log_path: Path | None
    process: subprocess.Popen | None
    pid: int
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    killed: bool = False

    @property
    def adopted(self) -> bool:
        return self.process is None

    @property
    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        holder = running_holder(self.run_dir)
        return holder is not None and holder.get("pid") == self.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    def signal(self, sig: int) -> None:
        """Send `sig` to the training's whole process group (launcher, DataLoader and compile
        workers too), when the training leads its own group (the UI starts it so)."""
        if os.getpgid(self.pid) == self.pid:
            os.killpg(self.pid, sig)
        else:  # a CLI training in a shell's job group: only the trainer itself
            os.kill(self.pid, sig)

    def wait(self, seconds: float) -> bool:
        """True when the training ended within `seconds`."""
        if self.process is not None:
            try:
                self.process.wait(seconds)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.running:
                return True
            time.sleep(0.2)
        return not self.running


class TrainingManager:
    """Starts, watches and stops trainings: one at a time, each a `python -m tunelab train` process.

    The config (as edited) is saved as RUNS/.ui/NAME.yaml and run with `output.dir=RUNS
    output.name=NAME`, so the run lands in the runs folder; its output goes to RUNS/.ui/NAME.log.
    Configs that would run code from a model repository (`model.trust_remote_code: true`),
    delete a run's results (`output.overwrite: true`) or download from the Hugging Face Hub
    are refused unless the server was started with --allow-remote-code / --allow-overwrite /
    --allow-hub: anyone who can use the UI could otherwise do all three.
    """

    def __init__(self, workspace: Workspace, *, allow_remote_code: bool = False, allow_overwrite: bool = False,
                 allow_hub: bool = False):
        self.workspace = workspace
        self.allow_remote_code = allow_remote_code
        self.allow_overwrite = allow_overwrite
        self.allow_hub = allow_hub
        self.job: TrainingJob | None = None
        self._lock = threading.Lock()

    def adopt_running(self) -> str | None:
        """Take over the watch of a training still running in the runs folder (started by an
        earlier UI, or the CLI): its run-folder lock names it. Returns what was found."""
        for run in run_folders(self.workspace.runs_dir):
            holder = running_holder(run)
            if holder is not None:
                name = run_label(self.workspace.runs_dir, run)
                log = self.workspace.ui_dir / f"{name}.log"
                self.job = TrainingJob(name=name, run_dir=run, command=[holder.get("command", "")],
                                       log_path=log if log.is_file() else None, process=None, pid=int(holder["pid"]),
                                       started=float(holder.get("started", time.time())))
                return f"{name}: {describe_holder(holder)}"
        return None

    def _spawn(self, name: str, args: list[str], *, append_log: bool) -> TrainingJob:
        run_dir = self.workspace.run_dir(name)
        log_path = self.workspace.ui_dir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tunelab", "train", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120", "TERM": "dumb"}
        if not self.allow_hub:  # cached models still load; nothing is downloaded
            env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        with open(log_path, "a" if append_log else "w", encoding="utf-8") as log:
            log.write("$ tunelab train " + " ".join(args) + "\n")
            log.flush()
            # Own session and process group: a Ctrl-C in the UI's terminal is not sent to the
            # training too; Stop signals the whole group.
            process = subprocess.Popen(
                command, cwd=self.workspace.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return TrainingJob(name=name, run_dir=run_dir, command=command, log_path=log_path, process=process, pid=process.pid)

    def _claim(self, name: str) -> None:
        if self.job is not None and self.job.running:
            raise TunelabError(
                f"a training is already running: {self.job.name} (pid {self.job.pid}); one at a time\n"
                "  fix: wait for it to finish, or Stop it first"
            )
        holder = running_holder(self.workspace.run_dir(name))
        if holder is not None:  # a CLI training, or one of another UI
            raise TunelabError(f"run {name!r} is being trained by {describe_holder(holder)}\n"
                               "  fix: wait for it to finish, or stop that process first")

    def _check_allowed(self, config, where: str, *, resuming: bool = False) -> None:
        """Refuse the keys a UI user must not use unless the server allows them (see the class doc)."""
        refused = []
        if config.model.trust_remote_code and not self.allow_remote_code:
            refused.append("model.trust_remote_code: true runs code from the model's repository "
                           "(allowed only when the UI is started with --allow-remote-code)")
        if config.output.overwrite and not self.allow_overwrite and not resuming:  # a resume deletes nothing
            refused.append("output.overwrite: true deletes the results of the run it names "
                           "(allowed only with --allow-overwrite; pick a new run name instead)")
        if not self.allow_hub:
            for key, value in (("model.name", config.model.name), ("data.train", config.data.train),
                               ("data.eval", config.data.eval)):
                if value and not (self.workspace.cwd / Path(value).expanduser()).exists():
                    refused.append(f"{key}: {value!r} is not a local path, and this UI does not download from the "
                                   "Hugging Face Hub (allowed only with --allow-hub)")
        if refused:
            raise TunelabError(f"{where}: refused:\n  " + "\n  ".join(refused))

    def start(self, config_text: str, name: str, data: str | None = None) -> TrainingJob:
        """Validate the edited config (plus the UI's overrides) and start training it as run NAME."""
        from tunelab.files import write_text_atomic

        with self._lock:
            config = check_config_text(config_text)
            name = (name or "").strip() or config.output.name or "ui-run"
            if "/" in name:
                raise TunelabError(f"not a run name for a new run: {name!r}\n  fix: one folder name, no '/'")
            self._claim(name)
            overrides = [f"output.dir={self.workspace.runs_dir}", f"output.name={name}"]
            if data and data.strip():
                overrides.append(f"data.train={self.workspace.check_path(data, 'data file')}")
            config = check_config_text(config_text, overrides)
            self._check_allowed(config, "config")
            for key, value in (("data.train", config.data.train), ("data.eval", config.data.eval), ("model.name", config.model.name)):
                # Local paths only (the trainer runs in the working directory); hub ids are not files.
                if value and (self.workspace.cwd / Path(value).expanduser()).exists():
                    self.workspace.check_path(value, key)
            config_path = write_text_atomic(self.workspace.ui_dir / f"{name}.yaml", config_text)
            self.job = self._spawn(name, [str(config_path), *overrides], append_log=False)
            return self.job

    def resume(self, name: str) -> TrainingJob:
        """Continue run NAME from its newest checkpoint: `tunelab train RUNS/NAME/config.yaml --resume`."""
        from tunelab.config import load_config

        with self._lock:
            self._claim(name)
            run_dir = self.workspace.run_dir(name)
            if not (run_dir / "config.yaml").is_file():
                raise TunelabError(f"no run named {name!r} in {self.workspace.runs_dir}\n  fix: give the name of a stopped run")
            if newest_checkpoint(run_dir) is None:
                raise TunelabError(f"run {name!r} has no checkpoint to resume from\n  fix: start it again instead")
            config = load_config(run_dir / "config.yaml")
            self._check_allowed(config, f"{run_dir / 'config.yaml'}", resuming=True)
            args = [str(run_dir / "config.yaml"), "--resume", f"output.dir={run_dir.parent}", f"output.name={run_dir.name}"]
            self.job = self._spawn(name, args, append_log=True)
            return self.job

    def stop(self, grace_s: float = 60.0) -> str:
        """End the running training as the trainer expects: SIGINT (it finishes the step, writes a
        checkpoint and exits), then after `grace_s` a second signal (it stops at once; only
        complete checkpoints remain), then SIGKILL. Signals go to the training's process group.
        """
        job = self.job
        if job is None or not job.running:
            return "no training is running"
        job.stop_requested = True
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                job.signal(sig)
            except ProcessLookupError:
                break
            job.killed = sig == signal.SIGKILL
            if job.wait(wait_s):
                break
        return self.status()

    def status(self) -> str:
        job = self.job
        if job is None:
            return "no training started from this UI yet"
        if job.running:
            before = " (started before this UI)" if job.adopted else ""
            return f"training {job.name}: running{before} (pid {job.pid}, {time.time() - job.started:.0f} s)"
        code = job.returncode
        checkpoint = newest_checkpoint(job.run_dir)
        if job.adopted:
            how = "done" if (job.run_dir / "final").is_dir() else "ended"
            text = f"training {job.name}: {how} (started before this UI)"
        elif job.killed:
            text = f"training {job.name}: killed (it did not stop within the grace period)"
        else:
            how = "stopped" if job.stop_requested else ("finished" if code == 0 else "failed")
            text = f"training {job.name}: {how} (exit code {code})"
        if code != 0 and checkpoint is not None and not (job.run_dir / "final").is_dir():
            text += f"; newest checkpoint {checkpoint.name}: Resume continues from it"
        return text

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        job = self.job
        if job is None or job.log_path is None or not job.log_path.is_file():
            return ""
        with open(job.log_path, "rb") as handle:  # the end only: a long run's log can be large
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            text = ANSI.sub("", handle.read().decode("utf-8", errors="replace"))
        # Rich redraws progress lines with carriage returns: keep each line's last state.
        kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
        return "\n".join(kept[-lines:])

    def shutdown(self) -> None:
        """Stop a training this UI started when the UI exits (Ctrl-C, SIGTERM, SIGHUP): it would
        otherwise run on unattended. One found running at start-up is left to its owner."""
        if self.job is not None and not self.job.adopted and self.job.running:
            self.stop(grace_s=30.0)
