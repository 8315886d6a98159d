"""Hyperparameter search with Optuna around the same `train()`.

A study samples values for dotted config keys from a search space, runs each trial as an
ordinary run (`runs/hpo/STUDY/trial-K/`, made by `tunelab.train.train`), reports the eval
loss of every evaluation to a pruner, and records each trial in an Optuna storage:

    runs/hpo/STUDY/
      study.db        SQLite storage (default; `--storage URL` puts the trials in any RDB)
      trial-K/        the run folder of trial K (+ trial.json: state, params, value, message)
      results.csv     one row per trial: number, state, metric, params, seconds, message
      best.yaml       complete runnable config of the best trial
      report.html     optimization history, parallel coordinates, parameter importances

Counting: `--trials N` asks for N *finished* trials (complete, pruned or failed). A trial
whose worker died (killed, machine lost) is found by Optuna's heartbeat, marked failed as
"interrupted", not counted, and its parameters are queued to run again. Re-running the
command continues the study; several workers (processes, machines) share one study
through its storage and together run N trials.
"""

from __future__ import annotations

import csv
import fcntl
import gc
import io
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.config import (
    RunConfig,
    _yaml_line_index,
    apply_override,
    build_config,
    config_to_yaml,
    known_keys,
    parse_override,
    read_config_file,
    suggest_key,
)
from tunelab.console import console
from tunelab.errors import ConfigError, TunelabError
from tunelab.files import write_text_atomic

SAMPLERS = ("tpe", "grid", "random")
PRUNERS = ("median", "hyperband", "none")
# Metric -> the `evaluation.metrics` name that produces it (None: read from the training result).
METRICS: dict[str, str | None] = {
    "eval_loss": None,
    "eval_perplexity": None,
    "train_loss": None,
    "exact_match": "exact_match",
    "accuracy": "accuracy",
    "rouge1": "rouge",
    "rouge2": "rouge",
    "rougeL": "rouge",
    "bleu": "bleu",
    "macro_f1": None,
}
# A classifier run (task: classification) scores its eval split at the end of training
# (eval.json): these metrics are read from there, nothing is generated.
CLASSIFIER_METRICS = ("accuracy", "macro_f1")
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity", "train_loss")
# Keys the study sets itself: every trial writes its own folder and starts fresh.
RESERVED_KEYS = ("output", "training.resume")
# A worker records a heartbeat every HEARTBEAT_S seconds while it runs a trial; a running
# trial without one for GRACE_FACTOR heartbeats belongs to a dead worker and is failed + retried.
# Optuna's documented 60/120 s is the scale: a busy SQLite file (60 s busy timeout), an
# overloaded host or a sleeping laptop must not make a live trial look dead (--heartbeat).
HEARTBEAT_S = 30
GRACE_FACTOR = 4  # grace period = 4 heartbeats
DEFAULT_TRIALS = 20
# Trial failures the study records and goes on from: user-fixable problems (bad sampled
# config, bad data, divergence) and runtime ones (out of memory, CUDA / allocator errors).
TRIAL_FAILURES = (TunelabError, RuntimeError, MemoryError)


# --- the search space -------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One searched key: a float or int range (optionally log-scaled / stepped) or a list of choices."""

    key: str
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"key": self.key, "choices": list(self.choices)}
        return {"key": self.key, self.kind: [self.low, self.high], "log": self.log, "step": self.step}

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.key} in {list(self.choices)}"
        scale = ", log" if self.log else ""
        step = f", step {self.step:g}" if self.step else ""
        return f"{self.key}: {self.kind} [{self.low:g}, {self.high:g}{scale}{step}]"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_YAML11_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _number_or_value(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string; in a search space it means the number."""
    return float(value) if isinstance(value, str) and _YAML11_FLOAT.match(value) else value


def parse_dimension(key: str, spec: Any) -> Dimension:
    """`[8, 16]` -> choices; `{float: [lo, hi], log: true}` / `{int: [lo, hi], step: 2}` -> a range.

    Raises ValueError with the reason (the caller adds file, line and key).
    """
    if isinstance(spec, list):
        spec = {"categorical": spec}
    if isinstance(spec, dict):
        spec = {k: [_number_or_value(v) for v in val] if isinstance(val, list) else _number_or_value(val)
                for k, val in spec.items()}
    if not isinstance(spec, dict):
        raise ValueError(
            f"expected a list of choices, {{float: [low, high]}} or {{int: [low, high]}} (got {spec!r})"
        )
    kinds = [k for k in ("float", "int", "categorical") if k in spec]
    unknown = sorted(set(spec) - {"float", "int", "categorical", "log", "step"})
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}; a range takes float/int: [low, high], log, step")
    if len(kinds) != 1:
        raise ValueError("give exactly one of float: [low, high], int: [low, high] or a list of choices")
    kind = kinds[0]
    if kind == "categorical":
        choices = spec["categorical"]
        if not isinstance(choices, list) or not choices:
            raise ValueError("choices must be a non-empty list")
        for choice in choices:
            if not (choice is None or isinstance(choice, (str, int, float, bool))):
                raise ValueError(f"choice {choice!r} is not a single value (number, string, true/false, null)")
        if len(set(map(repr, choices))) != len(choices):
            raise ValueError("choices repeat a value")
        return Dimension(key, "categorical", choices=tuple(choices))
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)):
        raise ValueError(f"{kind}: needs [low, high] numbers (got {bounds!r})")
    low, high = bounds
    if kind == "int" and not all(float(b).is_integer() for b in bounds):
        raise ValueError(f"int: bounds must be whole numbers (got {bounds!r}); use float: for fractions")
    if not low < high:
        raise ValueError(f"low must be below high (got [{low}, {high}])")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"log: must be true or false (got {log!r})")
    if log and low <= 0:
        raise ValueError(f"log: true needs low > 0 (got {low})")
    step = spec.get("step")
    if step is not None and (not _is_number(step) or step <= 0 or (kind == "int" and not float(step).is_integer())):
        raise ValueError(f"step: must be a positive {'whole ' if kind == 'int' else ''}number (got {step!r})")
    if step is not None and log:
        raise ValueError("step and log: true cannot be combined")
    if kind == "int":
        return Dimension(key, "int", int(low), int(high), log, int(step) if step is not None else None)
    return Dimension(key, "float", float(low), float(high), log, float(step) if step is not None else None)


def probe_values(dim: Dimension) -> list[Any]:
    """Values that stand for the whole dimension when it is validated against the config."""
    if dim.kind == "categorical":
        return list(dim.choices)
    if dim.kind == "int":
        return [dim.low, dim.high]
    # An interior, non-integer value too: a float range over an integer key fails here.
    inner = math.exp(math.log(dim.low) + 0.382 * (math.log(dim.high) - math.log(dim.low))) if dim.log else (
        dim.low + 0.382 * (dim.high - dim.low)
    )
    return [dim.low, inner, dim.high]


def load_space(path: str | Path, base: dict[str, Any]) -> list[Dimension]:
    """Read and validate a search space file against the base config (dict form).

    Every problem is reported at once as `space.yaml:LINE: key: what (got X)`: unknown keys
    get a did-you-mean, malformed ranges say the accepted forms, and each value a range or
    choice list can produce is validated as that config key (wrong types name the key).
    """
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"search space file not found: {path}\n  fix: --space SPACE.yaml (a YAML mapping of dotted keys)")
    data, _ = read_config_file(path)
    lines = _yaml_line_index(path.read_text(encoding="utf-8"))
    keys = known_keys()
    sections = {k for k in keys if any(other.startswith(k + ".") for other in keys)}
    problems: list[str] = []
    dims: list[Dimension] = []
    for key, spec in data.items():
        key = str(key)
        where = f"{path}:{lines.get(key, 1)}: {key}"
        if key not in keys:
            suggestion = suggest_key(key)
            hint = f"; did you mean '{suggestion}'?" if suggestion else "; `tunelab config show` lists the keys"
            problems.append(f"{where}: unknown key{hint}")
            continue
        if key in sections:
            problems.append(f"{where}: is a section; search a key inside it, e.g. '{key}.{_first_child(key, keys)}'")
            continue
        if any(key == r or key.startswith(r + ".") for r in RESERVED_KEYS):
            problems.append(f"{where}: is set by the study for each trial and cannot be searched")
            continue
        try:
            dim = parse_dimension(key, spec)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            continue
        for value in probe_values(dim):
            candidate = json.loads(json.dumps(base))
            apply_override(candidate, key, value)
            try:
                build_config(candidate)
            except ConfigError as err:
                problems += [f"{path}:{lines.get(key, 1)}: {p}" for p in err.problems if p.startswith(key)]
        dims.append(dim)
    if not data and not problems:
        problems.append(f"{path}:1: the search space is empty; add keys such as 'training.learning_rate: {{float: [1e-5, 1e-3], log: true}}'")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)), source=f"search space {path}")
    return dims


def _first_child(section: str, keys: list[str]) -> str:
    return next(k for k in keys if k.startswith(section + ".")).split(".")[len(section.split("."))]


def grid_of(space: list[Dimension]) -> dict[str, list]:
    """The grid for `--sampler grid`: every dimension must be a list of choices (or a stepped int range)."""
    grid = {}
    for dim in space:
        if dim.kind == "categorical":
            grid[dim.key] = list(dim.choices)
        elif dim.kind == "int" and not dim.log:
            grid[dim.key] = list(range(int(dim.low), int(dim.high) + 1, int(dim.step or 1)))
        else:
            raise TunelabError(
                f"--sampler grid: {dim.describe()} is a continuous range.\n"
                "  fix: give it as a list of values (e.g. [1e-4, 3e-4, 1e-3]), or use --sampler tpe / random"
            )
    return grid


def suggest(trial, dim: Dimension) -> Any:
    """Ask the trial for this dimension's value."""
    if dim.kind == "categorical":
        return trial.suggest_categorical(dim.key, list(dim.choices))
    if dim.kind == "int":
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(dim.key, dim.low, dim.high, step=dim.step, log=dim.log)


# --- study setup ------------------------------------------------------------------------------


@dataclass
class StudyPlan:
    """Everything a worker needs: where, what is searched, how trials are judged and counted."""

    name: str
    directory: Path  # runs/hpo/STUDY: trial folders, outputs, lock (and SQLite storage by default)
    storage_url: str
    base: dict[str, Any]  # config file + CLI overrides, before sampling (dict form)
    config_path: str | None
    space: list[Dimension]
    n_trials: int
    timeout_s: float | None
    sampler: str
    pruner: str
    metric: str
    direction: str
    heartbeat_s: float = HEARTBEAT_S
    base_steps: int | None = None  # the base config's training.max_steps (pruner warm-up, hyperband)
    eval_steps: int | None = None  # its training.eval_steps: the steps at which trials report

    @property
    def grace_s(self) -> float:
        return self.heartbeat_s * GRACE_FACTOR

    @property
    def storage_shown(self) -> str:
        return safe_url(self.storage_url)


def safe_url(url: str) -> str:
    """A storage URL fit to print: the password replaced by *** (logs, CI output, scrollback)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses: hide anything between :// and @
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def config_hash(base: dict[str, Any]) -> str:
    """A short fingerprint of a study's base config (file + overrides), stored with the study."""
    import hashlib

    return hashlib.sha256(json.dumps(base, sort_keys=True).encode()).hexdigest()[:16]


def study_directory(output_dir: str | Path, name: str) -> Path:
    return Path(output_dir) / "hpo" / name


def default_storage(directory: Path) -> str:
    return f"sqlite:///{(directory / 'study.db').resolve()}"


def plan_study(
    config_path: str | Path,
    overrides: list[str],
    *,
    space_path: str | Path,
    n_trials: int | None,
    timeout_s: float | None,
    study_name: str | None,
    storage: str | None,
    sampler: str,
    pruner: str,
    metric: str,
    direction: str | None,
    heartbeat_s: float = HEARTBEAT_S,
) -> StudyPlan:
    """Validate every input (config, overrides, space, options) before any study exists."""
    if sampler not in SAMPLERS:
        raise TunelabError(f"--sampler: unknown sampler {sampler!r}\n  fix: one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise TunelabError(f"--pruner: unknown pruner {pruner!r}\n  fix: one of {', '.join(PRUNERS)}")
    if metric not in METRICS:
        raise TunelabError(f"--metric: unknown metric {metric!r}\n  fix: one of {', '.join(METRICS)}")
    direction = direction or ("minimize" if metric in LOWER_IS_BETTER else "maximize")
    if direction not in ("minimize", "maximize"):
        raise TunelabError(f"--direction: {direction!r} is neither minimize nor maximize")
    if heartbeat_s <= 0:
        raise TunelabError(f"--heartbeat must be a positive number of seconds, got {heartbeat_s:g}")
    if n_trials is not None and n_trials < 1:
        raise TunelabError(f"--trials must be at least 1, got {n_trials}")
    data, lines = read_config_file(config_path)
    base_config = build_config(data, overrides, source=str(config_path), lines=lines)
    for item in overrides:  # the base every trial starts from: file + command-line overrides
        key, value = parse_override(item)
        apply_override(data, key, value)
    if base_config.data.train is None:
        raise TunelabError(f"{config_path}: data.train is not set.\n  fix: data.train in the config, or data.train=PATH")
    has_eval = base_config.data.eval is not None or base_config.data.eval_fraction > 0
    if metric.startswith("eval_") and not has_eval:
        raise TunelabError(
            f"--metric {metric} needs evaluation data, and {config_path} has none.\n"
            "  fix: data.eval=FILE or data.eval_fraction=0.1"
        )
    classifier = base_config.task == "classification"
    if metric == "macro_f1" and not classifier:
        raise TunelabError("--metric macro_f1 scores classifiers (task: classification)\n  fix: --metric exact_match, accuracy, rougeL, bleu or eval_loss")
    if classifier and metric not in (*CLASSIFIER_METRICS, *LOWER_IS_BETTER):
        raise TunelabError(f"--metric {metric} scores generated answers; a classifier run offers {', '.join(CLASSIFIER_METRICS)} "
                           f"or {', '.join(LOWER_IS_BETTER)}\n  fix: --metric accuracy")
    if classifier and metric in CLASSIFIER_METRICS and not has_eval:
        raise TunelabError(f"--metric {metric} is measured on the eval split, and {config_path} has none.\n"
                           "  fix: data.eval=FILE or data.eval_fraction=0.1")
    if METRICS[metric] is not None and base_config.data.eval is None and not classifier:
        raise TunelabError(
            f"--metric {metric} is scored by generating answers to data.eval, which is not set.\n"
            "  fix: data.eval=FILE (prompts with reference answers), or --metric eval_loss"
        )
    space = load_space(space_path, data)
    if sampler == "grid":
        size = math.prod(len(values) for values in grid_of(space).values())
        n_trials = min(n_trials or size, size)
    name = study_name or f"{Path(config_path).stem}-{Path(space_path).stem}"
    if not name or "/" in name or name.startswith("."):
        raise TunelabError(f"--study: {name!r} is not a usable folder name")
    directory = study_directory(base_config.output.dir, name)
    return StudyPlan(
        name=name, directory=directory, storage_url=storage or default_storage(directory), base=data,
        config_path=str(config_path), space=space, n_trials=n_trials or DEFAULT_TRIALS, timeout_s=timeout_s,
        sampler=sampler, pruner=pruner, metric=metric, direction=direction, heartbeat_s=heartbeat_s,
        base_steps=base_config.training.max_steps, eval_steps=base_config.training.eval_steps,
    )


def open_storage(url: str, heartbeat_s: float = HEARTBEAT_S):
    """An Optuna RDB storage with heartbeats, so trials of dead workers are failed and retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    # SQLite: wait for the other worker's write instead of failing with "database is locked".
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=max(1, round(heartbeat_s)),
                grace_period=max(2, round(heartbeat_s * GRACE_FACTOR)),
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
    except ImportError as err:
        raise TunelabError(f"--storage {safe_url(url)}: the database driver is not installed ({err}).\n"
                           "  fix: pip install psycopg2-binary (PostgreSQL) or pymysql (MySQL)") from None
    except Exception as err:  # SQLAlchemy: bad URL, unreachable server, wrong password
        detail = str(err).replace(url, safe_url(url))
        raise TunelabError(f"--storage {safe_url(url)}: cannot open the study storage: {detail}") from None


def make_sampler(name: str, space: list[Dimension], n_trials: int):
    import optuna

    if name == "grid":
        return optuna.samplers.GridSampler(grid_of(space))
    if name == "random":
        return optuna.samplers.RandomSampler()
    # Random start-up trials before TPE models the results: a third of the study, 2..10.
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(2, n_trials // 3)))


def make_pruner(name: str, *, n_trials: int = 20, max_steps: int | None = None, eval_steps: int | None = None):
    """median: stop a trial whose eval loss is worse than the median of finished trials at the
    same step, once a quarter of the study (2..5 trials, Optuna's default is 5) completed and
    after the first quarter of the steps (low learning rates and long warm-ups start slowly:
    judged at the first evaluation they would all be pruned);
    hyperband: successive halving over steps, its smallest budget one evaluation interval
    (trials report only at evaluations) and its largest the run's steps."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, n_trials // 4)), n_warmup_steps=(max_steps or 0) // 4)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=eval_steps or 1, max_resource=max_steps or "auto",
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


class StudyLock:
    """An exclusive lock (flock on STUDY/.lock) between the workers of this machine.

    It covers the steps that must not interleave: creating the storage, counting trials and
    creating the next one, so that N is exact. `release` may be called early (the trial
    releases it as soon as it exists) and again on exit.
    """

    def __init__(self, directory: Path):
        self.path = directory / ".lock"
        self.handle = None

    def __enter__(self) -> StudyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None

    def __exit__(self, *exc) -> None:
        self.release()


def open_study(plan: StudyPlan):
    """Create the study or load it; a study is bound to its space, metric, direction and base
    config: a worker with other settings would mix incomparable trials into it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report each trial
    storage = open_storage(plan.storage_url, plan.heartbeat_s)
    space = [d.as_dict() for d in plan.space]
    study = optuna.create_study(
        study_name=plan.name,
        storage=storage,
        sampler=make_sampler(plan.sampler, plan.space, plan.n_trials),
        pruner=make_pruner(plan.pruner, n_trials=plan.n_trials, max_steps=plan.base_steps, eval_steps=plan.eval_steps),
        direction=plan.direction,
        load_if_exists=True,
    )
    attrs = study.user_attrs
    base = json.loads(json.dumps(plan.base))  # as the storage gives it back (JSON)
    if "space" not in attrs:
        study.set_user_attr("space", space)
        study.set_user_attr("metric", plan.metric)
        study.set_user_attr("config", base)
        study.set_user_attr("config_hash", config_hash(base))
        study.set_user_attr("config_path", plan.config_path)
        return study
    where = f"study {plan.name!r} ({plan.storage_shown})"
    if attrs["space"] != space or attrs.get("metric") != plan.metric:
        raise TunelabError(
            f"{where} was started with another search space or metric "
            f"({attrs.get('metric')}), so its trials cannot be compared with new ones.\n"
            "  fix: --study NEW_NAME for a new study, or the original --space / --metric to continue it"
        )
    stored_direction = study.direction.name.lower()
    if stored_direction != plan.direction:
        raise TunelabError(
            f"{where} {stored_direction}s {plan.metric}; this worker would {plan.direction} it (pruning and the "
            "best trial would be inverted).\n"
            f"  fix: --direction {stored_direction} (or leave it out), or --study NEW_NAME"
        )
    if "config" in attrs and attrs["config"] != base:
        changed = sorted(differing_keys(attrs["config"], base))
        raise TunelabError(
            f"{where} was started from another base config (hash {attrs.get('config_hash') or config_hash(attrs['config'])}, "
            f"this one {config_hash(base)}); differing: {', '.join(changed[:8])}.\n"
            f"  fix: the study's own config ({attrs.get('config_path')}) and overrides, or --study NEW_NAME"
        )
    return study


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


# --- counting ---------------------------------------------------------------------------------


def is_interrupted(trial) -> bool:
    """Failed without a recorded reason: its worker died (heartbeat) or crashed; not counted."""
    from optuna.trial import TrialState

    return trial.state == TrialState.FAIL and "message" not in trial.user_attrs


@dataclass
class Counts:
    finished: int  # complete + pruned + failed (interrupted ones excluded): what N counts
    running: int
    waiting: int  # queued retries of interrupted trials


def count_trials(study) -> Counts:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = sum(1 for t in trials if t.state.is_finished() and not is_interrupted(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return Counts(finished, running, waiting)


def fail_stale_trials(study) -> None:
    """Fail running trials whose worker stopped sending heartbeats (and queue their retries)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# --- one trial --------------------------------------------------------------------------------


def trial_config(plan: StudyPlan, params: dict[str, Any], number: int, *, resume: bool = False) -> RunConfig:
    """The trial's full config: base + sampled values + its own run folder; validated.
    `resume`: continue trial `number`'s folder from its newest checkpoint (a stopped trial)."""
    data = json.loads(json.dumps(plan.base))
    for key, value in params.items():
        apply_override(data, key, value)
    for key, value in (("output.dir", str(plan.directory)), ("output.name", f"trial-{number}"),
                       ("output.overwrite", False), ("training.resume", "auto" if resume else False)):
        apply_override(data, key, value)
    try:
        return build_config(data)
    except ConfigError as err:
        raise ConfigError(err.problems, source=f"trial {number} ({format_params(params)})") from None


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in params.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Diverged(TunelabError):
    """The trial's loss stopped being a number."""


def metric_value(metric: str, config: RunConfig, result) -> float:
    """The trial's objective value from its training result (or a generation evaluation)."""
    if metric in ("eval_loss", "eval_perplexity"):
        if result.eval_loss is None:
            raise TunelabError("the run made no evaluation, so it has no eval loss")
        return result.eval_loss if metric == "eval_loss" else math.exp(min(result.eval_loss, 50))
    if metric == "train_loss":
        if result.train_loss is None:
            raise TunelabError("the run logged no training loss")
        return result.train_loss
    if config.task == "classification":  # scored on the eval split when training ended
        return float(json.loads((result.run_dir / "eval.json").read_text())[metric])
    from tunelab.evaluate import data_label, evaluate_model, load_eval_examples, save_evaluation

    d, e = config.data, config.evaluation
    examples = load_eval_examples(
        d.eval, limit=e.limit, fmt=d.format, fields=d.fields.model_dump() if d.fields else None, split=d.eval_split or "test"
    )
    result.model.eval()
    evaluation = evaluate_model(
        result.model, result.tokenizer, examples, metrics=[METRICS[metric]], batch_size=e.batch_size,
        max_new_tokens=e.max_new_tokens, answer_regex=e.answer_regex,
    )
    save_evaluation(result.run_dir, data_label(d.eval), evaluation)
    return float(evaluation.scores[metric])


def stop_and_requeue(study, trial, params: dict[str, Any], folder: int, why: str) -> None:
    """A trial stopped by Ctrl-C / SIGTERM: not finished (not counted), not lost: the same
    parameters are queued to continue in the same run folder from its newest checkpoint."""
    trial.set_user_attr("stopped", why)
    study.enqueue_trial(params, user_attrs={"resume_of": folder}, skip_if_exists=False)


def run_trial(trial, plan: StudyPlan, unlock, stops: list) -> float:
    """Optuna objective: sample, validate, train (reporting each eval loss), score.

    `unlock` releases the study lock, held from counting until this trial exists. A trial
    queued by `stop_and_requeue` (user attr `resume_of`) continues that trial's run folder.
    A Ctrl-C / SIGTERM stops the trial after its checkpoint; the stop is appended to `stops`
    for the worker loop, which then ends the study (the exception itself Optuna would catch).
    """
    import optuna
    import torch

    from tunelab.errors import TrainingInterrupted
    from tunelab.train import train

    unlock()
    started = time.time()
    params = {dim.key: suggest(trial, dim) for dim in plan.space}
    folder = int(trial.user_attrs.get("resume_of", trial.number))
    run_dir = plan.directory / f"trial-{folder}"
    trial.set_user_attr("run_dir", str(run_dir))
    console.rule(f"trial {trial.number}: {format_params(params)}", style="dim")

    def report(step: int, eval_loss: float) -> None:
        if not math.isfinite(eval_loss):
            raise Diverged(f"diverged: eval loss is {eval_loss} at step {step}")
        # Pruners compare intermediate values in the study's direction; eval loss is lower-better.
        trial.report(eval_loss if plan.direction == "minimize" else -eval_loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: eval loss {eval_loss:.4f} ({plan.pruner} pruner)")

    def record(state: str, value: float | None, message: str | None) -> None:
        info = {"number": trial.number, "state": state, "params": params, "metric": plan.metric,
                "value": value, "seconds": round(time.time() - started, 2), "message": message}
        if run_dir.is_dir():
            write_text_atomic(run_dir / "trial.json", json.dumps(info, indent=2) + "\n")

    try:
        config = trial_config(plan, params, folder, resume=folder != trial.number)
        result = train(config, config_path=plan.config_path, on_eval=report)
        if result.train_loss is not None and not math.isfinite(result.train_loss):
            raise Diverged(f"diverged: training loss is {result.train_loss}")
        value = metric_value(plan.metric, config, result)
        if not math.isfinite(value):
            raise Diverged(f"diverged: {plan.metric} is {value}")
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        record("complete", value, None)
        console.print(f"[green]trial {trial.number} complete[/]: {plan.metric} {value:.4f}", highlight=False)
        return value
    except TrainingInterrupted as err:
        why = str(err).splitlines()[0]
        stop_and_requeue(trial.study, trial, params, folder, f"{why}; the next `tunelab hpo` continues it")
        record("interrupted", None, why)
        stops.append(err)
        raise
    except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM: stopped at once, complete checkpoints only
        import signal

        stop_and_requeue(trial.study, trial, params, folder,
                         "stopped at once (second signal); the next `tunelab hpo` continues from its newest checkpoint")
        record("interrupted", None, "stopped at once")
        stops.append(TrainingInterrupted(f"trial {trial.number} stopped at once", signal.SIGINT))
        raise
    except optuna.TrialPruned as err:
        trial.set_user_attr("message", str(err))
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        record("pruned", None, str(err))
        console.print(f"[yellow]trial {trial.number} {err}[/]", highlight=False)
        raise
    except TRIAL_FAILURES as err:
        message = str(err).strip() or type(err).__name__
        if isinstance(err, torch.OutOfMemoryError) or "out of memory" in message.lower():
            message = f"out of memory: {message.splitlines()[0]}"
        trial.set_user_attr("message", message)
        trial.set_user_attr("seconds", round(time.time() - started, 2))
        record("failed", None, message)
        console.print(f"[red]trial {trial.number} failed[/]: {message}", highlight=False, soft_wrap=True)
        raise
    except Exception as err:  # a bug or an unexpected error: recorded as a crash, the worker stops
        trial.set_user_attr("crashed", f"{type(err).__name__}: {str(err).strip()[:300]}")
        record("crashed", None, f"{type(err).__name__}: {err}")
        raise
    finally:
        # A pruned or failed trial's traceback holds the model: free it before the next trial.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the worker loop --------------------------------------------------------------------------


def run_study(plan: StudyPlan) -> Any:
    """Work on the study until it holds `plan.n_trials` finished trials (or the timeout).

    Each round, under the study lock: fail trials of dead workers, count, and create the next
    trial. When every remaining slot is taken by a trial running elsewhere, wait for it (it
    may belong to a dead worker and come back as a retry). results.csv and best.yaml are
    rewritten after every trial. Ctrl-C / SIGTERM: the running trial checkpoints and is queued
    to continue, the outputs are written, and TrainingInterrupted (exit 128 + signal) ends the
    worker; a signal between trials stops before the next one. Returns the study.
    """
    from tunelab.errors import TrainingInterrupted
    from tunelab.stopping import StopRequest

    started = time.time()
    with StudyLock(plan.directory):
        study = open_study(plan)
    console.print(
        f"[bold]study[/] {plan.name}: {plan.n_trials} trials, sampler {plan.sampler}, pruner {plan.pruner}, "
        f"{plan.direction} {plan.metric}\n  storage {plan.storage_shown}\n  space: "
        + "; ".join(d.describe() for d in plan.space),
        highlight=False,
    )
    waited = False
    stops: list[TrainingInterrupted] = []
    with StopRequest() as between_trials:
        try:
            while not stops and between_trials.signum is None:
                if plan.timeout_s is not None and time.time() - started > plan.timeout_s:
                    console.print(f"[yellow]--timeout {plan.timeout_s:g}s reached[/]: no new trials from this worker")
                    break
                with StudyLock(plan.directory) as lock:
                    fail_stale_trials(study)
                    counts = count_trials(study)
                    if counts.finished >= plan.n_trials:
                        break
                    free = plan.n_trials - counts.finished - counts.running - counts.waiting
                    if counts.waiting == 0 and free <= 0:
                        if not waited:
                            console.print(f"waiting for {counts.running} trial(s) running in other workers", highlight=False)
                            waited = True
                        lock.release()
                        time.sleep(plan.heartbeat_s)
                        continue
                    waited = False
                    study.optimize(lambda trial: run_trial(trial, plan, lock.release, stops), n_trials=1,
                                   catch=TRIAL_FAILURES)
                write_outputs(study, plan, report=False)
        except KeyboardInterrupt:  # a second signal outside a trial's training loop
            stops.append(TrainingInterrupted("stopped at once", 2))
    write_outputs(study, plan)
    signum = stops[0].signum if stops else between_trials.signum
    if signum:
        import signal

        raise TrainingInterrupted(
            f"study {plan.name} stopped by {signal.Signals(signum).name}"
            + (f" ({stops[0]})" if stops else " between trials") + ".\n"
            "  the stopped trial is not counted and continues from its checkpoint: run the same `tunelab hpo` "
            "command again to go on",
            signum,
        )
    return study


# --- outputs ----------------------------------------------------------------------------------


@dataclass
class TrialRow:
    number: int
    state: str  # complete, pruned, failed, interrupted, running, waiting
    value: float | None
    params: dict[str, Any]
    seconds: float | None
    message: str


def trial_rows(study) -> list[TrialRow]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
                 TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}[t.state]
        message = t.user_attrs.get("message", "")
        if "stopped" in t.user_attrs:  # Ctrl-C / SIGTERM: checkpointed, queued to continue
            state, message = "interrupted", t.user_attrs["stopped"]
        elif "crashed" in t.user_attrs:
            state, message = "crashed", f"{t.user_attrs['crashed']} (see the worker's log)"
        elif is_interrupted(t):
            state, message = "interrupted", "worker died (no heartbeat); its parameters are run again"
        if "resume_of" in t.user_attrs and not message:
            message = f"continues trial {t.user_attrs['resume_of']} from its checkpoint"
        if "failed_trial" in t.system_attrs and not message:
            message = f"retry of trial {t.system_attrs['failed_trial']}"
        seconds = t.user_attrs.get("seconds")
        if seconds is None and t.datetime_start and t.datetime_complete:
            seconds = round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
        rows.append(TrialRow(t.number, state, t.value if t.state == TrialState.COMPLETE else None,
                             dict(t.params), seconds, message))
    return rows


def results_table(study, metric: str, direction: str):
    """A Rich table: trial, state, metric, one column per parameter, seconds, message."""
    from rich.table import Table

    rows = trial_rows(study)
    keys = list(dict.fromkeys(k for row in rows for k in row.params))
    best = best_trial(study)
    arrow = "↓" if direction == "minimize" else "↑"
    table = Table(title=f"study {study.study_name}: {metric} {arrow}", title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column("state")
    table.add_column(metric, justify="right")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("time", justify="right")
    table.add_column("message", overflow="fold")
    colours = {"complete": "green", "pruned": "yellow", "failed": "red", "interrupted": "magenta"}
    for row in rows:
        mark = " *" if best is not None and row.number == best.number else ""
        table.add_row(
            f"{row.number}{mark}",
            f"[{colours.get(row.state, 'white')}]{row.state}[/]",
            f"{row.value:.4f}" if row.value is not None else "",
            *[_short(row.params[k]) if k in row.params else "" for k in keys],
            f"{row.seconds:.0f}s" if row.seconds is not None else "",
            row.message,
        )
    return table


def best_trial(study):
    """The best complete trial, or None when no trial completed."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def write_outputs(study, plan: StudyPlan, *, report: bool = True) -> None:
    """results.csv, best.yaml and (`report`) report.html in the study folder, each written
    atomically; the first two after every trial, the report (several MB) at the end."""
    rows = trial_rows(study)
    keys = list(dict.fromkeys(k for row in rows for k in row.params))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", plan.metric, *keys, "seconds", "message"])
    for row in rows:
        writer.writerow([row.number, row.state, row.value, *[row.params.get(k, "") for k in keys], row.seconds, row.message])
    write_text_atomic(plan.directory / "results.csv", buffer.getvalue())
    best = best_trial(study)
    if best is not None:
        write_text_atomic(plan.directory / "best.yaml", best_config_yaml(plan, best))
    if report:
        write_text_atomic(plan.directory / "report.html", study_report_html(study, plan.metric))


def best_config_yaml(plan: StudyPlan, best) -> str:
    """The best trial's complete config, writing its own run folder `<output.dir>/STUDY-best`.

    It is the config the trial itself trained with (its run folder's config.yaml), not this
    worker's base plus the trial's values: that reproduces the trial even when the base
    changed. Trials of old studies without a config.yaml fall back to base + values.
    """
    import yaml

    trial_yaml = Path(best.user_attrs.get("run_dir", "")) / "config.yaml"
    if best.user_attrs.get("run_dir") and trial_yaml.is_file():
        data = yaml.safe_load(trial_yaml.read_text(encoding="utf-8"))
    else:
        data = json.loads(json.dumps(plan.base))
        for key, value in best.params.items():
            apply_override(data, key, value)
    base_output = build_config(plan.base).output
    apply_override(data, "output.dir", base_output.dir)
    apply_override(data, "output.name", f"{plan.name}-best")
    apply_override(data, "training.resume", False)
    config = build_config(data)
    header = (
        f"# best trial {best.number} of study {plan.name}: {plan.metric} {best.value:.6g}\n"
        f"# searched: {format_params(best.params)}\n"
        f"# train it: tunelab train {plan.directory / 'best.yaml'}\n"
    )
    return header + config_to_yaml(config)


def study_report_html(study, metric: str) -> str:
    """One HTML page: the results table and Optuna's plotly figures (plotly.js inlined: offline)."""
    import html

    import optuna.visualization as vis
    from optuna.trial import TrialState
    from rich.console import Console

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    sections = []
    table_console = Console(record=True, width=160, file=io.StringIO())
    table_console.print(results_table(study, metric, study.direction.name.lower()))
    sections.append(f"<h2>Trials</h2><pre>{html.escape(table_console.export_text())}</pre>")
    figures = [("Optimization history", vis.plot_optimization_history, 1),
               ("Parallel coordinates", vis.plot_parallel_coordinate, 1),
               ("Parameter importances", vis.plot_param_importances, 2),
               ("Intermediate values (eval loss per step)", vis.plot_intermediate_values, 1)]
    include_js: bool | str = True  # the first figure carries plotly.js; later ones reuse it
    for title, plot, needed in figures:
        if len(complete) < needed:
            sections.append(f"<h2>{title}</h2><p>needs {needed} complete trial(s); the study has {len(complete)}.</p>")
            continue
        try:
            figure = plot(study, target_name=metric) if plot is not vis.plot_intermediate_values else plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances of a parameter that never varied
            sections.append(f"<h2>{title}</h2><p>not available: {html.escape(str(err))}</p>")
            continue
        sections.append(f"<h2>{title}</h2>" + figure.to_html(full_html=False, include_plotlyjs=include_js))
        include_js = False
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>study {html.escape(study.study_name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px} pre{font-size:12px}</style></head><body>"
        f"<h1>Study {html.escape(study.study_name)}</h1>" + "".join(sections) + "</body></html>\n"
    )


def load_existing_study(study: str, *, storage: str | None, output_dir: str = "runs"):
    """Open a study for `tunelab hpo show`: by folder (runs/hpo/NAME or a path) or by name + --storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines report each trial
    path = Path(study)
    if storage is None:
        folder = path if (path / "study.db").is_file() else study_directory(output_dir, study)
        if not (folder / "study.db").is_file():
            raise TunelabError(
                f"no study {study!r}: neither {path}/study.db nor {folder}/study.db exists.\n"
                f"  fix: the study name (ls {Path(output_dir) / 'hpo'}) or folder, or --storage URL for a shared database"
            )
        storage, name = default_storage(folder), folder.name
    else:
        name = path.name
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage=open_storage(storage))]
        raise TunelabError(f"{safe_url(storage)} has no study {name!r} (it has: {', '.join(names) or 'none'})") from None


def show_summary(study) -> str:
    """Counts and the best trial, one line each, printed under the table."""
    rows = trial_rows(study)
    counts = {state: sum(1 for r in rows if r.state == state) for state in
              ("complete", "pruned", "failed", "interrupted", "running", "waiting")}
    text = "  ".join(f"{n} {state}" for state, n in counts.items() if n)
    best = best_trial(study)
    metric = study.user_attrs.get("metric", "value")
    if best is not None:
        text += f"\nbest: trial {best.number}, {metric} {best.value:.4f} ({format_params(best.params)})"
    return text
