"""Preference data: record shapes, chat rendering, truncation, bad rows, synthetic pairs, CLI."""

from __future__ import annotations

import copy
import json
import re

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.formats import normalise
from tunelab.data.preference import (
    collate_pairs,
    load_preferences,
    normalise_preferences,
    tokenize_preference,
)
from tunelab.data.sources import read_source
from tunelab.errors import DataError

runner = CliRunner()
IM_END = 2  # SmolLM2's end-of-turn token (also its EOS and pad)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def pairs_of(path, **options):
    return normalise_preferences(read_source(path), **options)


# --- record shapes -----------------------------------------------------------------------------


def test_every_record_shape_becomes_the_same_pair(tmp_path):
    """Strings, UltraFeedback's whole conversations, HH-RLHF conversations and HH-RLHF text agree."""
    user, good, bad = "What is 2 + 3?", "2 + 3 = 5\n#### 5", "2 + 3 = 6\n#### 6"
    conversation = lambda reply: [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]  # noqa: E731
    rows = [
        {"prompt": user, "chosen": good, "rejected": bad},
        {"prompt": user, "chosen": conversation(good), "rejected": conversation(bad), "messages": conversation(good), "score_chosen": 8.0},
        {"prompt": [{"role": "user", "content": user}], "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]},
        {"chosen": conversation(good), "rejected": conversation(bad)},
        {"chosen": f"\n\nHuman: {user}\n\nAssistant: {good}", "rejected": f"\n\nHuman: {user}\n\nAssistant: {bad}"},
    ]
    pairs = []
    for i, row in enumerate(rows):
        pairs += pairs_of(jsonl(tmp_path / f"shape{i}.jsonl", [row]))
    assert {(json.dumps(p.prompt), p.chosen, p.rejected) for p in pairs} == {(json.dumps([{"role": "user", "content": user}]), good, bad)}
    assert all(p.format == "preference" for p in pairs)


def test_multi_turn_hh_conversations_keep_the_shared_history_as_prompt(tmp_path):
    history = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Add 2 and 2."
    path = jsonl(tmp_path / "hh.jsonl", [{"chosen": history + "\n\nAssistant: 4", "rejected": history + "\n\nAssistant: 5"}])
    (pair,) = pairs_of(path)
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("4", "5")


def test_csv_parquet_and_saved_datasets_read_like_jsonl(tmp_path):
    import datasets

    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(3)]
    jsonl_pairs = pairs_of(jsonl(tmp_path / "p.jsonl", rows))
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_csv(tmp_path / "p.csv", index=False)
    dataset.to_parquet(tmp_path / "p.parquet")
    dataset.save_to_disk(tmp_path / "saved")
    for source in ("p.csv", "p.parquet", "saved"):
        got = pairs_of(tmp_path / source)
        assert [(p.prompt, p.chosen, p.rejected) for p in got] == [(p.prompt, p.chosen, p.rejected) for p in jsonl_pairs], source


def test_kto_records_and_pairs_split_for_kto(tmp_path):
    path = jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q1", "completion": "good", "label": True}, {"prompt": "Q2", "completion": "bad", "label": False}])
    assert [(e.chosen, e.desirable, e.format) for e in pairs_of(path, kto=True)] == [("good", True, "kto"), ("bad", False, "kto")]
    with pytest.raises(DataError, match=r"kto.jsonl:1: .*not a pair; set preference.loss: kto"):
        pairs_of(path)
    pairs = jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    assert [(e.chosen, e.desirable) for e in pairs_of(pairs, kto=True)] == [("yes", True), ("no", False)]


def test_sft_on_preference_data_says_which_task_trains_it(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=r"(?s)p.jsonl: this is preference data .* fix: set task: preference"):
        normalise(read_source(path))


# --- bad rows ----------------------------------------------------------------------------------


BAD_ROWS = [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same reply"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "no"}, "chosen is empty"),
    ({"prompt": "Q", "chosen": "yes"}, 'field "rejected" is missing'),
    (
        {
            "chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "no"}],
        },
        "chosen and rejected do not share their prompt: they differ at message 0",
    ),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_rows_are_named_by_file_and_line(tmp_path, row, message):
    path = jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(DataError) as error:
        pairs_of(path)
    assert str(error.value).startswith(f"{path}:2: ")
    assert message in str(error.value)


def test_skip_invalid_skips_and_counts_every_bad_row(tmp_path, tokenizer):
    path = jsonl(tmp_path / "mixed.jsonl", [{"prompt": "Q", "chosen": "yes", "rejected": "no"}] + [row for row, _ in BAD_ROWS])
    items, stats = load_preferences(str(path), tokenizer, skip_invalid=True)
    assert (len(items), stats.invalid_skipped, stats.examples) == (1, 4, 1)
    assert [p.split(": ", 1)[0] for p in stats.problems] == [f"{path}:{line}" for line in (2, 3, 4, 5)]


# --- rendering ---------------------------------------------------------------------------------


def test_rendering_masks_the_prompt_and_ends_each_reply_with_one_end_of_turn(tmp_path, tokenizer):
    (pair,) = pairs_of(jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?", "chosen": "It is 5.", "rejected": "It is 6, I think."}]))
    item = tokenize_preference(pair, tokenizer, max_length=512)
    for reply, text in ((item.chosen, pair.chosen), (item.rejected, pair.rejected)):
        expected = tokenizer.apply_chat_template(pair.prompt + [{"role": "assistant", "content": text}], tokenize=True, return_dict=True)["input_ids"]
        assert item.prompt + reply == list(expected)[: len(item.prompt) + len(reply)]  # exactly the template's ids
        assert reply[-1] == IM_END and IM_END not in reply[:-1]
        assert tokenizer.decode(reply) == f"{text}<|im_end|>"
    assert tokenizer.decode(item.prompt).endswith("<|im_start|>assistant\n")
    batch = collate_pairs([item], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 2  # [chosen; rejected]
    for row, reply in zip(batch["labels"].tolist(), (item.chosen, item.rejected)):
        assert [t for t in row if t != -100] == reply


def test_exactly_one_bos_when_the_template_writes_one(tmp_path, tokenizer):
    """A Llama-3-style template starting with {{ bos_token }}: no second BOS before the reply (axolotl #1616)."""
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<|endoftext|>"  # id 0, used nowhere else in the template
    tok.chat_template = "{{ bos_token }}" + tok.chat_template
    (pair,) = pairs_of(jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}]))
    item = tokenize_preference(pair, tok, max_length=512)
    for reply in (item.chosen, item.rejected):
        assert (item.prompt + reply).count(0) == 1 and item.prompt[0] == 0


def test_truncation_cuts_the_prompt_from_the_left_first(tmp_path, tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    (pair,) = pairs_of(jsonl(tmp_path / "p.jsonl", [{"prompt": long_prompt + " Now answer.", "chosen": "Yes, fine.", "rejected": "No."}]))
    full = tokenize_preference(pair, tokenizer, max_length=4096)
    cut = tokenize_preference(pair, tokenizer, max_length=64)
    assert cut.truncated and len(cut) <= 64
    assert (cut.chosen, cut.rejected) == (full.chosen, full.rejected)  # replies whole, end-of-turn kept
    assert cut.prompt[0] == full.prompt[0] and cut.prompt[1:] == full.prompt[-(len(cut.prompt) - 1) :]  # the prompt's end survives
    assert tokenize_preference(pair, tokenizer, max_length=64, truncation="drop") is None
    # A reply longer than the budget: the prompt keeps half of max_length, the replies are cut from the right.
    (long_reply,) = pairs_of(jsonl(tmp_path / "r.jsonl", [{"prompt": long_prompt, "chosen": long_prompt, "rejected": "No."}]))
    cut = tokenize_preference(long_reply, tokenizer, max_length=64)
    assert len(cut.prompt) == 32 and len(cut) == 64 and cut.rejected[-1] == IM_END


# --- synthetic pairs and the CLI ---------------------------------------------------------------

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_synth_preference_pairs_a_correct_answer_with_one_slip_and_a_held_out_split(tmp_path):
    train, test = tmp_path / "pairs.jsonl", tmp_path / "held_out.jsonl"
    result = runner.invoke(app, ["data", "synth", str(train), "--kind", "preference", "-n", "60", "--test-output", str(test), "--test-n", "20"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    held_out = [json.loads(line) for line in test.read_text().splitlines()]
    assert (len(rows), len(held_out)) == (60, 20)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in held_out}
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a // b}
    for row in rows + held_out:
        chosen, rejected = row["chosen"].splitlines(), row["rejected"].splitlines()
        wrong = [i for i, line in enumerate(rejected) if (m := EQUATION.search(line)) and ops[m[2]](int(m[1]), int(m[3])) != int(m[4])]
        assert all(ops[m[2]](int(m[1]), int(m[3])) == int(m[4]) for m in map(EQUATION.search, chosen) if m)  # chosen: every line right
        assert len(wrong) == 1  # rejected: exactly one wrong computation, the rest carry it on consistently
        assert chosen[-1] != rejected[-1] and rejected[-1].startswith("#### ")  # ... into a wrong final answer
        assert len(chosen) == len(rejected)


def test_cli_validate_and_inspect_show_pairs(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5."}, {"prompt": "Q", "chosen": "x", "rejected": "x"}])
    result = runner.invoke(app, ["data", "validate", str(path), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert "preference" in result.output and "1 examples usable; 1 invalid records skipped" in result.output
    assert f"{path}:2:" in result.output.replace("\n", "")
    result = runner.invoke(app, ["data", "inspect", str(path), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert "chosen:" in result.output and "rejected:" in result.output
    assert "⟦It is 4.<|im_end|>⟧" in result.output and "⟦It is 5.<|im_end|>⟧" in result.output
    assert "⟦What" not in result.output
    # Without --skip-invalid: the DataError that `tunelab.cli.main` prints as one line (exit 2, no traceback).
    bad = runner.invoke(app, ["data", "validate", str(path)])
    assert bad.exit_code != 0 and isinstance(bad.exception, DataError)
    assert str(bad.exception).startswith(f"{path}:2: chosen and rejected are the same reply")
