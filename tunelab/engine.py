"""The one generation engine: continuous batching over a Hugging Face causal LM with a KV cache.

Requests join the running batch and leave it between decode steps, so a short answer never
waits for a long one and a server can keep adding requests. One `step()`:

1. drops cancelled rows (their slot is free at once);
2. admits waiting requests into free slots: one left-padded prefill of the new prompts, whose
   last-position logits give each its first token; their KV cache is merged into the batch's;
3. decodes one token for every running row (one forward of shape (rows, 1)).

The batch cache is a `transformers.DynamicCache` whose rows are left-padded to a common
length; the 2-D attention mask hides the padding and each row gets its own position ids
(the count of its real tokens), exactly as `model.generate` does for a left-padded batch, so
greedy output equals `model.generate` token for token. When rows leave, padding columns that
no row needs any more are cut off, so attention never runs over dead columns for long.

Why not transformers' own continuous batching (`generate_batch` / `ContinuousBatchingManager`)?
Its sampler draws from one batch-wide RNG, so a seeded sample depends on its batch mates, and it
has no per-request sampling settings, stop strings or log-probabilities of the chosen tokens;
its paged-attention kernels are aimed at CUDA.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 = greedy; the other sampling knobs then do nothing
    except `repetition_penalty`, which also changes greedy choices (as in `model.generate`)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # per-request generator: same seed -> same sample regardless of batch mates
    stop: tuple[str, ...] = ()  # stop strings (not included in text)
    logprobs: bool = False  # return per-token logprobs of the chosen tokens

    def check(self) -> None:
        """Raise one clear TunelabError for a value the engine cannot use."""
        if self.max_new_tokens < 1:
            raise TunelabError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise TunelabError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TunelabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TunelabError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise TunelabError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise TunelabError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise TunelabError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationResult:
    """A finished request. `token_ids` are all generated tokens, including a final stop token and
    the token that completed a stop string; `text` is their decoding without special tokens,
    cut before the first stop string. `logprobs[i]` is log p(token_ids[i]) under the model's raw
    next-token distribution (before temperature, penalties and truncation)."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None


class GenerationRequest:
    """One submitted request: stream its text, wait for its result, or cancel it (thread-safe)."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.token_ids: list[int] = []
        self.token_logprobs: list[float] = []
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._engine = engine
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._deltas: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._text = ""  # decoded so far, cut at a stop string
        self._emitted = 0  # characters of _text already streamed
        self._generator: torch.Generator | None = None
        self._seen: torch.Tensor | None = None  # prompt + generated ids, for the repetition penalty

    def stream(self) -> Iterator[str]:
        """Text deltas as tokens are decoded (blocking); they concatenate to `result.text`.

        Text that may be the start of a stop string, or half a UTF-8 character, is held back
        until it is known. Without a background thread (`Engine.start`) the caller's thread
        runs the engine's steps itself.
        """
        while True:
            try:
                yield self._deltas.get_nowait()
                continue
            except queue.Empty:
                pass
            if self._done.is_set():
                while not self._deltas.empty():
                    yield self._deltas.get_nowait()
                break
            if not self._engine._drive_once():
                try:
                    yield self._deltas.get(timeout=0.05)
                except queue.Empty:
                    pass
        if self._error is not None:
            raise self._error

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request is finished and return its result (TimeoutError after `timeout` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"generation not finished after {timeout} s")
            if not self._engine._drive_once():
                self._done.wait(0.05 if deadline is None else max(0.0, min(0.05, deadline - time.monotonic())))
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop generating: the request leaves the batch (or the queue) at the next step."""
        self._cancelled.set()
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def result(self) -> GenerationResult | None:
        return self._result

    # ---- engine side

    def _finish(self, reason: str) -> None:
        self._push(final=True)
        self._result = GenerationResult(
            token_ids=list(self.token_ids),
            text=self._text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.token_ids),
            logprobs=list(self.token_logprobs) if self.params.logprobs else None,
        )
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def _push(self, final: bool) -> None:
        """Stream the part of the text that is settled."""
        safe = len(self._text) if final else _settled_length(self._text, self.params.stop)
        if safe > self._emitted:
            self._deltas.put(self._text[self._emitted : safe])
            self._emitted = safe


def _settled_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be streamed: not a trailing half character ("\\ufffd" from a
    partial UTF-8 sequence) nor a tail that could still grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:size], 0, end):
                hold = size
                break
    return end - hold


class Engine:
    """Continuous batching over a HF causal LM with a KV cache: requests join and leave the running
    batch between decode steps; prefill of new requests, one decode step for all active ones."""

    def __init__(self, model, tokenizer, max_batch_size: int = 8, stop_token_ids: Iterable[int] | None = None) -> None:
        if max_batch_size < 1:
            raise TunelabError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model  # in eval mode, as the caller left it (a training loop's rollouts switch back)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        if stop_token_ids is None:
            from tunelab.generate import end_of_turn_ids

            stop_token_ids = end_of_turn_ids(tokenizer, model)
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.device = next(model.parameters()).device
        self.context_tokens = _context_limit(model)
        self.pad_id = _pad_id(tokenizer)
        self._queue: deque[GenerationRequest] = deque()
        self._queue_lock = threading.Lock()
        self._work = threading.Condition(self._queue_lock)  # notified on submit / cancel / close
        self._step_lock = threading.Lock()  # one thread runs the model at a time
        self._thread: threading.Thread | None = None
        self._closing = False
        # The running batch: row i is self._rows[i]; tensors are on the model's device.
        self._rows: list[GenerationRequest] = []
        self._cache = None  # DynamicCache, rows left-padded to one length L
        self._mask: torch.Tensor | None = None  # (rows, L) 1 = real token in the cache
        self._lengths: torch.Tensor | None = None  # (rows,) real tokens in the cache = next position id
        self._pending: torch.Tensor | None = None  # (rows,) last chosen token, not yet in the cache
        self._admitting: list[GenerationRequest] = []  # taken from the queue, being prefilled

    # ---------------------------------------------------------------- public API

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenerationRequest:
        """Queue a request (thread-safe); it joins the batch at the next step with a free slot."""
        params.check()
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise TunelabError("empty prompt: generation needs at least one prompt token")
        if len(prompt_ids) >= self.context_tokens:
            raise TunelabError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.context_tokens}\n"
                "  fix: shorten the prompt"
            )
        request = GenerationRequest(self, prompt_ids, params)
        if not params.greedy:
            # Unseeded: one draw from torch's global RNG, so torch.manual_seed makes a script repeatable.
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
            request._generator = torch.Generator(device=self.device).manual_seed(seed)
        with self._work:
            if self._closing:
                raise TunelabError("the generation engine is closed")
            self._queue.append(request)
            self._work.notify()
        return request

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Generate for every prompt (in input order), running the batch loop in the calling thread
        (or waiting on the background thread if `start()` was called)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise TunelabError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        requests = [self.submit(p, s) for p, s in zip(prompts, params)]
        return [r.wait() for r in requests]

    def start(self) -> None:
        """Serve submit() from a background thread (a server, the UI)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name="tunelab-engine", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the background thread; queued and running requests end as "cancelled"."""
        with self._work:
            self._closing = True
            self._work.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        with self._step_lock:
            for request in self._take_queue():
                request._finish("cancelled")
            for request in self._rows:
                request._finish("cancelled")
            self._reset_batch()

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # ---------------------------------------------------------------- driving

    def step(self) -> None:
        """One engine step: drop cancelled rows, admit waiting requests, decode one token each."""
        with self._step_lock, torch.inference_mode():
            try:
                self._drop_cancelled()
                self._admit()
                if self._rows:
                    self._decode()
            except BaseException as error:  # a failed forward fails every request it touched
                for request in self._rows + self._admitting:
                    request._fail(error)
                self._admitting = []
                self._reset_batch()
                raise

    def _drive_once(self) -> bool:
        """Run one step in the caller's thread when no background thread does; False if it did not."""
        if self._thread is not None:
            return False
        if not self._step_lock.acquire(blocking=False):
            return False  # another caller is stepping; our request advances with theirs
        self._step_lock.release()
        self.step()
        return True

    def _serve(self) -> None:
        while True:
            with self._work:
                while not self._closing and not self._queue and not self._rows:
                    self._work.wait()
                if self._closing:
                    return
            try:
                self.step()
            except BaseException:  # already delivered to the requests; keep serving others
                pass

    def _wake(self) -> None:
        with self._work:
            self._work.notify()

    def _take_queue(self, limit: int | None = None) -> list[GenerationRequest]:
        with self._queue_lock:
            count = len(self._queue) if limit is None else min(limit, len(self._queue))
            return [self._queue.popleft() for _ in range(count)]

    # ---------------------------------------------------------------- batch bookkeeping

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._lengths, self._pending = [], None, None, None, None

    def _drop_cancelled(self) -> None:
        with self._queue_lock:
            queued = [r for r in self._queue if r._cancelled.is_set()]
            for request in queued:
                self._queue.remove(request)
        for request in queued:
            request._finish("cancelled")
        gone = [i for i, r in enumerate(self._rows) if r._cancelled.is_set()]
        for i in gone:
            self._rows[i]._finish("cancelled")
        self._remove(gone)

    def _admit(self) -> None:
        """Prefill waiting requests into the free slots and merge their cache into the batch's."""
        new = self._admitting = self._take_queue(self.max_batch_size - len(self._rows))
        if not new:
            return
        from transformers import DynamicCache

        width = max(len(r.prompt_ids) for r in new)
        input_ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for row, request in enumerate(new):
            input_ids[row, width - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[row, width - len(request.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, as model.generate computes them for left padding.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        _check_plain_cache(out.past_key_values)
        lengths = mask.sum(-1)
        for request in new:
            request._seen = torch.tensor(request.prompt_ids, device=self.device)
        self._merge(out.past_key_values, mask, lengths, new)
        self._admitting = []
        start = len(self._rows) - len(new)
        self._accept(list(range(start, len(self._rows))), out.logits[:, -1])

    def _merge(self, cache, mask: torch.Tensor, lengths: torch.Tensor, rows: list[GenerationRequest]) -> None:
        """Append prefilled rows to the batch, left-padding whichever side is shorter."""
        pending = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask, self._lengths, self._pending, self._rows = cache, mask, lengths, pending, rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for old, fresh in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(fresh.keys, width)])
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(fresh.values, width)])
        self._mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)), F.pad(mask, (width - mask.shape[1], 0))])
        self._lengths = torch.cat([self._lengths, lengths])
        self._pending = torch.cat([self._pending, pending])
        self._rows = self._rows + rows

    def _remove(self, gone: list[int]) -> None:
        """Take finished rows out of the batch and cut padding columns no remaining row uses."""
        if not gone:
            return
        keep = [i for i in range(len(self._rows)) if i not in set(gone)]
        if not keep:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(0).nonzero()[0])  # leading columns that are padding in every row
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]
        self._mask = mask[:, first:]
        self._lengths = self._lengths.index_select(0, index)
        self._pending = self._pending.index_select(0, index)
        self._rows = [self._rows[i] for i in keep]

    def _decode(self) -> None:
        """Feed every row's pending token; choose each row's next one."""
        mask = F.pad(self._mask, (0, 1), value=1)
        out = self.model(
            input_ids=self._pending[:, None],
            attention_mask=mask,
            position_ids=self._lengths[:, None],
            past_key_values=self._cache,
            use_cache=True,
        )
        self._mask = mask
        self._lengths = self._lengths + 1
        self._accept(list(range(len(self._rows))), out.logits[:, -1])

    # ---------------------------------------------------------------- choosing tokens

    def _accept(self, rows: list[int], logits: torch.Tensor) -> None:
        """Choose the next token of each row in `rows` from its logits (len(rows), vocab),
        record it, and remove rows that finished."""
        logits = logits.float()
        requests = [self._rows[i] for i in rows]
        chosen = logits.argmax(-1)  # greedy rows without a penalty need nothing else
        special = [j for j, r in enumerate(requests) if not r.params.greedy or r.params.repetition_penalty != 1.0]
        if special:
            chosen = chosen.clone()
            for j in special:
                chosen[j] = _sample(logits[j], requests[j])
        want_logprobs = any(r.params.logprobs for r in requests)
        if want_logprobs:
            logprobs = torch.log_softmax(logits, -1).gather(1, chosen[:, None])[:, 0].tolist()
        self._pending[rows] = chosen
        tokens = chosen.tolist()
        lengths = self._lengths.tolist()
        now = time.perf_counter()
        finished = []
        for j, (row, request) in enumerate(zip(rows, requests)):
            token = tokens[j]
            request.token_ids.append(token)
            if request.first_token_at is None:
                request.first_token_at = now
            if want_logprobs:
                request.token_logprobs.append(logprobs[j])
            if request.params.repetition_penalty != 1.0:
                request._seen = torch.cat([request._seen, chosen[j : j + 1]])
            reason = self._update_text(request, token)
            if reason is None and lengths[row] >= self.context_tokens:
                reason = "length"  # the pending token would sit past the model's last position
            if reason is not None:
                request._finish(reason)
                finished.append(row)
            else:
                request._push(final=False)
        self._remove(finished)

    def _update_text(self, request: GenerationRequest, token: int) -> str | None:
        """Decode the request's text after `token`; return why it finishes, if it does."""
        params = request.params
        text = self.tokenizer.decode(request.token_ids, skip_special_tokens=True)
        if params.stop:
            # Search only where a new match can start: after the streamed part minus a stop's length.
            start = max(0, request._emitted - max(len(s) for s in params.stop))
            hits = [i for i in (text.find(s, start) for s in params.stop) if i >= 0]
            if hits:
                request._text = text[: min(hits)]
                return "stop"
        request._text = text
        if token in self.stop_token_ids:
            return "stop"
        if len(request.token_ids) >= params.max_new_tokens:
            return "length"
        return None


def _sample(logits: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    """One token for one row, in `model.generate`'s order: repetition penalty, then temperature,
    top-k, top-p and min-p; drawn from the request's own generator (or argmax when greedy)."""
    params = request.params
    scores = logits
    if params.repetition_penalty != 1.0:
        seen = request._seen
        picked = scores[seen]
        scores = scores.clone()
        scores[seen] = torch.where(picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty)
    if params.greedy:
        return scores.argmax()
    scores = scores / params.temperature
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return torch.multinomial(probs, 1, generator=request._generator)[0]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad cached key/value states (rows, heads, length, dim) with zeros to `width` positions."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))


def _check_plain_cache(cache) -> None:
    """Rows of different lengths are merged by padding; that needs plain (growing) cache layers."""
    from transformers.cache_utils import DynamicLayer

    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise TunelabError(
            f"this model's KV cache uses {', '.join(sorted(kinds))} layers (sliding-window or hybrid attention), "
            "which the batching engine cannot merge across requests"
        )


def _context_limit(model) -> int:
    """Positions the model can attend over (its config's limit; a generous default otherwise)."""
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(model.config, name, None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return 1 << 20


def _pad_id(tokenizer) -> int:
    """Any id works for padding (it is masked out); the tokenizer's pad, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
