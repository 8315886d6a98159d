"""Preference data: pairs (prompt, chosen, rejected) and KTO's labelled completions.

Record shapes (auto-detected per file like the other formats, or set with data.format):

  preference   prompt + chosen + rejected, each a string or a list of messages
               (UltraFeedback-binarized: prompt a string, chosen/rejected the whole
               [user, assistant] conversation); or chosen + rejected alone, two whole
               conversations that share everything but the last assistant reply
               (HH-RLHF: message lists, or its "\\n\\nHuman: ... \\n\\nAssistant: ..." text)
  kto          prompt + completion + label (true = desirable); paired records given to
               KTO become two examples, chosen desirable and rejected not

Every example renders through the model's chat template exactly as inference will see
it: `prompt` is the conversation up to the reply with the generation prompt; a reply's
tokens run up to and including its end-of-turn token (the prefix rule of
tunelab/data/render.py). So there is exactly the BOS the template writes (no second one
before the reply, TRL #4481 / axolotl #1616) and each reply ends with one end-of-turn
token. Only reply tokens are targets.

Truncation keeps the prompt/reply boundary: when prompt + the longer reply exceed
max_length, the prompt is cut from the left first (its first token, the template's BOS or
turn header, is kept), down to half of max_length; only then are the replies cut from
the right. Bad records (a missing or empty field, chosen identical to rejected,
conversations that do not share their prompt) raise a DataError at file:line, or with
skip_invalid are skipped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.formats import CHAT_ROLES, DETECTION_SAMPLE, PREFERENCE_FIELDS, Example, describe_value, detect_format
from tunelab.data.packing import collate, plan_batches
from tunelab.data.render import (
    IGNORE_INDEX,
    TokenizedExample,
    Truncation,
    control_token_ids,
    conversation_ids_and_mask,
)
from tunelab.data.sources import DataStats, Location, Record
from tunelab.errors import DataError, TunelabError

PREFERENCE_FORMATS: tuple[str, ...] = ("preference", "kto")
# HH-RLHF's raw transcripts: "\n\nHuman: ...\n\nAssistant: ..." turns.
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
TRUE_LABELS = {True, 1, "true", "True", "1", "yes", "desirable", "good"}
FALSE_LABELS = {False, 0, "false", "False", "0", "no", "undesirable", "bad"}


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt (messages ending with a user turn) and its replies.

    Pairs: `chosen` is preferred to `rejected`. KTO: `chosen` holds the completion and
    `desirable` its label (`rejected` is None).
    """

    source: Location
    format: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str | None = None
    desirable: bool | None = None

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None


# --- records -> examples -------------------------------------------------------------------


def _text(value: Any, name: str, where: Location) -> str:
    if value is None:
        raise where.error(f"{name} is missing")
    if not isinstance(value, str):
        raise where.error(f"{name} must be a string, got {describe_value(value)}")
    if not value.strip():
        raise where.error(f"{name} is empty")
    return value


def _messages(value: Any, name: str, where: Location) -> list[dict[str, str]]:
    """A message list ([{role, content}]) as is; an HH-RLHF transcript string parsed into one."""
    if isinstance(value, str) and HH_TURN.search(value):
        parts = HH_TURN.split(value)
        if parts[0].strip():
            raise where.error(f'{name}: text before the first "\\n\\nHuman:" turn: {parts[0][:40]!r}')
        return [{"role": HH_ROLES[role], "content": _text(content.strip(), f"{name} turn {i}", where)} for i, (role, content) in enumerate(zip(parts[1::2], parts[2::2]))]
    if not isinstance(value, list) or not value:
        raise where.error(f"{name} must be a non-empty list of messages, got {describe_value(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise where.error(f'{name}[{i}] must be an object {{"role", "content"}} with role one of {", ".join(CHAT_ROLES)}')
        messages.append({"role": message["role"], "content": _text(message.get("content"), f"{name}[{i}].content", where)})
    return messages


def _turns(value: Any, name: str, where: Location, role: str) -> list[dict[str, str]]:
    """A field that is one message's text (`role`) or a list of messages."""
    if isinstance(value, str) and not HH_TURN.search(value):
        return [{"role": role, "content": _text(value, name, where)}]
    if value is None:
        raise where.error(f'field "{name}" is missing')
    return _messages(value, name, where)


def _conversation(prompt: list[dict[str, str]], reply: list[dict[str, str]]) -> list[dict[str, str]]:
    """prompt + reply, unless the reply field already repeats the prompt (UltraFeedback's whole conversations)."""
    return reply if prompt and reply[: len(prompt)] == prompt else prompt + reply


def _split_reply(conversation: list[dict[str, str]], name: str, where: Location) -> tuple[list[dict[str, str]], str]:
    if conversation[-1]["role"] != "assistant":
        raise where.error(f"{name}: the conversation must end with the assistant reply to train on, not a {conversation[-1]['role']} message")
    prompt = conversation[:-1]
    if "user" not in [m["role"] for m in prompt]:
        raise where.error(f"{name}: no user message before the reply; a conversation must start with the user")
    return prompt, conversation[-1]["content"]


def _pair(data: dict[str, Any], where: Location, system_prompt: str | None) -> PreferenceExample:
    prompt = [] if data.get("prompt") is None else _turns(data["prompt"], "prompt", where, "user")
    chosen = _conversation(prompt, _turns(data.get("chosen"), "chosen", where, "assistant"))
    rejected = _conversation(prompt, _turns(data.get("rejected"), "rejected", where, "assistant"))
    chosen_prompt, chosen_reply = _split_reply(chosen, "chosen", where)
    rejected_prompt, rejected_reply = _split_reply(rejected, "rejected", where)
    if chosen_prompt != rejected_prompt:
        at = next((i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt)) if a != b), min(len(chosen_prompt), len(rejected_prompt)))
        raise where.error(
            f"chosen and rejected do not share their prompt: they differ at message {at}, before the last reply.\n"
            "  fix: both conversations must be the same up to the final assistant reply (or give a separate \"prompt\")"
        )
    if chosen_reply.strip() == rejected_reply.strip():
        raise where.error("chosen and rejected are the same reply, so there is no preference to learn; remove the record")
    return PreferenceExample(where, "preference", _with_system(chosen_prompt, system_prompt), chosen_reply, rejected_reply)


def _kto(data: dict[str, Any], where: Location, system_prompt: str | None) -> PreferenceExample:
    prompt = _turns(data.get("prompt"), "prompt", where, "user")
    completion = _conversation(prompt, _turns(data.get("completion"), "completion", where, "assistant"))
    prompt, reply = _split_reply(completion, "completion", where)
    label = data.get("label")
    if label not in TRUE_LABELS and label not in FALSE_LABELS:
        raise where.error(f'field "label" must be true (desirable) or false (undesirable), got {label!r}')
    return PreferenceExample(where, "kto", _with_system(prompt, system_prompt), reply, desirable=label in TRUE_LABELS)


def _with_system(prompt: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    return prompt if not system_prompt or prompt[0]["role"] == "system" else [{"role": "system", "content": system_prompt}] + prompt


def normalise_preferences(
    records: Sequence[Record],
    *,
    fmt: str = "auto",
    kto: bool = False,
    system_prompt: str | None = None,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    limit: int | None = None,
) -> list[PreferenceExample]:
    """Records -> preference examples, the format detected per file from its first records unless `fmt` is set.

    `kto`: the examples KTO trains on; pairs become two labelled examples (chosen
    desirable, rejected undesirable). Otherwise every record must be a pair.
    """
    stats = stats if stats is not None else DataStats()
    if fmt not in ("auto", *PREFERENCE_FORMATS):
        raise TunelabError(f"data.format {fmt!r} is not preference data; task: preference reads format auto, preference or kto")
    formats: dict[str, str] = {}
    first: dict[str, Location] = {}
    fields: dict[str, set[str]] = {}
    seen: dict[str, int] = {}
    for record in records if fmt == "auto" else []:
        path = record.source.path
        seen[path] = seen.get(path, 0) + 1
        if seen[path] <= DETECTION_SAMPLE:  # a file's format, from its first records (as formats.py)
            first.setdefault(path, record.source)
            fields.setdefault(path, set()).update(k for k, v in record.data.items() if v is not None)
    for path, keys in fields.items():
        detected = detect_format(keys)
        if detected not in PREFERENCE_FORMATS:
            expected = "".join(f"\n    {name:<11} {spec}" for name, spec in PREFERENCE_FIELDS.items())
            raise first[path].error(
                f"not preference data: the fields are {sorted(keys)}.\n  expected the fields of:{expected}\n"
                "  fix: rename the fields, or set data.format"
            )
        formats[path] = detected
    examples: list[PreferenceExample] = []
    for record in records:
        if limit is not None and len(examples) >= limit:
            break
        record_format = formats.get(record.source.path, fmt)
        try:
            if record_format == "kto":
                if not kto:
                    raise record.source.error(
                        'a KTO record (prompt, completion, label) is not a pair; set preference.loss: kto, or give "chosen" and "rejected"'
                    )
                examples.append(_kto(record.data, record.source, system_prompt))
                continue
            pair = _pair(record.data, record.source, system_prompt)
        except DataError as error:
            if not skip_invalid:
                raise
            stats.skip(error)
            continue
        if kto:  # a pair, given to KTO: two labelled completions of one prompt
            examples += [
                PreferenceExample(pair.source, "kto", pair.prompt, pair.chosen, desirable=True),
                PreferenceExample(pair.source, "kto", pair.prompt, pair.rejected or "", desirable=False),
            ]
        else:
            examples.append(pair)
    if not examples:
        raise DataError(f"no valid examples: all {len(records)} records were invalid (see the skipped-record messages)", path=records[0].source.path if records else None)
    return examples


def remove_duplicate_preferences(examples: Sequence[PreferenceExample], *, stats: DataStats | None = None) -> list[PreferenceExample]:
    """Drop exact duplicates (same prompt and replies, and label), keeping the first."""
    seen: set[tuple] = set()
    kept = []
    for example in examples:
        key = (repr(example.prompt), example.chosen, example.rejected, example.desirable)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    if stats is not None:
        stats.duplicates_removed += len(examples) - len(kept)
    return kept


# --- rendering -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPreference:
    """Token ids of a prompt and its replies (each reply ends with its end-of-turn token)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None
    source: Location
    format: str
    desirable: bool | None = None
    truncated: bool = False

    def __len__(self) -> int:
        """The longest row this example puts in a batch (what batch planning pads to)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected or []))

    def row(self, reply: list[int]) -> TokenizedExample:
        """prompt + reply as one training row, the prompt masked."""
        return TokenizedExample(self.prompt + reply, [IGNORE_INDEX] * len(self.prompt) + reply, self.source, self.format, self.truncated)


def reply_ids(prompt: list[dict[str, str]], reply: str, tokenizer, source: Location, control_ids: frozenset[int]) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, reply ids through its end-of-turn token).

    Rendered once as the whole conversation, so the ids are exactly training's and
    inference's (render.py's prefix rule); tokens the template adds after the end-of-turn
    token (ChatML's newline) are left out: nothing is trained on them.
    """
    ids, trained = conversation_ids_and_mask(prompt + [{"role": "assistant", "content": reply}], tokenizer, source, control_ids)
    last = max(i for i, is_target in enumerate(trained) if is_target)
    start = last
    while start > 0 and trained[start - 1]:
        start -= 1
    return ids[:start], ids[start : last + 1]


def tokenize_preference(
    example: PreferenceExample,
    tokenizer,
    *,
    max_length: int,
    truncation: Truncation = "truncate",
    control_ids: frozenset[int] | None = None,
) -> TokenizedPreference | None:
    """One example's ids (None when longer than max_length and truncation is "drop")."""
    control_ids = control_ids if control_ids is not None else control_token_ids(tokenizer)
    prompt, chosen = reply_ids(example.prompt, example.chosen, tokenizer, example.source, control_ids)
    rejected = None
    if example.rejected is not None:
        rejected_prompt, rejected = reply_ids(example.prompt, example.rejected, tokenizer, example.source, control_ids)
        if rejected_prompt != prompt:  # the template renders the prompt differently by reply: cannot share it
            raise example.source.error("the chat template renders the prompt differently before the chosen and the rejected reply")
    longest = max(len(chosen), len(rejected or []))
    if len(prompt) + longest <= max_length:
        return TokenizedPreference(prompt, chosen, rejected, example.source, example.format, example.desirable)
    if truncation == "drop":
        return None
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    if keep < len(prompt):  # cut the prompt from the left, keeping its first token (the template's BOS / header)
        prompt = prompt[:1] + prompt[len(prompt) - keep + 1 :]
    room = max_length - len(prompt)
    chosen, rejected = chosen[:room], None if rejected is None else rejected[:room]
    return TokenizedPreference(prompt, chosen, rejected, example.source, example.format, example.desirable, truncated=True)


def tokenize_preferences(
    examples: Sequence[PreferenceExample],
    tokenizer,
    *,
    max_length: int = 512,
    truncation: Truncation = "truncate",
    skip_invalid: bool = False,
    stats: DataStats | None = None,
) -> tuple[list[TokenizedPreference], DataStats]:
    """Tokenize every example; count truncated, dropped and (skip_invalid) skipped ones."""
    if max_length < 4:
        raise TunelabError(f"max_length must be at least 4 tokens for preference data, got {max_length}")
    stats = stats if stats is not None else DataStats()
    control_ids = control_token_ids(tokenizer)
    kept: list[TokenizedPreference] = []
    for example in examples:
        try:
            item = tokenize_preference(example, tokenizer, max_length=max_length, truncation=truncation, control_ids=control_ids)
        except DataError as error:
            if not skip_invalid:
                raise
            stats.skip(error)
            continue
        if item is None:
            stats.dropped += 1
            continue
        stats.truncated += item.truncated
        kept.append(item)
    if not kept:
        raise DataError(
            f"no examples left after tokenization ({stats.dropped} dropped as longer than max_length={max_length}, "
            f"{stats.invalid_skipped} invalid skipped)\n  fix: raise data.max_seq_length or use truncation 'truncate'",
            path=examples[0].source.path if examples else None,
        )
    stats.examples = len(kept)
    stats.formats = {}
    for item in kept:
        stats.count_format(item.format)
    stats.tokens = sum(len(i.prompt) + len(i.chosen) + len(i.rejected or []) for i in kept)
    stats.trained_tokens = sum(len(i.chosen) + len(i.rejected or []) for i in kept)
    return kept, stats


# --- batches ---------------------------------------------------------------------------------


def collate_pairs(items: Sequence[TokenizedPreference], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded rows, [chosen_1..B; rejected_1..B] (TRL's layout), prompts masked in labels."""
    rows = [[item.row(item.chosen)] for item in items] + [[item.row(item.rejected or [])] for item in items]
    return collate(rows, pad_id)


def collate_completions(items: Sequence[TokenizedPreference], pad_id: int) -> dict[str, torch.Tensor]:
    """KTO: B rows prompt + completion, and `desirable` (B,) booleans."""
    batch = collate([[item.row(item.chosen)] for item in items], pad_id)
    batch["desirable"] = torch.tensor([bool(item.desirable) for item in items])
    return batch


def collate_mismatched(items: Sequence[TokenizedPreference], pad_id: int) -> dict[str, torch.Tensor]:
    """KTO's KL rows: prompt i with completion i-1 (a completion not written for that prompt)."""
    rows = [[item.row(items[(i - 1) % len(items)].chosen)] for i, item in enumerate(items)]
    return collate(rows, pad_id)


def plan_preference_batches(items: Sequence[TokenizedPreference], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True):
    """The epoch's batches of example indices (length-bucketed like SFT batches; pairs never packed)."""
    return [[row[0] for row in batch] for batch in plan_batches([len(item) for item in items], batch_size, seed=seed, epoch=epoch, shuffle=shuffle)]


def as_conversation(example: PreferenceExample) -> Example:
    """The chosen reply as an SFT conversation (what evaluation's generation prompts are made from)."""
    return Example(example.source, example.format, messages=example.prompt + [{"role": "assistant", "content": example.chosen}])


# --- read, validate, inspect -----------------------------------------------------------------


def load_preferences(
    source: str,
    tokenizer,
    *,
    fmt: str = "auto",
    kto: bool = False,
    system_prompt: str | None = None,
    split: str = "train",
    hf_config: str | None = None,
    max_length: int = 512,
    truncation: Truncation = "truncate",
    dedupe: bool = True,
    limit: int | None = None,
    skip_invalid: bool = False,
) -> tuple[list[TokenizedPreference], DataStats]:
    """Read a source, normalise its records to preference examples, drop duplicates, tokenize."""
    from tunelab.data.sources import read_source

    stats = DataStats()
    records = read_source(source, split=split, hf_config=hf_config, skip_invalid=skip_invalid, stats=stats)
    examples = normalise_preferences(records, fmt=fmt, kto=kto, system_prompt=system_prompt, skip_invalid=skip_invalid, stats=stats)
    if dedupe:
        examples = remove_duplicate_preferences(examples, stats=stats)
    if limit is not None:
        examples = examples[:limit]
    return tokenize_preferences(examples, tokenizer, max_length=max_length, truncation=truncation, skip_invalid=skip_invalid, stats=stats)


def is_preference_source(source: str, *, fmt: str = "auto", split: str = "train", hf_config: str | None = None) -> bool:
    """Does this source hold preference data (so `data validate` / `inspect` show pairs)?"""
    from tunelab.data.formats import detect_file_formats
    from tunelab.data.sources import read_source

    if fmt != "auto":
        return fmt in PREFERENCE_FORMATS
    try:
        formats = detect_file_formats(read_source(source, split=split, hf_config=hf_config, skip_invalid=True))
    except DataError:
        return False  # not detectable as anything: the SFT path reports it
    return bool(formats) and formats <= set(PREFERENCE_FORMATS)


def validate_preferences(source: str, tokenizer, *, fallback_template: str = "chatml", **options):
    """`tunelab data validate` for preference data: counts, lengths (prompt + longer reply), problems."""
    from tunelab.data.pipeline import ValidationReport
    from tunelab.data.render import ensure_chat_template

    applied = ensure_chat_template(tokenizer, fallback_template)
    items, stats = load_preferences(source, tokenizer, **options)
    return ValidationReport(str(source), stats, [len(item) for item in items], options.get("max_length", 512), options.get("truncation", "truncate"), applied)


def inspect_preferences(source: str, tokenizer, *, n: int = 3, fallback_template: str = "chatml", **options) -> list[TokenizedPreference]:
    """The first `n` examples tokenized exactly as training sees them (only those records are read)."""
    from tunelab.data.render import ensure_chat_template
    from tunelab.data.sources import read_source

    if n < 1:
        raise TunelabError(f"-n must be at least 1, got {n}")
    ensure_chat_template(tokenizer, fallback_template)
    skip_invalid = options.get("skip_invalid", False)
    records = read_source(source, split=options.get("split", "train"), skip_invalid=skip_invalid)
    examples = normalise_preferences(records, fmt=options.get("fmt", "auto"), kto=options.get("kto", False), skip_invalid=skip_invalid, limit=n)
    items, _ = tokenize_preferences(examples, tokenizer, max_length=options.get("max_length", 512), skip_invalid=skip_invalid)
    return items


def render_preference_inspection(items: Sequence[TokenizedPreference], tokenizer, *, markers: bool = False):
    """Each pair's header and both replies with trained tokens highlighted (KTO: the completion and its label)."""
    from rich.console import Group
    from rich.text import Text

    from tunelab.data.pipeline import TRAINED_STYLE, UNTRAINED_STYLE, highlight_trained

    trained_label = "⟦trained⟧ (scored reply tokens)" if markers else "trained (scored reply tokens)"
    parts = [Text.assemble("legend: ", (trained_label, TRAINED_STYLE), "  ", ("prompt, not trained", UNTRAINED_STYLE))]
    for number, item in enumerate(items, start=1):
        truncated = ", truncated" if item.truncated else ""
        if item.rejected is not None:
            sizes = f"prompt {len(item.prompt)}, chosen {len(item.chosen)}, rejected {len(item.rejected)} tokens"
            replies = [("chosen", item.chosen), ("rejected", item.rejected)]
        else:
            sizes = f"prompt {len(item.prompt)}, completion {len(item.chosen)} tokens"
            replies = [("desirable" if item.desirable else "undesirable", item.chosen)]
        parts.append(Text(f"── pair {number}: {item.source} ({item.format}, {sizes}{truncated})", style="bold"))
        for name, reply in replies:
            parts += [Text(f"{name}:", style="bold cyan"), highlight_trained(item.row(reply), tokenizer, markers=markers)]
        parts.append(Text(""))
    return Group(*parts)
