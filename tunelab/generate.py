"""Text generation from a loaded model: batched greedy/sampled completions and a chat session,
all decoded by the continuous-batching engine (`tunelab.engine`).

The prompt is rendered with the tokenizer's chat template (the one saved with the run, so
inference sees the same format as training) and generation stops at the end-of-turn
token ("<|im_end|>" for ChatML) as well as at EOS. Batches are LEFT-padded and carry an
attention mask, because SmolLM2's pad id equals its EOS id and cannot mark padding by
itself.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from tunelab.engine import Engine, SamplingParams
from tunelab.errors import DataError, TunelabError
from tunelab.files import write_text_atomic

# Fields that hold the prompt in a JSONL prompts file, in order of preference.
PROMPT_FIELDS = ("prompt", "question", "instruction")
# Context used when neither the model config nor the tokenizer states a sane limit.
FALLBACK_CONTEXT_TOKENS = 2048


@dataclass
class GenerationSettings:
    """How to generate: temperature 0 means greedy decoding; K samples per prompt need T > 0."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_samples: int = 1

    def check(self) -> None:
        """Raise one clear TunelabError for values generation cannot use."""
        if self.max_new_tokens < 1:
            raise TunelabError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise TunelabError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.num_samples < 1:
            raise TunelabError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise TunelabError(
                f"--num-samples {self.num_samples} with --temperature 0 would repeat one greedy answer\n"
                "  fix: add --temperature 0.7 (or any value > 0) to sample different answers"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation: its text (special tokens removed) and how many tokens it took."""

    text: str
    tokens: int


def model_device(model: torch.nn.Module) -> torch.device:
    """The device holding the model's weights (inputs must be moved there)."""
    return next(model.parameters()).device


def end_of_turn_ids(tokenizer, model: torch.nn.Module | None = None) -> list[int]:
    """Token ids that end generation: the tokenizer's EOS and chat end-of-turn markers
    (`tunelab.models.end_of_turn_ids`), plus whatever EOS the model's generation config names."""
    from tunelab.models import end_of_turn_ids as template_end_ids

    ids = set(template_end_ids(tokenizer))
    configured = model.generation_config.eos_token_id if model is not None and model.generation_config else None
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    return sorted(ids)


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def has_chat_template(tokenizer) -> bool:
    return bool(tokenizer.chat_template)


def render_prompt(tokenizer, messages: Sequence[dict[str, str]], *, use_chat_template: bool = True) -> str:
    """The text the model continues to answer the last message.

    With a chat template: the template plus the generation prompt (e.g. "<|im_start|>assistant\\n").
    Without one (or when disabled): the message contents separated by blank lines, then a newline.
    """
    if use_chat_template and has_chat_template(tokenizer):
        return apply_template(tokenizer, messages, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def apply_template(tokenizer, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """Render messages with the chat template, explaining template refusals (e.g. no system role)."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as err:
        raise template_refusal(messages, err) from err


def template_refusal(messages: Sequence[dict[str, str]], err: Exception) -> TunelabError:
    """The user-facing error for a chat template that refuses a conversation (e.g. no system role)."""
    roles = ", ".join(m["role"] for m in messages)
    return TunelabError(
        f"the model's chat template rejects these messages (roles: {roles}): {err}\n"
        "  fix: drop the system message (--system) or use roles the template allows"
    )


def encode_prompt(tokenizer, messages: Sequence[dict[str, str]], *, use_chat_template: bool = True) -> list[int]:
    """Token ids of a conversation prompt, rendered as in training (`render_prompt`).

    With the chat template, control tokens typed in the messages (a literal "<|im_end|>")
    are escaped, as the data pipeline does, so user text cannot end a turn early.
    """
    if not (use_chat_template and has_chat_template(tokenizer)):
        return encode_text(tokenizer, render_prompt(tokenizer, messages, use_chat_template=False))
    from jinja2.exceptions import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True
        )
    except TemplateError as err:
        raise template_refusal(messages, err) from err
    return list(encoded["input_ids"])


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of raw prompt text, with the BOS token if the tokenizer adds one."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token lists into (input_ids, attention_mask), padding on the left so that every
    row's last prompt token sits in the final column where generation continues."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        if tokens:
            input_ids[row, width - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            attention_mask[row, width - len(tokens) :] = 1
    return input_ids, attention_mask


def build_generation_config(tokenizer, model: torch.nn.Module, settings: GenerationSettings):
    """A complete GenerationConfig, so the model's saved defaults (sampling, lengths) never leak in."""
    from transformers import GenerationConfig

    sampling = {} if settings.greedy else {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": 0}
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=not settings.greedy,
        num_return_sequences=settings.num_samples,
        eos_token_id=end_of_turn_ids(tokenizer, model),
        pad_token_id=pad_token_id(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        **sampling,
    )


def trim_at_stop(tokens: Sequence[int], stop_ids: set[int]) -> list[int]:
    """The generated tokens up to and including the first stop token (the rest is padding)."""
    out: list[int] = []
    for token in tokens:
        out.append(int(token))
        if token in stop_ids:
            break
    return out


def sampling_params(settings: GenerationSettings, seed: int | None = None, stop: Sequence[str] = ()) -> SamplingParams:
    """The engine's per-request settings for one of `settings`' samples."""
    return SamplingParams(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=seed,
        stop=tuple(stop),
    )


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    """A distinct, repeatable seed for sample `sample` of prompt number `prompt` under run seed `seed`
    (so a sample never depends on which other prompts share its batch)."""
    return (seed * 1_000_003 + prompt * 1009 + sample) % 2**62


def generate_completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    *,
    batch_size: int = 8,
    seed: int | None = None,
    description: str = "Generating",
) -> list[list[Completion]]:
    """Generate `settings.num_samples` completions for each tokenized prompt, in input order.

    PyTorch models run on the continuous-batching `Engine` with `batch_size` slots: a row that
    finishes is replaced by the next prompt at once. `seed` gives every sample its own seed
    (`sample_seed`), so samples repeat whatever the batch size; without it they follow torch's
    global RNG. Exported runtimes (ONNX) keep their own `generate`.
    """
    from tunelab.console import progress
    from rich.progress import TextColumn

    settings.check()
    if not isinstance(model, torch.nn.Module):
        return _generate_with_runtime(model, tokenizer, prompts, settings, batch_size=batch_size, seed=seed)
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    requests = [
        engine.submit(list(ids), sampling_params(settings, None if seed is None else sample_seed(seed, i, k)))
        for i, ids in enumerate(prompts)
        for k in range(settings.num_samples)
    ]
    started = time.perf_counter()
    with progress(TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task(description, total=len(requests), rate="")
        while engine.active or engine.waiting:
            engine.step()
            finished = sum(r.done for r in requests)
            tokens = sum(len(r.token_ids) for r in requests)
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.update(task, completed=finished, rate=f"{rate:.0f} tok/s")
    results = [r.wait() for r in requests]
    k = settings.num_samples
    return [
        [Completion(text=r.text.strip(), tokens=r.completion_tokens) for r in results[i * k : (i + 1) * k]]
        for i in range(len(prompts))
    ]


def _generate_with_runtime(model, tokenizer, prompts, settings: GenerationSettings, *, batch_size: int, seed: int | None):
    """Left-padded batches through the model's own `generate` (an exported ONNX model's runtime)."""
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    config = build_generation_config(tokenizer, model, settings)
    stop_ids = set(end_of_turn_ids(tokenizer, model))
    results: list[list[Completion]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths, less padding
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], config.pad_token_id)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            for row, tokens in enumerate(output[:, input_ids.shape[1] :].tolist()):
                kept = trim_at_stop(tokens, stop_ids)
                text = tokenizer.decode(kept, skip_special_tokens=True).strip()
                results[batch[row // settings.num_samples]].append(Completion(text=text, tokens=len(kept)))
    return results


DTYPES = ("auto", "bf16", "fp16", "fp32")


def load_for_generation(
    source: str | None, *, dtype: str = "auto", device: str | None = None, chat_template: bool | None = None
):
    """Load a run/model for inference (`tunelab.models.load_for_inference`), checking `dtype` first.

    `dtype` "auto" picks bf16 only where the hardware runs it fast (CUDA with bf16, CPUs
    with AMX/AVX512-BF16) and fp32 elsewhere: on CPUs without bf16 units it is many times slower.
    `chat_template` None: as the run was trained (runs trained on plain text continue raw text).
    """
    from tunelab.models import load_for_inference

    if dtype not in DTYPES:
        raise TunelabError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return load_for_inference(source, dtype=dtype, device=device, chat_template=chat_template)


def generate_for_prompts(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings,
    *,
    use_chat_template: bool = True,
    system: str | None = None,
    seed: int | None = None,
    batch_size: int = 8,
) -> list[dict]:
    """Completions for plain-text prompts: one row {prompt, sample, completion, tokens} per sample.

    With the chat template each prompt is a user message (after `system`, if given);
    without it the prompt text is continued as is.
    """
    if use_chat_template and has_chat_template(tokenizer):
        encoded = [encode_prompt(tokenizer, user_messages(p, system)) for p in prompts]
    else:
        if system:
            raise TunelabError(
                "--system needs a chat template, and this model is prompted with raw text (--no-chat-template, a run "
                "trained on plain text, or a model without a template)\n  fix: drop --system"
            )
        encoded = [encode_text(tokenizer, p) for p in prompts]
    completions = generate_completions(model, tokenizer, encoded, settings, batch_size=batch_size, seed=seed)
    return [
        {"prompt": prompt, "sample": k, "completion": sample.text, "tokens": sample.tokens}
        for prompt, samples in zip(prompts, completions)
        for k, sample in enumerate(samples)
    ]


def read_prompts(source: str) -> list[str]:
    """Prompts from a file ("-" = stdin): one per line, or JSON objects with a prompt field.

    A line starting with "{" is read as JSON and must have one of `PROMPT_FIELDS`
    ("instruction" gets its "input" appended); any other non-empty line is the prompt itself.
    """
    if source == "-":
        return _prompts_from_lines(sys.stdin.read().splitlines(), "<stdin>")
    path = Path(source)
    if not path.is_file():
        raise TunelabError(f"--input file not found: {source}\n  fix: give a text/JSONL file, or '-' for stdin")
    return _prompts_from_lines(path.read_text(encoding="utf-8").splitlines(), source)


def _prompts_from_lines(lines: Iterable[str], where: str) -> list[str]:
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not line.lstrip().startswith("{"):
            prompts.append(line.rstrip("\n"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"invalid JSON ({err.msg}, column {err.colno})", where, number) from err
        prompts.append(_prompt_from_record(record, where, number))
    if not prompts:
        raise DataError("no prompts found (empty input)", where)
    return prompts


def _prompt_from_record(record: dict, where: str, line: int) -> str:
    for name in PROMPT_FIELDS:
        value = record.get(name) if isinstance(record, dict) else None
        if isinstance(value, str) and value.strip():
            extra = record.get("input") if name == "instruction" else None
            return f"{value}\n\n{extra}" if isinstance(extra, str) and extra.strip() else value
    raise DataError(
        f"no prompt field; expected one of {', '.join(PROMPT_FIELDS)} (found: {', '.join(record) or 'nothing'})",
        where,
        line,
    )


def user_messages(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation for a plain prompt, with an optional system message first."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> Path:
    """Write one JSON object per line, atomically (see `write_text_atomic`)."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ----------------------------------------------------------------------------- chat


def context_limit(model: torch.nn.Module, tokenizer) -> int:
    """How many tokens the model attends over: its position limit, else the tokenizer's."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        return limit
    tokenizer_limit = tokenizer.model_max_length
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        return tokenizer_limit
    return FALLBACK_CONTEXT_TOKENS


class ChatExit(Exception):
    """Raised by `/exit` to end the chat loop."""


@dataclass
class ChatSession:
    """A running conversation: system message, alternating user/assistant turns, settings.

    Before each reply the oldest turns are dropped (the system message is kept) until the
    prompt plus `max_new_tokens` fits in the model's context.
    """

    model: torch.nn.Module
    tokenizer: object
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    system: str | None = None
    context_tokens: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.context_tokens is None:
            self.context_tokens = context_limit(self.model, self.tokenizer)

    def messages(self) -> list[dict[str, str]]:
        """The conversation as the template sees it: system message (if any), then the turns."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.history

    def reset(self) -> None:
        """Forget all turns; the system message stays."""
        self.history.clear()

    def fit_prompt(self) -> list[int]:
        """Token ids of the conversation so far, dropping the oldest turns until it fits."""
        budget = self.context_tokens - self.settings.max_new_tokens
        while True:
            ids = encode_prompt(self.tokenizer, self.messages())
            if len(ids) <= budget:
                return ids
            if len(self.history) <= 1:  # only the new message is left and it alone is too long
                self.history.clear()
                raise TunelabError(
                    f"message too long: {len(ids)} prompt tokens + {self.settings.max_new_tokens} new tokens "
                    f"exceed the model's context of {self.context_tokens} tokens\n"
                    "  fix: send a shorter message or lower /max"
                )
            # Drop the oldest user turn together with the assistant answer that followed it.
            del self.history[: 2 if len(self.history) > 2 else 1]

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the reply (streamed to `on_text`), and keep both."""
        self.settings.check()
        self.history.append({"role": "user", "content": text})
        prompt_ids = self.fit_prompt()
        reply = stream_reply(self.model, self.tokenizer, prompt_ids, self.settings, on_text)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def command(self, line: str) -> str:
        """Apply a `/command` and return the message to show the user."""
        name, _, argument = line.strip().partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit"):
            raise ChatExit
        if name == "/reset":
            self.reset()
            return "conversation cleared"
        if name == "/system":
            self.system = argument or None
            return f"system message set: {argument}" if argument else "system message removed"
        if name == "/temp":
            value = _parse_number(argument, float, "/temp X (e.g. /temp 0.7; 0 = greedy)")
            GenerationSettings(temperature=value).check()
            self.settings.temperature = value
            return f"temperature = {value:g}"
        if name == "/max":
            value = _parse_number(argument, int, "/max N (e.g. /max 256)")
            GenerationSettings(max_new_tokens=value).check()
            self.settings.max_new_tokens = value
            return f"max new tokens = {value}"
        if name == "/help":
            return CHAT_HELP
        raise TunelabError(f"unknown command {name!r}\n{CHAT_HELP}")


CHAT_HELP = (
    "commands: /reset (clear the conversation)  /system TEXT (set the system message; empty removes it)  "
    "/temp X  /max N  /exit"
)


def _parse_number(text: str, kind: type, usage: str) -> float | int:
    try:
        return kind(text)
    except ValueError as err:
        raise TunelabError(f"expected a number: {text!r}\n  usage: {usage}") from err


def stream_reply(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    settings: GenerationSettings,
    on_text: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> str:
    """Generate one reply on the engine, passing text pieces to `on_text` as they are decoded.

    Setting `stop` (from another thread: a Stop button) ends generation at the next token.
    """
    engine = Engine(model, tokenizer, max_batch_size=1)
    request = engine.submit(list(prompt_ids), sampling_params(settings))
    pieces = []
    if stop is not None and stop.is_set():
        request.cancel()
    for piece in request.stream():
        pieces.append(piece)
        if on_text is not None:
            on_text(piece)
        if stop is not None and stop.is_set():
            request.cancel()
    return "".join(pieces).strip()


def terminal_lines(prompt: str = "[bold cyan]you>[/] ") -> Iterator[str]:
    """Lines typed at the terminal, with a prompt, until Ctrl-D."""
    from tunelab.console import console

    while True:
        try:
            yield console.input(prompt)
        except EOFError:
            console.print()
            return


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    out: TextIO,
    notify: Callable[[str], None],
    reply_prefix: str = "",
    stream: bool = True,
) -> int:
    """Drive a chat: each line is a message or a /command; replies go to `out`.

    With `stream` the reply is written piece by piece as it is generated (a terminal);
    without it the finished reply, trimmed, is written as one line-terminated block (a
    pipe). `notify` shows command results and errors (stderr in the CLI, so piped stdout
    holds only the replies). Returns the number of replies generated.
    """
    replies = 0
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                notify(session.command(line))
                continue
            out.write(reply_prefix)
            if stream:
                session.send(line, on_text=lambda piece: (out.write(piece), out.flush()))
            else:
                out.write(session.send(line))
            out.write("\n")
            out.flush()
            replies += 1
        except ChatExit:
            break
        except TunelabError as err:
            notify(f"error: {err}")
    return replies
