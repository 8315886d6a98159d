"""Format detection and normalisation into conversations / plain text, with located errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.formats import detect_format, normalise, remove_duplicates
from tunelab.data.sources import DataStats, read_source
from tunelab.errors import DataError, TunelabError


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def examples_of(path: Path, **kwargs):
    return normalise(read_source(path), **kwargs)


def user_assistant(user: str, assistant: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"text"}, "text"),
        ({"content"}, "text"),
        ({"instruction", "input", "output"}, "alpaca"),
        ({"instruction", "output"}, "alpaca"),
        ({"instruction", "context", "response", "category"}, "dolly"),
        ({"messages"}, "chat"),
        ({"conversations"}, "sharegpt"),
        ({"question", "answer"}, "qa"),
        ({"problem", "solution"}, "qa"),
        ({"foo", "bar"}, None),
    ],
)
def test_detect_format(fields, expected):
    assert detect_format(fields) == expected


def test_text_and_content_fields(tmp_path):
    examples = examples_of(jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"content": "other"}]))
    assert [(e.format, e.text, e.messages) for e in examples] == [("text", "hello world", None), ("text", "other", None)]


def test_alpaca_with_and_without_input(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    examples = examples_of(path)
    assert [e.format for e in examples] == ["alpaca", "alpaca"]
    assert examples[0].messages == user_assistant("Translate to French\n\ncat", "chat")
    assert examples[1].messages == user_assistant("Say hi", "hi")


def test_dolly(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Summarise", "context": "Long text.", "response": "Short.", "category": "summarization"},
            {"instruction": "Name a colour", "context": "", "response": "Blue", "category": "open_qa"},
        ],
    )
    examples = examples_of(path)
    assert examples[0].messages == user_assistant("Summarise\n\nLong text.", "Short.")
    assert examples[1].messages == user_assistant("Name a colour", "Blue")


def test_chat_messages_including_text_parts(tmp_path):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": "Hello"},
    ]
    (example,) = examples_of(jsonl(tmp_path / "d.jsonl", [{"messages": conversation}]))
    assert example.format == "chat"
    assert example.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_sharegpt_roles_are_mapped(tmp_path):
    turns = [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Q1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": "A2"},
    ]
    (example,) = examples_of(jsonl(tmp_path / "d.jsonl", [{"conversations": turns}]))
    assert example.format == "sharegpt"
    assert [(m["role"], m["content"]) for m in example.messages] == [
        ("system", "S"),
        ("user", "Q1"),
        ("assistant", "A1"),
        ("user", "Q2"),
        ("assistant", "A2"),
    ]


def test_question_answer_and_problem_solution(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    assert examples_of(path)[0].messages == user_assistant("1+1?", "2\n#### 2")
    path = jsonl(tmp_path / "m.jsonl", [{"problem": "2+2?", "solution": "4"}])
    assert examples_of(path)[0].messages == user_assistant("2+2?", "4")


def test_custom_field_mapping_with_system_field(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"q": "Why?", "a": "Because.", "sys": "You explain."}, {"q": "How?", "a": "Thus."}])
    examples = examples_of(path, fields={"prompt": "q", "response": "a", "system": "sys"})
    assert [e.format for e in examples] == ["custom", "custom"]
    assert examples[0].messages == [{"role": "system", "content": "You explain."}, *user_assistant("Why?", "Because.")]
    assert examples[1].messages == user_assistant("How?", "Thus.")


def test_system_prompt_is_added_only_where_there_is_none(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Own."}, *user_assistant("a", "b")]},
        {"messages": user_assistant("c", "d")},
    ]
    examples = examples_of(jsonl(tmp_path / "d.jsonl", rows), system_prompt="Default.")
    assert [e.messages[0]["content"] for e in examples] == ["Own.", "Default."]


def test_format_override_beats_detection(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a", "text": "raw"}])
    assert examples_of(path)[0].format == "qa"
    assert examples_of(path, fmt="text")[0].text == "raw"


def test_each_file_of_a_directory_is_detected_separately(tmp_path):
    jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    jsonl(tmp_path / "b.jsonl", [{"text": "plain"}])
    assert [e.format for e in examples_of(tmp_path)] == ["qa", "text"]


def test_missing_field_names_file_line_and_what_is_expected(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"instruction": "a", "output": "b"}] * 36 + [{"instruction": "c"}])
    with pytest.raises(DataError) as info:
        examples_of(path)
    assert str(info.value) == (
        f'{path}:37: field "output" is missing; alpaca records need "instruction", "output" and optionally "input"'
    )
    assert (info.value.path, info.value.line) == (str(path), 37)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "answer": 42}, 'field "answer" must be a string, got a number (42)'),
        ({"question": "q", "answer": "   "}, 'field "answer" is empty'),
        ({"messages": "hi"}, 'field "messages" must be a list of messages, got a string'),
        ({"messages": []}, 'field "messages" is an empty list'),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role is 'bot'; expected one of: system, user, assistant, tool"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is missing"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string (or a list of text parts), got a number (5)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant message, so there is nothing to train on"),
        (
            {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]},
            "the first assistant message comes before any user message",
        ),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from is 'bot'; expected one of: human, gpt, system"),
    ],
)
def test_wrong_types_and_shapes_are_located(tmp_path, row, message):
    path = jsonl(tmp_path / "data.jsonl", [row])
    with pytest.raises(DataError) as info:
        examples_of(path)
    assert str(info.value).startswith(f"{path}:1: {message}")


def test_undetectable_format_lists_fields_and_formats(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"foo": "x", "bar": "y"}])
    with pytest.raises(DataError) as info:
        examples_of(path)
    message = str(info.value)
    assert message.startswith(f"{path}:1: cannot tell the data format from the fields ['bar', 'foo']")
    assert '\n    alpaca    "instruction", "output" and optionally "input"\n' in message
    assert "--format" in message


def test_unknown_format_name_and_bad_field_mapping(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(TunelabError, match="unknown data format 'markdown'; expected auto or one of: text, alpaca"):
        examples_of(path, fmt="markdown")
    with pytest.raises(TunelabError, match=r"unknown keys \['answer'\]; missing \['response'\]"):
        examples_of(path, fields={"prompt": "q", "answer": "a"})
    with pytest.raises(TunelabError, match='format "custom" needs a field mapping'):
        examples_of(path, fmt="custom")


def test_custom_mapping_error_names_the_mapped_field(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"q": "x"}])
    with pytest.raises(DataError, match=r'data\.jsonl:1: field "a" is missing; custom records need "q", "a" \(the field mapping\)'):
        examples_of(path, fields={"prompt": "q", "response": "a"})


def test_skip_invalid_counts_bad_records_and_keeps_messages(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"question": "q", "answer": "a"}, {"question": "q2"}, {"question": 3, "answer": "x"}])
    stats = DataStats()
    examples = normalise(read_source(path), skip_invalid=True, stats=stats)
    assert len(examples) == 1
    assert stats.invalid_skipped == 2
    assert stats.problems == [
        f'{path}:2: field "answer" is missing; qa records need "question" and "answer" (or "problem" and "solution")',
        f'{path}:3: field "question" must be a string, got a number (3)',
    ]


def test_all_records_invalid_is_an_error_even_when_skipping(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"data\.jsonl: no valid examples: all 1 records were invalid"):
        normalise(read_source(path), skip_invalid=True)


def test_remove_duplicates_keeps_the_first_and_counts(tmp_path):
    rows = [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"}, {"question": "q", "answer": "b"}, {"question": "q", "answer": "a"}]
    examples = examples_of(jsonl(tmp_path / "d.jsonl", rows))
    stats = DataStats()
    kept = remove_duplicates(examples, stats=stats)
    assert [e.source.line for e in kept] == [1, 3]
    assert stats.duplicates_removed == 2


def test_a_file_mixing_formats_names_both_and_suggests_data_format(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Say yo", "input": "", "output": "yo"},
        {"messages": [{"role": "user", "content": "hey"}, {"role": "assistant", "content": "hello"}]},
    ])
    with pytest.raises(DataError) as info:
        examples_of(path)
    message = str(info.value)
    assert message.startswith(f"{path}: mixes data formats: alpaca from line 1, chat from line 3.")
    assert 'line 1 (alpaca): {"instruction": "Say hi", "output": "hi"}' in message
    assert 'line 3 (chat): {"messages": [{"role": "user", "content": "hey"}' in message
    assert "data.format" in message
    assert len(examples_of(path, fmt="alpaca", skip_invalid=True)) == 2  # the suggested fix reads the alpaca lines
