"""Intervals and paired differences (tunelab.compare) on known inputs, against scipy where it has the same maths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunelab.compare import (
    add_intervals,
    bootstrap_interval,
    format_difference,
    paired_bootstrap,
    paired_differences,
    wilson_interval,
)


def test_wilson_interval_matches_the_formula_and_scipy():
    # 2 of 3 by hand: centre (p + z²/2n) / (1 + z²/n), half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
    low, high = wilson_interval(2, 3)
    assert low == pytest.approx(0.2077, abs=1e-4) and high == pytest.approx(0.9385, abs=1e-4)
    # 0 of 50 is not the empty [0, 0] of the normal approximation.
    low, high = wilson_interval(0, 50)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.0713, abs=1e-4)
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 50), (7, 50), (25, 50), (50, 50), (93, 1319)):
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def test_bootstrap_mean_interval_agrees_with_the_normal_approximation_and_scipy():
    values = np.random.default_rng(1).normal(loc=2.0, scale=1.0, size=400).tolist()
    low, high = bootstrap_interval(values)
    mean, half = np.mean(values), 1.96 * np.std(values, ddof=1) / math.sqrt(len(values))
    assert low == pytest.approx(mean - half, abs=0.015) and high == pytest.approx(mean + half, abs=0.015)
    assert bootstrap_interval(values) == (low, high)  # fixed seed: reproducible
    stats = pytest.importorskip("scipy.stats")
    peer = stats.bootstrap((np.asarray(values),), np.mean, n_resamples=4000, method="percentile", random_state=0)
    assert (low, high) == pytest.approx((peer.confidence_interval.low, peer.confidence_interval.high), abs=0.015)
    # Equal weights are the plain mean; the weighted form is sum(v·w) / sum(w) per draw.
    assert bootstrap_interval(values, [3.0] * len(values)) == pytest.approx((low, high), abs=1e-12)
    low_w, high_w = bootstrap_interval([1.0, 3.0], [1.0, 3.0], resamples=2000)
    assert low_w == pytest.approx(1.0) and high_w == pytest.approx(3.0)  # draws: (1,1)->1, (3,3)->3, mixed->2.5


def test_paired_bootstrap_on_known_answers():
    right = [1.0] * 20 + [0.0] * 30
    same = paired_bootstrap(right, right)
    assert (same.difference, same.low, same.high, same.excludes_zero) == (0.0, 0.0, 0.0, False)
    # The other model gets the same 20 right plus 10 more: +20 points, and no draw can make it worse.
    better = [1.0] * 30 + [0.0] * 20
    diff = paired_bootstrap(right, better)
    assert diff.difference == pytest.approx(0.2)
    assert 0.0 < diff.low < 0.2 < diff.high and diff.excludes_zero
    # Per-example differences are 10 ones and 40 zeros: the interval ≈ 0.2 ± 1.96·sd/√n.
    d = np.asarray(better) - np.asarray(right)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert (diff.low, diff.high) == pytest.approx((0.2 - half, 0.2 + half), abs=0.03)
    # Pairing is the point: unpaired, two 40%/60% models on 50 items overlap heavily.
    assert wilson_interval(20, 50)[1] > wilson_interval(30, 50)[0]
    # Six wins and four losses out of 50 is noise.
    a = [1.0] * 4 + [0.0] * 6 + [1.0] * 10 + [0.0] * 30
    b = [0.0] * 4 + [1.0] * 6 + [1.0] * 10 + [0.0] * 30
    noise = paired_bootstrap(a, b)
    assert noise.difference == pytest.approx(0.04) and not noise.excludes_zero
    assert format_difference("exact_match", diff.as_dict()).startswith("+20.0 pts [+") and format_difference(
        "exact_match", diff.as_dict()).endswith("*")
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_intervals_and_differences_from_prediction_rows():
    rows_a = [{"source": f"d.jsonl:{i}", "correct": i < 3, "loss": 1.0 + i, "target_tokens": 2 + i} for i in range(6)]
    rows_b = [{**row, "correct": True, "loss": row["loss"] - 0.5} for row in rows_a]
    scores = add_intervals({"exact_match": 0.5, "loss": 1.0, "perplexity": 2.7}, rows_a)
    intervals = scores["intervals"]
    assert intervals["exact_match"]["method"] == "wilson"
    assert (intervals["exact_match"]["low"], intervals["exact_match"]["high"]) == pytest.approx(wilson_interval(3, 6))
    # Loss is token-weighted: the interval holds sum(nll)/sum(tokens) = sum((1+i)(2+i)) / sum(2+i) = 112/27.
    assert intervals["loss"]["low"] < 112 / 27 < intervals["loss"]["high"]
    assert intervals["perplexity"]["low"] == pytest.approx(math.exp(intervals["loss"]["low"]))
    differences = paired_differences(rows_a, rows_b)
    assert differences["exact_match"]["difference"] == pytest.approx(0.5)
    assert differences["loss"]["difference"] == pytest.approx(-0.5)
    assert differences["loss"]["high"] == pytest.approx(-0.5) and differences["loss"]["excludes_zero"]
    with pytest.raises(ValueError, match="not on the same examples"):
        paired_differences(rows_a, rows_b[::-1])
