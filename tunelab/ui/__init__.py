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
    share: bool = False,
    data_dirs: list[Path] | None = None,
    max_models: int = 3,
    concurrency: int = 2,
    max_upload_mb: int = 50,
    dtype: str = "auto",
    device: str | None = None,
) -> None:
    """Build the app and serve it until Ctrl-C; a training started from it is stopped on exit."""
    from tunelab.console import console
    from tunelab.errors import TunelabError
    from tunelab.ui import core

    credentials = core.parse_auth(auth, auth_file)
    if concurrency < 1:
        raise TunelabError(f"--concurrency must be at least 1, got {concurrency}")
    warning = core.exposure_warning(host, credentials, share)
    if warning:
        console.print(f"[bold yellow]{warning}[/]", highlight=False)
    workspace = core.Workspace(runs_dir, data_dirs or [])
    from tunelab.ui.app import build_app, launch  # gradio is imported only once the options are good

    cache = core.ModelCache(max_models, dtype=dtype, device=device)
    trainer = core.TrainingManager(workspace)
    demo = build_app(workspace, cache, trainer, concurrency=concurrency)
    try:
        try:
            _, url, share_url = launch(
                demo, workspace, host=host, port=port, auth=credentials, share=share,
                max_upload_mb=max_upload_mb, concurrency=concurrency, block=False,
            )
        except OSError as err:  # the port is taken, or the host is not an address of this machine
            raise TunelabError(f"cannot serve on {host}:{port}: {err}\n  fix: another --port (or --host)") from None
        console.print(f"tunelab ui on [bold]{url}[/] (runs folder {workspace.runs_dir}); Ctrl-C stops it", highlight=False)
        if share_url:
            console.print(f"public link: {share_url}", highlight=False)
        demo.block_thread()
    finally:
        trainer.shutdown()
        demo.close()
