"""Synthetic data: determinism, exact arithmetic in every worked answer, difficulty, splits, CLI."""

from __future__ import annotations

import json
import re
import statistics
import sys

import pytest

from tunelab.data.synthetic import (
    DEFAULT_DIFFICULTY,
    DIFFICULTIES,
    chat_records,
    reasoning_problems,
    reasoning_train_test,
    synthesize_files,
    text_records,
    write_jsonl,
)
from tunelab.errors import TunelabError

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
FINAL = re.compile(r"^#### (\d+)$")


def worked_steps(answer: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """The `a op b = c` equations of a worked answer (one per line) and its final number.

    Fails the test on a line without exactly one equation or a last line that is not `#### N`.
    """
    *lines, last = answer.split("\n")
    equations = []
    for line in lines:
        found = EQUATION.findall(line)
        assert len(found) == 1, f"expected one equation in {line!r}"
        a, op, b, c = found[0]
        equations.append((int(a), op, int(b), int(c)))
    final = FINAL.match(last)
    assert final, f"last line is not '#### N': {last!r}"
    return equations, int(final.group(1))


def evaluate(a: int, op: str, b: int) -> float:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `tunelab ARGS` through the console-script entry point; (exit code, stdout, stderr)."""
    from tunelab import cli

    monkeypatch.setattr(sys, "argv", ["tunelab", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


# --- reasoning problems ------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path):
    first = write_jsonl(reasoning_problems(200, seed=7), tmp_path / "a.jsonl")
    write_jsonl(reasoning_problems(200, seed=7), tmp_path / "b.jsonl")
    write_jsonl(reasoning_problems(200, seed=8), tmp_path / "c.jsonl")
    assert first == 200
    a, b, c = ((tmp_path / f"{name}.jsonl").read_bytes() for name in "abc")
    assert a == b
    assert a != c
    assert len(a.splitlines()) == 200


@pytest.mark.parametrize("difficulty", sorted(DIFFICULTIES))
def test_every_equation_is_exact_and_the_final_number_is_the_last_result(difficulty):
    level = DIFFICULTIES[difficulty]
    for problem in reasoning_problems(400, seed=difficulty, difficulty=difficulty):
        assert set(problem) == {"question", "answer"}
        equations, final = worked_steps(problem["answer"])
        for a, op, b, c in equations:
            assert evaluate(a, op, b) == c, f"{a} {op} {b} = {c} is wrong in {problem['answer']!r}"
            assert 0 <= c <= level.max_total
        assert final == equations[-1][3]
        assert level.min_steps <= len(equations) <= level.max_steps
        assert problem["question"].endswith("?")


def test_difficulty_changes_the_number_of_steps_and_the_size_of_numbers():
    def stats(difficulty):
        problems = reasoning_problems(300, seed=1, difficulty=difficulty)
        steps = [len(worked_steps(p["answer"])[0]) for p in problems]
        biggest = max(int(n) for p in problems for n in re.findall(r"\d+", p["question"] + p["answer"]))
        return statistics.mean(steps), set(steps), biggest

    mean_1, steps_1, biggest_1 = stats(1)
    mean_3, steps_3, biggest_3 = stats(3)
    mean_5, steps_5, biggest_5 = stats(5)
    assert steps_1 == {1, 2} and steps_3 == {3, 4} and steps_5 == {5, 6, 7}
    assert mean_1 < mean_3 < mean_5
    assert biggest_1 <= DIFFICULTIES[1].max_total < biggest_3 <= DIFFICULTIES[3].max_total < biggest_5


def test_default_problems_are_short_with_small_numbers(tokenizer):
    """What the CPU demo needs: short questions and answers, small numbers, 2-3 steps."""
    problems = reasoning_problems(300, seed=0)
    assert DEFAULT_DIFFICULTY == 2
    for problem in problems:
        numbers = [int(n) for n in re.findall(r"\d+", problem["question"] + problem["answer"])]
        assert max(numbers) <= 50
        assert len(problem["question"].split()) < 60
        assert len(tokenizer(problem["answer"])["input_ids"]) <= 85
        assert len(worked_steps(problem["answer"])[0]) in (2, 3)
    # All four operations and several story families appear.
    operations = {op for p in problems for _, op, _, _ in worked_steps(p["answer"])[0]}
    assert operations == {"+", "-", "*", "/"}
    assert any("$" in p["question"] for p in problems)
    assert any("times as many" in p["question"] for p in problems)


def test_train_and_test_never_share_a_question():
    train, test = reasoning_train_test(400, 100, seed=3)
    assert len(train) == 400 and len(test) == 100
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    # The training set is the plain list for that seed, so files made either way agree.
    assert train == reasoning_problems(400, seed=3)
    assert len({p["question"] for p in reasoning_problems(2000, seed=3, difficulty=1)}) == 2000


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TunelabError, match="difficulty must be an integer in 1..5, got 6"):
        reasoning_problems(5, difficulty=6)
    with pytest.raises(TunelabError, match="n must be a positive number"):
        reasoning_problems(0)


# --- text and chat records -----------------------------------------------------------------


def test_text_records_are_distinct_deterministic_paragraphs():
    records = text_records(100, seed=2)
    assert records == text_records(100, seed=2)
    assert records != text_records(100, seed=3)
    assert all(set(r) == {"text"} and r["text"].endswith(".") for r in records)
    assert len({r["text"] for r in records}) == 100


def test_chat_records_alternate_roles_and_include_multi_turn_and_system():
    records = chat_records(200, seed=4)
    assert records == chat_records(200, seed=4)
    turn_counts = set()
    for record in records:
        messages = record["messages"]
        if messages[0]["role"] == "system":
            messages = messages[1:]
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        turn_counts.add(len(roles) // 2)
        for user, assistant in zip(messages[::2], messages[1::2]):
            sum_question = re.fullmatch(r"What is (\d+) \+ (\d+)\?", user["content"])
            if sum_question:
                a, b = map(int, sum_question.groups())
                assert assistant["content"] == f"{a} + {b} = {a + b}."
    assert turn_counts == {1, 2, 3}
    assert any(r["messages"][0]["role"] == "system" for r in records)


# --- writing files -------------------------------------------------------------------------


def test_write_jsonl_is_atomic_and_keeps_an_existing_file_on_failure(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("old\n")
    with pytest.raises(TunelabError, match="already exists"):
        write_jsonl([{"text": "new"}], path)

    def records_then_failure():
        yield {"text": "fine"}
        yield {"text": object()}  # not JSON-serialisable: the write fails half way

    with pytest.raises(TypeError):
        write_jsonl(records_then_failure(), path, overwrite=True)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]  # no temp file left

    assert write_jsonl([{"text": "new"}], path, overwrite=True) == 1
    assert path.read_text() == '{"text": "new"}\n'


def test_synthesize_files_checks_every_option_before_writing(tmp_path):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    test.write_text("keep\n")
    with pytest.raises(TunelabError, match="test.jsonl already exists"):
        synthesize_files(train, n=10, test_output=test)
    assert not train.exists()  # nothing written when the second file is refused
    with pytest.raises(TunelabError, match="--difficulty applies only to --kind reasoning"):
        synthesize_files(train, kind="chat", difficulty=3)
    with pytest.raises(TunelabError, match="did you mean 'text'"):
        synthesize_files(train, kind="txt")


# --- CLI -----------------------------------------------------------------------------------


def test_cli_writes_train_and_held_out_files(tmp_path, monkeypatch, capsys):
    train, test = tmp_path / "out" / "train.jsonl", tmp_path / "out" / "test.jsonl"
    code, out, err = run_cli(
        monkeypatch, capsys, "data", "synth", train, "-n", "120", "--seed", "5", "--test-output", test, "--test-n", "30"
    )
    assert code == 0, err
    assert f"wrote 120 reasoning records to {train}" in out
    assert f"wrote 30 reasoning records to {test}" in out
    train_records = [json.loads(line) for line in train.read_text().splitlines()]
    test_records = [json.loads(line) for line in test.read_text().splitlines()]
    assert train_records == reasoning_problems(120, seed=5)
    assert len(test_records) == 30
    assert not {r["question"] for r in train_records} & {r["question"] for r in test_records}

    code, out, err = run_cli(monkeypatch, capsys, "data", "synth", tmp_path / "chat.jsonl", "--kind", "chat", "-n", "15")
    assert code == 0, err
    assert [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()] == chat_records(15)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "0"], "-n must be a positive number of records, got 0"),
        (["-n", "many"], "Invalid value for '-n'"),
        (["--kind", "poems"], "unknown kind of synthetic data 'poems'"),
        (["--difficulty", "9"], "difficulty must be an integer in 1..5, got 9"),
        (["--kind", "text", "--difficulty", "2"], "--difficulty applies only to --kind reasoning"),
    ],
)
def test_cli_rejects_bad_options_with_one_message(tmp_path, monkeypatch, capsys, args, message):
    output = tmp_path / "data.jsonl"
    code, out, err = run_cli(monkeypatch, capsys, "data", "synth", output, *args)
    assert code == 2
    assert message in " ".join(err.split())  # Rich may wrap long lines
    assert "Traceback" not in err + out
    assert not output.exists()


def test_cli_refuses_to_overwrite_without_force(tmp_path, monkeypatch, capsys):
    output = tmp_path / "data.jsonl"
    output.write_text("precious\n")
    code, _, err = run_cli(monkeypatch, capsys, "data", "synth", output, "-n", "5")
    assert code == 2
    assert "already exists" in err and "--force" in err
    assert output.read_text() == "precious\n"

    code, _, err = run_cli(monkeypatch, capsys, "data", "synth", output, "-n", "5", "--force")
    assert code == 0, err
    assert len(output.read_text().splitlines()) == 5
