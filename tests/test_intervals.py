"""95% intervals of evaluation figures: the formulas, their coverage, and where they show."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.harness.datasets import Dataset
from deploykit.harness.display import accuracy_line
from deploykit.harness.evaluate import evaluate_outputs
from deploykit.harness.intervals import (
    bootstrap_mean,
    cluster_bootstrap_mean,
    evaluation_intervals,
    wilson,
)


def test_wilson_matches_the_published_interval() -> None:
    # Reference values: scipy.stats.binomtest(k, n).proportion_ci(method="wilson").
    assert wilson(17, 20) == pytest.approx((63.958114, 94.763125), abs=1e-5)
    assert wilson(20, 20) == pytest.approx((83.887484, 100.0), abs=1e-5)
    assert wilson(0, 10) == pytest.approx((0.0, 27.75328), abs=1e-5)
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_wilson_covers_the_true_proportion_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(1)
    trials = 2000
    covered = 0
    for _ in range(trials):
        lo, hi = wilson(int(rng.binomial(50, 0.9)), 50)
        covered += lo <= 90.0 <= hi
    assert 0.92 <= covered / trials <= 0.99


def test_bootstrap_is_deterministic_and_covers_the_mean() -> None:
    values = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    weights = np.array([0.01, 0.01, 0.02, 0.06, 0.2, 0.7])
    mean = float((values * weights).sum())
    rng = np.random.default_rng(2)
    sample = rng.choice(values, size=200, p=weights)
    assert bootstrap_mean(sample, seed=3) == bootstrap_mean(sample, seed=3)
    lo, hi = bootstrap_mean(sample)
    assert lo <= sample.mean() <= hi
    covered = 0
    for trial in range(200):
        draw = rng.choice(values, size=200, p=weights)
        lo, hi = bootstrap_mean(draw, resamples=400, seed=trial)
        covered += lo <= mean <= hi
    assert 0.90 <= covered / 200 <= 0.99
    # Four times the inputs: about half the width.
    wide = np.subtract(*bootstrap_mean(sample)[::-1])
    narrow = np.subtract(*bootstrap_mean(np.tile(sample, 4))[::-1])
    assert 0.4 < narrow / wide < 0.6
    with pytest.raises(ValueError):
        bootstrap_mean(np.array([]))


def _twenty_photos() -> tuple[np.ndarray, np.ndarray, Dataset]:
    """20 labelled inputs: the reference gets 18 right; the candidate loses one of those."""
    labels = np.arange(20) % 10
    reference = np.full((20, 10), -1.0, dtype=np.float32)
    reference[np.arange(20), labels] = 5.0
    reference[[18, 19], 0] = 6.0  # two the reference misses (labels 8 and 9)
    candidate = reference.copy()
    candidate[3, 9] = 9.0  # a photo the reference had right
    data = Dataset(inputs=np.zeros((20, 1)), source="photos", sha256="x", labels=list(labels))
    return reference, candidate, data


def test_a_lost_photo_of_twenty_is_not_resolved() -> None:
    reference, candidate, data = _twenty_photos()
    result = evaluate_outputs(candidate, reference, data, "toy fp32")
    assert (result.fp32_top1, result.top1, result.drop) == (90.0, 85.0, 5.0)
    intervals = result.intervals
    assert intervals is not None
    assert intervals["top1"] == pytest.approx([63.96, 94.76], abs=0.01)
    lo, hi = intervals["drop"]
    assert lo == 0.0 and 10.0 <= hi <= 20.0  # one photo of 20: anything from 0 to ~3
    assert intervals["top1_agreement"] == pytest.approx([76.39, 99.11], abs=0.01)  # 19 of 20
    line = accuracy_line(result.to_dict())
    assert "95% intervals: top-1 64.0-94.8%, drop +0.0 to +" in line, line
    assert "95% intervals" in result.summary()


def test_unlabelled_sets_get_agreement_intervals_only() -> None:
    overlaps = np.ones(20)
    agree = np.arange(20) != 7  # 19 of 20
    intervals = evaluation_intervals(20, agree, overlaps, None, np.ones(20, dtype=bool))
    assert set(intervals) == {"top1_agreement", "top5_overlap", "decisive_agreement"}
    assert intervals["top5_overlap"] == [100.0, 100.0]
    assert intervals["decisive_agreement"] == intervals["top1_agreement"]
    none_decisive = evaluation_intervals(20, agree, overlaps, None, np.zeros(20, dtype=bool))
    assert "decisive_agreement" not in none_decisive


def _grouped_draw(rng: np.random.Generator, groups: int, per_group: int) -> np.ndarray:
    """0/1 outcomes whose rate varies from group to group (mean 0.9): correlated views."""
    rates = rng.beta(9.0, 1.0, size=groups)  # mean 0.9, strongly spread
    return (rng.random((groups, per_group)) < rates[:, None]).astype(np.float64).reshape(-1)


def test_cluster_bootstrap_covers_grouped_data_where_independent_intervals_do_not() -> None:
    rng = np.random.default_rng(5)
    groups, per_group, trials = 20, 32, 200
    ids = np.repeat(np.arange(groups), per_group)
    by_group = independent = 0
    for trial in range(trials):
        outcomes = _grouped_draw(rng, groups, per_group)
        lo, hi = cluster_bootstrap_mean(outcomes, ids, resamples=400, seed=trial)
        by_group += lo <= 0.9 <= hi
        lo, hi = wilson(int(outcomes.sum()), outcomes.size)
        independent += lo <= 90.0 <= hi
    # Resampling the groups covers close to 95% (a little under with 20 groups); treating
    # the 640 views as independent draws gives an interval far too narrow.
    assert 0.85 <= by_group / trials <= 0.99, by_group
    assert independent / trials < 0.8, independent


def test_cluster_bootstrap_is_a_ratio_over_whole_groups() -> None:
    values = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    ids = np.array([0, 0, 0, 1, 1, 1])
    lo, hi = cluster_bootstrap_mean(values, ids, seed=1)
    # Resamples: both groups (4/6), group 0 twice (1.0) or group 1 twice (1/3).
    assert lo == pytest.approx(1 / 3) and hi == pytest.approx(1.0)
    assert cluster_bootstrap_mean(values, ids, seed=1) == (lo, hi)
    # A mask keeps the groups whole but averages only the selected inputs.
    mask = np.array([True, False, False, True, True, False])
    lo, hi = cluster_bootstrap_mean(values, ids, seed=1, mask=mask)
    assert lo == pytest.approx(0.0) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cluster_bootstrap_mean(values, ids[:3])
    with pytest.raises(ValueError):
        cluster_bootstrap_mean(values, ids, mask=np.zeros(6, dtype=bool))


def test_grouped_sets_resample_their_photos_and_say_so() -> None:
    reference, candidate, _ = _twenty_photos()
    labels = list(np.arange(20) % 10)
    flat = Dataset(inputs=np.zeros((20, 1)), source="views", sha256="x", labels=labels)
    grouped = Dataset(
        inputs=np.zeros((20, 1)),
        source="views",
        sha256="x",
        labels=labels,
        groups=np.repeat(np.arange(4), 5),
    )
    independent = evaluate_outputs(candidate, reference, flat, "toy fp32")
    by_photo = evaluate_outputs(candidate, reference, grouped, "toy fp32")
    assert independent.interval_groups is None and by_photo.interval_groups == 4
    assert independent.intervals is not None and by_photo.intervals is not None
    assert set(by_photo.intervals) == set(independent.intervals)
    # The same figures; only the intervals differ.
    assert (by_photo.top1, by_photo.drop) == (independent.top1, independent.drop)
    assert by_photo.intervals != independent.intervals
    assert "95% intervals (resampling the 4 source photos): top-1" in by_photo.summary()
    assert "resampling" in accuracy_line(by_photo.to_dict())
    assert "resampling" not in independent.summary()
    one_photo = Dataset(
        inputs=np.zeros((20, 1)), source="v", sha256="x", labels=labels, groups=np.zeros(20)
    )
    # A single photo cannot be resampled: the independent intervals stand, and say so.
    alone = evaluate_outputs(candidate, reference, one_photo, "toy")
    assert alone.intervals == independent.intervals
    assert alone.interval_groups is None and "resampling" not in alone.summary()
