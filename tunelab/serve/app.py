"""The FastAPI app: routes, auth and limits in front of the generation engines.

A request goes: key check (401) -> rate limit (429) -> JSON + fields (400) -> model (404)
-> prompt rendering and length checks (400) -> admission (429 when running + queued
generations would pass the capacity) -> one engine request per choice. The engine batches
requests of every client together (continuous batching); this module only translates.

Streaming uses Server-Sent Events (sse-starlette): it notices a client hanging up and cancels
the generator, whose `finally` cancels the engine requests, so the batch slot is free at the
next decode step. Non-streamed requests watch the connection for the same reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import TunelabError
from tunelab.serve.limits import Admission, KeyChecker, RateLimiter, retry_after
from tunelab.serve.loading import ServedModel
from tunelab.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    SamplingFields,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    new_id,
    now,
    parse_request,
    usage,
)

log = logging.getLogger("tunelab.serve")

# OpenAI's defaults for fields a request leaves out. temperature 0 sent by a client stays 0.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0


@dataclass(frozen=True)
class ServerSettings:
    """Limits of one server (the `tunelab serve` options)."""

    keys: tuple[str, ...] = ()  # empty: no key needed (--insecure)
    requests_per_minute: int = 600  # per key (per client address without keys); 0 = unlimited
    max_batch_size: int = 8  # sequences decoded together per model
    max_queue: int = 32  # generations allowed to wait beyond the running batch; more get 429
    max_tokens: int = 2048  # most new tokens one choice may ask for
    timeout: float = 600.0  # seconds a request may take, queueing included
    keepalive: float = 15.0  # seconds between SSE comments while a stream waits (keeps proxies from closing it)

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue


@dataclass
class Prepared:
    """A validated request ready for the engine: the model, the prompts, one SamplingParams per choice."""

    model: ServedModel
    prompts: list[list[int]]  # one per choice (a prompt repeated n times)
    params: list  # tunelab.engine.SamplingParams, one per choice
    prompt_tokens: int  # counted once per prompt, as OpenAI bills n > 1


def create_app(models: list[ServedModel], settings: ServerSettings) -> FastAPI:
    """The API over already loaded models (whoever loaded them closes their engines).

    Several apps may share the same models, each with its own keys and limits."""
    by_id = {m.id: m for m in models}
    checker = KeyChecker(settings.keys)
    limiter = RateLimiter(settings.requests_per_minute)
    admission = Admission(settings.capacity)

    # No /docs or /openapi.json: nothing is served that the key does not guard, except /health.
    app = FastAPI(title="tunelab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission = admission
    app.state.models = by_id

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        if err.status_code == 404:
            message += " (routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health)"
        return JSONResponse(RequestError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request failed: %s %s", request.method, request.url.path)  # the traceback stays in the log
        body = RequestError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    def caller(request: Request) -> object:
        """Check the key (401) and the caller's rate (429); returns who is calling."""
        if checker.required:
            index = checker.identify(request.headers.get("authorization"))
            if index is None:
                raise RequestError(401, "invalid or missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                                   kind="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            who: object = ("key", index)
        else:
            who = ("address", request.client.host if request.client else "?")
        wait = limiter.take(who)
        if wait is not None:
            raise RequestError(429, f"rate limit of {settings.requests_per_minute} requests per minute reached; "
                               f"retry in {retry_after(wait)} s", kind="rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": retry_after(wait)})
        return who

    @app.get("/health")
    async def health() -> dict:
        """Liveness for load balancers and scripts; no key needed, nothing private in it."""
        return {"status": "ok", "in_flight": admission.in_flight, "capacity": admission.capacity}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict:
        caller(request)
        return {"object": "list", "data": [model_card(m) for m in models]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request) -> dict:
        caller(request)
        return model_card(find_model(by_id, name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        caller(request)
        body = parse_request(await read_json(request), ChatCompletionRequest)
        prepared = prepare_chat(body, by_id, settings)
        return await run(request, body, prepared, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        caller(request)
        body = parse_request(await read_json(request), CompletionRequest)
        prepared = prepare_completion(body, by_id, settings)
        return await run(request, body, prepared, chat=False)

    async def run(request: Request, body: SamplingFields, prepared: Prepared, *, chat: bool):
        count = len(prepared.prompts)
        if not admission.try_enter(count):
            raise RequestError(429, f"server busy: {admission.in_flight} generations running or queued (capacity "
                               f"{admission.capacity}); retry shortly", kind="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"})
        handles = []
        try:
            for prompt, params in zip(prepared.prompts, prepared.params):
                handles.append(prepared.model.engine.submit(prompt, params))
        except BaseException as err:
            for handle in handles:
                handle.cancel()
            admission.leave(count)
            if isinstance(err, TunelabError):  # a value the engine refuses (checked here first, so rare)
                raise RequestError(400, str(err).split("\n")[0]) from None
            raise
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = stream_events(handles, prepared, body.stop_strings(), chat=chat, include_usage=include_usage,
                                   timeout=settings.timeout, release=lambda: admission.leave(count))
            return EventSourceResponse(events, ping=settings.keepalive, sep="\n")
        try:
            results = await wait_results(request, handles, settings.timeout)
        finally:
            admission.leave(count)
        texts = [(r.text, finish_reason(r.finish_reason)) for r in results]
        completion_tokens = sum(r.completion_tokens for r in results)
        respond = chat_response if chat else completion_response
        return respond(new_id("chatcmpl" if chat else "cmpl"), prepared.model.id, texts, prepared.prompt_tokens, completion_tokens)

    return app


def model_card(m: ServedModel) -> dict:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": "tunelab", "parent": m.parent,
            "root": m.parent or m.id, "max_model_len": m.context_tokens}


def find_model(by_id: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in by_id:
        raise RequestError(404, f"model {name!r} is not served here; served models: {', '.join(by_id)}",
                           param="model", code="model_not_found")
    return by_id[name]


async def read_json(request: Request):
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise RequestError(400, f"the request body is not valid JSON{where}: {err}") from None


# ----------------------------------------------------------------------------- preparing requests


def prepare_chat(body: ChatCompletionRequest, by_id: dict[str, ServedModel], settings: ServerSettings) -> Prepared:
    """Render the messages with the model's own (training) chat template and check lengths."""
    from tunelab.generate import encode_prompt

    model = find_model(by_id, body.model)
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise RequestError(400, f"'max_tokens' ({body.max_tokens}) and 'max_completion_tokens' "
                           f"({body.max_completion_tokens}) disagree; send one of them", param="max_completion_tokens")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = encode_prompt(model.tokenizer, messages, use_chat_template=model.chat_template)
    except TunelabError as err:  # the template refuses this conversation (e.g. no system role)
        raise RequestError(400, str(err).split("\n")[0], param="messages") from None
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_new = new_token_budget(model, len(prompt), wanted, field, "messages", settings)
    if body.n > settings.capacity:
        raise RequestError(400, f"'n' is {body.n}, above the {settings.capacity} generations this server runs or "
                           "queues at once (--max-batch-size + --max-queue)", param="n")
    params = sampling_params(body, max_new)
    return Prepared(model, [prompt] * body.n, params, len(prompt))


def prepare_completion(body: CompletionRequest, by_id: dict[str, ServedModel], settings: ServerSettings) -> Prepared:
    """Tokenize the prompt(s) as raw text (no chat template, as OpenAI's completions endpoint)."""
    from tunelab.generate import encode_text

    model = find_model(by_id, body.model)
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts = [encode_text(model.tokenizer, prompt)]
    elif not prompt:
        raise RequestError(400, "'prompt' is empty: give a string, a list of strings or token ids", param="prompt")
    elif isinstance(prompt[0], str):
        prompts = [encode_text(model.tokenizer, p) for p in prompt]
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    vocab = len(model.tokenizer)
    for i, ids in enumerate(prompts):
        if not ids:
            raise RequestError(400, f"'prompt.{i}' is empty", param=f"prompt.{i}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(400, f"'prompt': token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    if len(prompts) * body.n > settings.capacity:
        raise RequestError(400, f"{len(prompts)} prompts x n={body.n} = {len(prompts) * body.n} generations exceed the "
                           f"server's capacity of {settings.capacity}; send fewer at once", param="prompt")
    longest = max(len(p) for p in prompts)
    max_new = new_token_budget(model, longest, body.max_tokens, "max_tokens", "prompt", settings)
    params = sampling_params(body, max_new)
    return Prepared(model, [p for p in prompts for _ in range(body.n)], params * len(prompts),
                    sum(len(p) for p in prompts))


def new_token_budget(model: ServedModel, prompt_tokens: int, wanted: int | None, field: str, prompt_field: str,
                     settings: ServerSettings) -> int:
    """New tokens per choice: as asked (checked against the server cap and the context), else what fits."""
    room = model.context_tokens - prompt_tokens
    if room < 1:
        raise RequestError(400, f"'{prompt_field}' is {prompt_tokens} tokens: that fills the model's context of "
                           f"{model.context_tokens} tokens; shorten it", param=prompt_field, code="context_length_exceeded")
    if wanted is None:
        return min(settings.max_tokens, room)
    if wanted > settings.max_tokens:
        raise RequestError(400, f"'{field}' is {wanted}, above this server's limit of {settings.max_tokens} "
                           "(tunelab serve --max-tokens)", param=field)
    if wanted > room:
        raise RequestError(400, f"'{field}' is {wanted}, but the prompt is {prompt_tokens} tokens and the context "
                           f"{model.context_tokens}: at most {room} new tokens fit", param=field,
                           code="context_length_exceeded")
    return wanted


def sampling_params(body: SamplingFields, max_new: int) -> list:
    """One SamplingParams per choice: choice k samples with seed + k, so n choices differ but repeat."""
    from tunelab.engine import SamplingParams

    def value(given, default):  # explicit None checks: a client's 0 is a value, not "unset"
        return default if given is None else given

    return [
        SamplingParams(
            max_new_tokens=max_new,
            temperature=float(value(body.temperature, DEFAULT_TEMPERATURE)),
            top_p=float(value(body.top_p, DEFAULT_TOP_P)),
            top_k=value(body.top_k, 0),
            min_p=float(value(body.min_p, 0.0)),
            repetition_penalty=float(value(body.repetition_penalty, 1.0)),
            seed=None if body.seed is None else body.seed + k,
            stop=body.stop_strings(),
        )
        for k in range(body.n)
    ]


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: the engine's "stop" / "length" as they are."""
    return "length" if reason == "length" else "stop"


# ----------------------------------------------------------------------------- waiting and streaming


def in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> asyncio.Future:
    """Run a blocking call in its own thread and resolve a future on `loop` with its outcome.

    One thread per generation (not a shared pool): each blocks until its request is done,
    and a pool smaller than the queue would stall finished requests behind unfinished ones.
    """
    future = loop.create_future()

    def settle(result, error) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def work() -> None:
        try:
            result, error = fn(), None
        except BaseException as err:  # handed to the awaiting coroutine
            result, error = None, err
        loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, daemon=True, name="tunelab-serve-wait").start()
    return future


async def wait_disconnect(request: Request) -> None:
    """Returns when the client hangs up (the body is read, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_results(request: Request, handles: list, timeout: float) -> list:
    """Every handle's GenerationResult; cancels all of them on disconnect (and returns nothing) or timeout (504)."""
    loop = asyncio.get_running_loop()
    results = asyncio.gather(*(in_thread(loop, h.wait) for h in handles))
    hang_up = asyncio.ensure_future(wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({results, hang_up}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hang_up.cancel()
    if results in done:
        return results.result()
    for handle in handles:
        handle.cancel()
    if hang_up in done:
        log.info("client disconnected; generation cancelled")
        raise RequestError(499, "client closed the request")
    raise RequestError(504, f"generation took longer than the server's timeout of {timeout:g} s "
                       "(tunelab serve --timeout); ask for fewer tokens", kind="timeout", code="timeout")


class StopHoldBack:
    """Streams text without ever sending a stop string: the tail that could still become one is held.

    `feed` takes the engine's deltas and returns what is safe to send; `finish` takes the
    final text (the engine's, stop strings cut) and returns what is left to send.
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.text = ""  # everything received
        self.sent = 0  # characters of `text` sent
        self.stopped = False

    def feed(self, delta: str) -> str:
        if self.stopped:
            return ""
        self.text += delta
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            safe = cut
        else:
            safe = len(self.text) - self._held()
        out = self.text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def finish(self, final: str) -> str:
        sent = self.text[: self.sent]
        return final[len(sent):] if final.startswith(sent) else ""


async def stream_events(handles: list, prepared: Prepared, stops: tuple[str, ...], *, chat: bool, include_usage: bool,
                        timeout: float, release: Callable[[], None]) -> AsyncIterator[str]:
    """SSE data lines of a streamed request: chunks as text arrives, a final chunk per choice, usage, [DONE]."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    rid, created, model = new_id("chatcmpl" if chat else "cmpl"), now(), prepared.model.id

    def pump(index: int, handle) -> None:  # a thread: the engine's blocking stream -> the event loop
        try:
            for delta in handle.stream():
                loop.call_soon_threadsafe(queue.put_nowait, (index, delta))
            loop.call_soon_threadsafe(queue.put_nowait, (index, handle.wait()))
        except BaseException as err:  # shown to the client as an error event
            loop.call_soon_threadsafe(queue.put_nowait, (index, err))

    def chunk(index: int | None, text: str | None = None, reason: str | None = None, usage_body: dict | None = None,
              role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            body = chat_chunk(rid, created, model, index, delta, reason, usage_body, include_usage)
        else:
            body = completion_chunk(rid, created, model, index, text or "", reason, usage_body, include_usage)
        return json.dumps(body, ensure_ascii=False)

    holds = [StopHoldBack(stops) for _ in handles]
    open_choices = set(range(len(handles)))
    completion_tokens = 0
    deadline = loop.time() + timeout
    try:
        for index, handle in enumerate(handles):
            threading.Thread(target=pump, args=(index, handle), daemon=True, name="tunelab-serve-stream").start()
            if chat:
                yield chunk(index, role=True)
        while open_choices:
            try:
                index, item = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                yield json.dumps(RequestError(504, f"generation took longer than the server's timeout of {timeout:g} s",
                                              kind="timeout", code="timeout").body())
                return
            if isinstance(item, str):
                text = holds[index].feed(item)
                if text:
                    yield chunk(index, text)
            elif isinstance(item, BaseException):
                log.error("generation failed", exc_info=item)
                yield json.dumps(RequestError(500, f"generation failed: {type(item).__name__}: {item}", kind="server_error").body())
                return
            else:  # the GenerationResult: what is left, then the finish reason
                tail = holds[index].finish(item.text)
                if tail:
                    yield chunk(index, tail)
                yield chunk(index, None, finish_reason(item.finish_reason))
                completion_tokens += item.completion_tokens
                open_choices.discard(index)
        if include_usage:
            yield chunk(None, usage_body=usage(prepared.prompt_tokens, completion_tokens))
        yield "[DONE]"
    finally:  # normal end, timeout, error, or the client hung up (sse-starlette cancels this generator)
        for handle in handles:
            if not handle.done:
                handle.cancel()
        release()
