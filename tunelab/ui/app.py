"""The Gradio app of `tunelab ui`: five tabs over the functions of `tunelab.ui.core`.

Chat, Compare, Runs, Data and Train. Every handler is also an API endpoint (`api_name`),
which is how the tests drive it with `gradio_client`. Handlers turn a `TunelabError`
(a bad path, a bad config, an unknown run) into a `gr.Error`, shown as a message in the page.
"""

from __future__ import annotations

import functools
import inspect
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from tunelab.errors import ConfigError, TunelabError
from tunelab.ui import core

CSS = """
mark { background: #b7f0c0; color: #111; padding: 0; }
.untrained { color: #8a8f98; }
pre.tl-example { white-space: pre-wrap; font-size: .85rem; }
"""
GENERATE = "generate"  # queue slot shared by model loads and generation (chat and compare)


def user_errors(fn):
    """Show a TunelabError as a Gradio error message (one line in the page), for plain handlers
    and generators alike; anything else keeps its traceback in the server log."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def wrapped_gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except TunelabError as err:
                raise gr.Error(str(err), print_exception=False) from None

        return wrapped_gen

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TunelabError as err:
            raise gr.Error(str(err), print_exception=False) from None

    return wrapped


def frame(rows: list[dict], columns: list[str], numeric: tuple[str, ...] = ("step", "loss", "lr", "examples")) -> pd.DataFrame:
    """Plot data as a DataFrame whose number columns are numbers even when empty: the plot's
    axis types are taken from the first value it gets, and an empty object column reads as text."""
    data = pd.DataFrame(rows, columns=columns)
    for column in columns:
        if column in numeric:
            data[column] = data[column].astype(float)
    return data


class LiveReplies:
    """The replies each browser session is generating, so that its Stop, Clear or closing its tab
    cancels them at the next token (freeing their engine slots), and nobody else's."""

    def __init__(self) -> None:
        self._requests: dict[str, list] = {}  # session hash -> its GenerationRequests
        self._lock = threading.Lock()

    def add(self, session: str, request) -> None:
        with self._lock:
            live = [r for r in self._requests.get(session, []) if not r.done]
            self._requests[session] = live + [request]

    def cancel(self, session: str) -> None:
        with self._lock:
            requests = self._requests.pop(session, [])
        for request in requests:
            request.cancel()


def session_of(request: gr.Request | None) -> str:
    return request.session_hash if request is not None and request.session_hash else "api"


def polling(trainer: core.TrainingManager) -> gr.Timer:
    """The Train tab's timer: ticking only while a training runs, so idle pages (every open tab,
    all day) do not re-read metrics.jsonl and the log every second."""
    return gr.Timer(active=trainer.job is not None and trainer.job.running)


def build_app(
    workspace: core.Workspace,
    cache: core.ModelCache,
    trainer: core.TrainingManager,
    *,
    concurrency: int = 2,
    poll_s: float = 1.0,
) -> gr.Blocks:
    """The five tabs. `concurrency` caps simultaneous model loads + generations (one queue slot)."""
    live = LiveReplies()

    # ------------------------------------------------------------------ handlers: chat, compare
    @user_errors
    def chat(message, history, source, system, temperature, top_p, max_new_tokens, request: gr.Request):
        if not (message or "").strip():
            raise TunelabError("type a message first")
        engine = cache.engine(workspace.model_source(source))
        session = session_of(request)
        live.cancel(session)  # a new message replaces a reply still running in this session
        turns = list(history or []) + [{"role": "user", "content": message}]
        yield turns + [{"role": "assistant", "content": ""}], "", cache.describe()
        text = ""
        for text in core.chat_stream(
            engine.model, engine.tokenizer, history or [], message, max_new_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, system=system, engine=engine,
            on_request=lambda r: live.add(session, r),
        ):
            yield turns + [{"role": "assistant", "content": text}], "", gr.skip()

    def stop_reply(request: gr.Request):
        live.cancel(session_of(request))

    def clear_chat(request: gr.Request):
        live.cancel(session_of(request))
        return []

    @user_errors
    def compare(prompt, source_a, source_b, source_c, system, temperature, max_new_tokens, request: gr.Request):
        if not (prompt or "").strip():
            raise TunelabError("type a prompt first")
        sources = [s for s in (source_a, source_b, source_c) if (s or "").strip()]
        if len(sources) < 2:
            raise TunelabError("pick at least two models to compare")
        session = session_of(request)
        # Every model's request is submitted before any is read: their engines decode side by side.
        streams = {}
        for slot, source in enumerate((source_a, source_b, source_c)):
            if (source or "").strip():
                engine = cache.engine(workspace.model_source(source))
                streams[slot] = core.chat_stream(
                    engine.model, engine.tokenizer, [], prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=1.0, system=system, engine=engine, on_request=lambda r: live.add(session, r),
                )
        answers = ["", "", ""]
        for slot, stream in streams.items():
            answers[slot] = next(stream)  # renders the prompt and submits the request
        for slot, stream in streams.items():
            for text in stream:
                answers[slot] = text
                yield tuple(answers)

    def model_dropdown_update():
        return gr.update(choices=core.model_choices(workspace))

    # ------------------------------------------------------------------ handlers: runs
    def runs_table():
        active = trainer.job.name if trainer.job is not None and trainer.job.running else None
        rows = core.run_rows(workspace, active)
        return pd.DataFrame(rows, columns=core.RUN_COLUMNS), gr.update(choices=[r[0] for r in rows])

    @user_errors
    def open_run(name):
        details = core.run_details(workspace, name)
        report = (
            f"[open report.html]({'/gradio_api/file=' + str(details.report)}) · {details.report}"
            if details.report else "no report.html yet (written when the training ends; `tunelab report RUN`)"
        )
        return (
            frame(details.loss, ["step", "loss", "series"]),
            frame(details.lr, ["step", "lr"]),
            details.summary,
            pd.DataFrame(details.scores, columns=details.score_columns),
            pd.DataFrame(details.samples, columns=["data", "prompt", "reference", "prediction", "correct"]),
            details.config,
            report,
        )

    def pick_run(evt: gr.SelectData):
        return evt.row_value[0]

    # ------------------------------------------------------------------ handlers: data
    def data_path(path_text, upload) -> Path:
        if upload:
            return Path(upload)
        if not (path_text or "").strip():
            raise TunelabError("give a data file path or upload a file")
        path = workspace.check_path(path_text, "data file")
        if not path.exists():
            raise TunelabError(f"data file not found: {path_text}\n  fix: check the path (relative to {workspace.cwd})")
        return path

    @user_errors
    def validate(path_text, upload, fmt, model, max_length):
        check = core.validate_file(
            data_path(path_text, upload), core.tokenizer_for(workspace.model_source(model)), fmt=fmt, max_length=int(max_length)
        )
        return (
            check.verdict,
            pd.DataFrame(check.counts, columns=["what", "count"]),
            pd.DataFrame(check.formats, columns=["format", "examples"]),
            frame(check.histogram, ["tokens", "examples"]),
            check.problems or "no invalid records",
        )

    @user_errors
    def inspect_data(path_text, upload, fmt, model, max_length, count):
        return core.inspect_file_html(
            data_path(path_text, upload), core.tokenizer_for(workspace.model_source(model)),
            n=int(count), fmt=fmt, max_length=int(max_length),
        )

    # ------------------------------------------------------------------ handlers: train
    @user_errors
    def load_config(name):
        if name not in core.config_files(workspace):
            raise TunelabError(f"no config named {name!r} in {workspace.configs_dir}")
        text = (workspace.configs_dir / name).read_text(encoding="utf-8")
        return text, check_config(text), Path(name).stem

    def check_config(text):
        try:
            config = core.check_config_text(text or "")
        except ConfigError as err:
            return f"**config has problems** (as `tunelab config validate` reports them):\n```\n{err}\n```"
        return f"config OK: method {config.method}, model {config.model.name or 'default'}, data {config.data.train or '(not set: give a data file)'}"

    def poll():
        job = trainer.job
        loss = frame(core.curves(job.run_dir)[0], ["step", "loss", "series"]) if job else frame([], ["step", "loss", "series"])
        return trainer.status(), trainer.log_tail(), loss

    @user_errors
    def start_training(text, name, data):
        trainer.start(text or "", name, data)
        return poll()

    @user_errors
    def stop_training():
        trainer.stop()
        return poll()

    @user_errors
    def resume_training(name):
        trainer.resume(name)
        return poll()

    # ------------------------------------------------------------------ layout
    choices = core.model_choices(workspace)
    with gr.Blocks(title="tunelab") as demo:
        gr.Markdown(f"# tunelab\nruns folder: `{workspace.runs_dir}`")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    chat_model = gr.Dropdown(choices, value=core.DEFAULT_SOURCE, label="model (bundled, a run, or a path)", allow_custom_value=True, scale=3)
                    chat_refresh = gr.Button("Refresh models", scale=0)
                memory = gr.Textbox(cache.describe(), label="loaded models", lines=2, interactive=False)
                with gr.Accordion("settings", open=False):
                    chat_system = gr.Textbox(label="system prompt", lines=2)
                    with gr.Row():
                        chat_temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature (0 = greedy)")
                        chat_top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
                        chat_max = gr.Slider(1, 2048, value=256, step=1, label="max new tokens")
                chatbot = gr.Chatbot(label="chat", elem_id="chatbot", height=380)
                chat_input = gr.Textbox(label="message", placeholder="Ask something and press Enter", elem_id="chat-input")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="chat-send")
                    stop = gr.Button("Stop", elem_id="chat-stop")
                    clear = gr.Button("Clear", elem_id="chat-clear")
                    unload = gr.Button("Unload models", elem_id="chat-unload")
                chat_inputs = [chat_input, chatbot, chat_model, chat_system, chat_temperature, chat_top_p, chat_max]
                chat_outputs = [chatbot, chat_input, memory]
                send.click(chat, chat_inputs, chat_outputs, api_name="chat", concurrency_limit=concurrency, concurrency_id=GENERATE)
                chat_input.submit(chat, chat_inputs, chat_outputs, api_visibility="private", concurrency_id=GENERATE)
                stop.click(stop_reply, None, None, api_name="stop", concurrency_limit=None)
                clear.click(clear_chat, None, chatbot, api_name="clear", concurrency_limit=None)
                chat_refresh.click(model_dropdown_update, None, chat_model, api_name="models", concurrency_limit=None)
                unload.click(cache.unload, None, memory, api_name="unload", concurrency_limit=None)

            with gr.Tab("Compare", id="compare"):
                gr.Markdown("One prompt, two or three models side by side (e.g. the base model and a fine-tuned run).")
                with gr.Row():
                    compare_models = [
                        gr.Dropdown(choices, value=core.DEFAULT_SOURCE, label="model A", allow_custom_value=True),
                        gr.Dropdown(choices, value=choices[-1][1] if len(choices) > 1 else None, label="model B", allow_custom_value=True),
                        gr.Dropdown([("(none)", ""), *choices], value="", label="model C (optional)", allow_custom_value=True),
                    ]
                compare_prompt = gr.Textbox(label="prompt", lines=3)
                with gr.Row():
                    compare_system = gr.Textbox(label="system prompt")
                    compare_temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)")
                    compare_max = gr.Slider(1, 2048, value=256, step=1, label="max new tokens")
                compare_button = gr.Button("Compare", variant="primary")
                with gr.Row():
                    compare_answers = [gr.Textbox(label=f"answer {k}", lines=10) for k in "ABC"]
                compare_button.click(
                    compare, [compare_prompt, *compare_models, compare_system, compare_temperature, compare_max], compare_answers,
                    api_name="compare", concurrency_limit=concurrency, concurrency_id=GENERATE,
                )

            with gr.Tab("Runs", id="runs"):
                with gr.Row():
                    runs_refresh = gr.Button("Refresh", scale=0)
                    run_name = gr.Dropdown([], label="open run", allow_custom_value=True, elem_id="run-name", scale=3)
                    run_open = gr.Button("Open", variant="primary", elem_id="run-open", scale=0)
                runs = gr.Dataframe(headers=core.RUN_COLUMNS, interactive=False, label="runs (click a row to pick it)", wrap=True)
                with gr.Row():
                    run_loss = gr.LinePlot(x="step", y="loss", color="series", title="loss", elem_id="run-loss", height=280)
                    run_lr = gr.LinePlot(x="step", y="lr", title="learning rate", height=280)
                run_report = gr.Markdown()
                run_summary = gr.Textbox(label="summary (eval.json)", lines=6)
                run_scores = gr.Dataframe(headers=["data"], label="evaluations", interactive=False)
                run_samples = gr.Dataframe(
                    headers=["data", "prompt", "reference", "prediction", "correct"], label="sample predictions",
                    interactive=False, wrap=True, max_height=420,
                )
                run_config = gr.Code(label="config.yaml", language="yaml", interactive=False)
                runs_refresh.click(runs_table, None, [runs, run_name], api_name="runs", concurrency_limit=None)
                runs.select(pick_run, None, run_name, api_visibility="private", concurrency_limit=None)
                run_open.click(
                    open_run, run_name, [run_loss, run_lr, run_summary, run_scores, run_samples, run_config, run_report],
                    api_name="open_run", concurrency_limit=None,
                )
                demo.load(runs_table, None, [runs, run_name], api_visibility="private", concurrency_limit=None)
                demo.unload(stop_reply)  # closing or reloading the tab cancels its replies at the next token

            with gr.Tab("Data", id="data"):
                with gr.Row():
                    data_path_box = gr.Textbox(label="data file (inside the working directory, data folders or runs folder)", scale=3)
                    data_upload = gr.File(label="or upload", type="filepath", file_types=[".jsonl", ".json", ".csv", ".txt", ".parquet"])
                with gr.Row():
                    data_format = gr.Dropdown(["auto", "text", "alpaca", "dolly", "chat", "sharegpt", "qa"], value="auto", label="format")
                    data_model = gr.Dropdown(choices, value=core.DEFAULT_SOURCE, label="tokenizer of model", allow_custom_value=True)
                    data_max = gr.Number(512, label="max tokens per example", precision=0)
                    data_count = gr.Number(3, label="examples to inspect", precision=0)
                with gr.Row():
                    validate_button = gr.Button("Validate", variant="primary")
                    inspect_button = gr.Button("Inspect")
                data_verdict = gr.Markdown()
                with gr.Row():
                    data_counts = gr.Dataframe(headers=["what", "count"], label="counts", interactive=False)
                    data_formats = gr.Dataframe(headers=["format", "examples"], label="examples per format", interactive=False)
                data_hist = gr.BarPlot(x="tokens", y="examples", title="token lengths", sort=None, height=260)
                data_problems = gr.Textbox(label="invalid records (file:line)", lines=4)
                data_view = gr.HTML()
                data_inputs = [data_path_box, data_upload, data_format, data_model, data_max]
                validate_button.click(
                    validate, data_inputs, [data_verdict, data_counts, data_formats, data_hist, data_problems],
                    api_name="validate_data", concurrency_limit=concurrency, concurrency_id="data",
                )
                inspect_button.click(
                    inspect_data, [*data_inputs, data_count], data_view,
                    api_name="inspect_data", concurrency_limit=concurrency, concurrency_id="data",
                )

            with gr.Tab("Train", id="train"):
                gr.Markdown(
                    "One training at a time, run as a `tunelab train` process into the runs folder. "
                    "Stop interrupts it like Ctrl-C; Resume continues the run from its newest checkpoint."
                )
                with gr.Row():
                    # Open with quickstart.yaml (else the first config) in the editor, never a blank one.
                    names = core.config_files(workspace)
                    first = "quickstart.yaml" if "quickstart.yaml" in names else (names[0] if names else None)
                    first_text = (workspace.configs_dir / first).read_text(encoding="utf-8") if first else ""
                    config_pick = gr.Dropdown(names, value=first, label="config from configs/", scale=3, elem_id="config-pick")
                    train_name = gr.Textbox(Path(first).stem if first else "", label="run name", elem_id="train-name")
                    train_data = gr.Textbox(label="data file (optional: overrides data.train)", elem_id="train-data")
                config_editor = gr.Code(first_text, label="config (YAML)", language="yaml", interactive=True, elem_id="config-editor")
                config_check = gr.Markdown(check_config(first_text) if first else "", elem_id="config-check")
                with gr.Row():
                    train_start = gr.Button("Start", variant="primary", elem_id="train-start")
                    train_stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
                    train_resume = gr.Button("Resume", elem_id="train-resume")
                train_status = gr.Textbox(label="status", elem_id="train-status", interactive=False)
                with gr.Row():
                    train_log = gr.Textbox(label="log", lines=14, max_lines=14, autoscroll=True, elem_id="train-log", interactive=False)
                    train_loss = gr.LinePlot(x="step", y="loss", color="series", title="loss", elem_id="train-loss", height=300)
                train_outputs = [train_status, train_log, train_loss]
                config_pick.input(load_config, config_pick, [config_editor, config_check, train_name], api_name="load_config", concurrency_limit=None)
                config_editor.change(check_config, config_editor, config_check, api_name="check_config", concurrency_limit=None)
                timer = gr.Timer(poll_s, active=False)  # switched on while a training runs (polling)
                switch = dict(fn=lambda: polling(trainer), inputs=None, outputs=timer, api_visibility="private", concurrency_limit=None)
                train_start.click(start_training, [config_editor, train_name, train_data], train_outputs, api_name="train_start", concurrency_limit=None).then(**switch)
                train_stop.click(stop_training, None, train_outputs, api_name="train_stop", concurrency_limit=None).then(**switch)
                train_resume.click(resume_training, train_name, train_outputs, api_name="train_resume", concurrency_limit=None).then(**switch)
                timer.tick(poll, None, train_outputs, api_name="train_poll", concurrency_limit=None, show_progress="hidden").then(**switch)
                demo.load(**switch)
    return demo


def launch(
    demo: gr.Blocks,
    workspace: core.Workspace,
    *,
    host: str = "127.0.0.1",
    port: int | None = 7860,
    auth: list[tuple[str, str]] | None = None,
    share: bool = False,
    max_upload_mb: int = 50,
    concurrency: int = 2,
    block: bool = True,
    token: str | None = None,
    allowed_hosts: set[str] | None = frozenset(),
):
    """Start the server (queue on, uploads capped, report.html files of the runs folder servable).

    `token`: every request must carry it (tunelab/ui/access.py); `allowed_hosts`: names the
    Host header may give besides loopback, this machine's names and IP addresses (None: no
    Host check, for --share).
    """
    from starlette.middleware import Middleware

    from tunelab.ui.access import AccessMiddleware

    demo.queue(default_concurrency_limit=concurrency, max_size=200)
    guard = Middleware(AccessMiddleware, token=token, allowed_hosts=None if share else set(allowed_hosts or ()))
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=share,
        app_kwargs={"middleware": [guard]},
        max_file_size=f"{max_upload_mb}mb",
        allowed_paths=[str(workspace.runs_dir)],
        prevent_thread_lock=not block,
        css=CSS,
        footer_links=["api"],
        quiet=True,
        show_error=True,
    )
