"""Who may call the server and how much: API keys, per-key rate limits, a bounded queue.

Keys are compared with `hmac.compare_digest` (constant time, so response timing does not
reveal how much of a guessed key was right). A key is never logged: limits are kept per key
*index* ("key 2"), and errors do not echo the key sent.
"""

from __future__ import annotations

import hmac
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError

KEY_ENV = "TUNELAB_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Callers (keys, or client addresses with --insecure) whose buckets are kept before full ones are dropped.
MAX_TRACKED_CALLERS = 10_000


@dataclass(frozen=True)
class KeySource:
    """The keys the server accepts and where they came from (for the printed snippets)."""

    keys: tuple[str, ...]
    origin: str  # "option", "env", "file", "generated" or "none" (--insecure)


def load_keys(api_key: str | None, keys_file: Path | None, *, env: dict[str, str] | None = None) -> KeySource:
    """Keys from --api-key, else TUNELAB_API_KEY, plus every line of --api-keys-file.

    Keys file: one key per line; blank lines and lines starting with '#' are skipped.
    """
    env = os.environ if env is None else env
    keys: list[str] = []
    origin = "none"
    if api_key is not None:
        keys.append(_checked_key(api_key, "--api-key"))
        origin = "option"
    elif env.get(KEY_ENV):
        keys.append(_checked_key(env[KEY_ENV], KEY_ENV))
        origin = "env"
    if keys_file is not None:
        if not keys_file.is_file():
            raise TunelabError(f"--api-keys-file: {keys_file} not found\n  fix: a text file with one key per line")
        lines = keys_file.read_text(encoding="utf-8").splitlines()
        found = [_checked_key(line.strip(), f"{keys_file}:{number}") for number, line in enumerate(lines, 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not found:
            raise TunelabError(f"--api-keys-file: {keys_file} holds no keys\n  fix: one key per line ('#' starts a comment)")
        keys += found
        origin = origin if origin != "none" else "file"
    return KeySource(tuple(keys), origin)


def _checked_key(key: str, where: str) -> str:
    if not key or any(c.isspace() for c in key):
        raise TunelabError(f"{where}: an API key must be non-empty and hold no spaces")
    return key


def generated_keys() -> KeySource:
    """A random key for this server's lifetime (printed at start), when none was configured."""
    return KeySource((f"sk-tunelab-{secrets.token_urlsafe(24)}",), "generated")


def check_binding(host: str, keys: KeySource, insecure: bool) -> None:
    """Refuse to serve other machines without a key: an open API lets anyone run the model."""
    if host not in LOOPBACK_HOSTS and not keys.keys and not insecure:
        raise TunelabError(
            f"--host {host} serves other machines and no API key is set\n"
            f"  fix: add --api-key KEY (or set {KEY_ENV}, or --api-keys-file FILE); "
            "--insecure serves without a key"
        )


class KeyChecker:
    """Validates `Authorization: Bearer KEY` headers. No keys: everyone passes (--insecure)."""

    def __init__(self, keys: tuple[str, ...]):
        self._keys = [key.encode() for key in keys]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> int | None:
        """The index of the matching key, None if none matches (every key is compared)."""
        if not self._keys:
            return 0
        scheme, _, sent = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return None
        sent_bytes = sent.strip().encode()
        match = None
        for index, key in enumerate(self._keys):
            if hmac.compare_digest(sent_bytes, key):
                match = index
        return match


class RateLimiter:
    """A token bucket per caller: `per_minute` requests a minute, bursts up to `per_minute`.

    0 disables the limit. Thread-safe. `take` returns None when admitted, else the seconds
    until the next request would be (for the Retry-After header).
    """

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self._clock = clock
        self._buckets: dict[object, tuple[float, float]] = {}  # caller -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, caller: object) -> float | None:
        if self.per_minute <= 0:
            return None
        rate = self.per_minute / 60.0  # tokens per second
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.get(caller, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if len(self._buckets) > MAX_TRACKED_CALLERS:  # forget callers whose bucket has refilled
                self._buckets = {who: (t, at) for who, (t, at) in self._buckets.items()
                                 if t + (now - at) * rate < self.per_minute}
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                return None
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / rate


@dataclass
class Admission:
    """Bounds the generations in flight (running + waiting, counted per choice), server-wide.

    Past `capacity` a request is refused at once (429) instead of queueing without bound:
    clients retry after a moment instead of timing out behind a queue that only grows.
    """

    capacity: int
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def try_enter(self, count: int) -> bool:
        with self._lock:
            if self.in_flight + count > self.capacity:
                return False
            self.in_flight += count
            return True

    def leave(self, count: int) -> None:
        with self._lock:
            self.in_flight -= count


def retry_after(seconds: float) -> str:
    """Retry-After takes whole seconds; never 0, which some clients read as "retry now, forever"."""
    return str(max(1, math.ceil(seconds)))
