"""`tunelab hpo`: search-space validation, a complete study, pruning and failures, a killed
study resumed, two workers on one SQLite study. Tiny random Llama, 4 steps per trial, fp32."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from tunelab.config import load_config
from tunelab.data.synthetic import reasoning_problems
from tunelab.errors import ConfigError, TunelabError
from tunelab.hpo import StudyLock, load_space, open_study, plan_study, run_study
from tunelab.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, tiny_model_dir) -> Path:
    """A folder with train.jsonl and base.yaml (tiny model, 4 steps, eval every 2 steps)."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(32, seed=3)))
    base = {
        "model": {"name": str(tiny_model_dir)},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval_fraction": 0.25, "max_seq_length": 256},
        "lora": {"r": 4, "alpha": 8},
        "training": {"batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4, "eval_steps": 2,
                     "warmup_steps": 0, "logging_steps": 1, "precision": "fp32", "learning_rate": 0.005},
        "output": {"dir": "runs"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    return tmp_path


def write_space(folder: Path, text: str) -> Path:
    path = folder / "space.yaml"
    path.write_text(text)
    return path


def plan(workdir: Path, space: Path, **options):
    settings = dict(n_trials=None, timeout_s=None, study_name=None, storage=None, sampler="tpe", pruner="median",
                    metric="eval_loss", direction=None)
    settings.update(options)
    return plan_study(workdir / "base.yaml", [f"output.dir={workdir / 'runs'}"], space_path=space, **settings)


def study_at(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


def tunelab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_space_problems_are_all_reported_with_line_key_and_fix(tmp_path):
    space = write_space(tmp_path, (
        "training.lerning_rate: {float: [1e-5, 1e-3], log: true}\n"  # typo
        "lora.r: {float: [4, 16]}\n"                                  # float range over an int key
        "training.batch_size: {int: [0, 8]}\n"                        # 0 is not a valid batch size
        "lora.dropout: {float: [0.5, 0.1]}\n"                         # bounds reversed
        "training: [1, 2]\n"                                          # a section
        "output.name: [a, b]\n"                                       # set by the study itself
        "training.lr_scheduler: [cosine, cosnie]\n"                   # bad choice
        "training.warmup_steps: {int: [0, 10], log: true}\n"          # log with low 0
    ))
    with pytest.raises(ConfigError) as err:
        load_space(space, {})
    problems = err.value.problems
    expected = [
        "space.yaml:1: training.lerning_rate: unknown key; did you mean 'training.learning_rate'?",
        "space.yaml:2: lora.r: Input should be a valid integer, got a number with a fractional part",
        "space.yaml:3: training.batch_size: Input should be greater than or equal to 1 (got 0)",
        "space.yaml:4: lora.dropout: low must be below high (got [0.5, 0.1])",
        "space.yaml:5: training: is a section; search a key inside it",
        "space.yaml:6: output.name: is set by the study for each trial",
        "space.yaml:7: training.lr_scheduler: Input should be 'cosine', 'linear' or 'constant' (got 'cosnie')",
        "space.yaml:8: training.warmup_steps: log: true needs low > 0 (got 0)",
    ]
    assert len(problems) == len(expected), problems
    for problem, start in zip(problems, expected):
        assert problem.split("/")[-1].startswith(start), (problem, start)
    good = load_space(write_space(tmp_path, "training.learning_rate: {float: [1e-5, 1e-3], log: true}\nlora.r: [4, 8]\n"), {})
    assert [(d.key, d.kind, d.low, d.high, d.log, d.choices) for d in good] == [
        ("training.learning_rate", "float", 1e-5, 1e-3, True, ()), ("lora.r", "categorical", None, None, False, (4, 8))]


def test_bad_space_on_the_command_line_is_one_message_exit_2(workdir):
    write_space(workdir, "lora.rank: [4, 8]\n")
    result = tunelab("hpo", "base.yaml", "--space", "space.yaml", "--trials", "2", cwd=workdir)
    assert result.returncode == 2
    assert "space.yaml:1: lora.rank: unknown key; did you mean 'lora.r'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists()


def test_a_study_is_bound_to_its_space_and_metric(workdir):
    first = plan(workdir, write_space(workdir, "lora.r: [2, 4]\n"), study_name="bound")
    with StudyLock(first.directory):
        open_study(first)
    other = plan(workdir, write_space(workdir, "lora.r: [2, 8]\n"), study_name="bound")
    with pytest.raises(TunelabError, match="started with another search space or metric"):
        open_study(other)
    open_study(first)  # the same space loads the study again


def test_timeout_stops_the_worker_before_a_new_trial(workdir):
    study = run_study(plan(workdir, write_space(workdir, "lora.r: [2, 4]\n"), study_name="late", timeout_s=0))
    assert study.get_trials() == []
    folder = workdir / "runs" / "hpo" / "late"
    assert (folder / "results.csv").read_text().splitlines() == ["trial,state,eval_loss,seconds,message"]
    assert not (folder / "best.yaml").exists() and (folder / "report.html").is_file()


def test_four_trial_study_completes_and_best_config_trains_to_the_same_loss(workdir):
    space = write_space(workdir, "training.learning_rate: {float: [1e-3, 2e-2], log: true}\nlora.r: [2, 4]\n")
    study_plan = plan(workdir, space, n_trials=4, pruner="none")
    study = run_study(study_plan)
    folder = workdir / "runs" / "hpo" / "base-space"
    assert study_plan.directory == folder
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    for t in trials:  # each trial is an ordinary run folder with its sampled values
        run = folder / f"trial-{t.number}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["training"]["learning_rate"] == t.params["training.learning_rate"]
        assert config["lora"]["r"] == t.params["lora.r"]
        assert json.loads((run / "eval.json").read_text())["eval_loss"] == pytest.approx(t.value, abs=1e-12)
        assert (run / "final" / "adapter_model.safetensors").is_file()
        assert json.loads((run / "trial.json").read_text())["state"] == "complete"
    best = min(trials, key=lambda t: t.value)
    assert study.best_trial.number == best.number
    rows = (folder / "results.csv").read_text().splitlines()
    assert rows[0] == "trial,state,eval_loss,training.learning_rate,lora.r,seconds,message" and len(rows) == 5
    report = (folder / "report.html").read_text()
    for title in ("Optimization history", "Parallel coordinates", "Parameter importances"):
        assert f"<h2>{title}</h2>" in report
    assert report.count("Plotly.newPlot(") == 4 and "<p>not available" not in report  # 4 figures drawn

    best_config = load_config(folder / "best.yaml", [f"output.dir={workdir / 'runs'}"])
    assert best_config.training.learning_rate == best.params["training.learning_rate"]
    assert best_config.lora.r == best.params["lora.r"] and best_config.output.name == "base-space-best"
    retrained = train(best_config, quiet=True)  # same config, same seed: the same eval loss
    assert retrained.eval_loss == pytest.approx(best.value, rel=1e-5)


def test_diverging_learning_rate_is_pruned_and_failing_trials_do_not_stop_the_study(workdir):
    # The grid's order is Optuna's seeded shuffle (the same in every worker): here two sane
    # rates come first, then lr 1.0 (diverges), and max_seq_length 16 leaves no reply token
    # after truncation (a data error) for three trials.
    space = write_space(workdir, "training.learning_rate: [1.0, 0.004, 0.006]\ndata.max_seq_length: [256, 16]\n")
    study = run_study(plan(workdir, space, sampler="grid", pruner="median"))
    order = [(t.params["data.max_seq_length"], t.params["training.learning_rate"]) for t in study.get_trials()]
    assert order == [(16, 0.006), (256, 0.006), (256, 0.004), (16, 1.0), (256, 1.0), (16, 0.004)]
    trials = {(t.params["training.learning_rate"], t.params["data.max_seq_length"]): t for t in study.get_trials()}
    assert len(trials) == 6 and len(study.get_trials()) == 6
    State = optuna.trial.TrialState
    assert trials[0.004, 256].state == State.COMPLETE and trials[0.006, 256].state == State.COMPLETE
    diverged = trials[1.0, 256]
    assert diverged.state == State.PRUNED, (diverged.state, diverged.intermediate_values)
    assert diverged.user_attrs["message"].startswith("pruned at step 2: eval loss")
    median = sorted(trials[lr, 256].intermediate_values[2] for lr in (0.004, 0.006))
    assert diverged.intermediate_values[2] > max(median)
    for lr in (0.004, 0.006, 1.0):
        failed = trials[lr, 16]
        assert failed.state == State.FAIL
        assert "all labels are masked" in failed.user_attrs["message"], failed.user_attrs
    assert study.best_trial.params["training.learning_rate"] != 1.0


def test_hyperband_pruner_study_runs_every_trial_and_reports_each_evaluation(workdir):
    """`--pruner hyperband`: every trial reports its step-2 eval loss to the pruner and ends
    complete or pruned; the best trial is the lowest complete eval loss. (Whether hyperband
    prunes a given trial depends on its brackets, so no particular trial is asserted pruned.)"""
    space = write_space(workdir, "training.learning_rate: [0.004, 0.006, 0.02]\n")
    study = run_study(plan(workdir, space, sampler="grid", pruner="hyperband"))
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    State = optuna.trial.TrialState
    trials = study.get_trials()
    assert sorted(t.params["training.learning_rate"] for t in trials) == [0.004, 0.006, 0.02]
    assert all(t.state in (State.COMPLETE, State.PRUNED) and 2 in t.intermediate_values for t in trials)
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert complete and all(sorted(t.intermediate_values) == [2, 4] for t in complete)
    assert study.best_value == min(t.value for t in complete)


def test_generation_metric_is_maximised_and_saved_with_the_trial(workdir):
    (workdir / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reasoning_problems(4, seed=9)))
    space = write_space(workdir, "lora.r: [2, 4]\n")
    study_plan = plan_study(
        workdir / "base.yaml",
        [f"output.dir={workdir / 'runs'}", f"data.eval={workdir / 'problems.jsonl'}", "training.max_steps=2",
         "evaluation.max_new_tokens=8"],
        space_path=space, n_trials=None, timeout_s=None, study_name="em", storage=None, sampler="grid",
        pruner="median", metric="exact_match", direction=None,
    )
    assert study_plan.direction == "maximize" and study_plan.n_trials == 2  # the whole grid
    study = run_study(study_plan)
    for t in study.get_trials():
        scores = json.loads((study_plan.directory / f"trial-{t.number}" / "eval" / "problems" / "scores.json").read_text())
        assert scores["examples"] == 4 and t.value == scores["exact_match"]
        assert t.intermediate_values and all(v < 0 for v in t.intermediate_values.values())  # -eval loss


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_killed_study_resumes_with_two_workers_to_exactly_n_trials(workdir):
    """Kill a worker mid-trial, then resume the study with two workers at once on its SQLite file."""
    write_space(workdir, "training.learning_rate: {float: [1e-3, 2e-2], log: true}\nlora.r: [2, 4]\n")
    command = [sys.executable, "-m", "tunelab", "hpo", "base.yaml", "--space", "space.yaml", "--trials", "4",
               "--study", "shared", "--pruner", "none", "--heartbeat", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    folder = workdir / "runs" / "hpo" / "shared"
    worker = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it while trial 1 trains (trial 0 is then complete)
        wait_for(lambda: (folder / "trial-1" / "metrics.jsonl").is_file(), 240, "trial 1 to start training")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    first = folder / "trial-0" / "eval.json"
    first_mtime = first.stat().st_mtime_ns

    workers = [subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]

    State = optuna.trial.TrialState
    trials = study_at(folder, "shared").get_trials()
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials)))  # no trial number twice
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED) or "message" in t.user_attrs]
    assert len(finished) == 4 and all(t.state == State.COMPLETE for t in finished)
    assert trials[0].state == State.COMPLETE and first.stat().st_mtime_ns == first_mtime  # not redone
    assert trials[1].state == State.FAIL and "message" not in trials[1].user_attrs  # interrupted, not counted
    # Trial 1 is declared dead once its heartbeat is 4 heartbeats old; its parameters then run again, once.
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1 and retries[0].params == trials[1].params and retries[0].state == State.COMPLETE
    assert len(trials) == 5
    for t in finished:  # each trial number has its own run folder, written once
        assert json.loads((folder / f"trial-{t.number}" / "trial.json").read_text())["number"] == t.number
    ran = [sum(f"trial {n} complete" in err for n in numbers) for _, err in outputs]
    assert sum(ran) == 3, ran  # the resuming workers ran trials 2, 3 and the retry between them

    shown = tunelab("hpo", "show", "shared", cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    # Keyed by trial number; the best trial's number carries a " *" mark.
    rows = {line.split("│")[1].strip().removesuffix(" *"): line for line in shown.stdout.splitlines() if line.count("│") > 3}
    assert "interrupted" in rows["1"] and "retry of trial 1" in rows[str(retries[0].number)]
    assert "4 complete  1 interrupted" in shown.stdout
    assert f"best: trial {min(finished, key=lambda t: t.value).number}," in shown.stdout


def test_example_space_validates_against_the_quickstart_config():
    data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    space = load_space(REPO / "configs" / "hpo" / "quickstart-space.yaml", data)
    assert [d.key for d in space] == ["training.learning_rate", "lora.r", "training.warmup_steps"]


# ----------------------------------------------------------------------------- stops, binding, safety


def signal_when(path: Path, predicate, signum: int) -> threading.Thread:
    """Send `signum` to this process once metrics.jsonl at `path` satisfies `predicate` (a watcher thread)."""

    def watch() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
            if predicate([r for r in records if "loss" in r]):
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_and_sigint_stop_the_study_after_a_checkpoint_and_the_next_run_continues_the_trial(workdir):
    """SIGTERM (a preemption), then SIGINT (Ctrl-C) during the continued trial: each stops the study with
    the shell's exit code after the trial checkpointed; the trial is neither counted nor lost, and the
    third run continues it in its own folder from the checkpoint to the end."""
    from tunelab.errors import TrainingInterrupted
    from tunelab.hpo import best_config_yaml, count_trials

    space = write_space(workdir, "lora.r: [2, 4]\n")
    study_plan = plan_study(workdir / "base.yaml", [f"output.dir={workdir / 'runs'}", "training.max_steps=8"],
                            space_path=space, n_trials=2, timeout_s=None, study_name="stops", storage=None,
                            sampler="random", pruner="none", metric="eval_loss", direction=None)
    run = study_plan.directory / "trial-0"
    State = optuna.trial.TrialState

    signal_when(run / "metrics.jsonl", lambda r: len(r) >= 1, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGTERM") as stop:
        run_study(study_plan)
    assert stop.value.exit_code == 143
    study = study_at(study_plan.directory, "stops")
    first, queued = study.get_trials()
    assert first.state == State.FAIL and "SIGTERM" in first.user_attrs["stopped"] and "message" not in first.user_attrs
    assert queued.state == State.WAITING and queued.user_attrs["resume_of"] == 0
    assert queued.system_attrs["fixed_params"] == first.params
    stopped_at = int(sorted(run.glob("checkpoints/step-*"))[-1].name.split("-")[1])
    assert 1 <= stopped_at < 8 and not (run / "final").exists()
    assert count_trials(study).finished == 0 and not (study_plan.directory / "trial-1").exists()
    assert "interrupted" in (study_plan.directory / "results.csv").read_text()  # outputs written on the way out

    signal_when(run / "metrics.jsonl", lambda r: any(x["step"] > stopped_at for x in r), signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT") as stop:
        run_study(study_plan)
    assert stop.value.exit_code == 130
    again = study_at(study_plan.directory, "stops").get_trials()
    assert again[1].state == State.FAIL and "stopped" in again[1].user_attrs
    assert again[2].state == State.WAITING and again[2].user_attrs["resume_of"] == 0

    study = run_study(study_plan)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert len(complete) == 2 and complete[0].number == 2 and complete[0].user_attrs["run_dir"] == str(run)
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9))  # continued, not restarted: every step once
    assert complete[0].value == pytest.approx(json.loads((run / "eval.json").read_text())["eval_loss"])
    assert (study_plan.directory / f"trial-{complete[1].number}" / "final").is_dir()

    best = min(complete, key=lambda t: t.value)
    changed = dataclasses.replace(study_plan, base={**study_plan.base, "training": {**study_plan.base["training"], "max_steps": 3}})
    best_yaml = yaml.safe_load(best_config_yaml(changed, best))  # the trial's own config, not today's base
    assert best_yaml["training"]["max_steps"] == 8 and best_yaml["output"]["name"] == "stops-best"


def test_a_study_is_bound_to_its_direction_and_base_config(workdir):
    space = write_space(workdir, "lora.r: [2, 4]\n")
    first = plan(workdir, space, study_name="bound2")
    with StudyLock(first.directory):
        open_study(first)
    with pytest.raises(TunelabError, match="minimizes eval_loss; this worker would maximize"):
        open_study(plan(workdir, space, study_name="bound2", direction="maximize"))
    other = plan_study(workdir / "base.yaml", [f"output.dir={workdir / 'runs'}", "training.max_steps=8"], space_path=space,
                       n_trials=None, timeout_s=None, study_name="bound2", storage=None, sampler="tpe", pruner="median",
                       metric="eval_loss", direction=None)
    with pytest.raises(TunelabError, match="another base config .* differing: training.max_steps"):
        open_study(other)


def test_storage_passwords_are_never_printed():
    from tunelab.hpo import open_storage, safe_url

    url = "postgresql+psycopg2://alice:hunter2@127.0.0.1:1/studies"
    assert "hunter2" not in safe_url(url) and "alice:***@127.0.0.1" in safe_url(url)
    with pytest.raises(TunelabError) as err:
        open_storage(url)
    assert "hunter2" not in str(err.value) and "alice" in str(err.value)


def test_pruner_defaults_follow_the_study_and_eval_cadence():
    from tunelab.hpo import make_pruner

    median = make_pruner("median", n_trials=20, max_steps=1000)
    assert (median._n_startup_trials, median._n_warmup_steps) == (5, 250)  # not at the first evaluation
    assert make_pruner("median", n_trials=6, max_steps=4)._n_startup_trials == 2
    hyperband = make_pruner("hyperband", max_steps=1000, eval_steps=100)
    assert (hyperband._min_resource, hyperband._max_resource) == (100, 1000)  # trials report every 100 steps


def test_a_second_sigterm_stops_at_once():
    from tunelab.stopping import REPEAT_SECONDS, StopRequest

    with StopRequest(announce=False) as request:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert request.signum == signal.SIGTERM
        time.sleep(REPEAT_SECONDS + 0.1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
