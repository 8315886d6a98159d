"""How sure a score is: 95% intervals for evaluation scores, and paired differences between models.

On `make demo`'s 50 problems one greedy run against another moves exact match by a few
problems, so a comparison that prints two percentages says little. This module attaches

  * to each score, a 95% interval: Wilson's score interval for proportions (exact match,
    accuracy: right at 0% and 100% too, where the normal approximation gives [0, 0]);
    a percentile bootstrap over examples for means (ROUGE-L) and for the token-weighted
    loss (sum of NLL / sum of target tokens, resampled by example; perplexity is the exp
    of the loss bounds);
  * to each model after the first in a comparison, the difference to the first on the same
    examples with a paired bootstrap 95% interval: examples are resampled once and both
    models are scored on the same draw, so the spread of the questions cancels out and only
    the disagreement between the models counts. The difference is marked when its interval
    excludes zero.

The functions take plain lists (per-example values in example order) so they are tested on
known inputs; `add_intervals` and `add_paired_differences` read `tunelab eval`'s prediction
rows. Bootstrap draws use a fixed seed: the same inputs always give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
RESAMPLES = 4000  # bootstrap draws; the percentile bounds move by ~0.1 point between seeds at this count
SEED = 0
_CHUNK_CELLS = 4_000_000  # resampled indices held at once (int64: 32 MB), whatever the data size

# Score key -> (prediction-row field with the per-example value, weight field or None, method).
# "wilson": the value is right/wrong; "bootstrap": a (weighted) mean resampled by example.
PER_EXAMPLE = {
    "exact_match": ("correct", None, "wilson"),
    "accuracy": ("label_correct", None, "wilson"),
    "loss": ("loss", "target_tokens", "bootstrap"),
    "rougeL": ("rougeL", None, "bootstrap"),
}

PROPORTIONS = frozenset({"exact_match", "accuracy"})  # shown in percent (differences in points)


@dataclass(frozen=True)
class Difference:
    """`other - baseline` on the same examples with its paired bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies wholly above or below zero: more than noise at this level."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"difference": self.difference, "low": self.low, "high": self.high, "excludes_zero": self.excludes_zero}


# ----------------------------------------------------------------------------- intervals


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion successes / n (95% for the default z).

    Unlike p +- z * sqrt(p(1-p)/n) it never leaves [0, 1] and is not empty at 0 or n
    successes: 0 of 50 gives [0, 7.1%], not [0, 0].
    """
    if n <= 0:
        raise ValueError("a proportion needs at least one example")
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _draws(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Bootstrap index draws, shape (k, n), in chunks so memory stays bounded on large data."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // max(n, 1))
    done = 0
    while done < resamples:
        k = min(per_chunk, resamples - done)
        yield rng.integers(0, n, size=(k, n))
        done += k


def _statistic(values: np.ndarray, weights: np.ndarray | None, draw: np.ndarray) -> np.ndarray:
    """Per resample: the mean of the drawn values, or sum(value * weight) / sum(weight)."""
    if weights is None:
        return values[draw].mean(axis=1)
    return (values * weights)[draw].sum(axis=1) / np.maximum(weights[draw].sum(axis=1), 1e-12)


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _arrays(values: Sequence[float], weights: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not values:
        raise ValueError("no values to resample")
    array = np.asarray(values, dtype=np.float64)
    if weights is None:
        return array, None
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    return array, np.asarray(weights, dtype=np.float64)


def bootstrap_interval(
    values: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (or a weighted mean: sum(v*w) / sum(w)).

    Examples are drawn with replacement `resamples` times. The weighted form is how a
    token-averaged loss is resampled: by example, keeping each example's token count.
    """
    array, weight = _arrays(values, weights)
    stats = np.concatenate([_statistic(array, weight, draw) for draw in _draws(len(array), resamples, seed)])
    return _percentiles(stats, level)


def paired_bootstrap(
    baseline: Sequence[float],
    other: Sequence[float],
    baseline_weights: Sequence[float] | None = None,
    other_weights: Sequence[float] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Difference:
    """`other - baseline` on the same examples (element i of both is example i), with a
    paired percentile bootstrap interval: each draw resamples examples once and scores both
    models on it, so an example both get right (or wrong) adds no noise to the difference."""
    if len(baseline) != len(other):
        raise ValueError(f"paired comparison needs the same examples: {len(baseline)} vs {len(other)} values")
    a, wa = _arrays(baseline, baseline_weights)
    b, wb = _arrays(other, other_weights)
    everything = np.arange(len(a))[None, :]  # the observed data: every example once
    point = float(_statistic(b, wb, everything)[0] - _statistic(a, wa, everything)[0])
    diffs = np.concatenate([_statistic(b, wb, d) - _statistic(a, wa, d) for d in _draws(len(a), resamples, seed)])
    low, high = _percentiles(diffs, level)
    return Difference(point, low, high)


# ----------------------------------------------------------------------------- tunelab eval rows


def per_example(rows: Sequence[dict], key: str) -> tuple[list[float], list[float] | None] | None:
    """A score's per-example values (and weights) from prediction rows, or None when a row lacks them."""
    field, weight_field, _ = PER_EXAMPLE[key]
    if not rows or any(field not in row or (weight_field and weight_field not in row) for row in rows):
        return None
    values = [float(row[field]) for row in rows]
    weights = [float(row[weight_field]) for row in rows] if weight_field else None
    return values, weights


def score_intervals(rows: Sequence[dict], scores: dict) -> dict[str, dict]:
    """95% intervals of every score in `scores` that has per-example values in `rows`:
    {"exact_match": {"low": ..., "high": ..., "method": "wilson"}, ...}; perplexity follows loss."""
    intervals: dict[str, dict] = {}
    for key, (_, _, method) in PER_EXAMPLE.items():
        found = per_example(rows, key) if scores.get(key) is not None else None
        if found is None:
            continue
        values, weights = found
        if method == "wilson":
            low, high = wilson_interval(int(sum(values)), len(values))
        else:
            low, high = bootstrap_interval(values, weights)
        intervals[key] = {"low": low, "high": high, "method": method}
    if "loss" in intervals and scores.get("perplexity") is not None:
        loss = intervals["loss"]  # exp is monotonic: the bounds map straight across
        intervals["perplexity"] = {"low": math.exp(min(loss["low"], 700.0)), "high": math.exp(min(loss["high"], 700.0)),
                                   "method": "bootstrap (exp of the loss bounds)"}
    return intervals


def add_intervals(scores: dict, rows: Sequence[dict]) -> dict:
    """Put `score_intervals` into scores["intervals"] (with the level and bootstrap settings); returns scores."""
    intervals = score_intervals(rows, scores)
    if intervals:
        scores["intervals"] = {"level": LEVEL, "bootstrap_resamples": RESAMPLES, "seed": SEED, **intervals}
    return scores


def paired_differences(baseline_rows: Sequence[dict], other_rows: Sequence[dict]) -> dict[str, dict]:
    """Per score both models have per example: `other - baseline` with its paired bootstrap interval.

    Rows are matched by their `source` ("file:line"); a mismatch (different data or limit)
    is an error rather than a silently unpaired comparison.
    """
    if [row.get("source") for row in baseline_rows] != [row.get("source") for row in other_rows]:
        raise ValueError("the two evaluations are not on the same examples (their prediction rows' sources differ)")
    differences: dict[str, dict] = {}
    for key in PER_EXAMPLE:
        a, b = per_example(baseline_rows, key), per_example(other_rows, key)
        if a is None or b is None:
            continue
        differences[key] = paired_bootstrap(a[0], b[0], a[1], b[1]).as_dict()
    return differences


def add_paired_differences(results: Sequence) -> None:
    """For every model after the first (a `tunelab.evaluate.ModelEvaluation`), store its paired
    differences to the first in scores["compared_to"] = {"model": first's name, <score>: {...}}."""
    if len(results) < 2:
        return
    baseline = results[0]
    for result in results[1:]:
        result.scores["compared_to"] = {
            "model": baseline.name,
            "level": LEVEL,
            "method": "paired bootstrap over examples",
            **paired_differences(baseline.predictions, result.predictions),
        }


# ----------------------------------------------------------------------------- display


def format_interval(key: str, interval: dict | None) -> str:
    """"[20.8, 93.9]" (percent for proportions, the table's own units otherwise); "" when absent."""
    if not interval:
        return ""
    low, high = interval["low"], interval["high"]
    if key in PROPORTIONS:
        return f"[{100 * low:.1f}, {100 * high:.1f}]"
    if key == "perplexity":
        return f"[{low:.2f}, {high:.2f}]"
    return f"[{low:.4f}, {high:.4f}]"


def format_difference(key: str, difference: dict) -> str:
    """"+12.0 pts [4.0, 20.0] *" (the star: the interval excludes zero)."""
    scale, unit, digits = (100, " pts", 1) if key in PROPORTIONS else (1, "", 4)
    star = " *" if difference["excludes_zero"] else ""
    return (f"{scale * difference['difference']:+.{digits}f}{unit} "
            f"[{scale * difference['low']:+.{digits}f}, {scale * difference['high']:+.{digits}f}]{star}")


DIFFERENCE_TITLES = {"exact_match": "exact match", "accuracy": "accuracy", "loss": "loss", "rougeL": "ROUGE-L"}


def differences_table(results: Sequence):
    """A Rich table: one row per model after the first, its difference to the first per score."""
    from rich.table import Table

    compared = [r for r in results[1:] if isinstance(r.scores.get("compared_to"), dict)]
    keys = [k for k in DIFFERENCE_TITLES if any(k in r.scores["compared_to"] for r in compared)]
    if not compared or not keys:
        return None
    table = Table(title=f"Difference to {results[0].name} on the same examples (paired bootstrap 95% interval; "
                        "* = the interval excludes 0)")
    table.add_column("model", style="bold")
    for key in keys:
        table.add_column(DIFFERENCE_TITLES[key], justify="right")
    for result in compared:
        row = result.scores["compared_to"]
        table.add_row(result.name, *(format_difference(k, row[k]) if k in row else "-" for k in keys))
    return table
