"""`tunelab ui`: a web UI (Gradio) over run folders and data files.

core.py holds what the tabs do (plain functions, testable without a browser); app.py lays
them out as Gradio Blocks and starts the server.
"""

from __future__ import annotations

import os
from pathlib import Path

# No usage reports or update checks from Gradio: tunelab is offline by default.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def serve(
    runs_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: str | None = None,
    auth_file: Path | None = None,
    no_auth: bool = False,
    allow_hosts: list[str] | None = None,
    share: bool = False,
    data_dirs: list[Path] | None = None,
    max_models: int = 3,
    concurrency: int = 2,
    max_upload_mb: int = 50,
    dtype: str = "auto",
    device: str | None = None,
    allow_remote_code: bool = False,
    allow_overwrite: bool = False,
    allow_hub: bool = False,
) -> None:
    """Build the app and serve it until Ctrl-C, SIGTERM or SIGHUP; a training started from it
    is stopped (SIGINT: it checkpoints) on exit.

    Access: `--auth` users, else a random token printed in the URL ($TUNELAB_UI_TOKEN sets
    one), else, only with `no_auth`, nothing (warned).
    """
    import signal

    from tunelab.console import console
    from tunelab.errors import TunelabError
    from tunelab.ui import core
    from tunelab.ui.access import new_token

    credentials = core.parse_auth(auth, auth_file)
    if concurrency < 1:
        raise TunelabError(f"--concurrency must be at least 1, got {concurrency}")
    if no_auth and credentials:
        raise TunelabError("--no-auth and --auth/--auth-file contradict each other\n  fix: drop one of them")
    token = None if credentials or no_auth else (os.environ.get("TUNELAB_UI_TOKEN") or new_token())
    warning = core.exposure_warning(host, credentials or token, share)
    if warning:
        console.print(f"[bold yellow]{warning}[/]", highlight=False)
    if no_auth:
        console.print(f"[bold yellow]warning: --no-auth: anything that reaches {host}:{port} (other local users, "
                      "a web page in your browser) can use this UI: start trainings, read runs and data[/]", highlight=False)
    workspace = core.Workspace(runs_dir, data_dirs or [])
    from tunelab.ui.app import build_app, launch  # gradio is imported only once the options are good

    cache = core.ModelCache(max_models, dtype=dtype, device=device)
    trainer = core.TrainingManager(workspace, allow_remote_code=allow_remote_code, allow_overwrite=allow_overwrite,
                                   allow_hub=allow_hub)
    adopted = trainer.adopt_running()
    demo = build_app(workspace, cache, trainer, concurrency=concurrency)

    def stop_serving(signum, frame):  # `kill`, systemd, docker stop, a closed ssh session
        raise KeyboardInterrupt  # ends block_thread(); the finally below stops the training

    previous = {sig: signal.signal(sig, stop_serving) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            _, url, share_url = launch(
                demo, workspace, host=host, port=port, auth=credentials, share=share,
                max_upload_mb=max_upload_mb, concurrency=concurrency, block=False, token=token,
                allowed_hosts=set(allow_hosts or ()),
            )
        except OSError as err:  # the port is taken, or the host is not an address of this machine
            raise TunelabError(f"cannot serve on {host}:{port}: {err}\n  fix: another --port (or --host)") from None
        link = f"{url}?token={token}" if token else url
        console.print(f"tunelab ui on [bold]{link}[/] (runs folder {workspace.runs_dir}); Ctrl-C stops it",
                      highlight=False, soft_wrap=True)
        if adopted:
            console.print(f"still training (started before this UI): {adopted}", highlight=False)
        if share_url:
            console.print(f"public link: {share_url}" + (f"?token={token}" if token else ""), highlight=False)
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
    finally:
        trainer.shutdown()
        demo.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
