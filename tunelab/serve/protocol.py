"""The OpenAI wire format: request models (validated with pydantic), response builders, errors.

Requests are validated strictly where a wrong value would change the answer (types, ranges,
the number of stop strings) and fields we do not implement are refused by name
(`UNSUPPORTED_*`), never silently dropped or aliased to something else. Keys OpenAI does not
define are ignored, as OpenAI's own server does.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Most stop strings and choices one request may ask for (OpenAI allows 4 stop strings and
# n up to 128; each choice takes a batch slot here, so n is kept small).
MAX_STOP_STRINGS = 16
MAX_CHOICES = 16

# Request fields OpenAI defines and this server does not implement, with what to do instead.
# A field is refused only when it asks for something: null, false, 0 and empty lists are the
# clients' defaults (LangChain sends presence_penalty: 0) and mean "off", as here.
UNSUPPORTED_COMMON = {
    "logit_bias": "token biases are not implemented",
    "presence_penalty": "use repetition_penalty (a multiplicative penalty, a different quantity)",
    "frequency_penalty": "use repetition_penalty (a multiplicative penalty, a different quantity)",
    "logprobs": "log-probabilities are not returned by this server",
    "best_of": "generate n choices and pick one yourself",
}
UNSUPPORTED_CHAT = {
    **UNSUPPORTED_COMMON,
    "tools": "tool calling is not implemented",
    "tool_choice": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "parallel_tool_calls": "tool calling is not implemented",
    "response_format": "structured output (JSON mode / schemas) is not implemented",
    "top_logprobs": "log-probabilities are not returned by this server",
    "audio": "audio output is not implemented",
    "modalities": "only text output is implemented",
    "prediction": "predicted outputs are not implemented",
    "web_search_options": "web search is not implemented",
    "reasoning_effort": "reasoning effort is not implemented",
}
UNSUPPORTED_COMPLETION = {
    **UNSUPPORTED_COMMON,
    "echo": "the prompt is not echoed back",
    "suffix": "insertion (suffix) is not implemented",
}
# Message fields that need tool support.
UNSUPPORTED_MESSAGE = {"tool_calls": "tool calling is not implemented", "function_call": "function calling is not implemented",
                       "audio": "audio input is not implemented"}


class RequestError(Exception):
    """A client error, sent as OpenAI's error envelope with an HTTP status.

    `param` names the offending field as a dotted path (`messages.1.content`), as OpenAI does.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------- requests


class Strict(BaseModel):
    """Fields are checked for type without coercion ("1" is not 1); unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    """One message. `developer` is OpenAI's newer name for `system` and is rendered as one."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted; chat templates have no place for it

    def text(self) -> str:
        """The content as one string (text parts joined, as OpenAI concatenates them)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


# Sampling ranges are OpenAI's where it has one (temperature 0..2, top_p 0..1).
Temperature = Annotated[float, Field(ge=0.0, le=2.0, strict=False)]  # strict=False: an int 0 or 1 is a float too


class SamplingFields(Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, strict=False)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Extras (vLLM and unsloth take the same names in the body / extra_body).
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0.0, lt=1.0, strict=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, strict=False)] | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    # The newer name of max_tokens (LangChain and the o-series clients send only this one).
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptInput


# ----------------------------------------------------------------------------- parsing


def refuse_unsupported(body: dict, unsupported: dict[str, str], where: str = "") -> None:
    """400 for the first unimplemented field that asks for something (see UNSUPPORTED_COMMON)."""
    for name, advice in unsupported.items():
        value = body.get(name)
        if value in (None, False, 0, [], {}, ""):
            continue
        raise RequestError(400, f"'{where}{name}' is not supported by this server: {advice}", param=f"{where}{name}",
                           code="unsupported_parameter")


def parse_request(body: Any, model: type[SamplingFields]) -> SamplingFields:
    """Validate a decoded JSON body into `model`, or raise a RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    if model is ChatCompletionRequest:
        refuse_unsupported(body, UNSUPPORTED_CHAT)
        for i, message in enumerate(body.get("messages") or []):
            if isinstance(message, dict):
                refuse_unsupported(message, UNSUPPORTED_MESSAGE, where=f"messages.{i}.")
    else:
        refuse_unsupported(body, UNSUPPORTED_COMPLETION)
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise validation_error(err) from err


def validation_error(err: ValidationError) -> RequestError:
    """The first pydantic error as one message: the field's dotted path, the problem, the value."""
    first = min(err.errors(), key=lambda e: len(e["loc"]))  # the outermost problem reads best
    # pydantic reports a failed union member as a loc segment ("str", "list[TextPart]"); drop those.
    path = ".".join(str(part) for part in first["loc"] if not _union_tag(part))
    if first["type"] == "missing":
        return RequestError(400, f"'{path}' is required", param=path)
    received = repr(first.get("input"))
    if len(received) > 80:
        received = received[:77] + "..."
    message = first["msg"].removeprefix("Value error, ")
    return RequestError(400, f"'{path}': {message} (got {received})", param=path)


def _union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
    """A `chat.completion`: one choice per (text, finish_reason)."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
        for i, (text, reason) in enumerate(texts)
    ]
    return {"id": rid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_response(rid: str, model: str, texts: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
    """A `text_completion`: choices in prompt order, n per prompt."""
    choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason} for i, (text, reason) in enumerate(texts)]
    return {"id": rid, "object": "text_completion", "created": now(), "model": model, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, created: int, model: str, index: int | None, delta: dict | None = None,
               finish_reason: str | None = None, usage_body: dict | None = None, with_usage: bool = False) -> dict:
    """A `chat.completion.chunk`. `index` None: the usage-only chunk (no choices) that ends a stream."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:  # OpenAI sends "usage": null on every chunk when include_usage is on
        chunk["usage"] = usage_body
    return chunk


def completion_chunk(rid: str, created: int, model: str, index: int | None, text: str = "",
                     finish_reason: str | None = None, usage_body: dict | None = None, with_usage: bool = False) -> dict:
    """A streamed `text_completion` chunk (OpenAI streams completions as the same object type)."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = usage_body
    return chunk
