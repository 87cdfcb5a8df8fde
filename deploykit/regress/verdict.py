"""Noise-aware verdicts: a slowdown counts only when it exceeds the tolerance AND the noise.

For each entry the statistic is the ratio, current over baseline, of the 20%
trimmed mean of the rounds' p50s (raw latencies, or latencies divided by the
reference workload when normalising): it uses more of the rounds than a median
and still drops the outlier rounds a busy neighbour causes.
Its confidence interval comes from a bootstrap over the rounds
of both sides (fixed seed, so a verdict is reproducible from its inputs):

- ``slower``: ratio > 1 + tolerance and the whole interval lies above 1;
- ``faster``: ratio < 1 - tolerance and the whole interval lies below 1;
- ``noisy``: beyond the tolerance but the interval reaches 1 (inconclusive);
- ``ok``: within the tolerance.

When the baseline artifact was re-measured in the same rounds (A/B pairing),
the statistic is the geometric 20% trimmed mean of the per-round ratios and
the bootstrap resamples whole rounds, keeping each pair together: what slows
the machine during one round slows both sides of that round, so it cancels in
the round's ratio instead of widening the interval. Bootstrapping the two
sides independently ignores that pairing; on a loaded 2-core CI runner it
once put a real +100% slowdown (ratio 1.61) at an interval of 0.86-, i.e.
"noisy".

Normalising by the reference workload did not narrow the spread of unchanged
re-runs on the shared 2-core VM this was developed on (mobilenet_v2 on
OpenVINO, 14 re-runs: raw 0.91-1.10, normalised 0.82-1.08 of their median; the
reference correlated only weakly with the model, r = 0.45), because the short
reference workload adds noise of its own. So raw latencies are compared on the
same CPU, and normalised ones when the baseline was measured on a different
CPU (``normalise="auto"``), where raw figures would not be comparable at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.regress.baseline import Entry, Measurements

MIN_ROUNDS = 3
_BOOTSTRAP = 2000
_CONFIDENCE = 0.90
_TRIM = 0.2


@dataclass(frozen=True)
class CheckOptions:
    """Thresholds of a regression check.

    Attributes:
        tolerance: Allowed relative latency change (0.10 = 10%).
        accuracy_tolerance: Allowed drop of top-1 / top-1 agreement, in points.
        cosine_tolerance: Allowed drop of the fidelity cosine.
        normalise: ``auto``, ``on`` or ``off``: compare latencies divided by the
            reference workload's.
        pair: When the baseline's own artifact is still on disk (unchanged, checked by
            sha256), re-measure it in the same rounds as the current one and compare
            the two (A/B), instead of comparing with numbers stored minutes or days ago.
    """

    tolerance: float = 0.10
    accuracy_tolerance: float = 1.0
    cosine_tolerance: float = 1e-3
    normalise: str = "auto"
    pair: bool = True


@dataclass
class EntryVerdict:
    """The verdict for one entry."""

    key: str
    verdict: str
    ratio: float | None
    ci_low: float | None
    ci_high: float | None
    noise_pct: float | None
    baseline_p50_ms: float | None
    current_p50_ms: float | None
    normalised: bool
    paired: bool = False
    stored_baseline_p50_ms: float | None = None
    accuracy: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regression(self) -> bool:
        """Whether this entry fails the check."""
        return self.verdict in ("slower", "accuracy")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {**asdict(self), "regression": self.regression}


def environment_differences(baseline: Measurements, current: Measurements) -> list[str]:
    """Human-readable differences between the measuring environments."""
    diffs = []
    b_cpu, c_cpu = baseline.environment.get("cpu", {}), current.environment.get("cpu", {})
    for key in ("name", "cores", "features"):
        if b_cpu.get(key) != c_cpu.get(key):
            diffs.append(f"cpu {key}: {b_cpu.get(key)} -> {c_cpu.get(key)}")
    b_ver, c_ver = baseline.environment.get("versions", {}), current.environment.get("versions", {})
    for key in sorted(set(b_ver) | set(c_ver)):
        if b_ver.get(key) != c_ver.get(key):
            diffs.append(f"{key}: {b_ver.get(key)} -> {c_ver.get(key)}")
    if baseline.reference_workload != current.reference_workload:
        diffs.append(
            f"reference workload: {baseline.reference_workload} -> {current.reference_workload}"
        )
    return diffs


def should_normalise(options: CheckOptions, baseline: Measurements, current: Measurements) -> bool:
    """Resolve ``normalise=auto``: on when the CPU (model or usable cores) differs."""
    if options.normalise in ("on", "off"):
        return options.normalise == "on"
    b_cpu, c_cpu = baseline.environment.get("cpu", {}), current.environment.get("cpu", {})
    return any(b_cpu.get(k) != c_cpu.get(k) for k in ("name", "cores"))


def trimmed_mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean after dropping the lowest and highest 20% (at least one each from 5 values on)."""
    data = np.sort(np.asarray(values, dtype=np.float64), axis=axis)
    n = data.shape[axis]
    cut = int(n * _TRIM) if n >= 5 else 0
    kept = np.take(data, range(cut, n - cut), axis=axis)
    return np.asarray(kept.mean(axis=axis))


def ratio_interval(
    base: list[float], cur: list[float], seed: int = 0
) -> tuple[float, float, float]:
    """Ratio of trimmed means (cur / base) over rounds, and its bootstrap confidence interval."""
    b = np.asarray(base, dtype=np.float64)
    c = np.asarray(cur, dtype=np.float64)
    ratio = float(trimmed_mean(c) / trimmed_mean(b))
    rng = np.random.default_rng(seed)
    bs = trimmed_mean(rng.choice(b, size=(_BOOTSTRAP, b.size)), axis=1)
    cs = trimmed_mean(rng.choice(c, size=(_BOOTSTRAP, c.size)), axis=1)
    tail = (1 - _CONFIDENCE) / 2 * 100
    low, high = np.percentile(cs / bs, [tail, 100 - tail])
    return ratio, float(low), float(high)


def paired_ratio_interval(
    base: list[float], cur: list[float], seed: int = 0
) -> tuple[float, float, float]:
    """Geometric trimmed mean of per-round ratios (cur / base) and its paired bootstrap interval.

    Raises:
        ValueError: The two sides have different numbers of rounds.
    """
    if len(base) != len(cur):
        raise ValueError(f"paired rounds differ in number: {len(base)} vs {len(cur)}")
    logs = np.log(np.asarray(cur, dtype=np.float64) / np.asarray(base, dtype=np.float64))
    ratio = float(np.exp(trimmed_mean(logs)))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, logs.size, size=(_BOOTSTRAP, logs.size))
    boot = np.exp(trimmed_mean(logs[picks], axis=1))
    tail = (1 - _CONFIDENCE) / 2 * 100
    low, high = np.percentile(boot, [tail, 100 - tail])
    return ratio, float(low), float(high)


def _values(entry: Entry, normalised: bool) -> list[float]:
    if not normalised:
        return list(entry.latency.round_p50s_ms)
    ref = float(trimmed_mean(np.asarray(entry.latency.reference_round_p50s_ms)))
    return [v / ref for v in entry.latency.round_p50s_ms]


def _accuracy_findings(base: Entry, cur: Entry, options: CheckOptions) -> list[str]:
    findings = []
    for key in ("top1", "top1_agreement"):
        if key in base.accuracy and key in cur.accuracy:
            drop = 100 * (base.accuracy[key] - cur.accuracy[key])
            if drop > options.accuracy_tolerance:
                findings.append(
                    f"{key} {100 * cur.accuracy[key]:.2f}% vs baseline "
                    f"{100 * base.accuracy[key]:.2f}% (-{drop:.2f} pt > "
                    f"{options.accuracy_tolerance:g} pt)"
                )
    if "fidelity_cosine" in base.accuracy and "fidelity_cosine" in cur.accuracy:
        b, c = base.accuracy["fidelity_cosine"], cur.accuracy["fidelity_cosine"]
        if b - c > options.cosine_tolerance:
            findings.append(f"fidelity cosine {c:.6f} vs baseline {b:.6f}")
    return findings


def judge_entry(
    base: Entry, cur: Entry, options: CheckOptions, normalised: bool, paired: bool = False
) -> EntryVerdict:
    """Compare one entry with its baseline.

    Args:
        base: The baseline entry (stored, or re-measured when `paired`).
        cur: The current entry.
        options: Thresholds.
        normalised: Divide latencies by the reference workload's.
        paired: `base` was timed in the same rounds as `cur`, round i next to round i.
    """
    b_vals, c_vals = _values(base, normalised), _values(cur, normalised)
    if paired and len(b_vals) == len(c_vals):
        ratio, low, high = paired_ratio_interval(b_vals, c_vals)
    else:
        ratio, low, high = ratio_interval(b_vals, c_vals)
    tol = options.tolerance
    notes: list[str] = []
    if ratio > 1 + tol:
        verdict = "slower" if low > 1 else "noisy"
    elif ratio < 1 - tol:
        verdict = "faster" if high < 1 else "noisy"
    else:
        verdict = "ok"
    if min(len(b_vals), len(c_vals)) < MIN_ROUNDS and verdict in ("slower", "faster"):
        verdict = "noisy"
        notes.append(f"fewer than {MIN_ROUNDS} rounds: the noise cannot be estimated")
    if base.threads != cur.threads:
        notes.append(f"threads differ: {base.threads} -> {cur.threads}")
    accuracy = _accuracy_findings(base, cur, options)
    if accuracy and verdict != "slower":
        verdict = "accuracy"
    return EntryVerdict(
        key=cur.key,
        verdict=verdict,
        ratio=ratio,
        ci_low=low,
        ci_high=high,
        noise_pct=100 * (high - low) / 2 / ratio,
        baseline_p50_ms=base.latency.p50_ms,
        current_p50_ms=cur.latency.p50_ms,
        normalised=normalised,
        paired=paired,
        accuracy=accuracy,
        notes=notes,
    )


def judge(
    baseline: Measurements, current: Measurements, options: CheckOptions
) -> list[EntryVerdict]:
    """Verdicts for every current entry.

    Raises:
        UserError: A current entry has no baseline entry.
    """
    missing = [key for key in current.entries if key not in baseline.entries]
    if missing:
        raise UserError(
            f"{', '.join(missing)} not in the baseline (it has "
            f"{', '.join(baseline.entries) or 'no entries'}); add it with --update-baseline"
        )
    normalised = should_normalise(options, baseline, current)
    verdicts = []
    for key, cur in current.entries.items():
        stored = baseline.entries[key]
        twin = current.paired.get(key)
        if twin is None:
            verdict = judge_entry(stored, cur, options, normalised)
        else:
            # A/B: the baseline artifact was timed in the same rounds; its accuracy is stored.
            verdict = judge_entry(
                twin.model_copy(update={"accuracy": stored.accuracy}),
                cur,
                options,
                normalised=False,
                paired=True,
            )
            verdict.notes.append("paired: baseline artifact re-measured in the same rounds")
        verdict.stored_baseline_p50_ms = stored.latency.p50_ms
        verdicts.append(verdict)
    return verdicts
