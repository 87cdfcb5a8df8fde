"""95% confidence intervals for the figures of one evaluation.

A figure measured on a small set moves with the set: on 20 labelled photos one
image is 5 points of top-1, and on 256 views one view is 0.4 point of agreement.
Every evaluation therefore carries an interval next to each figure, so a reader
can tell a difference the set resolves from one it does not:

- proportions (top-1, top-5, top-1 agreement, agreement on the decisive inputs):
  the Wilson score interval, which stays inside [0, 100] and is honest at 20/20;
- means of per-input values (top-5 overlap) and paired differences (the top-1
  drop against the reference, scored on the same inputs): a percentile bootstrap
  over the inputs with a fixed seed, so the same outputs give the same interval.

Both treat the inputs as independent draws. Views augmented from one photo are
not (the natural-image sets hold 64 views of each of 4 photos): two crops of the
same cat tend to be right or wrong together. For such sets the caller passes each
input's source photo, and every interval is a cluster bootstrap instead: resample
the photos with replacement, keep all the views of each pick, and recompute the
figure (Davison and Hinkley 1997, section 3.8). With few photos that interval is
wide, which is the point: it says how much the set can resolve. With very few (4)
it is itself rough, since 4 photos admit only 35 distinct resamples.
"""

from __future__ import annotations

import math

import numpy as np

# Two-sided 95%: the standard normal quantile at 0.975.
Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
# Resamples drawn at once: bounds the index array to CHUNK x inputs (10,000 inputs: 16 MB).
_CHUNK = 200


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion, in percent.

    Args:
        successes: Inputs that count (e.g. whose top-1 class is right).
        n: Inputs.
        z: Normal quantile of the confidence level.

    Raises:
        ValueError: When ``n < 1`` or `successes` is outside ``[0, n]``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * max(0.0, centre - half), 100.0 * min(1.0, centre + half)


def bootstrap_mean(
    values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of per-input `values`.

    Deterministic for a given `seed`. The interval is in the values' own unit.

    Raises:
        ValueError: When `values` is empty.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        count = min(_CHUNK, resamples - start)
        picks = rng.integers(0, flat.size, size=(count, flat.size))
        means.append(flat[picks].mean(axis=1))
    lo, hi = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(lo), float(hi)


def cluster_bootstrap_mean(
    values: np.ndarray,
    groups: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap 95% interval of the mean of `values` when inputs come in groups.

    Each resample draws as many groups as there are, with replacement, and takes the
    mean over all the inputs of the drawn groups (a ratio estimate: large groups
    weigh more). `mask` restricts the mean to some inputs (e.g. the decisive ones)
    while the groups are still drawn whole. Deterministic for a given `seed`.

    Raises:
        ValueError: When no input is selected, or `groups` does not match `values`.
    """
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    ids = np.asarray(groups).reshape(-1)
    keep = np.ones(flat.size, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if ids.size != flat.size or keep.size != flat.size:
        raise ValueError(f"{flat.size} values but {ids.size} groups and {keep.size} mask entries")
    if not keep.any():
        raise ValueError("no values to bootstrap")
    _, codes = np.unique(ids, return_inverse=True)
    count = int(codes.max()) + 1
    sums = np.bincount(codes[keep], weights=flat[keep], minlength=count)
    sizes = np.bincount(codes[keep], minlength=count).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        picks = rng.integers(0, count, size=(min(_CHUNK, resamples - start), count))
        drawn = sizes[picks].sum(axis=1)
        # A resample of only groups without selected inputs has no mean; it is left out.
        means.append(sums[picks].sum(axis=1)[drawn > 0] / drawn[drawn > 0])
    lo, hi = np.percentile(np.concatenate(means), [2.5, 97.5])
    return float(lo), float(hi)


def resampled_groups(groups: np.ndarray | None) -> int | None:
    """How many source photos the intervals resample: None when the inputs count as
    independent (no groups, or a single photo, which cannot be resampled)."""
    if groups is None:
        return None
    count = int(np.unique(groups).size)
    return count if count > 1 else None


def evaluation_intervals(
    samples: int,
    agree: np.ndarray,
    overlaps: np.ndarray,
    hits: dict[str, np.ndarray] | None,
    decisive: np.ndarray | None,
    groups: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """The 95% intervals of one evaluation's figures, in percent (points for ``drop``).

    Args:
        samples: Inputs evaluated.
        agree: Per input: True when its top-1 class matches the reference's.
        overlaps: Per-input fraction of the reference's top-5 in the artifact's top-5.
        hits: Per-input label hits of the artifact (``top1``, ``top5``) and the
            reference (``fp32_top1``, ``fp32_top5``), or None for an unlabelled set.
        decisive: Per input: True when the reference leads its runner-up by the
            decisive margin (`deploykit.harness.evaluate.decisive_mask`); None for
            outputs with fewer than two classes.
        groups: Source photo of each input for sets of augmented views: every interval
            is then a cluster bootstrap over the photos. None: inputs are independent.

    Returns:
        ``top1_agreement`` and ``top5_overlap`` always; ``top1``, ``top5``,
        ``fp32_top1``, ``fp32_top5`` and ``drop`` with labels; ``decisive_agreement``
        when some input is decisive.
    """
    agree = np.asarray(agree, dtype=bool).reshape(-1)
    if groups is not None and resampled_groups(groups):
        return _grouped_intervals(agree, overlaps, hits, decisive, np.asarray(groups))
    result = {
        "top1_agreement": list(wilson(int(agree.sum()), samples)),
        "top5_overlap": [100.0 * v for v in bootstrap_mean(overlaps)],
    }
    if decisive is not None and decisive.any():
        result["decisive_agreement"] = list(wilson(int(agree[decisive].sum()), int(decisive.sum())))
    if hits is not None:
        for name, hit in hits.items():
            result[name] = list(wilson(int(hit.sum()), samples))
        paired = hits["fp32_top1"].astype(np.float64) - hits["top1"].astype(np.float64)
        result["drop"] = [100.0 * v for v in bootstrap_mean(paired)]
    return _rounded(result)


def _grouped_intervals(
    agree: np.ndarray,
    overlaps: np.ndarray,
    hits: dict[str, np.ndarray] | None,
    decisive: np.ndarray | None,
    groups: np.ndarray,
) -> dict[str, list[float]]:
    """:func:`evaluation_intervals` for inputs grouped by source photo."""

    def percent(values: np.ndarray, mask: np.ndarray | None = None) -> list[float]:
        lo, hi = cluster_bootstrap_mean(values, groups, mask=mask)
        return [100.0 * lo, 100.0 * hi]

    result = {"top1_agreement": percent(agree), "top5_overlap": percent(overlaps)}
    if decisive is not None and decisive.any():
        result["decisive_agreement"] = percent(agree, mask=decisive)
    if hits is not None:
        for name, hit in hits.items():
            result[name] = percent(hit)
        result["drop"] = percent(hits["fp32_top1"].astype(np.float64) - hits["top1"])
    return _rounded(result)


def _rounded(result: dict[str, list[float]]) -> dict[str, list[float]]:
    return {name: [round(lo, 2), round(hi, 2)] for name, (lo, hi) in result.items()}


# The intervals a one-line summary shows (all of them are in the JSON), in this order.
_SHOWN = (
    ("top1", "top-1"),
    ("drop", "drop"),
    ("top1_agreement", "top-1 agreement"),
    ("top5_overlap", "top-5 overlap"),
)


def interval_text(intervals: dict[str, list[float]] | None, groups: int | None = None) -> str:
    """`` · 95% intervals: top-1 64.0-94.8%, drop -0.0 to +15.0 pt, ...``, or nothing for a
    result written before intervals existed. `groups`: the number of source photos a
    cluster bootstrap resampled, said in the text."""
    if not intervals:
        return ""
    parts = []
    for name, label in _SHOWN:
        if name not in intervals:
            continue
        lo, hi = intervals[name]
        if name == "drop":
            parts.append(f"{label} {lo:+.1f} to {hi:+.1f} pt")
        else:
            parts.append(f"{label} {lo:.1f}-{hi:.1f}%")
    if not parts:
        return ""
    by = f" (resampling the {groups} source photos)" if groups else ""
    return f" · 95% intervals{by}: " + ", ".join(parts)
