"""The one-grey-level stability measure (deploykit.harness.stability)."""

from __future__ import annotations

import numpy as np
import pytest

from deploykit.harness.stability import grey_level_steps, measure_stability, nudge

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _images(pixels: np.ndarray) -> np.ndarray:
    """uint8 NCHW pixels -> model inputs under (MEAN, STD)."""
    m = np.asarray(MEAN, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(STD, np.float32).reshape(1, -1, 1, 1)
    return ((pixels.astype(np.float32) / 255.0 - m) / s).astype(np.float32)


def _pixels(inputs: np.ndarray) -> np.ndarray:
    m = np.asarray(MEAN, np.float64).reshape(1, -1, 1, 1)
    s = np.asarray(STD, np.float64).reshape(1, -1, 1, 1)
    return (inputs.astype(np.float64) * s + m) * 255.0


def test_nudge_moves_one_value_of_each_input_by_one_grey_level() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(64, 3, 5, 7))
    inputs = _images(pixels)
    moved = nudge(inputs, MEAN, STD, np.random.default_rng(1))
    changed = (moved != inputs).reshape(64, -1).sum(axis=1)
    assert changed.tolist() == [1] * 64
    delta = _pixels(moved) - _pixels(inputs)
    steps = delta[moved != inputs]
    np.testing.assert_allclose(np.abs(steps), 1.0, atol=1e-3)
    assert (steps > 0).any() and (steps < 0).any()
    # Still an 8-bit image: nothing leaves 0-255.
    assert _pixels(moved).min() > -0.01 and _pixels(moved).max() < 255.01
    np.testing.assert_array_equal(moved, nudge(inputs, MEAN, STD, np.random.default_rng(1)))


def test_nudge_keeps_black_and_white_pixels_in_range() -> None:
    for level, direction in ((0, 1.0), (255, -1.0)):
        inputs = _images(np.full((32, 3, 2, 2), level))
        moved = nudge(inputs, MEAN, STD, np.random.default_rng(3))
        delta = (_pixels(moved) - _pixels(inputs))[moved != inputs]
        np.testing.assert_allclose(delta, direction, atol=1e-3)


def test_grey_level_is_one_over_255_std() -> None:
    np.testing.assert_allclose(grey_level_steps((0.5, 0.25)), [2.0 / 255.0, 4.0 / 255.0])


def test_stability_is_full_for_a_smooth_model_and_zero_for_one_that_sees_every_step() -> None:
    inputs = _images(np.full((20, 3, 4, 4), 100))
    weights = np.random.default_rng(2).normal(size=(48, 10)).astype(np.float32)

    def linear(x: np.ndarray) -> np.ndarray:
        return x.reshape(x.shape[0], -1) @ weights

    def step(x: np.ndarray) -> np.ndarray:
        # Class 0 while the image is untouched, class 1 as soon as any value moved.
        moved = np.abs(x - inputs[: x.shape[0]]).reshape(x.shape[0], -1).max(axis=1) > 0
        return np.stack([1.0 - moved, moved.astype(np.float64)], axis=1).astype(np.float32)

    smooth = measure_stability(linear, inputs, MEAN, STD, batch=4, draws=3)
    assert smooth.top1_agreement == 100.0 and smooth.cosine_min > 0.9999
    assert smooth.draws == 3 and smooth.samples == 20
    brittle = measure_stability(step, inputs, MEAN, STD, batch=4, draws=2)
    assert brittle.top1_agreement == 0.0 and brittle.top1_agreement_min == 0.0


def test_stability_needs_a_draw() -> None:
    with pytest.raises(ValueError, match="at least one draw"):
        measure_stability(lambda x: x, np.zeros((2, 1, 1, 1), np.float32), (0.0,), (1.0,), 1, 0)
