"""Prompts with reference answers: the data of learning from rewards (GRPO).

Each record gives a prompt and the answer a reward program checks completions against:
GSM8K's `question` / `answer` (`... #### 72`), qa (`question`/`problem` + `answer`/`solution`),
alpaca and dolly (instruction [+ input] + output), chat (`messages` ending with the
assistant's reference reply), ShareGPT, custom field mappings, or any of these with an explicit
`reference` field (then a chat record may end on the user's turn). The prompt is every message
before the last assistant reply, rendered with the chat template and its generation prompt;
the reference is that reply (or the `reference` field).

A record whose reference has no number is an error naming its `file:line` when a reward
needs one (`correct` compares final numbers); `skip_invalid` skips and counts such records.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.data.formats import normalise
from tunelab.data.sources import DataStats, Location, Record, read_source
from tunelab.errors import DataError
from tunelab.metrics import extract_answer


@dataclass(frozen=True)
class Prompt:
    """One training prompt: its token ids (chat-rendered, ending in the generation prompt), its
    text as the model sees it, the reference answer, and where it came from."""

    ids: list[int]
    text: str
    reference: str
    source: Location

    def __len__(self) -> int:
        return len(self.ids)


def _with_reference_as_reply(record: Record, reference_field: str) -> Record:
    """A chat record with a `reference` field and no final assistant turn gets the reference as
    that turn, so the shared format reader sees a complete conversation."""
    data = record.data
    messages = data.get("messages")
    if reference_field in data and isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") != "assistant":
        data = {**data, "messages": [*messages, {"role": "assistant", "content": str(data[reference_field])}]}
        return Record(data=data, source=record.source)
    return record


def read_prompts(
    source: str,
    tokenizer,
    *,
    fmt: str = "auto",
    fields: dict | None = None,
    split: str = "train",
    hf_config: str | None = None,
    system_prompt: str | None = None,
    reference_field: str = "reference",
    max_prompt_tokens: int = 512,
    need_number: bool = True,
    skip_invalid: bool = False,
    limit: int | None = None,
    stats: DataStats | None = None,
) -> list[Prompt]:
    """Read, check and tokenize prompt/reference records (see the module docstring).

    A prompt longer than `max_prompt_tokens` is cut from the left (the question's end and the
    generation prompt are kept), as a chat prompt cut from the right would lose its turn marker.
    """
    stats = stats if stats is not None else DataStats()
    records = [_with_reference_as_reply(r, reference_field)
               for r in read_source(source, split=split, hf_config=hf_config, skip_invalid=skip_invalid, stats=stats)]
    by_location = {str(r.source): r for r in records}
    examples = normalise(records, fmt=fmt, fields=fields, system_prompt=system_prompt, skip_invalid=skip_invalid,
                         stats=stats, limit=limit)
    prompts = []
    for example in examples:
        try:
            prompts.append(_prompt(example, by_location[str(example.source)], tokenizer, reference_field,
                                   max_prompt_tokens, need_number))
        except DataError as error:
            if not skip_invalid:
                raise
            stats.skip(error)
    if not prompts:
        raise DataError(f"no usable prompts: all {len(examples)} records were invalid", path=str(source))
    return prompts


def _prompt(example, record: Record, tokenizer, reference_field: str, max_prompt_tokens: int,
            need_number: bool) -> Prompt:
    where = example.source
    if example.messages is None:
        raise where.error("a plain-text record has no prompt/answer split; learning from rewards needs a prompt "
                          "and a reference answer (e.g. question/answer fields)")
    roles = [m["role"] for m in example.messages]
    last_reply = len(roles) - 1 - roles[::-1].index("assistant")
    messages = example.messages[:last_reply]
    reference = record.data.get(reference_field)
    reference = str(reference) if reference is not None else example.messages[last_reply]["content"]
    if need_number and extract_answer(reference) is None:
        raise where.error(f"the reference answer has no number for the `correct` reward: {reference[:80]!r}\n"
                          f"  fix: end the answer with '#### <number>', or give a numeric '{reference_field}' field")
    from tunelab.generate import encode_prompt  # as `tunelab eval` and `generate` prompt the model

    ids = encode_prompt(tokenizer, messages)[-max_prompt_tokens:]
    return Prompt(ids=ids, text=tokenizer.decode(ids), reference=reference, source=where)
