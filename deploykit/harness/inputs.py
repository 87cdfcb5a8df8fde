"""Deterministic, image-like model inputs for fidelity checks and timing."""

from __future__ import annotations

import numpy as np

from deploykit.models.contract import InputContract


def synthetic_images(contract: InputContract, count: int, seed: int = 0) -> np.ndarray:
    """Return `count` normalised NCHW float32 inputs that look like natural images.

    White noise drives a CNN into an unusual regime; these are smooth random
    fields (low-frequency colour blobs plus mild texture) in [0, 1], normalised
    with the contract's mean and std, so activations have realistic statistics.

    Args:
        contract: The model's input contract.
        count: Number of images.
        seed: Seed; the same seed always gives the same images.

    Returns:
        Array of shape (count, C, H, W), float32.
    """
    rng = np.random.default_rng(seed)
    c, h, w = contract.channels, contract.height, contract.width
    coarse = rng.random((count, c, 8, 8), dtype=np.float32)
    # Bilinear upsampling of the 8x8 field as two small matrix products.
    smooth = np.einsum("hi,ncij,wj->nchw", _interp(h), coarse, _interp(w), optimize=True)
    texture = rng.normal(0.0, 0.05, size=(count, c, h, w)).astype(np.float32)
    images = np.clip(smooth + texture, 0.0, 1.0)
    mean = np.asarray(contract.mean, dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(contract.std, dtype=np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray((images - mean) / std, dtype=np.float32)


def _interp(size: int, grid: int = 8) -> np.ndarray:
    """(size, grid) matrix of linear interpolation weights from `grid` knots to `size` pixels."""
    pos = np.linspace(0, grid - 1, size, dtype=np.float32)
    lo = np.floor(pos).astype(int).clip(0, grid - 2)
    frac = pos - lo
    weights = np.zeros((size, grid), dtype=np.float32)
    weights[np.arange(size), lo] = 1 - frac
    weights[np.arange(size), lo + 1] += frac
    return weights


def spread_subset(inputs: np.ndarray, count: int) -> np.ndarray:
    """`count` inputs taken evenly across `inputs` (all of them when there are fewer).

    Data sets arrive grouped: a manifest's augmented views photo by photo, an image
    folder class by class. The first `count` inputs of such a set come from one
    photo or one class, so bias correction and the fallback's ranking, which work
    on a subset of the calibration inputs, take it this way.
    """
    total = inputs.shape[0]
    if count >= total:
        return inputs
    return inputs[np.linspace(0, total - 1, num=count).round().astype(np.int64)]
