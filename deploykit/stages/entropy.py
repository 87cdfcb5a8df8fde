"""Entropy (KL) calibration thresholds: TensorRT's search, on ONNX Runtime's histograms.

ONNX Runtime's HistogramCalibrater collects one histogram per tensor over
``[-amax, amax]``; deploykit keeps that collection but picks each threshold itself,
with the algorithm of TensorRT's entropy calibrator (Migacz, "8-bit Inference with
TensorRT", GTC 2017; NVIDIA's pytorch-quantization ``_compute_amax_entropy``):

- the histogram is of ``|x|``, so the candidate thresholds run over the magnitude and
  all of the 128 levels of a signed INT8 grid cover data;
- the first bin (the zeros a ReLU emits) is flattened to its neighbour's count before
  the search, so the zero spike does not decide the threshold.

ONNX Runtime's own ``compute_entropy`` (1.32) does neither: it searches the signed
histogram, so a ReLU output (nothing below zero) is modelled with half the levels it
has, and the zero spike dominates the divergence. On EfficientNet-Lite0 with real
weights it clipped the last ReLU6 (1280 channels, range [0, 6]) to [0, 0.38], and the
INT8 model agreed with FP32 on 0% of the natural-image views (ONNX Runtime) and 31%
(OpenVINO); with this search the same tensor keeps [0, 6] and agreement is 86%, in line
with the published loss of entropy calibration on EfficientNet (docs/accuracy.md).
"""

from __future__ import annotations

import numpy as np

# Levels of the signed INT8 grid the divergence is measured against: the portable
# symmetric encoding (and TensorRT's), the coarsest one any backend receives.
LEVELS = 128
MAX_CANDIDATES = 2048
SMOOTHING = 1e-4
SPIKE_SHARE = 0.01
SPIKE_RATIO = 10.0


def kl_threshold_bins(hist_abs: np.ndarray, levels: int = LEVELS) -> int:
    """Number of leading |x| bins to keep: the cut with the least KL divergence.

    For each candidate ``i`` (``levels`` .. ``len(hist_abs)`` bins kept), the reference
    distribution is the first ``i`` bins with everything beyond folded into the last;
    the candidate is those ``i`` bins merged into ``levels`` groups and spread back
    evenly over each group's non-empty bins. Ties keep the smallest ``i``.
    """
    bins = np.asarray(hist_abs, dtype=np.float64).copy()
    n = bins.size
    if n <= levels:
        return n
    bins[0] = bins[1]
    floor = _flatten_spikes(bins)
    total = bins.sum()
    if total <= 0:
        return n
    tail = total - np.cumsum(bins)  # mass beyond the first i bins is tail[i - 1]
    nonzero = bins > 0
    best_i, best = n, np.inf
    # A histogram that grew while merging batches can be far longer than the search
    # needs; candidates are spaced so that at most MAX_CANDIDATES are tried.
    first = max(levels, floor)
    stride = max(1, (n - first) // MAX_CANDIDATES)
    for i in range(first, n + 1, stride):
        kept = bins[:i]
        group = (np.arange(i) * levels) // i
        mass = np.bincount(group, weights=kept, minlength=levels)
        count = np.bincount(group, weights=nonzero[:i], minlength=levels)
        q = np.where(nonzero[:i], mass[group] / np.maximum(count[group], 1.0), 0.0)
        p = kept.copy()
        p[-1] += tail[i - 1]
        if not q.any():  # every kept bin empty: all the mass is clipped
            continue
        p /= p.sum()
        q /= q.sum()
        used = p > 0
        # Clipped mass in a bin the candidate leaves empty (sparse outliers beyond an
        # empty stretch) would make the divergence infinite; like ONNX Runtime, give
        # such bins SMOOTHING of the mass instead (then renormalized).
        holes = used & (q == 0)
        if holes.any():
            q = q + SMOOTHING * holes
            q /= q.sum()
        divergence = float(np.sum(p[used] * np.log(p[used] / q[used])))
        if divergence < best:
            best_i, best = i, divergence
    return best_i


def entropy_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The ``[lo, hi]`` range a tensor's signed histogram over ``[-amax, amax]`` gives.

    The threshold ``t`` comes from the |x| histogram (the two halves folded); the range
    is ``[max(lo, -t), min(hi, t)]``, so a ReLU output keeps ``[0, t]``.
    """
    width = float(edges[1] - edges[0])
    t = kl_threshold_bins(magnitude_histogram(hist)) * width
    return max(float(lo), -t), min(float(hi), t)


def magnitude_histogram(hist: np.ndarray) -> np.ndarray:
    """The ``|x|`` histogram of a signed one over ``[-amax, amax]``: the halves folded."""
    hist = np.asarray(hist)
    half = hist.size // 2
    return hist[half:] + hist[:half][::-1]


def _flatten_spikes(bins: np.ndarray) -> int:
    """Flatten point masses in place; return the fewest bins that keep them all in range.

    A spike is a bin holding at least SPIKE_SHARE of the mass and SPIKE_RATIO times
    both neighbours: one exact value (a constant image background after normalisation,
    a ReLU6 saturating at 6). The KL search compares shapes; a spike merged with its
    neighbours looks like a large divergence wherever the cut falls, so the search would
    pick the cut that isolates it and clip everything beyond (the 28x28 Fashion-MNIST
    input clipped at its background value, 0.81 of 2.02). Like TensorRT's zero bin, a
    spike gets its neighbours' count for the search, and the threshold must keep it.
    """
    total = bins.sum()
    if total <= 0 or bins.size < 3:
        return 0
    padded = np.concatenate([[0.0], bins, [0.0]])
    neighbours = np.maximum(padded[:-2], padded[2:])
    spikes = np.flatnonzero((bins >= SPIKE_SHARE * total) & (bins >= SPIKE_RATIO * neighbours))
    for k in spikes:
        bins[k] = neighbours[k]
    return int(spikes.max()) + 1 if spikes.size else 0
