"""Synthetic data: seeded arithmetic word problems, plain text and chat records.

The reasoning problems are what the quickstart demo fine-tunes on: short multi-step word
problems whose worked answers spell out every operation as `a op b = c` on its own line
and end with GSM8K's `#### <number>` line. Everything is generated from a seed with
`random.Random`, so the same seed and options give byte-identical files.

Each generator is an endless stream of distinct records (duplicates are skipped), and the
list functions take its first `n`. So with one seed, the first `n_train` records and the
`n_test` records after them never share a question: that is how `reasoning_train_test`
(and `tunelab data synth --test-output`) make a held-out set.
"""

from __future__ import annotations

import difflib
import itertools
import json
import os
import random
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

KINDS = ("reasoning", "text", "chat", "classification", "preference")
DEFAULT_DIFFICULTY = 2
# Records are only shown a progress bar from this many on; smaller files take well under a second.
PROGRESS_THRESHOLD = 5000
# After this many duplicates in a row the options cannot make enough distinct records.
MAX_DUPLICATES_IN_A_ROW = 10_000


@dataclass(frozen=True)
class Difficulty:
    """How hard reasoning problems are: equation lines per answer and number sizes.

    `max_operand` bounds the amounts named in a question (counts, prices, additions),
    `max_factor` the multipliers and divisors, and `max_total` every intermediate and
    final result, so all numbers stay in a range a small model can compute.
    """

    min_steps: int
    max_steps: int
    max_operand: int
    max_factor: int
    max_total: int


# Level 2 (the default) is tuned for the CPU demo's 135M model, whose own arithmetic is
# weak (it gets most subtractions wrong even below 20): 2-3 steps, amounts up to 10,
# factors 2-3, every number at most 50, so fine-tuning can teach the computations.
DIFFICULTIES: dict[int, Difficulty] = {
    1: Difficulty(min_steps=1, max_steps=2, max_operand=10, max_factor=3, max_total=30),
    2: Difficulty(min_steps=2, max_steps=3, max_operand=10, max_factor=3, max_total=50),
    3: Difficulty(min_steps=3, max_steps=4, max_operand=20, max_factor=5, max_total=100),
    4: Difficulty(min_steps=4, max_steps=5, max_operand=100, max_factor=10, max_total=1000),
    5: Difficulty(min_steps=5, max_steps=7, max_operand=1000, max_factor=20, max_total=20000),
}

# (name, subject pronoun, object pronoun, possessive)
PEOPLE = [
    ("Mia", "she", "her", "her"), ("Liam", "he", "him", "his"), ("Ava", "she", "her", "her"),
    ("Noah", "he", "him", "his"), ("Emma", "she", "her", "her"), ("Lucas", "he", "him", "his"),
    ("Zoe", "she", "her", "her"), ("Omar", "he", "him", "his"), ("Priya", "she", "her", "her"),
    ("Diego", "he", "him", "his"), ("Hana", "she", "her", "her"), ("Ben", "he", "him", "his"),
    ("Sara", "she", "her", "her"), ("Tom", "he", "him", "his"), ("Lena", "she", "her", "her"),
    ("Kofi", "he", "him", "his"), ("Nina", "she", "her", "her"), ("Sam", "he", "him", "his"),
    ("Aisha", "she", "her", "her"), ("Leo", "he", "him", "his"), ("Rosa", "she", "her", "her"),
    ("Ivan", "he", "him", "his"), ("Maya", "she", "her", "her"), ("Jack", "he", "him", "his"),
    ("Chloe", "she", "her", "her"), ("Ravi", "he", "him", "his"), ("Ella", "she", "her", "her"),
    ("Max", "he", "him", "his"), ("Yuki", "she", "her", "her"), ("Owen", "he", "him", "his"),
]

# (plural item, container that holds several of them)
ITEMS = [
    ("apples", "bags"), ("pencils", "packs"), ("marbles", "jars"), ("stickers", "sheets"),
    ("cookies", "boxes"), ("cards", "decks"), ("books", "boxes"), ("eggs", "cartons"),
    ("crayons", "boxes"), ("shells", "buckets"), ("stamps", "albums"), ("beads", "bags"),
    ("balloons", "packs"), ("candies", "bags"), ("buttons", "tins"), ("oranges", "crates"),
    ("rocks", "boxes"), ("flowers", "bunches"), ("peaches", "baskets"), ("coins", "jars"),
]

# Things bought in the money problems, with a plural name.
GOODS = ["notebooks", "pens", "sandwiches", "tickets", "comics", "plants", "muffins", "toys", "socks", "cups"]
EXPENSES = ["lunch", "a book", "a movie ticket", "a gift", "snacks", "a bus pass", "paint", "a game"]
JOBS = ["walking dogs", "washing cars", "mowing lawns", "babysitting", "selling lemonade", "tutoring"]
RELATIVES = ["grandmother", "grandfather", "aunt", "uncle", "mother", "father", "cousin"]


def check_difficulty(difficulty: int) -> Difficulty:
    """The settings of a difficulty level; a clear error for a level outside 1..5."""
    if difficulty not in DIFFICULTIES:
        levels = f"{min(DIFFICULTIES)}..{max(DIFFICULTIES)}"
        raise TunelabError(
            f"difficulty must be an integer in {levels}, got {difficulty!r}\n"
            f"  fix: use {DEFAULT_DIFFICULTY} (the default: 2-3 steps, numbers below 100) or a level in {levels}"
        )
    return DIFFICULTIES[difficulty]


# ---------------------------------------------------------------------------------------
# Reasoning problems
# ---------------------------------------------------------------------------------------


@dataclass
class _Story:
    """A problem being built: question sentences, worked-answer lines and the running value."""

    question: list[str]
    answer: list[str]
    value: int
    steps: int = 0

    def step(self, line_before: str, a: int, op: str, b: int, line_after: str) -> int:
        """Append one worked line `... a op b = c ...`, check it exactly, and return c."""
        result = _apply(a, op, b)
        self.answer.append(f"{line_before}{a} {op} {b} = {result}{line_after}")
        self.steps += 1
        return result


def _apply(a: int, op: str, b: int) -> int:
    """Exact integer arithmetic; division must have no remainder and results stay >= 0."""
    if op == "+":
        result = a + b
    elif op == "-":
        result = a - b
    elif op == "*":
        result = a * b
    elif op == "/":
        if b == 0 or a % b != 0:
            raise ValueError(f"{a} / {b} is not an exact integer division")
        result = a // b
    else:
        raise ValueError(f"unknown operation {op!r}")
    if result < 0:
        raise ValueError(f"{a} {op} {b} is negative")
    return result


def _cap(sentence: str) -> str:
    """Capitalise the first letter only (str.capitalize would lower-case names)."""
    return sentence[:1].upper() + sentence[1:]


def _divisors(value: int, max_factor: int) -> list[int]:
    """Divisors 2..max_factor of `value` that leave at least 2 (so a division is never trivial)."""
    return [k for k in range(2, max_factor + 1) if value % k == 0 and value // k >= 2]


def _collection_problem(rng: random.Random, steps: int, level: Difficulty) -> tuple[str, str]:
    """One person's count of items changes step by step: buy packs, get, give away, multiply, split."""
    name, she, her_obj, her = rng.choice(PEOPLE)
    friend = rng.choice([p[0] for p in PEOPLE if p[0] != name])
    items, container = rng.choice(ITEMS)
    story = _Story(question=[], answer=[], value=0)

    pack_max = min(level.max_factor, level.max_total // 2)
    if rng.random() < 0.5:  # open with packs: already one multiplication step
        packs = rng.randint(2, max(2, pack_max))
        per_pack = rng.randint(2, max(2, min(level.max_operand, level.max_total // packs)))
        story.question.append(f"{name} buys {packs} {container} of {items} with {per_pack} {items} in each.")
        story.value = story.step(f"{name} buys {packs} {container} of {per_pack}, so {she} has ", packs, "*", per_pack, f" {items}.")
    else:
        story.value = rng.randint(2, min(level.max_operand, level.max_total))
        story.question.append(f"{name} has {story.value} {items}.")

    while story.steps < steps:
        x = story.value
        choices: list[str] = []
        # Amounts added or taken are at least 2 ("1 more apples" reads badly) and leave at least 2.
        if x + 2 <= level.max_total:
            choices.append("add")
        if x >= 4:
            choices.append("sub")
        if x * 2 <= level.max_total:
            choices.append("mul")
        if _divisors(x, level.max_factor):
            choices.append("div")
        op = rng.choice(choices)
        if op == "add":
            k = rng.randint(2, max(2, min(level.max_operand, level.max_total - x)))
            question, line = rng.choice(
                [
                    (f"Then {she} finds {k} more {items}.", f"{_cap(she)} finds {k} more"),
                    (f"{friend} gives {her_obj} {k} more {items}.", f"{_cap(she)} gets {k} more"),
                    (f"Then {she} buys {k} more {items}.", f"{_cap(she)} buys {k} more"),
                ]
            )
            story.question.append(question)
            story.value = story.step(f"{line}, so {she} has ", x, "+", k, f" {items}.")
        elif op == "sub":
            k = rng.randint(2, max(2, min(level.max_operand, x - 2)))
            question, line = rng.choice(
                [
                    (f"{_cap(she)} gives {k} {items} to {friend}.", f"{_cap(she)} gives away {k}"),
                    (f"Then {she} loses {k} {items}.", f"{_cap(she)} loses {k}"),
                    (f"{_cap(she)} sells {k} of {her} {items}.", f"{_cap(she)} sells {k}"),
                ]
            )
            story.question.append(question)
            story.value = story.step(f"{line}, so {she} has ", x, "-", k, f" {items}.")
        elif op == "mul":
            k = rng.randint(2, max(2, min(level.max_factor, level.max_total // x)))
            story.question.append(f"By the end of the week, {she} has {k} times as many {items} as before.")
            story.value = story.step(f"{_cap(she)} has {k} times as many, so {she} has ", x, "*", k, f" {items}.")
        else:
            k = rng.choice(_divisors(x, level.max_factor))
            if k == 2 and rng.random() < 0.5:
                story.question.append(f"{_cap(she)} gives half of {her} {items} to {friend}.")
                story.value = story.step(f"{_cap(she)} keeps half, so {she} has ", x, "/", 2, f" {items}.")
            else:
                story.question.append(f"{_cap(she)} puts the {items} into {k} equal {container} and keeps one of them.")
                story.value = story.step(f"{_cap(she)} keeps 1 of {k} {container}, so {she} has ", x, "/", k, f" {items}.")

    ending = rng.choice([f"How many {items} does {name} have now?", f"How many {items} does {name} have at the end?"])
    return " ".join(story.question + [ending]), "\n".join(story.answer + [f"#### {story.value}"])


def _money_problem(rng: random.Random, steps: int, level: Difficulty) -> tuple[str, str]:
    """One person's money changes: wages, purchases at a unit price, spending, earning, saving half."""
    name, she, her_obj, her = rng.choice(PEOPLE)
    story = _Story(question=[], answer=[], value=0)

    if rng.random() < 0.4:
        hours = rng.randint(2, max(2, level.max_factor))
        rate = rng.randint(2, max(2, min(level.max_operand, level.max_total // hours)))
        story.question.append(f"{name} earns ${rate} an hour and works {hours} hours.")
        story.value = story.step(f"{name} earns ", hours, "*", rate, " dollars.")
    else:
        # Start above the operand range sometimes, so purchases and spending stay possible.
        story.value = rng.randint(5, min(level.max_total, 2 * level.max_operand))
        story.question.append(f"{name} has ${story.value}.")

    while story.steps < steps:
        x = story.value
        choices: list[str] = []
        if x + 2 <= level.max_total:
            choices.append("earn")
        if x >= 4:
            choices.append("spend")
        if steps - story.steps >= 2 and x >= 6:
            choices.append("buy")
        if x % 2 == 0 and x >= 4:
            choices.append("half")
        op = rng.choice(choices)
        if op == "earn":
            k = rng.randint(2, max(2, min(level.max_operand, level.max_total - x)))
            question, line = rng.choice(
                [
                    (f"{_cap(she)} earns ${k} {rng.choice(JOBS)}.", f"{_cap(she)} earns {k} more"),
                    (f"{_cap(her)} {rng.choice(RELATIVES)} gives {her_obj} ${k}.", f"{_cap(she)} gets {k} more"),
                ]
            )
            story.question.append(question)
            story.value = story.step(f"{line}, so {she} has ", x, "+", k, " dollars.")
        elif op == "spend":
            k = rng.randint(2, max(2, min(level.max_operand, x - 2)))
            story.question.append(f"{_cap(she)} spends ${k} on {rng.choice(EXPENSES)}.")
            story.value = story.step(f"{_cap(she)} spends {k}, so {she} has ", x, "-", k, " dollars.")
        elif op == "buy":
            goods = rng.choice(GOODS)
            # count * price <= x - 2: the purchase always leaves at least $2.
            count = rng.randint(2, max(2, min(level.max_factor, (x - 2) // 2)))
            price = rng.randint(2, max(2, min(level.max_operand, (x - 2) // count)))
            story.question.append(f"{_cap(she)} buys {count} {goods} that cost ${price} each.")
            cost = story.step(f"The {goods} cost ", count, "*", price, " dollars.")
            story.value = story.step(f"{_cap(she)} has ", x, "-", cost, " dollars left.")
        else:
            story.question.append(f"{_cap(she)} puts half of {her} money in the bank.")
            story.value = story.step(f"{_cap(she)} keeps half, so {she} has ", x, "/", 2, " dollars.")

    ending = rng.choice([f"How many dollars does {name} have now?", f"How much money does {name} have left?"])
    return " ".join(story.question + [ending]), "\n".join(story.answer + [f"#### {story.value}"])


def _comparison_problem(rng: random.Random, steps: int, level: Difficulty) -> tuple[str, str]:
    """People compared in a chain ("Tom has 5 more than Mia"); asks for the last one or the total."""
    # Asking for the total needs one relation and one addition per extra person (an even step count).
    ask_total = steps % 2 == 0 and rng.random() < 0.5
    relations = steps // 2 if ask_total else steps
    people = rng.sample(PEOPLE, relations + 1)
    items, _ = rng.choice(ITEMS)
    first = people[0][0]
    # Leave room for the sum when the question asks for the total: every count stays <= room.
    room = level.max_total // (relations + 1) if ask_total else level.max_total
    counts = [rng.randint(2, min(level.max_operand, room))]
    story = _Story(question=[f"{first} has {counts[0]} {items}."], answer=[], value=counts[0])

    for (name, *_), (previous, *_) in zip(people[1:], people[:-1]):
        x = counts[-1]
        choices: list[str] = []
        if x + 2 <= room:
            choices.append("more")
        if x >= 4:
            choices.append("fewer")
        if x * 2 <= room:
            choices.append("times")
        if x % 2 == 0 and x >= 4:
            choices.append("half")
        op = rng.choice(choices)
        if op == "more":
            k = rng.randint(2, max(2, min(level.max_operand, room - x)))
            story.question.append(f"{name} has {k} more {items} than {previous}.")
            counts.append(story.step(f"{name} has ", x, "+", k, f" {items}."))
        elif op == "fewer":
            k = rng.randint(2, max(2, min(level.max_operand, x - 2)))
            story.question.append(f"{name} has {k} fewer {items} than {previous}.")
            counts.append(story.step(f"{name} has ", x, "-", k, f" {items}."))
        elif op == "times":
            k = rng.randint(2, max(2, min(level.max_factor, room // x)))
            story.question.append(f"{name} has {k} times as many {items} as {previous}.")
            counts.append(story.step(f"{name} has ", x, "*", k, f" {items}."))
        else:
            story.question.append(f"{name} has half as many {items} as {previous}.")
            counts.append(story.step(f"{name} has ", x, "/", 2, f" {items}."))

    if ask_total:
        total = counts[0]
        for index, count in enumerate(counts[1:], start=2):
            lead = "Together they have " if index == len(counts) else "So far that is "
            total = story.step(lead, total, "+", count, f" {items}.")
        story.value = total
        ending = f"How many {items} do they have together?"
    else:
        story.value = counts[-1]
        ending = f"How many {items} does {people[-1][0]} have?"
    return " ".join(story.question + [ending]), "\n".join(story.answer + [f"#### {story.value}"])


# Weights of the problem families: running totals of things and money are the easiest
# patterns to learn; comparisons (which reuse earlier numbers) get more weight when harder.
_FAMILIES: list[tuple[Callable[[random.Random, int, Difficulty], tuple[str, str]], tuple[float, float]]] = [
    (_collection_problem, (0.5, 0.4)),
    (_money_problem, (0.3, 0.3)),
    (_comparison_problem, (0.2, 0.3)),
]


def _reasoning_problem(rng: random.Random, level: Difficulty, difficulty: int) -> dict[str, str]:
    """One problem: pick a step count in the level's range and a family, then build it."""
    steps = rng.randint(level.min_steps, level.max_steps)
    weights = [easy if difficulty <= DEFAULT_DIFFICULTY else hard for _, (easy, hard) in _FAMILIES]
    family = rng.choices([build for build, _ in _FAMILIES], weights=weights)[0]
    question, answer = family(rng, steps, level)
    return {"question": question, "answer": answer}


def _distinct(records: Iterator[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> Iterator[dict[str, Any]]:
    """Skip records whose key was seen before; fail clearly when the options run out of new ones."""
    seen: set[str] = set()
    duplicates = 0
    for record in records:
        k = key(record)
        if k in seen:
            duplicates += 1
            if duplicates >= MAX_DUPLICATES_IN_A_ROW:
                raise TunelabError(
                    f"only {len(seen)} distinct records can be generated with these options\n"
                    "  fix: ask for fewer records (-n) or use a higher difficulty"
                )
            continue
        duplicates = 0
        seen.add(k)
        yield record


def iter_reasoning_problems(seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY) -> Iterator[dict[str, str]]:
    """An endless stream of distinct {"question", "answer"} problems (no question repeats)."""
    level = check_difficulty(difficulty)
    rng = random.Random(seed)
    stream = (_reasoning_problem(rng, level, difficulty) for _ in itertools.count())
    return _distinct(stream, key=lambda record: record["question"])


def reasoning_problems(n: int, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY) -> list[dict[str, str]]:
    """`n` distinct arithmetic word problems with worked answers ending in `#### <integer>`.

    Every worked line holds one exact `a op b = c` (+, -, *, / with integer results, never
    negative); the final line's number is the last result. Same seed -> same problems, and
    the list for `n` is a prefix of the list for any larger `n`.
    """
    _check_count(n, "n")
    return list(itertools.islice(iter_reasoning_problems(seed, difficulty), n))


def reasoning_train_test(
    n_train: int, n_test: int, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A training set and a held-out test set from one seed, with no question in both."""
    _check_count(n_train, "n_train")
    _check_count(n_test, "n_test")
    problems = reasoning_problems(n_train + n_test, seed, difficulty)
    return problems[:n_train], problems[n_train:]


# ---------------------------------------------------------------------------------------
# Preference pairs: the correct worked answer against one with a single arithmetic slip
# ---------------------------------------------------------------------------------------

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _slipped_answer(answer: str, rng: random.Random) -> str | None:
    """The worked answer with one result off by a little (1, 2 or 10), carried into the later lines.

    A later line whose left operand is the value that was wrong computes on with the wrong
    value (exact integer arithmetic still); the `####` line gives the final, wrong result.
    None when the slip cannot be carried consistently (a division would leave a remainder).
    """
    lines = answer.split("\n")
    equations = [i for i, line in enumerate(lines) if EQUATION.search(line)]
    at = rng.choice(equations)
    a, op, b, right = EQUATION.search(lines[at]).groups()
    right = int(right)
    wrong = right + rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0])
    lines[at] = EQUATION.sub(f"{a} {op} {b} = {wrong}", lines[at], count=1)
    carried = {right: wrong}  # a correct value -> the wrong value the slipped answer has instead
    final = wrong
    for i in equations[equations.index(at) + 1 :]:
        a, op, b, result = (int(x) if x.isdigit() else x for x in EQUATION.search(lines[i]).groups())
        if a not in carried:
            continue
        new_a = carried[a]
        if op == "/" and new_a % b:
            return None
        if op == "-" and new_a < b:
            return None
        final = _apply(new_a, op, b)
        carried = {result: final}
        lines[i] = EQUATION.sub(f"{new_a} {op} {b} = {final}", lines[i], count=1)
    correct = int(lines[-1].removeprefix("#### "))
    if correct in carried:
        final = carried[correct]
    elif final != wrong or at != equations[-1]:
        return None  # the slip did not reach the final answer
    if final == correct:
        return None
    lines[-1] = f"#### {final}"
    return "\n".join(lines)


def _preference_pair(problem: dict[str, str], rng: random.Random) -> dict[str, str]:
    """{"prompt", "chosen", "rejected"}: chosen is the correct worked answer, rejected one slip away."""
    for _ in range(10):
        rejected = _slipped_answer(problem["answer"], rng)
        if rejected is not None:
            break
    else:  # slip only the last equation: it always reaches the final line
        lines = problem["answer"].split("\n")
        last = max(i for i, line in enumerate(lines) if EQUATION.search(line))
        a, op, b, right = EQUATION.search(lines[last]).groups()
        lines[last] = EQUATION.sub(f"{a} {op} {b} = {int(right) + 1}", lines[last], count=1)
        lines[-1] = f"#### {int(right) + 1}"
        rejected = "\n".join(lines)
    return {"prompt": problem["question"], "chosen": problem["answer"], "rejected": rejected}


def iter_preference_pairs(seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY) -> Iterator[dict[str, str]]:
    """An endless stream of distinct preference pairs over the reasoning problems of `seed`.

    The prompts are exactly `iter_reasoning_problems(seed, difficulty)`'s questions, in
    order, so pairs from seed S never share a question with a held-out split of seed S.
    """
    rng = random.Random(f"slips-{seed}")
    return (_preference_pair(problem, rng) for problem in iter_reasoning_problems(seed, difficulty))


# ---------------------------------------------------------------------------------------
# Plain text and chat records (small, varied data for tests and examples)
# ---------------------------------------------------------------------------------------

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["library", "market", "park", "museum", "harbour", "bakery", "garden", "station"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "foggy", "cloudy"]
ACTIVITIES = ["read a book", "painted a picture", "played chess", "went for a run", "baked bread", "fed the ducks"]
WORDS = ["garden", "window", "river", "pencil", "rocket", "candle", "planet", "forest", "silver", "basket", "turtle", "mirror"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer briefly and exactly.", "You are a careful tutor."]


def _text_record(rng: random.Random) -> dict[str, str]:
    """A short paragraph (2-4 sentences) about someone's day, assembled from templates."""
    name, she, _, her = rng.choice(PEOPLE)
    count = rng.randint(2, 12)
    items, _ = rng.choice(ITEMS)
    sentences = [
        f"On {rng.choice(DAYS)}, {name} walked to the {rng.choice(PLACES)}.",
        f"The weather was {rng.choice(WEATHER)}.",
        f"{_cap(she)} brought {count} {items} for {her} friends.",
        f"Later {she} {rng.choice(ACTIVITIES)} and went home at {rng.randint(4, 9)} o'clock.",
    ]
    keep = rng.randint(2, len(sentences))
    return {"text": " ".join(sentences[:keep])}


def _chat_turns(rng: random.Random) -> list[tuple[str, str]]:
    """A task with exact answers and its follow-ups, as (user, assistant) pairs in order."""
    task = rng.choice(["arithmetic", "word", "sort"])
    if task == "arithmetic":
        a, b, k = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
        total = a + b
        return [
            (f"What is {a} + {b}?", f"{a} + {b} = {total}."),
            (f"Now multiply that by {k}.", f"{total} * {k} = {total * k}."),
            ("And subtract 1?", f"{total * k} - 1 = {total * k - 1}."),
        ]
    if task == "word":
        word = rng.choice(WORDS)
        return [
            (f"Write the word '{word}' backwards.", word[::-1]),
            ("Now in capital letters.", word[::-1].upper()),
            (f"How many letters does '{word}' have?", f"'{word}' has {len(word)} letters."),
        ]
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    return [
        (f"Sort these numbers from smallest to largest: {listed}.", ", ".join(map(str, sorted(numbers)))),
        ("Now from largest to smallest.", ", ".join(map(str, sorted(numbers, reverse=True)))),
        ("What is the largest one?", str(max(numbers))),
    ]


def _chat_record(rng: random.Random, max_turns: int) -> dict[str, list[dict[str, str]]]:
    """A conversation of 1..max_turns user/assistant turns, sometimes with a system message."""
    messages: list[dict[str, str]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = _chat_turns(rng)[: rng.randint(1, max_turns)]
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    return {"messages": messages}


def iter_text_records(seed: int = 0) -> Iterator[dict[str, str]]:
    """An endless stream of distinct {"text": ...} records."""
    rng = random.Random(seed)
    return _distinct((_text_record(rng) for _ in itertools.count()), key=lambda record: record["text"])


def iter_chat_records(seed: int = 0, max_turns: int = 3) -> Iterator[dict[str, list[dict[str, str]]]]:
    """An endless stream of distinct {"messages": [...]} conversations (1..max_turns turns)."""
    if not 1 <= max_turns <= 3:
        raise TunelabError(f"max_turns must be 1..3, got {max_turns}")
    rng = random.Random(seed)
    stream = (_chat_record(rng, max_turns) for _ in itertools.count())
    return _distinct(stream, key=lambda record: json.dumps(record, sort_keys=True))


def text_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` distinct short plain-text records {"text": ...}."""
    _check_count(n, "n")
    return list(itertools.islice(iter_text_records(seed), n))


def chat_records(n: int, seed: int = 0, max_turns: int = 3) -> list[dict[str, list[dict[str, str]]]]:
    """`n` distinct conversations {"messages": [{"role", "content"}, ...]}, single- and multi-turn.

    Assistant replies are exact (sums, reversed words, sorted lists), so they are
    checkable; about 30% start with a system message.
    """
    _check_count(n, "n")
    return list(itertools.islice(iter_chat_records(seed, max_turns), n))


# ---------------------------------------------------------------------------------------
# Labelled texts for classification: support tickets routed to a team
# ---------------------------------------------------------------------------------------

# Each team has its own vocabulary; a ticket's label is the team whose words it uses. The
# classes are deliberately unbalanced (billing is the majority class, 35%).
TICKET_LABELS = ("billing", "shipping", "technical", "account")
TICKET_WEIGHTS = (0.35, 0.25, 0.25, 0.15)
TICKET_TOPICS = {
    "billing": ["invoice", "refund", "charge on my card", "payment", "bill", "receipt", "subscription fee",
                "double charge", "discount code", "price", "VAT number", "direct debit"],
    "shipping": ["package", "delivery", "courier", "tracking number", "parcel", "shipment", "address label",
                 "customs form", "delivery date", "warehouse", "damaged box", "carrier"],
    "technical": ["app", "login page", "error message", "crash", "bug", "latest update", "browser plugin",
                  "server", "blank screen", "sync", "website", "loading spinner"],
    "account": ["username", "profile", "email address", "account settings", "two-factor code", "membership",
                "display name", "newsletter", "phone number", "privacy settings", "sign-up", "account deletion"],
}
TICKET_OPENERS = ["", "Hi, ", "Hello team, ", "Good morning, ", "Hey, ", "Dear support, ", "Quick question: "]
TICKET_PROBLEMS = [
    "I have a problem with the {t}.", "something is wrong with my {t}.", "can you check the {t}?",
    "there is an issue with the {t}.", "I need help with the {t}.", "the {t} looks wrong to me.",
    "what happened to my {t}?", "I am confused about the {t}.",
]
TICKET_DETAILS = [
    "It also concerns the {t}.", "The {t} is affected too.", "Same story with the {t}.", "And the {t} as well.",
    "This started with the {t}.", "Please look at the {t} too.",
]
TICKET_FILLERS = ["since yesterday", "for order 4512", "again", "after last week", "twice now", "for the second time",
                  "on my phone", "this morning"]
# Difficulty 2 adds a word of another team in a sentence that rules it out, so single
# words do not decide the label; the rule (the team named without "not") still does.
TICKET_DISTRACTORS = ["The {t} is fine, though.", "This is not about the {t}.", "No problem with the {t}.",
                      "The {t} has nothing to do with it."]
CLASSIFICATION_DIFFICULTIES = (1, 2)


def _ticket_record(rng: random.Random, difficulty: int) -> dict[str, str]:
    """One ticket: an opener, a problem with a word of its team, a detail with another of its words
    (60%), a filler (50%), and at difficulty 2 a ruled-out word of another team (35%)."""
    label = rng.choices(TICKET_LABELS, weights=TICKET_WEIGHTS)[0]
    words = rng.sample(TICKET_TOPICS[label], 2)
    problem = rng.choice(TICKET_PROBLEMS).format(t=words[0])
    if rng.random() < 0.5:
        problem = problem[:-1] + f" {rng.choice(TICKET_FILLERS)}" + problem[-1]
    opener = rng.choice(TICKET_OPENERS)
    sentences = [opener + (problem if opener else problem[0].upper() + problem[1:])]
    if rng.random() < 0.6:
        sentences.append(rng.choice(TICKET_DETAILS).format(t=words[1]))
    if difficulty >= 2 and rng.random() < 0.35:
        other = rng.choice([name for name in TICKET_LABELS if name != label])
        sentences.insert(rng.randint(1, len(sentences)), rng.choice(TICKET_DISTRACTORS).format(t=rng.choice(TICKET_TOPICS[other])))
    return {"text": " ".join(sentences), "label": label}


def iter_classification_records(seed: int = 0, difficulty: int = 2) -> Iterator[dict[str, str]]:
    """An endless stream of distinct {"text", "label"} support tickets (4 unbalanced classes)."""
    if difficulty not in CLASSIFICATION_DIFFICULTIES:
        raise TunelabError(f"--difficulty for --kind classification is 1 (keywords only) or 2 (with ruled-out words), got {difficulty}")
    rng = random.Random(seed)
    return _distinct((_ticket_record(rng, difficulty) for _ in itertools.count()), key=lambda record: record["text"])


def classification_records(n: int, seed: int = 0, difficulty: int = 2) -> list[dict[str, str]]:
    """`n` distinct labelled tickets {"text": ..., "label": billing | shipping | technical | account}."""
    _check_count(n, "n")
    return list(itertools.islice(iter_classification_records(seed, difficulty), n))


# ---------------------------------------------------------------------------------------
# Writing files
# ---------------------------------------------------------------------------------------


def _check_count(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise TunelabError(f"{what} must be a positive number of records, got {n!r}")


def check_kind(kind: str) -> str:
    """`kind` itself if known; otherwise an error naming the kinds (and the closest one)."""
    if kind in KINDS:
        return kind
    close = difflib.get_close_matches(kind, KINDS, n=1)
    suggestion = f"did you mean '{close[0]}'? " if close else ""
    raise TunelabError(f"unknown kind of synthetic data '{kind}'\n  fix: {suggestion}use one of: {', '.join(KINDS)}")


def iter_records(kind: str, seed: int = 0, difficulty: int = DEFAULT_DIFFICULTY) -> Iterator[dict[str, Any]]:
    """The endless distinct stream for a kind: "reasoning", "text", "chat", "classification" or "preference"."""
    check_kind(kind)
    if kind == "reasoning":
        return iter_reasoning_problems(seed, difficulty)
    if kind == "text":
        return iter_text_records(seed)
    if kind == "classification":
        return iter_classification_records(seed, difficulty)
    if kind == "preference":
        return iter_preference_pairs(seed, difficulty)
    return iter_chat_records(seed)


def _check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing file (unless asked) or to write onto a directory."""
    if path.is_dir():
        raise TunelabError(f"{path} is a directory\n  fix: give a file name such as {path / 'train.jsonl'}")
    if path.exists() and not overwrite:
        raise TunelabError(f"{path} already exists\n  fix: pass --force to overwrite it, or choose another file name")


def write_jsonl(
    records: Iterable[Mapping[str, Any]], path: str | Path, *, overwrite: bool = False, total: int | None = None
) -> int:
    """Write records as JSON lines, atomically: a temporary sibling file renamed over `path`.

    An interrupted write leaves no partial file and leaves an existing file untouched.
    With `total` at or above PROGRESS_THRESHOLD a progress bar is shown (records may be a
    lazy generator, so the bar covers generating as well as writing). Returns the count.
    """
    from tunelab.console import progress

    path = Path(path)
    _check_output_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique sibling opened with "x" (not mkstemp, whose files are private to the owner):
    # the finished file gets the usual permissions and the rename stays on one file system.
    tmp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    count = 0
    try:
        with open(tmp_name, "x", encoding="utf-8", newline="\n") as handle:
            if total is not None and total >= PROGRESS_THRESHOLD:
                with progress() as bar:
                    task = bar.add_task(f"Writing {path.name}", total=total)
                    for record in records:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                        count += 1
                        bar.advance(task)
            else:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
        os.replace(tmp_name, path)
    except BaseException:
        tmp_name.unlink(missing_ok=True)
        raise
    return count


def synthesize_files(
    output: str | Path,
    kind: str = "reasoning",
    n: int = 500,
    seed: int = 0,
    difficulty: int | None = None,
    test_output: str | Path | None = None,
    n_test: int = 100,
    overwrite: bool = False,
) -> list[tuple[Path, int]]:
    """Generate `n` records of `kind` into `output` (and `n_test` held-out ones into `test_output`).

    Both files come from one seeded stream of distinct records, so the test file never
    repeats a training record. Every option is checked before anything is written.
    `difficulty` applies to "reasoning" only (None means DEFAULT_DIFFICULTY).
    Returns [(path, record count), ...] in the order written.
    """
    check_kind(kind)
    _check_count(n, "-n")
    if difficulty is not None and kind not in ("reasoning", "classification", "preference"):
        raise TunelabError(f"--difficulty applies only to --kind reasoning, preference and classification (got --kind {kind})\n  fix: drop --difficulty")
    level = DEFAULT_DIFFICULTY if difficulty is None else difficulty
    if kind in ("reasoning", "preference"):
        check_difficulty(level)
    if kind == "classification" and level not in CLASSIFICATION_DIFFICULTIES:
        raise TunelabError(f"--difficulty for --kind classification is 1 (keywords only) or 2 (default: with ruled-out words), got {level}")
    output = Path(output)
    _check_output_path(output, overwrite)
    if test_output is not None:
        test_output = Path(test_output)
        _check_count(n_test, "--test-n")
        if test_output.resolve() == output.resolve():
            raise TunelabError(f"the test file is the training file: {output}\n  fix: give --test-output a different path")
        _check_output_path(test_output, overwrite)

    stream = iter_records(kind, seed, level)
    written = [(output, write_jsonl(itertools.islice(stream, n), output, overwrite=overwrite, total=n))]
    if test_output is not None:
        written.append((test_output, write_jsonl(itertools.islice(stream, n_test), test_output, overwrite=overwrite, total=n_test)))
    return written
