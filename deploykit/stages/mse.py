"""MSE calibration thresholds: the range whose INT8 grid reproduces a tensor best.

For each tensor, the threshold ``t`` minimises the expected squared error between the
activation and its quantized value, clipping and rounding together, estimated from the
tensor's histogram (the collection entropy uses, `deploykit.stages.entropy`). This is
the "mse" range of NVIDIA's pytorch-quantization and TensorRT Model Optimizer
(``_compute_amax_mse``). ONNX Runtime's calibrators (1.32) offer min-max, entropy,
percentile and a distribution fit for float8, not this. NNCF has a search of the kind
(``RangeEstimatorParametersSet.HISTOGRAM``, a port of PyTorch's HistogramObserver), but
inside its own quantizer of an OpenVINO graph; computed here on ONNX Runtime's
histograms, one calibration gives the Q/DQ file of every backend.

The error is measured on the grid the CPU encodings give the tensor: a non-negative
tensor (a ReLU output) keeps ``[0, t]`` on 255 UINT8 steps, a signed one ``[-t, t]`` on
the symmetric 127 steps a side. Unlike pytorch-quantization, which scores each bin at
its centre, each bin's mass is spread evenly over the bin (SUBSAMPLES points), so a
threshold whose step is a few bins wide is not favoured by where the centres happen to
fall. A point mass needs no special handling: the zeros a ReLU emits are on every
grid, and clipping the values of a saturating ReLU6 costs their whole distance, so the
threshold keeps 6 to within a bin. Unlike KL, the error weighs each clipped value by
its squared distance: a handful of far outliers among many values pulls ``t`` out
part of the way, where KL would clip them.
"""

from __future__ import annotations

import numpy as np

from deploykit.stages.entropy import magnitude_histogram

UNSIGNED_STEPS = 255
SIGNED_STEPS = 127
# Candidate thresholds: at most MAX_CANDIDATES, no fewer bins kept than MIN_BINS (a
# histogram of 2048 |x| bins, `calibstats.ENTROPY_BINS` / 2).
MAX_CANDIDATES = 512
MIN_BINS = 16
SUBSAMPLES = 8


def mse_threshold(hist_abs: np.ndarray, width: float, steps: int) -> float:
    """Threshold on ``|x|`` with the least expected squared quantization error.

    ``hist_abs[k]`` counts the values with ``|x|`` in ``[k * width, (k + 1) * width)``;
    the grid has ``steps`` steps from 0 to the threshold. Ties keep the smallest
    threshold. A histogram with no mass keeps every bin.
    """
    bins = np.asarray(hist_abs, dtype=np.float64)
    n = bins.size
    if n == 0 or bins.sum() <= 0 or width <= 0:
        return n * width
    offsets = (np.arange(SUBSAMPLES) + 0.5) / SUBSAMPLES
    points = ((np.arange(n)[:, None] + offsets[None, :]) * width).reshape(-1)
    weights = np.repeat(bins / SUBSAMPLES, SUBSAMPLES)
    used = weights > 0
    points, weights = points[used], weights[used]
    first = min(n, MIN_BINS)
    stride = max(1, (n - first) // MAX_CANDIDATES)
    candidates = list(range(first, n + 1, stride))
    if candidates[-1] != n:
        candidates.append(n)
    best_t, best = n * width, np.inf
    for i in candidates:
        t = i * width
        step = t / steps
        q = np.minimum(np.round(points / step), steps) * step
        error = float(np.dot(weights, (points - q) ** 2))
        if error < best:
            best_t, best = t, error
    return best_t


def mse_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The ``[lo, hi]`` range a tensor's signed histogram over ``[-amax, amax]`` gives.

    A non-negative tensor (``lo >= 0``) is searched on its UINT8 grid from the positive
    half; a signed one on the symmetric grid from the two halves folded. The range is
    ``[max(lo, -t), min(hi, t)]``.
    """
    width = float(edges[1] - edges[0])
    # Nothing below zero: the folded histogram is the positive half, on the UINT8 grid.
    steps = UNSIGNED_STEPS if lo >= 0.0 else SIGNED_STEPS
    t = mse_threshold(magnitude_histogram(hist), width, steps)
    return max(float(lo), -t), min(float(hi), t)
