"""MSE thresholds: the range whose INT8 grid reproduces the tensor with the least error."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.stages.mse import SIGNED_STEPS, UNSIGNED_STEPS, mse_range, mse_threshold

BINS = 4096  # what deploykit.stages.calibrate collects: 2048 bins of |x|


def _range(x: np.ndarray) -> tuple[float, float]:
    """The MSE range of x, from the histogram ONNX Runtime's collector builds."""
    amax = float(np.abs(x).max())
    hist, edges = np.histogram(x, BINS, range=(-amax, amax))
    return mse_range(hist, edges, float(x.min()), float(x.max()))


def _sample_mse(x: np.ndarray, t: float, signed: bool) -> float:
    """Squared error of quantizing the samples themselves on the grid with threshold t."""
    if signed:
        step = t / SIGNED_STEPS
        q = np.clip(np.round(x / step), -SIGNED_STEPS, SIGNED_STEPS) * step
    else:
        step = t / UNSIGNED_STEPS
        q = np.clip(np.round(x / step), 0, UNSIGNED_STEPS) * step
    return float(np.mean((x - q) ** 2))


@pytest.mark.parametrize(
    ("name", "signed"), [("laplace", True), ("normal", True), ("half-normal", False)]
)
def test_threshold_minimises_the_error_on_the_samples(name: str, signed: bool) -> None:
    """The histogram search lands where a brute-force search on the raw samples does."""
    rng = np.random.default_rng(0)
    x = {
        "laplace": lambda: rng.laplace(size=300_000),
        "normal": lambda: rng.standard_normal(300_000),
        "half-normal": lambda: np.abs(rng.standard_normal(300_000)),
    }[name]()
    lo, hi = _range(x)
    t = hi if not signed else -lo
    amax = float(np.abs(x).max())
    brute = min(_sample_mse(x, c, signed) for c in np.linspace(0.05 * amax, amax, 400))
    assert _sample_mse(x, t, signed) <= brute * 1.01, (t, amax)
    # ... and that clipping really pays: the full range is clearly worse.
    assert _sample_mse(x, amax, signed) > 1.1 * brute


def test_laplace_threshold_matches_the_analytic_optimum() -> None:
    """ACIQ (Banner et al. 2019): 8-bit Laplace(b) clips at about 9.89 b."""
    x = np.random.default_rng(1).laplace(scale=0.5, size=1_000_000)
    lo, hi = _range(x)
    assert lo == -hi
    assert 9.4 < hi / 0.5 < 10.4, hi / 0.5


def test_relu_zeros_do_not_move_the_threshold() -> None:
    """Zero is on the UINT8 grid, so the zeros a ReLU emits cost nothing wherever t is."""
    rng = np.random.default_rng(2)
    tail = np.abs(rng.standard_normal(200_000))
    thresholds = []
    for zeros in (0, 200_000, 1_800_000):
        x = np.concatenate([np.zeros(zeros), tail])
        lo, hi = _range(x)
        assert lo == x.min()  # a non-negative tensor keeps its own lower end
        thresholds.append(hi)
    assert max(thresholds) - min(thresholds) < 0.05, thresholds


def test_saturating_relu6_keeps_six() -> None:
    """A fifth of the values at exactly 6: clipping them costs more than any step saves."""
    rng = np.random.default_rng(3)
    x = np.concatenate([np.abs(rng.standard_normal(400_000)) * 1.5, np.full(100_000, 6.0)])
    x = np.minimum(x, 6.0)
    lo, hi = _range(x)
    assert lo == x.min() and hi >= 6.0 - 2 * 6.0 / (BINS // 2), hi


def test_uniform_keeps_its_whole_range() -> None:
    x = np.random.default_rng(4).uniform(-3.0, 3.0, 300_000)
    lo, hi = _range(x)
    assert lo == pytest.approx(x.min(), abs=0.02) and hi == pytest.approx(x.max(), abs=0.02)


def test_outliers_are_weighed_by_their_squared_distance() -> None:
    """Unlike KL, MSE pays for clipped outliers: a few far ones pull t out, not all the way."""
    rng = np.random.default_rng(5)
    bulk = rng.standard_normal(300_000)
    lo, hi = _range(np.concatenate([bulk, [60.0, -75.0]]))
    assert lo == -hi and 8.0 < hi < 60.0, hi
    lo, hi = _range(np.concatenate([bulk, np.full(3, 40.0)]))
    assert 2.5 < hi < 40.0, hi


def test_empty_histogram_keeps_every_bin() -> None:
    assert mse_threshold(np.zeros(2048), 0.01, UNSIGNED_STEPS) == pytest.approx(20.48)
    assert mse_threshold(np.zeros(0), 0.01, SIGNED_STEPS) == 0.0
