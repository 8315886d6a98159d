"""`tunelab serve`: an OpenAI-compatible API for runs and adapters.

    protocol.py  request models (pydantic), response and chunk builders, the error envelope
    limits.py    API keys, per-key rate limits, the bounded queue
    loading.py   SOURCE + --adapter NAME=RUN -> served models, one engine each, one base in memory
    app.py       the FastAPI routes over tunelab/engine.py (continuous batching)

`serve()` below is the command: `build_server` checks the binding and keys before loading
anything and binds the socket (a port in use is a clear error, not a traceback); then the URL
is printed with a curl and an openai-SDK snippet that work as printed, and uvicorn runs until Ctrl-C.
"""

from __future__ import annotations

import socket
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.serve.app import ServerSettings, create_app
from tunelab.serve.limits import KEY_ENV, KeySource, check_binding, generated_keys, load_keys
from tunelab.serve.loading import ServedModel, load_models, parse_adapter

__all__ = ["Server", "ServerSettings", "ServedModel", "bind_socket", "build_server", "create_app", "load_models", "serve", "snippets"]


class Server:
    """A loaded, bound, not yet running server: `run()` serves until Ctrl-C (or `stop()`)."""

    def __init__(self, models: list[ServedModel], settings: ServerSettings, sock: socket.socket, banner: str):
        import uvicorn

        self.models = models
        self.settings = settings
        self.sock = sock
        self.banner = banner
        self.app = create_app(models, settings)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def run(self) -> None:
        """Serve until interrupted, then close the socket and the engines."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.sock.close()
            for m in self.models:
                m.engine.close()

    def stop(self) -> None:
        self.uvicorn.should_exit = True


def build_server(
    source: str,
    *,
    adapters: list[str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_keys_file: Path | None = None,
    insecure: bool = False,
    requests_per_minute: int = 600,
    max_batch_size: int = 8,
    max_queue: int = 32,
    max_tokens: int = 2048,
    timeout: float = 600.0,
    dtype: str = "auto",
    device: str | None = None,
    threads: int | None = None,
) -> Server:
    """Check options, keys and the binding (before loading anything), bind, load SOURCE + adapters."""
    import torch

    from tunelab.console import console, status

    keys = load_keys(api_key, api_keys_file)
    check_binding(host, keys, insecure)
    if not keys.keys and not insecure:
        keys = generated_keys()
    check_limits(requests_per_minute=requests_per_minute, max_batch_size=max_batch_size, max_queue=max_queue,
                 max_tokens=max_tokens, timeout=timeout, threads=threads)
    parsed = [parse_adapter(option) for option in adapters or []]
    sock = bind_socket(host, port)  # before loading: a port in use fails in a second, not after a minute
    try:
        if threads:
            torch.set_num_threads(threads)
        with status(f"loading {source}" + (f" with {len(parsed)} adapter(s)" if parsed else "")):
            models = load_models(source, parsed, dtype=dtype, device=device, max_batch_size=max_batch_size)
    except BaseException:
        sock.close()
        raise
    if insecure and not keys.keys:
        console.print(f"[bold yellow]warning:[/] --insecure: no API key; anyone who can reach {host}:{sock.getsockname()[1]} "
                      "can use the models", highlight=False)
    settings = ServerSettings(keys=keys.keys, requests_per_minute=requests_per_minute, max_batch_size=max_batch_size,
                              max_queue=max_queue, max_tokens=max_tokens, timeout=timeout)
    return Server(models, settings, sock, snippets(host, sock.getsockname()[1], [m.id for m in models], keys))


def serve(source: str, **options) -> None:
    """`tunelab serve`: build the server (options as `build_server`), print how to call it, serve."""
    server = build_server(source, **options)
    print(server.banner, flush=True)
    server.run()


def check_limits(**values: float | int | None) -> None:
    """Refuse option values the server cannot run with, naming the option."""
    minimum = {"requests_per_minute": 0, "max_batch_size": 1, "max_queue": 0, "max_tokens": 1, "timeout": 0.001, "threads": 1}
    for name, value in values.items():
        if value is not None and value < minimum[name]:
            raise TunelabError(f"--{name.replace('_', '-')} must be at least {minimum[name]}, got {value}")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise TunelabError(f"cannot listen on {host}:{port}: {err.strerror}\n  fix: pick another --port, "
                           "or stop the program using it") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def snippets(host: str, port: int, model_ids: list[str], keys: KeySource) -> str:
    """The startup text: URL, key and a curl and a Python call that work when pasted as printed."""
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}/v1"
    model = model_ids[-1]  # an adapter when there are any: that is what people serve to try
    if keys.origin == "env":
        key_text, curl_key, py_key = f"from ${KEY_ENV}", f'"Authorization: Bearer ${KEY_ENV}"', f'os.environ["{KEY_ENV}"]'
    elif keys.keys:
        key = keys.keys[0]
        note = {"generated": " (generated for this run; choose one with --api-key or $" + KEY_ENV + ")",
                "file": f" (the first of {len(keys.keys)} keys in --api-keys-file)"}.get(keys.origin, "")
        key_text, curl_key, py_key = key + note, f"'Authorization: Bearer {key}'", repr(key)
    else:
        key_text, curl_key, py_key = "none (--insecure)", "'Authorization: Bearer none'", "'none'"
    request = json_one_line({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    lines = [
        f"tunelab serve: {base}  models: {', '.join(model_ids)}",
        f"API key: {key_text}",
        "",
        "curl:",
        f"curl {base}/chat/completions -H {curl_key} -H 'Content-Type: application/json' -d '{request}'",
        "",
        "python (pip install openai):",
        *(["import os"] if keys.origin == "env" else []),
        "from openai import OpenAI",
        f"client = OpenAI(base_url={base!r}, api_key={py_key})",
        f"reply = client.chat.completions.create(model={model!r}, messages=[{{'role': 'user', 'content': 'Hello!'}}], max_tokens=64)",
        "print(reply.choices[0].message.content)",
        "",
        "Ctrl-C stops the server.",
    ]
    return "\n".join(lines)


def json_one_line(value) -> str:
    import json

    return json.dumps(value, ensure_ascii=False).replace("'", "'\\''")  # safe inside '...' in a shell
