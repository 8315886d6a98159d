"""Render examples into token ids and labels: the chat template and the loss mask.

Conversations are rendered with the tokenizer's own chat template (or a named fallback
set with `set_chat_template`, which is then saved with the tokenizer, so inference uses
exactly the template training used). Plain text is tokenized as is, plus EOS.

Labels are aligned with `input_ids` (the Hugging Face convention, unshifted: the logits
at position t are scored against labels[t + 1]); -100 means "not a target".

Which tokens are targets is decided by position, never by comparing ids: for SmolLM2 the
end-of-turn token `<|im_end|>` is also the pad and EOS token, so "every id equal to the
pad id is padding" would throw away exactly the token that teaches the model to stop.
For each assistant message i, the conversation is rendered twice:

    prompt = render(messages[:i], add_generation_prompt=True)   # what inference feeds
    turn   = render(messages[:i + 1])

Both must be token prefixes of the whole rendered conversation (the "prefix property");
the tokens between them are the reply. The reply's targets run up to and including the
first special token after its start (the end-of-turn token); anything the template adds
after it (ChatML's "\\n") is not a target. User text is tokenized with control tokens
escaped (`sanitize_control_tokens`), so a literal "<|im_end|>" typed in the data cannot
fake a turn boundary. Position 0 is never a target (no logits predict it), so the number
of labels != -100 is exactly the number of predicted tokens, padded or packed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from tunelab.data.formats import Example
from tunelab.data.records import DataStats, Location
from tunelab.errors import DataError, TunelabError

IGNORE_INDEX = -100
Truncation = Literal["truncate", "drop"]
TRUNCATIONS: tuple[str, ...] = ("truncate", "drop")

# ChatML, the fallback for tokenizers without a chat template. The end-of-turn token
# <|im_end|> is added to the tokenizer as a special token when it is missing.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# An Alpaca-style prompt for base models: ends each reply with the tokenizer's own EOS
# token, so it needs no new tokens (and no embedding resize).
ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{% else %}{{ '### ' + message['role'] + ':\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
FALLBACK_TEMPLATES: dict[str, str] = {"chatml": CHATML_TEMPLATE, "alpaca": ALPACA_TEMPLATE}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and aligned labels (-100 = not a target) of one example, and its origin."""

    input_ids: list[int]
    labels: list[int]
    source: Location
    format: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """How many tokens are targets (labels != -100)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


# --- chat templates ----------------------------------------------------------------------


def set_chat_template(tokenizer, template: str) -> list[str]:
    """Set a chat template on the tokenizer: a fallback name ("chatml", "alpaca") or Jinja text.

    The template becomes `tokenizer.chat_template`, so `tokenizer.save_pretrained` stores
    it with the run and inference renders prompts exactly as training did. Returns the
    tokens added to the vocabulary ("chatml" adds <|im_start|>/<|im_end|> when missing);
    if any were added, the caller must `model.resize_token_embeddings(len(tokenizer))`.
    """
    if template in FALLBACK_TEMPLATES:
        jinja = FALLBACK_TEMPLATES[template]
    elif "{{" in template or "{%" in template:
        jinja = template
    else:
        raise TunelabError(
            f"unknown chat template {template!r}; expected one of: {', '.join(FALLBACK_TEMPLATES)}, or a Jinja template text"
        )
    added: list[str] = []
    if template == "chatml":
        vocab = tokenizer.get_vocab()
        added = [token for token in CHATML_TOKENS if token not in vocab]
        if added:
            tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.chat_template = jinja
    return added


def ensure_chat_template(tokenizer, fallback: str = "chatml") -> str | None:
    """Give a tokenizer without a chat template the named fallback; returns it if applied."""
    if tokenizer.chat_template:
        return None
    set_chat_template(tokenizer, fallback)
    return fallback


def control_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the special tokens (plus EOS): a template's end-of-turn token is one of them."""
    ids = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    ids.update(tokenizer.all_special_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def end_of_turn_token_id(tokenizer) -> int:
    """The token the chat template puts after an assistant reply (what generation should stop at)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, trained = conversation_ids_and_mask(probe, tokenizer, Location("<probe conversation>"), control_token_ids(tokenizer))
    return ids[max(i for i, is_target in enumerate(trained) if is_target)]


# --- token ids and masks -----------------------------------------------------------------


def _chat_ids(tokenizer, messages: list[dict[str, str]], source: Location, *, add_generation_prompt: bool) -> list[int]:
    """Token ids of a rendered (partial) conversation, with control tokens in the text escaped."""
    from jinja2 import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt,
            tokenize=True,
            return_dict=True,
            sanitize_control_tokens=True,
        )
    except TemplateError as err:
        raise source.error(f"the chat template rejected this conversation: {err}") from None
    return list(encoded["input_ids"])


def _check_prefix(
    prefix: list[int], full: list[int], messages: list[dict[str, str]], i: int, is_prompt: bool, tokenizer, source: Location
) -> None:
    """Raise a clear error when a partial rendering is not a token prefix of the whole conversation.

    The partial rendering is the prompt before assistant message i (`is_prompt`, rendered
    with add_generation_prompt=True) or the conversation up to and including message i.
    """
    if full[: len(prefix)] == prefix:
        return
    partial = messages[:i] if is_prompt else messages[: i + 1]
    partial_text = tokenizer.apply_chat_template(partial, add_generation_prompt=is_prompt, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if full_text.startswith(partial_text):
        # The template is fine; the text on the two sides of the boundary merges into one
        # token (e.g. a reply starting with "  " right after the prompt's "\n").
        after = full_text[len(partial_text) : len(partial_text) + 12]
        raise source.error(
            f"messages[{i}] (assistant): the text {partial_text[-12:]!r} before the {'start' if is_prompt else 'end'} of the "
            f"reply and the text {after!r} after it merge into one token across the boundary, so the prompt seen at "
            "inference is not a prefix of the training sequence.\n"
            "  fix: strip leading/trailing whitespace from the replies (or use a template whose prompt does not end in a space)"
        )
    mismatch = next((k for k, (a, b) in enumerate(zip(partial_text, full_text)) if a != b), min(len(partial_text), len(full_text)))
    what = f"the prompt for messages[{i}] (rendered with add_generation_prompt=True)" if is_prompt else f"messages[:{i + 1}]"
    raise TunelabError(
        f"{source}: the chat template does not render conversations incrementally: {what} is not a prefix of the "
        f"whole conversation (they differ at character {mismatch}: {partial_text[mismatch:mismatch + 30]!r} vs "
        f"{full_text[mismatch:mismatch + 30]!r}). tunelab computes which tokens are trained from these prefixes.\n"
        "  fix: use a template where each turn only appends text, e.g. the fallback 'chatml'"
    )


def conversation_ids_and_mask(
    messages: list[dict[str, str]], tokenizer, source: Location, control_ids: frozenset[int]
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation, and which of them are assistant-reply targets.

    See the module docstring for the prefix rule. A template that puts no special token
    after a reply cannot teach the model to stop, and is an error.
    """
    if not tokenizer.chat_template:
        raise TunelabError(
            "the tokenizer has no chat template, so conversations cannot be rendered.\n"
            "  fix: set a fallback template (data.chat_template: chatml, i.e. set_chat_template(tokenizer, 'chatml'))"
        )
    full = _chat_ids(tokenizer, messages, source, add_generation_prompt=False)
    trained = [False] * len(full)
    last = len(messages) - 1
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat_ids(tokenizer, messages[:i], source, add_generation_prompt=True)
        turn = full if i == last else _chat_ids(tokenizer, messages[: i + 1], source, add_generation_prompt=False)
        _check_prefix(prompt, full, messages, i, True, tokenizer, source)
        _check_prefix(turn, full, messages, i, False, tokenizer, source)
        end_of_turn = next((j for j in range(len(prompt), len(turn)) if full[j] in control_ids), None)
        if end_of_turn is None:
            reply = tokenizer.decode(full[len(prompt) : len(turn)])
            raise TunelabError(
                f"the chat template puts no special end-of-turn token after an assistant reply (rendered reply: {reply!r}), "
                "so the model could never learn to stop.\n"
                "  fix: use a template that ends replies with a special token, e.g. the fallback 'chatml' or 'alpaca'"
            )
        if end_of_turn == len(prompt):
            # The reply "starts" with a special token: the template put the assistant header
            # after the prompt, i.e. it ignores add_generation_prompt.
            raise TunelabError(
                f"the chat template renders {tokenizer.decode(full[len(prompt) : len(prompt) + 3])!r} at the start of an "
                "assistant reply instead of in the generation prompt (does it ignore add_generation_prompt?), so the "
                "reply tokens cannot be told apart.\n  fix: use a template that honours add_generation_prompt, e.g. 'chatml'"
            )
        for j in range(len(prompt), end_of_turn + 1):
            trained[j] = True
    return full, trained


def text_ids(text: str, tokenizer) -> list[int]:
    """Plain text as the tokenizer encodes it (with its BOS, if it adds one), then EOS."""
    if tokenizer.eos_token_id is None:
        raise TunelabError("the tokenizer has no EOS token, so plain text cannot be ended.\n  fix: set tokenizer.eos_token")
    return list(tokenizer(text, add_special_tokens=True)["input_ids"]) + [tokenizer.eos_token_id]


def tokenize_example(
    example: Example,
    tokenizer,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    truncation: Truncation = "truncate",
    control_ids: frozenset[int] | None = None,
) -> TokenizedExample | None:
    """One example as ids + labels; None when it is longer than max_length and truncation is "drop".

    Raises a DataError (with the example's file:line) when no target is left, e.g. when
    truncation cut off the whole reply.
    """
    if example.messages is not None:
        ids, trained = conversation_ids_and_mask(example.messages, tokenizer, example.source, control_ids or control_token_ids(tokenizer))
        if train_on_prompt:
            trained = [True] * len(ids)
    else:
        ids = text_ids(example.text or "", tokenizer)
        trained = [True] * len(ids)
    untruncated_length = len(ids)
    truncated = untruncated_length > max_length
    if truncated:
        if truncation == "drop":
            return None
        ids, trained = ids[:max_length], trained[:max_length]
    labels = [token if is_target else IGNORE_INDEX for token, is_target in zip(ids, trained)]
    labels[0] = IGNORE_INDEX  # no logits predict position 0
    tokenized = TokenizedExample(ids, labels, example.source, example.format, truncated)
    if tokenized.num_trained == 0:
        if truncated:
            prompt_length = trained.index(True) if True in trained else len(trained)
            raise example.source.error(
                f"all labels are masked: after truncation to max_length={max_length} tokens no reply token is left "
                f"(the example is {untruncated_length} tokens, its prompt at least {prompt_length}).\n"
                "  fix: raise max_length, shorten the prompt, or use truncation 'drop'"
            )
        raise example.source.error("all labels are masked: the example has no token to train on")
    return tokenized


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    *,
    max_length: int = 512,
    train_on_prompt: bool = False,
    truncation: Truncation = "truncate",
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    show_progress: bool = False,
) -> tuple[list[TokenizedExample], DataStats]:
    """Tokenize examples with their label masks; count truncated, dropped and skipped ones.

    `truncation`: "truncate" keeps the first max_length tokens of a longer example, "drop"
    leaves it out. Errors in one example (template rejects it, every label masked) raise a
    DataError naming its file:line, or with `skip_invalid` skip it and count it.
    """
    if truncation not in TRUNCATIONS:
        raise TunelabError(f"unknown truncation {truncation!r}; expected one of: {', '.join(TRUNCATIONS)}")
    if max_length < 2:
        raise TunelabError(f"max_length must be at least 2 tokens, got {max_length}")
    stats = stats if stats is not None else DataStats()
    control_ids = control_token_ids(tokenizer)
    tokenized: list[TokenizedExample] = []
    with _maybe_progress(show_progress, len(examples)) as advance:
        for example in examples:
            advance()
            try:
                item = tokenize_example(
                    example, tokenizer, max_length=max_length, train_on_prompt=train_on_prompt, truncation=truncation, control_ids=control_ids
                )
            except DataError as error:
                if not skip_invalid:
                    raise
                stats.skip(error)
                continue
            if item is None:
                stats.dropped += 1
                continue
            stats.truncated += item.truncated
            tokenized.append(item)
    _count_kept(tokenized, stats)
    if not tokenized:
        where = examples[0].source.path if examples else None
        raise DataError(
            f"no examples left after tokenization ({stats.dropped} dropped as longer than max_length={max_length}, "
            f"{stats.invalid_skipped} invalid skipped)\n  fix: raise max_length or use truncation 'truncate'",
            path=where,
        )
    return tokenized, stats


def _count_kept(tokenized: Sequence[TokenizedExample], stats: DataStats) -> None:
    """Set the kept-example counts (examples, formats, tokens, targets) from the final list."""
    stats.examples = len(tokenized)
    stats.formats = {}
    for item in tokenized:
        stats.count_format(item.format)
    stats.tokens = sum(len(item) for item in tokenized)
    stats.trained_tokens = sum(item.num_trained for item in tokenized)


def filter_by_length(
    tokenized: Sequence[TokenizedExample], *, min_tokens: int = 0, max_tokens: int | None = None, stats: DataStats | None = None
) -> list[TokenizedExample]:
    """Keep examples whose token count is within [min_tokens, max_tokens]; the rest are counted as filtered."""
    kept = [item for item in tokenized if len(item) >= min_tokens and (max_tokens is None or len(item) <= max_tokens)]
    if stats is not None:
        stats.filtered += len(tokenized) - len(kept)
        _count_kept(kept, stats)
    return kept


@contextlib.contextmanager
def _maybe_progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A Rich progress bar over `total` items when asked for (long tokenization); yields `advance`."""
    if not enabled:
        yield lambda: None
        return
    from tunelab.console import progress

    with progress() as bar:
        task = bar.add_task("Tokenizing", total=total)
        yield lambda: bar.advance(task)
