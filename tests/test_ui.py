"""`tunelab ui`: each tab's functions through gradio_client against a live app on a tiny model,
a bounded load test (20 concurrent chat users), and real-browser tests (Playwright + Debian's
chromium; skipped with a reason where chromium is missing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from tunelab.errors import TunelabError  # noqa: E402
from tunelab.ui import core  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(os.environ.get("TUNELAB_UI_SCREENSHOTS", Path(__file__).resolve().parents[1] / "test-artifacts" / "ui"))


def tiny_config(model_dir: Path, *, max_steps: int, save_steps: int) -> dict:
    """A run config for the tiny model: LoRA, fp32, one logged loss per step."""
    return {
        "model": {"name": str(model_dir)},
        "data": {"train": "data/train.jsonl", "eval_fraction": 0.1, "max_seq_length": 128},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {
            "learning_rate": 1e-3, "batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": max_steps,
            "warmup_steps": 1, "logging_steps": 1, "save_steps": save_steps, "precision": "fp32", "num_threads": 1,
        },
        "output": {"dir": "runs", "name": "tiny"},
    }


@pytest.fixture(scope="module")
def workspace_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A working directory with data/, configs/ and runs/tiny (a finished 4-step run with an evaluation)."""
    from tunelab.config import build_config
    from tunelab.data.synthetic import synthesize_files
    from tunelab.evaluate import evaluate_sources
    from tunelab.train import train

    root = tmp_path_factory.mktemp("ui-workspace")
    synthesize_files(root / "data" / "train.jsonl", n=48, seed=0, test_output=root / "data" / "test.jsonl", n_test=4)
    (root / "configs").mkdir()
    (root / "configs" / "tiny.yaml").write_text(yaml.safe_dump(tiny_config(tiny_model_dir, max_steps=40, save_steps=2)))
    config = tiny_config(tiny_model_dir, max_steps=4, save_steps=2)
    config["data"]["train"] = str(root / "data" / "train.jsonl")
    config["output"]["dir"] = str(root / "runs")
    train(build_config(config), quiet=True)
    evaluate_sources([str(root / "runs" / "tiny")], str(root / "data" / "test.jsonl"), metrics=["exact_match"], max_new_tokens=8, batch_size=4)
    return root


@pytest.fixture(scope="module")
def live(workspace_dir, tiny_model_dir):
    """The app served on a free port: (url, workspace, cache, trainer)."""
    from tunelab.ui.app import build_app, launch

    workspace = core.Workspace(workspace_dir / "runs", [tiny_model_dir.parent], cwd=workspace_dir)
    cache = core.ModelCache(3, dtype="fp32")
    trainer = core.TrainingManager(workspace)
    demo = build_app(workspace, cache, trainer, concurrency=2, poll_s=0.5)
    _, url, _ = launch(demo, workspace, port=None, block=False, max_upload_mb=1)
    yield url, workspace, cache, trainer
    trainer.shutdown()
    demo.close()


@pytest.fixture(scope="module")
def client(live):
    return gradio_client.Client(live[0], verbose=False)


def chat_args(message: str, source: str, max_new_tokens: int = 12, history=None, temperature: float = 1.0):
    """The /chat endpoint's inputs. Sampling (T 1): the tiny random model's greedy answers are blank lines."""
    return dict(message=message, history=history or [], source=source, system="", temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)


def plot_rows(plot: dict) -> list[dict]:
    """A plot's data as gradio_client returns it ({columns, data}) as dicts."""
    return [dict(zip(plot["columns"], row)) for row in plot["data"]]


# ----------------------------------------------------------------------------- chat and compare


def test_chat_streams_the_reply_generate_gives(client, live, workspace_dir):
    """Same tokens as `tunelab generate` with the run's chat template: sampling from the same seed
    (the server runs in this process, so one torch seed drives both)."""
    import torch

    from tunelab.generate import GenerationSettings, generate_for_prompts

    _, workspace, cache, _ = live
    run = str(workspace_dir / "runs" / "tiny")
    model, tokenizer = cache.get(workspace.model_source(run))  # loading draws random numbers (LoRA init) too
    torch.manual_seed(123)
    job = client.submit(**chat_args("What is 12 * 7?", run, temperature=1.0), api_name="/chat")
    history, box, memory = job.result(timeout=120)
    updates = job.outputs()
    reply = core.text_of(history[-1]["content"])
    assert history[-1]["role"] == "assistant" and reply
    assert len({core.text_of(u[0][-1]["content"]) for u in updates}) >= 3, "the reply arrives in pieces"
    assert box == "" and "model slots used" in updates[0][2]  # the loaded-models panel
    torch.manual_seed(123)
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0)
    expected = generate_for_prompts(model, tokenizer, ["What is 12 * 7?"], settings)[0]["completion"]
    assert reply == expected


def test_chat_keeps_history_and_rejects_paths_outside(client, workspace_dir):
    run = str(workspace_dir / "runs" / "tiny")
    first, _, _ = client.predict(**chat_args("hello", run, 4), api_name="/chat")
    second, _, _ = client.predict(**chat_args("again", run, 4, history=first), api_name="/chat")
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    with pytest.raises(Exception, match="outside the folders this UI may read"):
        client.predict(**chat_args("hi", "/etc"), api_name="/chat")
    assert client.predict(api_name="/clear") == []


def test_stop_and_clear_cancel_the_reply_and_free_its_slot(client, live, workspace_dir):
    """Stop and Clear cancel this session's reply at the next token: the reply ends far short of
    its limit and the model's engine has no request left."""
    _, workspace, cache, _ = live
    run = str(workspace_dir / "runs" / "tiny")
    engine = cache.engine(workspace.model_source(run))
    tokenizer = engine.tokenizer
    for action in ("/stop", "/clear"):
        job = client.submit(**chat_args("Tell me a long story", run, max_new_tokens=900), api_name="/chat")
        started = time.monotonic()
        while engine.active == 0 and not job.done() and time.monotonic() - started < 60:
            time.sleep(0.01)
        assert engine.active == 1, "the reply is being generated"
        client.predict(api_name=action)
        history, _, _ = job.result(timeout=120)
        assert len(tokenizer(core.text_of(history[-1]["content"]))["input_ids"]) < 300
        assert engine.active == 0 and engine.waiting == 0


def test_a_reply_nobody_reads_is_cancelled(live, workspace_dir):
    """A closed tab stops reading the reply's stream: closing it cancels the request."""
    _, workspace, cache, _ = live
    engine = cache.engine(workspace.model_source(str(workspace_dir / "runs" / "tiny")))
    requests = []
    stream = core.chat_stream(
        engine.model, engine.tokenizer, [], "hi", max_new_tokens=900, temperature=1.0, top_p=1.0,
        engine=engine, on_request=requests.append,
    )
    next(stream), next(stream)  # submitted, and the first piece arrived
    stream.close()
    assert requests[0].wait(timeout=30).finish_reason == "cancelled"
    assert requests[0].result.completion_tokens < 300 and engine.active == 0


def test_stop_endpoint_ends_only_that_sessions_reply(live, workspace_dir):
    """Two browser sessions chat at once; /stop from one ends its reply, the other runs to its length."""
    url, workspace, cache, _ = live
    run = str(workspace_dir / "runs" / "tiny")
    _, tokenizer = cache.get(workspace.model_source(run))
    a, b = gradio_client.Client(url, verbose=False), gradio_client.Client(url, verbose=False)
    job_a = a.submit(**chat_args("Count to a thousand.", run, 600), api_name="/chat")
    job_b = b.submit(**chat_args("Count to a hundred.", run, 80), api_name="/chat")
    wait_for(lambda: len(job_a.outputs()) >= 3, 120, "A's reply to stream")
    a.predict(api_name="/stop")
    reply_a = core.text_of(job_a.result(timeout=120)[0][-1]["content"])
    reply_b = core.text_of(job_b.result(timeout=120)[0][-1]["content"])
    assert len(tokenizer(reply_a)["input_ids"]) < 300, "A stopped early"
    assert len(tokenizer(reply_b)["input_ids"]) >= 60, "B was not stopped by A's Stop"


def test_compare_two_models_side_by_side(client, workspace_dir, tiny_model_dir):
    run = str(workspace_dir / "runs" / "tiny")
    a, b, c = client.predict("What is 3 + 4?", str(tiny_model_dir), run, "", "", 1.0, 10, api_name="/compare")
    assert a and b and c == "" and a != b
    a, b, c = client.predict("What is 3 + 4?", str(tiny_model_dir), run, run, "", 1.0, 10, api_name="/compare")
    assert a and b and c
    with pytest.raises(Exception, match="at least two models"):
        client.predict("x", run, "", "", "", 0.0, 4, api_name="/compare")


# ----------------------------------------------------------------------------- runs


def test_runs_table_and_open_run(client, workspace_dir):
    table, _ = client.predict(api_name="/runs")
    rows = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    tiny = rows["tiny"]
    assert (tiny["status"], tiny["method"], tiny["steps"]) == ("done", "lora", 4)
    assert "data-test: exact_match" in tiny["eval scores"]
    loss, lr, summary, scores, samples, config, report = client.predict("tiny", api_name="/open_run")
    train_points = [row for row in plot_rows(loss) if row["series"] == "train"]
    assert [row["step"] for row in train_points] == [1, 2, 3, 4] and len(plot_rows(lr)) == 4
    assert "train_loss" in summary and "method: lora" in config
    assert scores["data"][0][0] == "data-test" and len(samples["data"]) == 4
    assert "/gradio_api/file=" in report and "report.html" in report
    with pytest.raises(Exception, match="not a run name"):
        client.predict("../etc", api_name="/open_run")
    summary_loss = json.loads((workspace_dir / "runs" / "tiny" / "eval.json").read_text())["eval_loss"]
    assert tiny["eval loss"] == round(summary_loss, 4) != summary_loss  # rounded for people


def test_runs_tab_shows_evaluations_written_elsewhere(client, workspace_dir):
    import shutil

    from tunelab.evaluate import evaluate_sources

    extra = workspace_dir / "data" / "extra.jsonl"
    shutil.copy(workspace_dir / "data" / "test.jsonl", extra)
    out = workspace_dir / "eval-results" / "mine"
    try:  # as `tunelab eval runs/tiny --data data/extra.jsonl --output eval-results/mine`, run from the workspace
        cwd = os.getcwd()
        os.chdir(workspace_dir)
        try:
            evaluate_sources(["runs/tiny"], "data/extra.jsonl", metrics=["exact_match"], max_new_tokens=4, batch_size=4, output=str(out))
        finally:
            os.chdir(cwd)
        assert not (workspace_dir / "runs" / "tiny" / "eval" / "extra").exists()
        rows = {row[0]: row for row in client.predict(api_name="/runs")[0]["data"]}
        assert "extra (mine): exact_match" in rows["tiny"][-1]
        scores = client.predict("tiny", api_name="/open_run")[3]
        assert "extra (mine)" in [row[0] for row in scores["data"]]
    finally:
        shutil.rmtree(workspace_dir / "eval-results", ignore_errors=True)
        extra.unlink()


def test_runs_tab_lists_hpo_trial_runs(client, workspace_dir):
    import shutil

    trial = workspace_dir / "runs" / "hpo" / "study" / "trial-0"
    shutil.copytree(workspace_dir / "runs" / "tiny", trial)
    try:
        table, _ = client.predict(api_name="/runs")
        rows = {row[0]: row for row in table["data"]}
        assert rows["hpo/study/trial-0"][1] == "done"
        loss, *_ = client.predict("hpo/study/trial-0", api_name="/open_run")
        assert len([r for r in plot_rows(loss) if r["series"] == "train"]) == 4
        models = client.predict(api_name="/models")
        assert str(trial) in [choice[1] for choice in models["choices"]]
        with pytest.raises(Exception, match="not a run name"):
            client.predict("hpo/../..", api_name="/open_run")
    finally:
        shutil.rmtree(workspace_dir / "runs" / "hpo")


def test_report_link_serves_the_report(client, live, workspace_dir):
    import httpx

    url = live[0].rstrip("/") + "/gradio_api/file=" + str((workspace_dir / "runs" / "tiny" / "report.html").resolve())
    response = httpx.get(url)
    assert response.status_code == 200 and "<h1>Run tiny</h1>" in response.text
    outside = httpx.get(live[0].rstrip("/") + "/gradio_api/file=/etc/passwd")
    assert outside.status_code >= 400


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def bad_data(workspace_dir) -> Path:
    lines = [json.dumps({"instruction": f"Add {i} and {i}.", "output": f"{2 * i}"}) for i in range(5)]
    lines.insert(2, "{not json")
    path = workspace_dir / "data" / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_validate_counts_histogram_and_located_errors(client, bad_data, tiny_model_dir):
    verdict, counts, formats, histogram, problems = client.predict(
        "data/bad.jsonl", None, "auto", str(tiny_model_dir), 512, api_name="/validate_data"
    )
    count = {row[0]: row[1] for row in counts["data"]}
    assert count["records read"] == 5 and count["invalid records skipped"] == 1 and count["examples kept"] == 5
    assert "bad.jsonl:3" in problems
    assert sum(row["examples"] for row in plot_rows(histogram)) == 5
    assert formats["data"] == [["alpaca", 5]]
    assert "5 examples usable" in verdict
    with pytest.raises(Exception, match="outside the folders"):
        client.predict("/etc/passwd", None, "auto", "default", 512, api_name="/validate_data")


def test_data_upload_and_inspect_highlights_trained_tokens(client, workspace_dir, tmp_path):
    upload = tmp_path / "up.jsonl"
    upload.write_text(json.dumps({"instruction": "Name a colour.", "output": "Blue sky"}) + "\n")
    view = client.predict("", gradio_client.handle_file(str(upload)), "auto", "default", 512, 2, api_name="/inspect_data")
    assert "<mark>" in view and "Blue sky" in view.split("<mark>", 1)[1]  # the answer is trained
    marked = " ".join(part.split("</mark>", 1)[0] for part in view.split("<mark>")[1:])
    assert "Name a colour." in view and "Name a colour." not in marked  # the prompt is not


def test_uploads_over_the_limit_are_refused(live):
    import httpx

    upload = live[0].rstrip("/") + "/gradio_api/upload"  # the app under test allows 1 MB
    big = httpx.post(upload, files={"files": ("big.jsonl", b"x" * (2 * 2**20))})
    assert big.status_code == 413 and "maximum allowed size of 1048576 bytes" in big.text
    assert httpx.post(upload, files={"files": ("small.jsonl", b"{}\n")}).status_code == 200


# ----------------------------------------------------------------------------- config and training


def test_config_check_gives_the_cli_messages(client, workspace_dir, tmp_path):
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    text = "training:\n  learnig_rate: 1e-4\n  batch_size: zero\n"
    message = client.predict(text, api_name="/check_config")
    path = tmp_path / "editor"
    path.write_text(text)
    with pytest.raises(ConfigError) as cli:
        load_config(path)
    for problem in cli.value.problems:
        assert problem.replace(str(path), "editor") in message
    assert "editor:2: training.learnig_rate: unknown key; did you mean 'training.learning_rate'?" in message
    loaded, check, name = client.predict("tiny.yaml", api_name="/load_config")
    assert "max_steps: 40" in loaded and check.startswith("config OK") and name == "tiny"


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_train_start_stop_resume(client, live, workspace_dir):
    _, workspace, _, trainer = live
    text = (workspace_dir / "configs" / "tiny.yaml").read_text()
    status, _, _ = client.predict(text, "ui-train", "", api_name="/train_start")
    assert status.startswith("training ui-train: running")
    with pytest.raises(Exception, match="already running"):
        client.predict(text, "other", "", api_name="/train_start")
    run = workspace.runs_dir / "ui-train"

    def logged_steps():
        status, log, loss = client.predict(api_name="/train_poll")
        return [row["step"] for row in plot_rows(loss) if row["series"] == "train"]

    assert len(wait_for(lambda: len(logged_steps()) >= 3 and logged_steps(), 120, "3 logged steps")) >= 3
    wait_for(lambda: core.newest_checkpoint(run), 60, "a checkpoint")
    status, log, _ = client.predict(api_name="/train_stop")
    # Stop is Ctrl-C for the trainer: exit 130 (SIGINT), the checkpoints written so far intact.
    assert "stopped (exit code 130)" in status and "Resume continues" in status, status
    assert "$ tunelab train" in log
    stopped_at = int(core.newest_checkpoint(run).name.split("-")[1])
    assert not (run / "final").exists() and stopped_at < 40
    rows = {row[0]: row for row in client.predict(api_name="/runs")[0]["data"]}
    assert rows["ui-train"][1] == f"stopped at step-{stopped_at}"

    status, _, _ = client.predict("ui-train", api_name="/train_resume")
    assert "running" in status
    wait_for(lambda: not trainer.job.running, 180, "the resumed run to finish")
    status, log, loss = client.predict(api_name="/train_poll")
    assert "finished (exit code 0)" in status, log
    assert f"resumed from {run / 'checkpoints'}" in log.replace("\n", "")
    assert (run / "final" / "adapter_model.safetensors").is_file()
    steps = [row["step"] for row in plot_rows(loss) if row["series"] == "train"]
    assert max(steps) == 40 and stopped_at + 1 in steps


def test_train_refuses_bad_config_and_outside_data(client, workspace_dir):
    with pytest.raises(Exception, match="unknown key"):
        client.predict("trainig:\n  epochs: 1\n", "x", "", api_name="/train_start")
    with pytest.raises(Exception, match="outside the folders"):
        client.predict("method: lora\n", "x", "/etc/hosts", api_name="/train_start")
    text = (workspace_dir / "configs" / "tiny.yaml").read_text()
    for extra, message in (("model:\n  trust_remote_code: true\n", "runs code from the model's repository.*--allow-remote-code"),
                           ("output:\n  overwrite: true\n", "deletes the results.*--allow-overwrite"),
                           ("data:\n  eval: openai/gsm8k\n", "data.eval: 'openai/gsm8k' is not a local path.*--allow-hub")):
        config = yaml.safe_load(text)
        for section, values in yaml.safe_load(extra).items():
            config[section].update(values)
        with pytest.raises(Exception, match=message):
            client.predict(yaml.safe_dump(config), "refused", "", api_name="/train_start")
    assert not (workspace_dir / "runs" / "refused").exists()
    manager = core.TrainingManager(core.Workspace(workspace_dir / "runs", [], cwd=workspace_dir), allow_overwrite=True)
    overwriting = yaml.safe_load(text)
    overwriting["output"]["overwrite"] = True
    manager._check_allowed(core.check_config_text(yaml.safe_dump(overwriting)), "config")  # the server allows it


# ----------------------------------------------------------------------------- load


def test_twenty_concurrent_chat_users_all_get_answers(live, workspace_dir):
    url, workspace, cache, _ = live
    run = str(workspace_dir / "runs" / "tiny")
    cache.get(workspace.model_source(run))
    loads_before, rss_before = cache.loads, core.memory_mb()
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    peak = [rss_before]

    def user(k: int) -> None:
        try:
            history, _, _ = gradio_client.Client(url, verbose=False).predict(**chat_args(f"Question {k}: what is {k} + {k}?", run, 8), api_name="/chat")
            answers[k] = core.text_of(history[-1]["content"])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=user, args=(k,), daemon=True) for k in range(20)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads) and time.monotonic() - started < 180:
        peak[0] = max(peak[0], core.memory_mb())
        time.sleep(0.1)
    assert not any(t.is_alive() for t in threads), "all 20 users answered within 180 s"
    assert not errors, errors[:3]
    assert sorted(answers) == list(range(20)) and all(answers.values())
    assert cache.loads == loads_before  # nobody loaded another copy of the model
    assert peak[0] - rss_before < 1024, f"memory grew by {peak[0] - rss_before:.0f} MB under load"
    print(f"20 users answered in {time.monotonic() - started:.1f} s; peak RSS +{peak[0] - rss_before:.0f} MB")


def engine_params():
    from tunelab.engine import SamplingParams

    return SamplingParams(max_new_tokens=1)


def test_model_cache_loads_once_and_evicts_least_recent(tiny_model_dir, workspace_dir, tmp_path):
    import shutil

    cache = core.ModelCache(2, dtype="fp32")
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(str(tiny_model_dir)))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.loads == 1 and all(r is results[0] for r in results)
    a, b, c = str(tiny_model_dir), str(workspace_dir / "runs" / "tiny"), str(shutil.copytree(tiny_model_dir, tmp_path / "copy"))
    cache.get(b)
    cache.get(a)  # A used after B: B is now the least recently used
    cache.get(c)
    assert cache.loads == 3 and "2 of 2 model slots used" in cache.describe()
    assert a in cache.describe() and c in cache.describe() and b not in cache.describe()  # FIFO would drop A
    cache.get(a)
    assert cache.loads == 3
    engine = cache.engine(a)
    assert cache.engine(a) is engine and engine.model is cache.get(a)[0]  # one engine per loaded model
    assert cache.unload().startswith("0 of 2 model slots used")
    with pytest.raises(Exception, match="engine is closed"):  # unload also let go of the idle engine
        engine.submit([5], engine_params())
    cache.get(a)
    assert cache.loads == 4


# ----------------------------------------------------------------------------- safety


def test_workspace_paths(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "notes.txt").write_text("private")
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "link").symlink_to(outside)
    workspace = core.Workspace(tmp_path / "runs", [], cwd=tmp_path)
    assert workspace.check_path("runs", "x") == (tmp_path / "runs").resolve()
    assert workspace.check_path("data/x.jsonl", "x") == (tmp_path / "data" / "x.jsonl").resolve()
    for bad in ("/etc/passwd", "../", "link/secret", "notes.txt", "."):  # the working directory is no root
        with pytest.raises(TunelabError, match="outside the folders"):
            workspace.check_path(bad, "data file")
    assert workspace.model_source("default") is None


def test_auth_and_exposure_warning(tmp_path):
    from tunelab.ui.core import exposure_warning, parse_auth

    assert parse_auth("alice:pw", None) == [("alice", "pw")]
    auth_file = tmp_path / "users"
    auth_file.write_text("# users\nbob:x\ncarol\n")
    with pytest.raises(TunelabError, match=f"{auth_file}:3: expected USER:PASS"):
        parse_auth(None, auth_file)
    assert exposure_warning("127.0.0.1", None, False) is None
    assert "without a password" in exposure_warning("0.0.0.0", None, False)
    assert exposure_warning("0.0.0.0", [("a", "b")], False) is None
    result = subprocess.run([sys.executable, "-m", "tunelab", "ui", "--auth", "nopassword"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--auth must be USER:PASS" in result.stderr and "Traceback" not in result.stderr


GUARDED = [  # (method, path): the page, its config, the API, the queue, uploads, files
    ("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
    ("POST", "/gradio_api/call/train_start"), ("POST", "/gradio_api/upload"), ("GET", "/gradio_api/file={report}"),
]


def probe(url: str, report: Path, **kwargs) -> dict[str, int]:
    import httpx

    codes = {}
    for method, path in GUARDED:
        target = url.rstrip("/") + path.format(report=report)
        codes[path] = httpx.request(method, target, json={} if method == "POST" else None, **kwargs).status_code
    return codes


def test_auth_and_token_are_required_on_every_route(workspace_dir, tiny_model_dir):
    from tunelab.ui.app import build_app, launch

    workspace = core.Workspace(workspace_dir / "runs", [], cwd=workspace_dir)
    report = (workspace_dir / "runs" / "tiny" / "report.html").resolve()
    for mode in ("auth", "token"):
        demo = build_app(workspace, core.ModelCache(1), core.TrainingManager(workspace))
        extra = {"auth": [("alice", "pw")]} if mode == "auth" else {"token": "s3cret-token"}
        _, url, _ = launch(demo, workspace, port=None, block=False, **extra)
        try:
            refused = probe(url, report)
            if mode == "auth":  # the page itself is Gradio's login form
                assert refused.pop("/") == 200
            assert all(code == 401 for code in refused.values()), (mode, refused)
            with pytest.raises(Exception, match="credentials were not provided|401"):
                gradio_client.Client(url, verbose=False)
            if mode == "auth":
                client = gradio_client.Client(url, auth=("alice", "pw"), verbose=False)
            else:
                import httpx

                page = httpx.get(url + "?token=s3cret-token")  # the printed link: the browser gets a cookie
                assert page.status_code == 200 and "tunelab-token=s3cret-token" in page.headers["set-cookie"]
                assert httpx.get(url.rstrip("/") + f"/gradio_api/file={report}", cookies=page.cookies).status_code == 200
                assert httpx.get(url.rstrip("/") + "/gradio_api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
                client = gradio_client.Client(url, headers={"Authorization": "Bearer s3cret-token"}, verbose=False)
            assert "tiny" in [row[0] for row in client.predict(api_name="/runs")[0]["data"]]
        finally:
            demo.close()


def test_host_header_allow_list(live):
    import httpx

    url = live[0]
    assert httpx.get(url, headers={"Host": "evil.example:7860"}).status_code == 400  # DNS rebinding
    for host in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860"):
        assert httpx.get(url, headers={"Host": host}).status_code == 200, host


def test_ui_command_prints_token_and_sigterm_stops_its_training(workspace_dir, tiny_model_dir):
    """`tunelab ui` from a shell: the printed link carries a token the server requires; SIGTERM (systemd,
    docker stop, kill) ends the UI and stops its training with a checkpoint instead of orphaning it."""
    import re
    import signal
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    ui = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "runs", "--port", str(port), "--data-dir", str(tiny_model_dir.parent)], cwd=workspace_dir,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "tunelab ui on" not in line:
            line = ui.stdout.readline()
            assert line or ui.poll() is None, "the UI exited before serving"
        url, token = re.search(r"(http://\S+/)\?token=(\S+)", line).groups()
        assert httpx.get(url).status_code == 401 and httpx.get(url + f"?token={token}").status_code == 200
        client = gradio_client.Client(url, headers={"Authorization": f"Bearer {token}"}, verbose=False)
        text = (workspace_dir / "configs" / "tiny.yaml").read_text()
        status, _, _ = client.predict(text, "sigterm-run", "", api_name="/train_start")
        run = workspace_dir / "runs" / "sigterm-run"
        wait_for(lambda: core.newest_checkpoint(run), 120, "a checkpoint")
        trainer_pid = int(re.search(r"pid (\d+)", status).group(1))
        ui.send_signal(signal.SIGTERM)
        ui.wait(90)
        wait_for(lambda: not core.running_holder(run), 30, "the training to end")
        with pytest.raises(ProcessLookupError):
            os.kill(trainer_pid, 0)
        log = (workspace_dir / "runs" / ".ui" / "sigterm-run.log").read_text()
        assert "SIGINT: stopping after this step" in log and "stopped by SIGINT" in log
        assert not (run / "final").exists() and core.newest_checkpoint(run) is not None
    finally:
        if ui.poll() is None:
            ui.kill()


def test_restarted_ui_finds_a_running_training_and_stops_its_group(workspace_dir):
    """A training the UI did not start (an earlier UI's, or the CLI's): found by its run-folder lock,
    shown as training, Resume into it refused, Stop signals its process group."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "train", "configs/tiny.yaml", "output.name=cli-run"], cwd=workspace_dir,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        workspace = core.Workspace(workspace_dir / "runs", [], cwd=workspace_dir)
        run = workspace.runs_dir / "cli-run"
        wait_for(lambda: core.newest_checkpoint(run), 120, "a checkpoint")
        manager = core.TrainingManager(workspace)
        found = manager.adopt_running()
        assert found.startswith(f"cli-run: pid {trainer.pid} on host"), found
        assert manager.status().startswith("training cli-run: running (started before this UI)")
        rows = {row[0]: row for row in core.run_rows(workspace)}
        assert rows["cli-run"][1] == "training"
        with pytest.raises(TunelabError, match="already running: cli-run"):
            manager.resume("cli-run")
        with pytest.raises(TunelabError, match=f"being trained by pid {trainer.pid}"):
            core.TrainingManager(workspace).resume("cli-run")  # another UI that did not adopt it
        status = manager.stop()
        assert trainer.wait(30) == 130 and "started before this UI" in status
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_polling_only_while_a_training_runs(live):
    from tunelab.ui.app import polling

    workspace = live[1]
    manager = core.TrainingManager(workspace)
    assert polling(manager).active is False
    manager.job = core.TrainingJob(name="x", run_dir=workspace.runs_dir / "x", command=[], log_path=None,
                                   process=subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]), pid=0)
    try:
        assert polling(manager).active is True
    finally:
        manager.job.process.kill()
        manager.job.process.wait()
    assert polling(manager).active is False
    from tunelab.ui.app import build_app

    config = build_app(workspace, core.ModelCache(1), manager).config
    timers = [c for c in config["components"] if c.get("type") == "timer"]
    assert timers and all(t["props"]["active"] is False for t in timers)  # a fresh page does not poll


# ----------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        reason = f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install -y chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI always runs them
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as play:
        browser = play.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(30_000)
    page.goto(live[0])
    page.wait_for_selector("text=runs folder", timeout=60_000)
    yield page
    page.close()


def shot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_browser_chat_streams_an_answer(page, workspace_dir):
    page.get_by_label("model (bundled, a run, or a path)").fill(str(workspace_dir / "runs" / "tiny"))
    page.keyboard.press("Enter")
    page.locator("#chat-input textarea").fill("What is 12 * 7?")
    page.locator("#chat-send").click()
    bot = page.locator("#chatbot .message.bot, #chatbot [data-testid='bot']").last
    bot.wait_for()
    seen: list[str] = []
    deadline = time.monotonic() + 60
    last_change = time.monotonic()
    while time.monotonic() < deadline:  # until the text has not changed for 2 s
        text = bot.inner_text().strip()
        if not seen or text != seen[-1]:
            seen.append(text)
            last_change = time.monotonic()
        elif text and time.monotonic() - last_change > 2.0:
            break
        time.sleep(0.05)
    final = seen[-1]
    assert final, "the answer is shown"
    partial = [text for text in seen[:-1] if text]
    assert any(len(text) < len(final) for text in partial), "the answer grew piece by piece (streaming)"
    shot(page, "chat")


def test_browser_open_run_shows_plot(page):
    page.get_by_role("tab", name="Runs").click()
    page.locator("#run-name input").fill("tiny")
    page.keyboard.press("Enter")
    # Before Open, the plot shows Gradio's empty placeholder, itself an SVG icon: wait for the
    # curve's own marks instead (Vega's SVG renderer draws each line as g.mark-line > path).
    assert page.locator("#run-loss g.mark-line path").count() == 0
    page.locator("#run-open").click()
    page.locator("#run-loss g.mark-line path").first.wait_for(timeout=60_000)
    shot(page, "runs")


def test_browser_training_curve_moves(page, live, workspace_dir):
    trainer = live[3]
    wait_for(lambda: trainer.job is None or not trainer.job.running, 180, "no training running")
    page.get_by_role("tab", name="Train").click()
    page.locator("#config-pick input").click()
    page.get_by_role("option", name="tiny.yaml").click()
    check = "document.querySelector('#config-check').innerText"
    page.wait_for_function(f"{check}.includes('config OK')")
    # Edited YAML is checked as it is typed, with the messages of `tunelab config validate`.
    page.locator("#config-editor .cm-content").click()
    page.keyboard.press("Control+End")
    page.keyboard.type("\ntrainig: 1")
    page.wait_for_function(f"{check}.includes('trainig: unknown key')")  # the editor indents it under output:
    for _ in range(len("trainig: 1")):
        page.keyboard.press("Backspace")
    page.wait_for_function(f"{check}.includes('config OK')")
    page.locator("#train-name textarea, #train-name input").first.fill("browser-run")
    page.locator("#train-start").click()
    page.wait_for_function("document.querySelector('#train-status textarea, #train-status input').value.includes('running')")
    run = workspace_dir / "runs" / "browser-run"
    wait_for(lambda: len(core.curves(run)[0]) >= 2, 120, "two logged steps")
    page.locator("#train-loss g.mark-line path").first.wait_for(timeout=30_000)  # a curve, not the placeholder
    first = page.locator("#train-loss").screenshot()
    wait_for(lambda: len(core.curves(run)[0]) >= 6, 120, "six logged steps")
    time.sleep(2.5)  # a few polls of the page
    later = page.locator("#train-loss").screenshot()
    assert first != later, "the curve changed while training ran"
    shot(page, "train")
    page.locator("#train-stop").click()
    page.wait_for_function("document.querySelector('#train-status textarea, #train-status input').value.includes('stopped')")
