"""Stability: how far an artifact's answers move when its input moves by one grey level.

An 8-bit image cannot change by less than one grey level in one pixel value. An FP32
network does not notice such a change; an INT8 network can, because a one-step
change of one input code can cross a rounding boundary in the next layer, and each
layer multiplies the number of codes that differ (a depthwise filter with large
weights turns one step of its input into many steps of its output). Two INT8
backends running one Q/DQ file round a few ties differently and start the same
cascade, so the agreement between them cannot be expected to exceed the agreement
of either one with itself under the smallest input change. `measure_stability`
measures that floor: each input gets one value moved by one grey level (a random
position and sign, seeded; the sign that keeps the pixel within 0-255 at the ends),
the artifact runs again, and the outputs are compared with its own unperturbed
outputs, over several draws.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from deploykit.harness.evaluate import Infer, run_batched
from deploykit.harness.fidelity import compare_outputs

DEFAULT_DRAWS = 4
SEED = 7_000


@dataclass(frozen=True)
class Stability:
    """The artifact against itself with each input moved by one grey level in one value.

    Attributes:
        draws: Perturbed copies of the set that were run.
        samples: Inputs in the set.
        top1_agreement: Percent of inputs whose top-1 class did not change, mean over draws.
        top1_agreement_min: The same, for the least stable draw.
        top5_overlap: Mean percent of the top-5 classes kept, mean over draws.
        cosine_mean: Mean per-input cosine against the unperturbed outputs.
        cosine_min: Smallest per-input cosine over all draws.
    """

    draws: int
    samples: int
    top1_agreement: float
    top1_agreement_min: float
    top5_overlap: float
    cosine_mean: float
    cosine_min: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def grey_level_steps(std: tuple[float, ...]) -> np.ndarray:
    """One grey level per channel in model-input units: ``1 / (255 * std)``."""
    return (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32)


def nudge(
    inputs: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], rng: np.random.Generator
) -> np.ndarray:
    """A copy of `inputs` (N, C, ...) with one value of each input moved by one grey level.

    The value is chosen uniformly, the direction at random, except that a pixel at 0
    moves up and a pixel at 255 moves down, so the result is still an 8-bit image.
    """
    out = inputs.copy()
    n = inputs.shape[0]
    flat = out.reshape(n, -1)
    per_channel = int(np.prod(inputs.shape[2:])) if inputs.ndim > 2 else 1
    positions = rng.integers(0, flat.shape[1], size=n)
    channels = positions // per_channel
    steps = grey_level_steps(std)[channels]
    m = np.asarray(mean, dtype=np.float64)[channels]
    s = np.asarray(std, dtype=np.float64)[channels]
    rows = np.arange(n)
    pixels = (flat[rows, positions].astype(np.float64) * s + m) * 255.0
    signs = rng.choice(np.array([-1.0, 1.0]), size=n)
    signs = np.where(pixels < 0.5, 1.0, np.where(pixels > 254.5, -1.0, signs))
    flat[rows, positions] += (signs * steps).astype(out.dtype)
    return out


def measure_stability(
    infer: Infer,
    inputs: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch: int,
    draws: int = DEFAULT_DRAWS,
    seed: int = SEED,
    base: np.ndarray | None = None,
) -> Stability:
    """Run `infer` on `inputs` and on `draws` one-grey-level nudges of them; compare.

    Args:
        infer: The artifact's runner (``Runner.infer``).
        inputs: The evaluation inputs, preprocessed (N, C, ...).
        mean: The input contract's per-channel mean (pixels scaled to [0, 1]).
        std: Its per-channel standard deviation.
        batch: Batch the artifact takes.
        draws: Perturbed copies to run.
        seed: Seed of the positions and signs.
        base: The artifact's outputs on `inputs`, when the caller has them already.

    Raises:
        ValueError: `draws` below 1 or an empty set.
    """
    if draws < 1:
        raise ValueError(f"stability needs at least one draw, got {draws}")
    if inputs.shape[0] == 0:
        raise ValueError("no inputs to perturb")
    rng = np.random.default_rng(seed)
    if base is None:
        base = run_batched(infer, inputs, batch)
    scores = [
        compare_outputs(base, run_batched(infer, nudge(inputs, mean, std, rng), batch))
        for _ in range(draws)
    ]
    return Stability(
        draws=draws,
        samples=int(inputs.shape[0]),
        top1_agreement=100.0 * float(np.mean([f.top1_agreement for f in scores])),
        top1_agreement_min=100.0 * min(f.top1_agreement for f in scores),
        top5_overlap=100.0 * float(np.mean([f.top5_overlap for f in scores])),
        cosine_mean=float(np.mean([f.cosine_mean for f in scores])),
        cosine_min=min(f.cosine for f in scores),
    )
