"""The built-in rewards on hand-made completions, including the reward hacks RL runs find."""

from __future__ import annotations

import math
import sys

import pytest

from tunelab.errors import TunelabError
from tunelab.rewards import (RewardSpec, correct, final_answers, format_soft, format_strict, load_reward,
                             overlong_penalty, score)

REF = "She has 3 + 4 = 7 apples.\n7 * 2 = 14\n#### 14"


def one(fn, completion: str, reference: str = REF, **kw) -> float:
    return fn(["q"], [completion], [reference], **kw)[0]


@pytest.mark.parametrize("completion, expected", [
    ("3 + 4 = 7\n7 * 2 = 14\n#### 14", 1.0),
    ("The answer is 14.", 1.0),                          # no marker: the last number
    ("<answer>14</answer>", 1.0),
    ("so \\boxed{14}", 1.0),
    ("#### 14.0", 1.0),
    ("#### $14", 1.0),
    ("#### 13", 0.0),
    ("", 0.0),                                            # hack: empty answer
    ("<answer></answer>", 0.0),                           # hack: empty tag (Visual-RFT #176)
    ("#### 14\n#### 15", 0.0),                            # hack: two different answers
    ("<answer>14</answer> <answer>15</answer>", 0.0),
    ("<think>14 is it</think>", 0.0),                     # hack: the answer only inside the reasoning
    ("<think>I guess 14</think>\n#### 12", 0.0),
    ("<think>3 + 4 = 7, 7 * 2 = 14 so", 0.0),            # hack: truncated inside the reasoning
    ("3 + 4 = 7\n7 * 2 =", 0.0),                          # truncated: the last number is 2
])
def test_correct_rewards_one_unambiguous_final_answer(completion, expected):
    assert one(correct, completion) == expected


def test_correct_reads_thousands_separators_and_units_on_both_sides():
    assert one(correct, "#### 1,234 dollars", "#### 1234") == 1.0
    assert one(correct, "#### 1234", "total $1,234") == 1.0
    assert one(correct, "#### 1,235", "#### 1,234") == 0.0
    assert one(correct, "#### 5", "no number here") == 0.0   # a reference without a number scores nothing


def test_answer_source_is_configurable():
    text = "#### 3\n<answer>4</answer>"
    assert final_answers(text) == [4.0]                    # auto: the answer tag wins
    assert final_answers(text, "gsm8k") == [3.0]
    assert one(correct, text, "#### 3", source="gsm8k") == 1.0
    assert one(correct, text, "#### 3") == 0.0
    with pytest.raises(TunelabError, match="unknown answer source 'final'"):
        final_answers(text, "final")


@pytest.mark.parametrize("completion, strict, soft", [
    ("3 + 4 = 7\n#### 7", 1.0, 1.0),
    ("3 + 4 = 7\n#### 7\n", 1.0, 1.0),
    ("#### 7", 0.0, 1.0),                                 # no reasoning line
    ("3 + 4 = 7\n#### 7\nbye", 0.0, 1.0),                 # text after the answer
    ("3 + 4 = 7\n#### 7\n#### 8", 0.0, 0.0),              # two answers
    ("3 + 4 = 7\n####", 0.0, 0.0),                        # marker without a number
    ("3 + 4 = 7", 0.0, 0.0),
])
def test_format_rewards_gsm8k_style(completion, strict, soft):
    assert one(format_strict, completion) == strict
    assert one(format_soft, completion) == soft


def test_format_rewards_xml_style():
    good = "<think>\n3 + 4 = 7\n</think>\n<answer>\n7\n</answer>"
    assert one(format_strict, good, style="xml") == 1.0
    assert one(format_soft, good, style="xml") == 1.0
    assert one(format_strict, "<think>3 + 4 = 7</think><answer>7</answer>", style="xml") == 0.0
    assert one(format_soft, "<think>3 + 4 = 7</think><answer>7</answer>", style="xml") == 1.0
    with pytest.raises(TunelabError, match="unknown format style 'json'"):
        format_strict(["q"], ["x"], ["r"], style="json")


def test_overlong_penalty_is_dapos_linear_ramp():
    lengths = [10, 96, 97, 112, 128, 140]
    got = overlong_penalty(["q"] * 6, ["c"] * 6, ["r"] * 6, completion_lengths=lengths, max_completion_length=128)
    assert got == pytest.approx([0.0, 0.0, -1 / 32, -0.5, -1.0, -1.0])
    hard = overlong_penalty(["q"] * 2, ["c"] * 2, ["r"] * 2, completion_lengths=[127, 128],
                            max_completion_length=128, buffer=0)
    assert hard == [0.0, -1.0]


def test_user_reward_is_imported_and_combined_with_weights(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, references, **info):\n"
        "    return [-len(c) / 100 for c in completions]\n"
        "def wrong_length(prompts, completions, references, **info):\n"
        "    return [1.0]\n"
        "def nan(prompts, completions, references, **info):\n"
        "    return [float('nan')] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    completions = ["#### 14", "3 + 4 = 7\n7 * 2 = 14\n#### 14", "#### 2"]
    scores = score([RewardSpec("correct", 2.0), RewardSpec("my_rewards:brevity", 0.5)],
                   ["q"] * 3, completions, [REF] * 3)
    assert scores.per_function["correct"] == [1.0, 1.0, 0.0]
    assert scores.per_function["my_rewards:brevity"] == pytest.approx([-0.07, -0.28, -0.06])
    assert scores.total == pytest.approx([2 - 0.035, 2 - 0.14, -0.03])
    with pytest.raises(TunelabError, match="returned 1 values for 3 completions"):
        score([RewardSpec("my_rewards:wrong_length")], ["q"] * 3, completions, [REF] * 3)
    with pytest.raises(TunelabError, match="non-finite value"):
        score([RewardSpec("my_rewards:nan")], ["q"] * 3, completions, [REF] * 3)
    sys.modules.pop("my_rewards", None)


@pytest.mark.parametrize("name, message", [
    ("corect", "neither a built-in"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("math:no_such_function", "module 'math' has no function 'no_such_function'"),
])
def test_bad_reward_names_say_what_is_wrong(name, message):
    with pytest.raises(TunelabError, match=message):
        load_reward(name)
    assert math.isfinite(load_reward("correct")(["q"], ["#### 1"], ["#### 1"])[0])
