"""Pure scoring functions for generated text: final-answer exact match, ROUGE, BLEU, accuracy.

Every function takes plain lists of strings (predictions and references, same order) so
it can be tested on hand-made values and reused outside `tunelab eval`.

Scales: `exact_match`, `accuracy` and the ROUGE F-measures are fractions in [0, 1];
`bleu_score` is on sacrebleu's usual 0-100 scale.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence

from tunelab.errors import TunelabError

# A number as people write it: optional sign, optional currency, thousands separators,
# decimals ("-1,234.50", "$1,200", "0.5", ".5"). The sign only counts when it is not the
# minus of an expression ("5-3" is 5 and 3, not 5 and -3).
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?\$?\s?"
    r"(?:\d{1,3}(?:,\d{3})+(?!\d|,\d)|\d+(?:\.\d+)?|\.\d+)"
    r"(?:(?<=\d)\.\d+)?"
)
# GSM8K puts the final answer after "####" at the end of the solution.
_GSM8K_MARKER = "####"
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})  # unicode minus, en dash
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def compile_answer_regex(pattern: str | None) -> re.Pattern[str] | None:
    """Compile a user's `--answer-regex`, turning a syntax error into a clear message."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise TunelabError(
            f"--answer-regex {pattern!r} is not a valid regular expression: {err}\n"
            r"  fix: e.g. --answer-regex 'answer is (-?[\d,.]+)' (group 1, if any, is the answer)"
        ) from err


def parse_number(text: str) -> float | None:
    """The first number written in `text` as a float ("$1,200" -> 1200.0); None if there is none."""
    match = _NUMBER.search(text.translate(_MINUS_SIGNS))
    if match is None:
        return None
    return _to_float(match.group(0))


def _to_float(token: str) -> float:
    """Convert one `_NUMBER` match: drop currency, separators and spaces."""
    return float(token.replace("$", "").replace(",", "").replace(" ", ""))


def _last_number(text: str) -> float | None:
    matches = _NUMBER.findall(text.translate(_MINUS_SIGNS))
    return _to_float(matches[-1]) if matches else None


def extract_answer(text: str, regex: str | re.Pattern[str] | None = None) -> float | None:
    """The final numeric answer in a solution, or None when it has none.

    With `regex`: its last match in the text (group 1 when the pattern has a group), read
    as a number. Otherwise the first number after the last "####" (GSM8K style); without
    "####", the last number in the text. "1,000", "1000" and "1000.0" all give 1000.0.
    """
    if regex is not None:
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        matches = list(pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        captured = last.group(1) if pattern.groups else last.group(0)
        return parse_number(captured or "")
    if _GSM8K_MARKER in text:
        return parse_number(text.rsplit(_GSM8K_MARKER, 1)[1])
    return _last_number(text)


def normalise_text(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace ("  Positive. " -> "positive")."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def answers_match(prediction: str, reference: str, regex: str | re.Pattern[str] | None = None) -> bool:
    """Whether a prediction's final answer equals the reference's.

    Numeric references compare numerically (tolerance 1e-6); a prediction without an
    answer is wrong. A reference with no number at all falls back to normalised string
    equality of the whole texts (SQuAD-style exact match).
    """
    expected = extract_answer(reference)
    if expected is None:
        return normalise_text(prediction) == normalise_text(reference)
    got = extract_answer(prediction, regex)
    return got is not None and math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-6)


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(
    predictions: Sequence[str], references: Sequence[str], regex: str | re.Pattern[str] | None = None
) -> float:
    """Fraction of predictions whose final answer matches the reference (see `answers_match`)."""
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(answers_match(p, r, regex) for p, r in zip(predictions, references))
    return hits / len(predictions)


def generated_label(prediction: str) -> str:
    """The label a classifier-style generation gives: its first non-empty line, normalised."""
    for line in prediction.splitlines():
        if line.strip():
            return normalise_text(line)
    return ""


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of generated labels equal to the reference label after normalisation.

    Only the first non-empty line of a generation counts, so "Positive.\\nBecause ..."
    matches the label "positive".
    """
    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(generated_label(p) == normalise_text(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F-measure of each prediction against its reference (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    rows = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # rouge-score takes (target, prediction)
        rows.append({name: scores[name].fmeasure for name in ROUGE_TYPES})
    return rows


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure over the examples (fractions in [0, 1])."""
    rows = rouge_per_example(predictions, references)
    if not rows:
        return {name: 0.0 for name in ROUGE_TYPES}
    return {name: sum(row[name] for row in rows) / len(rows) for name in ROUGE_TYPES}


def bleu_score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams, brevity penalty), 0-100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


# --- classification ------------------------------------------------------------------------


def classification_scores(predictions: Sequence[int], references: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro and per-class precision / recall / F1, and the confusion matrix.

    `predictions` and `references` are class ids (indices into `labels`). The confusion
    matrix has one row per true class and one column per predicted class. A class never
    predicted has precision 0 (and one absent from the references recall 0), so the macro
    averages count every class of the label set equally. `majority_baseline` is the
    accuracy of always answering the most frequent reference class.
    """
    if len(predictions) != len(references):
        raise TunelabError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise TunelabError("no examples to score")
    size = len(labels)
    matrix = [[0] * size for _ in range(size)]
    for predicted, true in zip(predictions, references):
        matrix[true][predicted] += 1
    per_class = {}
    for k, name in enumerate(labels):
        hits = matrix[k][k]
        predicted = sum(matrix[row][k] for row in range(size))
        support = sum(matrix[k])
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(matrix[k][k] for k in range(size))
    supports = [sum(row) for row in matrix]
    return {
        "accuracy": correct / len(references),
        "macro_precision": sum(c["precision"] for c in per_class.values()) / size,
        "macro_recall": sum(c["recall"] for c in per_class.values()) / size,
        "macro_f1": sum(c["f1"] for c in per_class.values()) / size,
        "majority_baseline": max(supports) / len(references),
        "per_class": per_class,
        "labels": list(labels),
        "confusion_matrix": matrix,
    }
