"""Pure metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest

from tunelab.errors import TunelabError
from tunelab.metrics import (
    accuracy,
    answers_match,
    bleu_score,
    compile_answer_regex,
    exact_match,
    extract_answer,
    parse_number,
    rouge_per_example,
    rouge_scores,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $18 every day.\n#### 18", 18.0),
        ("#### $1,200", 1200.0),
        ("#### 1,000", 1000.0),
        ("#### 1000.0", 1000.0),
        ("#### -7", -7.0),
        ("#### 0.25", 0.25),
        ("The total is 3 + 4 = 7 apples.", 7.0),  # no ####: the last number
        ("It was -3 degrees, then 5 - 8 = -3", -3.0),  # "- 8" is subtraction, the answer is -3
        ("Costs $1,000, which is a lot", 1000.0),  # a comma after a grouped number ends it
        ("The temperature fell to \u221212 degrees", -12.0),  # unicode minus sign
        ("It sold for $2,500.50 in total.", 2500.5),
        ("first 10 #### 12 apples, then 99", 12.0),  # the first number after the last ####
        ("No digits here", None),
        ("#### unknown", None),  # a #### with no number after it is a missing answer
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_with_regex_uses_group_and_last_match():
    text = "The answer is 3. Wait, recomputing: the answer is 1,250."
    assert extract_answer(text, r"answer is (\S+)") == 1250.0
    assert extract_answer(text, r"answer is [\d,.]+") == 1250.0  # no group: the whole match is parsed
    assert extract_answer("nothing matches", r"answer is (\d+)") is None
    assert extract_answer("answer is soon", r"answer is (\w+)") is None  # matched but not a number


def test_compile_answer_regex_reports_bad_pattern():
    with pytest.raises(TunelabError, match=r"--answer-regex '\(unclosed' is not a valid regular expression"):
        compile_answer_regex("(unclosed")
    assert compile_answer_regex(None) is None


def test_parse_number_first_number():
    assert parse_number("approximately $3,400.5 and 2") == 3400.5
    assert parse_number(".5 of it") == 0.5


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("so #### 1,000", "#### 1000", True),
        ("the answer is 1000.0", "#### 1,000", True),  # no #### in the prediction: its last number
        ("#### -5", "#### 5", False),
        ("I don't know", "#### 5", False),  # a missing answer is wrong
        ("#### 18.000", "#### 18", True),
        ("Paris.", "paris", True),  # no number in the reference: normalised text equality
        ("Lyon", "paris", False),
    ],
)
def test_answers_match(prediction, reference, expected):
    assert answers_match(prediction, reference) is expected


def test_exact_match_fraction_and_regex():
    predictions = ["#### 18", "#### 3", "no idea", "The answer is 70000."]
    references = ["#### 18", "#### 4", "#### 12", "... #### 70,000"]
    assert exact_match(predictions, references) == pytest.approx(2 / 4)
    # With a regex only its match counts: "12" in "answer: 12 or 13" instead of the last number 13.
    assert exact_match(["answer: 12 or 13"], ["#### 12"], r"answer: (\d+)") == 1.0
    assert exact_match(["answer: 12 or 13"], ["#### 12"]) == 0.0
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_accuracy_normalises_labels_and_reads_first_line():
    predictions = ["Positive.", "  negative\nBecause the review complains.", "neutral", ""]
    references = ["positive", "Negative", "positive", "negative"]
    assert accuracy(predictions, references) == pytest.approx(2 / 4)


def test_rouge_hand_computed():
    # unigrams: 5 of 6 shared (the x2, cat, on, mat) -> P = R = F = 5/6
    # bigrams: the-cat, on-the, the-mat shared, 3 of 5 -> 0.6
    # LCS "the cat on the mat" = 5 tokens -> 5/6
    scores = rouge_scores(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rouge2"] == pytest.approx(0.6)
    assert scores["rougeL"] == pytest.approx(5 / 6)


def test_rouge_averages_examples():
    # A perfect match (1.0) and a disjoint pair (0.0) average to 0.5.
    scores = rouge_scores(["a b c", "x y"], ["a b c", "p q"])
    assert scores == {"rouge1": pytest.approx(0.5), "rouge2": pytest.approx(0.5), "rougeL": pytest.approx(0.5)}
    assert rouge_per_example(["a b c"], ["a b"])[0]["rouge1"] == pytest.approx(0.8)  # P 2/3, R 1 -> F 0.8


def test_bleu_hand_computed():
    # Longer than the reference (no brevity penalty): precisions 6/7, 5/6, 4/5, 3/4.
    expected = 100 * (6 / 7 * 5 / 6 * 4 / 5 * 3 / 4) ** 0.25
    assert bleu_score(["the cat sat on the mat today"], ["the cat sat on the mat"]) == pytest.approx(expected, abs=0.01)
    # Every n-gram matches but the prediction is short: BLEU is the brevity penalty exp(1 - 6/5).
    assert bleu_score(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.2), abs=0.01)
    assert bleu_score(["same words here ok"], ["same words here ok"]) == pytest.approx(100.0)


def test_bleu_is_corpus_level():
    # Corpus BLEU pools n-gram counts: precisions (6+4)/(7+4), (5+3)/(6+3), (4+2)/(5+2), (3+1)/(4+1);
    # length 11 vs 10, so no brevity penalty.
    predictions = ["the cat sat on the mat today", "a dog ran fast"]
    references = ["the cat sat on the mat", "a dog ran fast"]
    expected = 100 * (10 / 11 * 8 / 9 * 6 / 7 * 4 / 5) ** 0.25
    assert bleu_score(predictions, references) == pytest.approx(expected, abs=0.01)
