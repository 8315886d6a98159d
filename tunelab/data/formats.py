"""Detect the shape of raw records and normalise them into examples.

An `Example` is either plain text (`text`) or a conversation (`messages`, a list of
`{"role", "content"}` with roles system/user/assistant/tool). Every instruction-like
format becomes a conversation, so one code path (the model's chat template) renders all
of them, at training and at inference alike.

Formats (auto-detected per file from the fields of its first records, or forced):

  name       fields                                            becomes
  text       text | content                                    plain text, every token trained
  alpaca     instruction, input (optional), output             user: instruction [+ input], assistant: output
  dolly      instruction, context (optional), response         user: instruction [+ context], assistant: response
  chat       messages: [{role, content}]                       the conversation as is (OpenAI style)
  sharegpt   conversations: [{from, value}]                    from human/gpt/system -> user/assistant/system
  qa         question + answer, or problem + solution          user: question, assistant: answer (e.g. GSM8K)
  custom     a field mapping {prompt, response, system?}       user: prompt, assistant: response
  preference chosen + rejected (+ prompt)                        pairs for task: preference (tunelab/data/preference.py)
  kto        prompt + completion + label                         labelled completions for task: preference, loss kto
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tunelab.data.records import DataStats, Location, Record
from tunelab.errors import DataError, TunelabError

FORMATS: tuple[str, ...] = ("text", "alpaca", "dolly", "chat", "sharegpt", "qa", "custom", "preference", "kto")
CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES: dict[str, str] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
FORMAT_FIELDS: dict[str, str] = {
    "text": '"text" (or "content")',
    "alpaca": '"instruction", "output" and optionally "input"',
    "dolly": '"instruction", "response" and optionally "context"',
    "chat": '"messages": a list of {"role", "content"}',
    "sharegpt": '"conversations": a list of {"from", "value"}',
    "qa": '"question" and "answer" (or "problem" and "solution")',
}
# Read by tunelab/data/preference.py (task: preference); named here so detection knows them.
PREFERENCE_FIELDS: dict[str, str] = {
    "preference": '"prompt", "chosen" and "rejected" (strings or message lists), or "chosen" and "rejected" conversations',
    "kto": '"prompt", "completion" and "label" (true for a desirable completion)',
}
# Records of a file whose field names decide its format: enough to see optional fields.
DETECTION_SAMPLE = 100


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the prompt, the response and (optionally) the system message."""

    prompt: str
    response: str
    system: str | None = None


@dataclass(frozen=True)
class Example:
    """A normalised example: plain `text`, or a conversation in `messages`; never both."""

    source: Location
    format: str
    messages: list[dict[str, str]] | None = None
    text: str | None = None

    @property
    def is_conversation(self) -> bool:
        return self.messages is not None

    def content_key(self) -> str:
        """The example's content as one string: equal keys mean exact duplicates."""
        if self.messages is not None:
            return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)
        return "text\0" + (self.text or "")


def detect_format(fields: Iterable[str]) -> str | None:
    """The format named by a set of record field names, or None when no format matches."""
    keys = set(fields)
    # Preference data first: UltraFeedback-binarized pairs also carry a "messages" field.
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"completion", "label"} <= keys:
        return "kto"
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys:
        return "dolly" if ("response" in keys or "context" in keys) and "output" not in keys else "alpaca"
    if keys & {"question", "problem"}:
        return "qa"
    if keys & {"text", "content"}:
        return "text"
    return None


def parse_field_map(fields: FieldMap | Mapping[str, str] | None) -> FieldMap | None:
    """A FieldMap from a mapping like {"prompt": "q", "response": "a", "system": "sys"}."""
    if fields is None or isinstance(fields, FieldMap):
        return fields
    unknown = sorted(set(fields) - {"prompt", "response", "system"})
    missing = [key for key in ("prompt", "response") if not fields.get(key)]
    if unknown or missing:
        raise TunelabError(
            f"bad field mapping {dict(fields)}: "
            + (f"unknown keys {unknown}; " if unknown else "")
            + (f"missing {missing}; " if missing else "")
            + 'expected {"prompt": FIELD, "response": FIELD, "system": FIELD (optional)}'
        )
    return FieldMap(prompt=fields["prompt"], response=fields["response"], system=fields.get("system"))


def normalise(
    records: Sequence[Record],
    *,
    fmt: str = "auto",
    fields: FieldMap | Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    skip_invalid: bool = False,
    stats: DataStats | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Turn raw records into examples, detecting the format of each file unless `fmt` is given.

    `fields` maps custom field names (implies fmt "custom"); `system_prompt` is added as the
    system message of every conversation that has none. A record that does not fit its
    format raises a DataError naming its file and line and what was expected, unless
    `skip_invalid` is set: then it is skipped and counted in `stats`. `limit` stops after
    that many examples (formats are still detected from each file's first records).
    """
    stats = stats if stats is not None else DataStats()
    field_map = parse_field_map(fields)
    if fmt == "auto" and field_map is not None:
        fmt = "custom"
    if fmt != "auto" and fmt not in FORMATS:
        raise TunelabError(f"unknown data format {fmt!r}; expected auto or one of: {', '.join(FORMATS)}")
    if fmt == "custom" and field_map is None:
        raise TunelabError('format "custom" needs a field mapping: {"prompt": FIELD, "response": FIELD, "system": FIELD (optional)}')

    formats = _formats_by_file(records) if fmt == "auto" else {}
    preference = sorted({fmt, *formats.values()} & {"preference", "kto"})
    if preference:
        where = next(r.source.path for r in records if formats.get(r.source.path, fmt) in preference) if records else None
        raise DataError(
            f"this is preference data ({preference[0]}: {PREFERENCE_FIELDS[preference[0]]}), which trains with task: preference.\n"
            "  fix: set task: preference (see docs/preference.md), or give prompt/response data for supervised fine-tuning",
            path=where,
        )
    if fmt == "auto":  # only the records that will be read (`limit`: a preview of the first ones)
        check_one_format_per_file(records if limit is None else records[:limit])
    examples = []
    for record in records:
        if limit is not None and len(examples) >= limit:
            break
        record_format = formats.get(record.source.path, fmt)
        try:
            example = _normalise_record(record, record_format, field_map, system_prompt)
        except DataError as error:
            if not skip_invalid:
                raise
            stats.skip(error)
            continue
        examples.append(example)
    if not examples:
        where = records[0].source.path if records else None
        raise DataError(f"no valid examples: all {len(records)} records were invalid (see the skipped-record messages)", path=where)
    return examples


def detect_file_formats(records: Sequence[Record]) -> set[str]:
    """The formats detected in a set of records (each file's from its first records)."""
    return set(_formats_by_file(records).values())


def _formats_by_file(records: Sequence[Record]) -> dict[str, str]:
    """Detect each file's format from the field names of its first records."""
    fields_by_file: dict[str, set[str]] = {}
    seen_by_file: dict[str, int] = {}
    first_location: dict[str, Location] = {}
    for record in records:
        path = record.source.path
        if seen_by_file.get(path, 0) >= DETECTION_SAMPLE:
            continue
        seen_by_file[path] = seen_by_file.get(path, 0) + 1
        first_location.setdefault(path, record.source)
        fields_by_file.setdefault(path, set()).update(key for key, value in record.data.items() if value is not None)
    formats = {}
    for path, keys in fields_by_file.items():
        detected = detect_format(keys)
        if detected is None:
            expected = "".join(f"\n    {name:<9} {spec}" for name, spec in FORMAT_FIELDS.items())
            raise first_location[path].error(
                f"cannot tell the data format from the fields {sorted(keys)}.\n"
                f"  expected the fields of one of these formats:{expected}\n"
                "  fix: rename the fields, choose a format (--format), or map fields "
                '(custom: {"prompt": FIELD, "response": FIELD})'
            )
        formats[path] = detected
    return formats


def check_one_format_per_file(records: Sequence[Record]) -> None:
    """Refuse a file whose records follow different formats (an alpaca line, then a chat line).

    Detection from the union of a file's fields would pick one format and then report
    every line of the other as broken; naming both formats and where each starts says
    what is really wrong. Each record is classified on its own (a set lookup, cheap).
    """
    first_of: dict[str, dict[str, Record]] = {}  # path -> format -> its first record
    for record in records:
        detected = detect_format(key for key, value in record.data.items() if value is not None)
        if detected is None:
            continue  # reported later as a bad record, at its own line
        seen = first_of.setdefault(record.source.path, {})
        if detected not in seen:
            seen[detected] = record
            if len(seen) > 1:
                (fmt_a, first_a), (fmt_b, first_b) = list(seen.items())[:2]
                raise DataError(
                    f"mixes data formats: {fmt_a} from line {_where(first_a)}, {fmt_b} from line {_where(first_b)}.\n"
                    f"    line {_where(first_a)} ({fmt_a}): {_preview(first_a.data)}\n"
                    f"    line {_where(first_b)} ({fmt_b}): {_preview(first_b.data)}\n"
                    f"  fix: keep one format per file (split it into two files), or set data.format (--format) "
                    f"to the format every record follows, e.g. data.format={fmt_a}",
                    path=record.source.path,
                )


def _where(record: Record) -> str:
    """The record's line (or dataset index) for messages."""
    where = record.source
    return str(where.line) if where.line is not None else f"index {where.index}"


def _preview(data: dict[str, Any], width: int = 100) -> str:
    """The record as one JSON line, cut to `width` characters."""
    text = json.dumps(data, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def _normalise_record(record: Record, fmt: str, field_map: FieldMap | None, system_prompt: str | None) -> Example:
    data, where = record.data, record.source
    if fmt == "text":
        field = "text" if data.get("text") is not None or data.get("content") is None else "content"
        return Example(where, "text", text=_required_text(data, field, where, "text"))
    if fmt == "chat":
        messages = _chat_messages(data, where)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(data, where)
    elif fmt == "alpaca":
        prompt = _join(_required_text(data, "instruction", where, fmt), _optional_text(data, "input", where))
        messages = [_user(prompt), _assistant(_required_text(data, "output", where, fmt))]
    elif fmt == "dolly":
        prompt = _join(_required_text(data, "instruction", where, fmt), _optional_text(data, "context", where))
        messages = [_user(prompt), _assistant(_required_text(data, "response", where, fmt))]
    elif fmt == "qa":
        question, answer = ("problem", "solution") if "problem" in data and "question" not in data else ("question", "answer")
        messages = [_user(_required_text(data, question, where, fmt)), _assistant(_required_text(data, answer, where, fmt))]
    else:  # custom
        assert field_map is not None
        messages = [
            _user(_required_text(data, field_map.prompt, where, "custom", field_map)),
            _assistant(_required_text(data, field_map.response, where, "custom", field_map)),
        ]
        if field_map.system is not None and _optional_text(data, field_map.system, where):
            messages.insert(0, {"role": "system", "content": _optional_text(data, field_map.system, where)})
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    _check_conversation(messages, where)
    return Example(where, fmt, messages=messages)


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def _join(instruction: str, extra: str) -> str:
    """The instruction, then the optional input/context after a blank line."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _expected_fields(fmt: str, field_map: FieldMap | None) -> str:
    if fmt == "custom" and field_map is not None:
        system = f' and optionally "{field_map.system}"' if field_map.system else ""
        return f'"{field_map.prompt}", "{field_map.response}"{system} (the field mapping)'
    return FORMAT_FIELDS[fmt]


def _required_text(data: dict[str, Any], field: str, where: Location, fmt: str, field_map: FieldMap | None = None) -> str:
    """A non-empty string field; the error says which field and what the format expects."""
    value = data.get(field)
    if value is None:
        raise where.error(f'field "{field}" is missing; {fmt} records need {_expected_fields(fmt, field_map)}')
    if not isinstance(value, str):
        raise where.error(f'field "{field}" must be a string, got {describe_value(value)}')
    if not value.strip():
        raise where.error(f'field "{field}" is empty')
    return value


def _optional_text(data: dict[str, Any], field: str, where: Location) -> str:
    value = data.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise where.error(f'field "{field}" must be a string, got {describe_value(value)}')
    return value


def describe_value(value: Any) -> str:
    """A JSON value as an error message names it ("a number (3)", "a list", "an object")."""
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _message_list(data: dict[str, Any], field: str, where: Location, fmt: str) -> list[Any]:
    value = data.get(field)
    if value is None:
        raise where.error(f'field "{field}" is missing; {fmt} records need {FORMAT_FIELDS[fmt]}')
    if not isinstance(value, list):
        raise where.error(f'field "{field}" must be a list of messages, got {describe_value(value)}')
    if not value:
        raise where.error(f'field "{field}" is an empty list; a conversation needs a user and an assistant message')
    return value


def _chat_messages(data: dict[str, Any], where: Location) -> list[dict[str, str]]:
    messages = []
    for i, message in enumerate(_message_list(data, "messages", where, "chat")):
        if not isinstance(message, dict):
            raise where.error(f'messages[{i}] must be an object {{"role", "content"}}, got {describe_value(message)}')
        role = message.get("role")
        if role not in CHAT_ROLES:
            got = "missing" if role is None else repr(role)
            raise where.error(f"messages[{i}].role is {got}; expected one of: {', '.join(CHAT_ROLES)}")
        messages.append({"role": role, "content": _message_content(message.get("content"), f"messages[{i}].content", where)})
    return messages


def _message_content(content: Any, name: str, where: Location) -> str:
    """Message text: a string, or OpenAI-style text parts [{"type": "text", "text": ...}] joined."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        content = "".join(part["text"] for part in content)
    if content is None:
        raise where.error(f"{name} is missing")
    if not isinstance(content, str):
        raise where.error(f"{name} must be a string (or a list of text parts), got {describe_value(content)}")
    if not content.strip():
        raise where.error(f"{name} is empty")
    return content


def _sharegpt_messages(data: dict[str, Any], where: Location) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(_message_list(data, "conversations", where, "sharegpt")):
        if not isinstance(turn, dict):
            raise where.error(f'conversations[{i}] must be an object {{"from", "value"}}, got {describe_value(turn)}')
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            got = "missing" if speaker is None else repr(speaker)
            raise where.error(f"conversations[{i}].from is {got}; expected one of: human, gpt, system")
        content = _message_content(turn.get("value"), f"conversations[{i}].value", where)
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    return messages


def _check_conversation(messages: list[dict[str, str]], where: Location) -> None:
    """A trainable conversation: some assistant reply, and a user message before the first one."""
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise where.error("the conversation has no assistant message, so there is nothing to train on")
    if "user" not in roles[: roles.index("assistant")]:
        raise where.error("the first assistant message comes before any user message; a conversation must start with the user")


def remove_duplicates(examples: Sequence[Example], *, stats: DataStats | None = None) -> list[Example]:
    """Drop exact duplicates (same text, or same messages), keeping the first; counted in stats."""
    seen: set[str] = set()
    kept = []
    for example in examples:
        key = example.content_key()
        if key not in seen:
            seen.add(key)
            kept.append(example)
    if stats is not None:
        stats.duplicates_removed += len(examples) - len(kept)
    return kept
