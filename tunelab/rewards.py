"""Verifiable rewards for learning from rewards (GRPO): programs that score completions.

A reward function takes the batch's prompts, completions and reference answers (same order,
one entry per completion) and returns one float per completion:

    def my_reward(prompts: list[str], completions: list[str], references: list[str], **info) -> list[float]

`info` carries `completion_lengths` (tokens per completion) and `max_completion_length`
(the sampling limit); a function that does not need them just accepts `**info`. The built-in
ones below are pure Python and deterministic. A user's own function is named in the config
as `module:function` and is imported and run as the user's own code (`load_reward`).

The built-ins are written against the reward hacks the RL literature reports (an empty
answer, several answers, the answer only inside the reasoning, a truncated output): a
completion earns `correct` only for one unambiguous final answer outside the reasoning.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.metrics import extract_answer, parse_number

RewardFunction = Callable[..., list[float]]

# Where a completion states its final answer, most explicit first. "<think>...</think>" is
# reasoning: numbers inside it never count as the answer.
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_GSM8K_LINE = re.compile(r"^####[ \t]*(.*)$", re.MULTILINE)
ANSWER_SOURCES = ("auto", "gsm8k", "boxed", "answer_tag", "last_number")


def final_answers(completion: str, source: str = "auto") -> list[float | None]:
    """Every final answer a completion states, as numbers (None for a marker with no number).

    `source` picks the marker: "gsm8k" (`#### N` lines), "boxed" (`\\boxed{N}`), "answer_tag"
    (`<answer>N</answer>`), "last_number" (the last number in the text), or "auto": the first
    of answer_tag, boxed, gsm8k that appears, else the last number. Reasoning inside
    `<think>...</think>` is removed first.
    """
    if source not in ANSWER_SOURCES:
        raise TunelabError(f"unknown answer source {source!r}; choose one of {', '.join(ANSWER_SOURCES)}")
    text = _THINK.sub("", completion)
    marked = {
        "answer_tag": _ANSWER_TAG.findall(text),
        "boxed": _BOXED.findall(text),
        "gsm8k": _GSM8K_LINE.findall(text),
    }
    if source in marked:
        return [parse_number(found) for found in marked[source]]
    if source == "auto":
        for name in ("answer_tag", "boxed", "gsm8k"):
            if marked[name]:
                return [parse_number(found) for found in marked[name]]
    last = extract_answer(text) if text.strip() else None
    return [last] if last is not None else []


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)


def correct(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
            source: str = "auto", **info) -> list[float]:
    """1.0 when the completion's final answer equals the reference's number, else 0.0.

    The reference's number is read as `tunelab eval`'s exact match reads it (`#### N` or its
    last number; "1,234", "$1234" and "1234.0" are equal). Zero for: no answer, a marker with
    no number in it (`<answer></answer>`), two different final answers, a reference without a
    number.
    """
    scores = []
    for completion, reference in zip(completions, references, strict=True):
        expected = extract_answer(reference)
        answers = final_answers(completion, source)
        if expected is None or not answers or any(a is None for a in answers):
            scores.append(0.0)
            continue
        scores.append(1.0 if all(_same_number(a, expected) for a in answers) else 0.0)
    return scores


# Strict: worked lines, then exactly one last line "#### <number>", nothing after it.
_STRICT_GSM8K = re.compile(r"\A(?:(?!####)[^\n]*\S[^\n]*\n)+####[ \t]*-?\$?[\d,]*\.?\d+[ \t]*\Z")
# Strict XML layout (the R1 / unsloth recipe): reasoning block then answer block, alone.
_STRICT_XML = re.compile(r"\A\s*<think>\n.+?\n</think>\n<answer>\n.+?\n</answer>\s*\Z", re.DOTALL)
FORMAT_STYLES = ("gsm8k", "xml")


def _check_style(style: str) -> None:
    if style not in FORMAT_STYLES:
        raise TunelabError(f"unknown format style {style!r}; choose one of {', '.join(FORMAT_STYLES)}")


def format_strict(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                  style: str = "gsm8k", **info) -> list[float]:
    """1.0 when the whole completion has the expected layout, else 0.0.

    "gsm8k": one or more reasoning lines, then a last line `#### <number>` and nothing
    after it. "xml": `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>` and nothing else.
    """
    _check_style(style)
    pattern = _STRICT_GSM8K if style == "gsm8k" else _STRICT_XML
    return [1.0 if pattern.match(c.strip("\n") if style == "gsm8k" else c) else 0.0 for c in completions]


def format_soft(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str],
                style: str = "gsm8k", **info) -> list[float]:
    """1.0 when the completion states exactly one numeric final answer in the style's marker.

    Softer than `format_strict`: text around it is allowed (open-r1 #235: an anchored regex
    alone can keep the format reward at 0 for a whole run).
    """
    _check_style(style)
    source = "gsm8k" if style == "gsm8k" else "answer_tag"
    scores = []
    for completion in completions:
        answers = final_answers(completion, source)
        scores.append(1.0 if len(answers) == 1 and answers[0] is not None else 0.0)
    return scores


def overlong_penalty(prompts: Sequence[str], completions: Sequence[str], references: Sequence[str], *,
                     completion_lengths: Sequence[int], max_completion_length: int,
                     buffer: int | None = None, **info) -> list[float]:
    """DAPO's soft overlong punishment: 0 up to `max - buffer` tokens, then down to -1 at `max`.

    `buffer` defaults to a quarter of `max_completion_length`. A completion cut at the limit
    gets -1: it never stated a finished answer (open-r1 #363).
    """
    buffer = max_completion_length // 4 if buffer is None else buffer
    if buffer <= 0:  # a hard limit: only a completion cut at the maximum is punished
        return [-1.0 if length >= max_completion_length else 0.0 for length in completion_lengths]
    start = max_completion_length - buffer
    return [0.0 if length <= start else -min(1.0, (length - start) / buffer) for length in completion_lengths]


BUILT_IN: dict[str, RewardFunction] = {
    "correct": correct,
    "format_strict": format_strict,
    "format_soft": format_soft,
    "length": overlong_penalty,
}


def load_reward(name: str) -> RewardFunction:
    """A built-in reward by name, or a user's function given as `module:function`.

    The user's module is imported as Python code (it runs with the trainer's rights); a
    wrong path is a TunelabError saying what was missing and how to write the name.
    """
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, sep, function_name = name.partition(":")
    if not sep or not module_name or not function_name:
        raise TunelabError(
            f"reward {name!r} is neither a built-in ({', '.join(BUILT_IN)}) nor a 'module:function' path\n"
            "  fix: e.g. rewards: [{name: correct, weight: 1.0}, {name: my_rewards:brevity, weight: 0.2}]"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TunelabError(
            f"reward {name!r}: cannot import module {module_name!r}: {err}\n"
            "  fix: put the module on PYTHONPATH (or in the working directory) and name it as module:function"
        ) from err
    function = vars(module).get(function_name)
    if not callable(function):
        raise TunelabError(f"reward {name!r}: module {module_name!r} has no function {function_name!r}")
    return function


@dataclass(frozen=True)
class RewardSpec:
    """One reward function of a run and its weight in the total."""

    name: str
    weight: float = 1.0


@dataclass
class Scores:
    """A batch's rewards: per function (name -> one float per completion) and the weighted total."""

    per_function: dict[str, list[float]]
    total: list[float]


def score(specs: Sequence[RewardSpec], prompts: Sequence[str], completions: Sequence[str],
          references: Sequence[str], **info) -> Scores:
    """Run every reward function on the batch and combine them as sum(weight * reward).

    A user function returning the wrong number of values, or a non-finite value, is an
    error naming the function (a silent NaN would poison the advantages of its group).
    """
    per_function: dict[str, list[float]] = {}
    for spec in specs:
        values = [float(v) for v in load_reward(spec.name)(list(prompts), list(completions), list(references), **info)]
        if len(values) != len(completions):
            raise TunelabError(f"reward {spec.name!r} returned {len(values)} values for {len(completions)} completions")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise TunelabError(f"reward {spec.name!r} returned a non-finite value ({values[bad[0]]}) for completion {bad[0]}")
        per_function[spec.name] = values
    total = [sum(spec.weight * per_function[spec.name][i] for spec in specs) for i in range(len(completions))]
    return Scores(per_function=per_function, total=total)
