"""Who may use the UI: a secret token (as Jupyter does) and a Host-header allow-list.

Without `--auth`, `tunelab ui` makes a random token, prints it inside the URL and refuses
every request without it: the page, the API (`/gradio_api/...`), the queue, uploads and file
downloads alike. The first visit with `?token=...` leaves a cookie, so the browser's later
requests carry it; scripts send `Authorization: Bearer TOKEN` (gradio_client:
`Client(url, headers={"Authorization": "Bearer TOKEN"})`).

The Host check defeats DNS rebinding: a page on evil.example that re-points its name at
127.0.0.1 reaches the port, but its requests say `Host: evil.example`. Only loopback names,
this machine's names, IP literals (a rebinding page cannot make the browser send one for
its own origin) and names given with `--allow-host` are accepted.

Both are one ASGI middleware, installed in front of Gradio's own routes.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
from http.cookies import SimpleCookie
from urllib.parse import parse_qs

COOKIE = "tunelab-token"
# Gradio's launch() calls this itself to start the queue, before anyone has the token.
OPEN_PATHS = ("/gradio_api/startup-events",)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def local_names() -> set[str]:
    names = {"localhost", "localhost.localdomain"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return names


def host_name(header: str) -> str:
    """The name part of a Host header: `[::1]:7860` -> `::1`, `a.b:80` -> `a.b`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    name, _, _ = header.partition(":") if header.count(":") == 1 else (header, "", "")
    return name.rstrip(".")


def host_allowed(header: str, extra: set[str]) -> bool:
    name = host_name(header)
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in local_names() or name in extra or "*" in extra


class AccessMiddleware:
    """ASGI middleware: refuse a bad Host header (400) and, when a token is set, a request
    without it (401). `allowed_hosts=None` switches the Host check off (--share: the public
    link's host is Gradio's tunnel)."""

    def __init__(self, app, *, token: str | None, allowed_hosts: set[str] | None):
        self.app = app
        self.token = token
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and not host_allowed(headers.get("host", ""), self.allowed_hosts):
            return await self._refuse(scope, receive, send, 400,
                                      f"tunelab ui: Host {headers.get('host', '')!r} is not allowed (DNS rebinding guard); "
                                      "start the UI with --allow-host NAME to serve it under that name")
        if self.token is None or scope.get("path", "") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        from_query = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0]
        cookies = SimpleCookie(headers.get("cookie", ""))
        offered = [from_query, cookies[COOKIE].value if COOKIE in cookies else "",
                   headers.get("authorization", "").removeprefix("Bearer ").strip(), headers.get("x-tunelab-token", "")]
        if not any(o and hmac.compare_digest(o, self.token) for o in offered):
            return await self._refuse(scope, receive, send, 401,
                                      "tunelab ui: this UI needs its access token; open the link `tunelab ui` printed "
                                      "(http://HOST:PORT/?token=...), or send the header 'Authorization: Bearer TOKEN'")
        if not from_query or scope["type"] != "http":
            return await self.app(scope, receive, send)
        cookie = f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode("latin-1")

        async def send_with_cookie(message):  # the browser keeps the token for its later requests
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)

    @staticmethod
    async def _refuse(scope, receive, send, status: int, text: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
