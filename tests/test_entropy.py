"""Entropy (KL) thresholds: TensorRT's search on |x|, robust to the zeros a ReLU emits."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.stages.entropy import LEVELS, entropy_range, kl_threshold_bins

BINS = 4096  # what deploykit.stages.calibrate collects: 2048 bins of |x|


def _range(x: np.ndarray) -> tuple[float, float]:
    """The entropy range of x, from the histogram ONNX Runtime's collector builds."""
    amax = float(np.abs(x).max())
    hist, edges = np.histogram(x, BINS, range=(-amax, amax))
    return entropy_range(hist, edges, float(x.min()), float(x.max()))


def _relu6(zero_share: float, n: int = 400_000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tail = np.minimum(np.abs(rng.standard_normal(int(n * (1 - zero_share)))), 6.0)
    return np.concatenate([np.zeros(n - tail.size), tail])


def test_relu_output_keeps_its_tail_however_many_zeros() -> None:
    """The zero spike of a ReLU does not pull the threshold in (ORT 1.32's search does)."""
    thresholds = [_range(_relu6(share))[1] for share in (0.1, 0.5, 0.9)]
    for lo_hi in (_range(_relu6(0.5)),):
        assert lo_hi[0] == 0.0
    assert all(3.0 < t < 6.0 for t in thresholds), thresholds
    assert max(thresholds) - min(thresholds) < 0.25, thresholds


def test_outliers_are_clipped_and_the_bulk_kept() -> None:
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(200_000), [80.0, -95.0, 120.0]])
    lo, hi = _range(x)
    assert -8.0 < lo < -2.5 and 2.5 < hi < 8.0, (lo, hi)
    assert lo == -hi  # one threshold on |x|


def test_range_without_tail_is_kept_whole() -> None:
    x = np.random.default_rng(2).uniform(-3.0, 3.0, 200_000)
    lo, hi = _range(x)
    assert lo == pytest.approx(x.min(), abs=0.05) and hi == pytest.approx(x.max(), abs=0.05)


def test_threshold_never_exceeds_the_observed_range() -> None:
    x = np.random.default_rng(3).uniform(0.5, 2.0, 10_000)  # all positive, away from 0
    lo, hi = _range(x)
    assert lo == pytest.approx(x.min()) and hi <= x.max()


def test_short_and_empty_histograms() -> None:
    assert kl_threshold_bins(np.ones(LEVELS)) == LEVELS
    assert kl_threshold_bins(np.zeros(1024)) == 1024
    assert kl_threshold_bins(np.ones(3000)) == 3000  # flat: nothing worth clipping


def test_constant_background_does_not_set_the_threshold() -> None:
    """A normalised image whose background is one value keeps its bright pixels.

    Without spike handling the search isolates the background bin and clips every
    brighter pixel (Fashion-MNIST's input went from [-0.81, 2.02] to [-0.81, 0.81]).
    """
    rng = np.random.default_rng(4)
    background = np.full(300_000, -0.81)
    pixels = np.clip(rng.normal(1.0, 0.5, 100_000), -0.81, 2.02)
    lo, hi = _range(np.concatenate([background, pixels]))
    assert lo == pytest.approx(-0.81) and hi > 1.9, (lo, hi)


def test_saturating_relu6_keeps_six() -> None:
    """Mass piled at exactly 6 (a saturating ReLU6) stays inside the range."""
    rng = np.random.default_rng(5)
    x = np.minimum(np.abs(rng.normal(0, 3.0, 400_000)), 6.0)
    assert (x == 6.0).mean() > 0.02
    assert _range(x)[1] == pytest.approx(6.0, abs=0.01)
