"""Latency measurement on the CPU: warm-up, many timed runs, percentiles, throughput."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LatencyOptions:
    """How long to measure.

    Attributes:
        warmup_runs: Untimed runs first (allocations, JIT, caches).
        warmup_seconds: Keep warming up at least this long.
        runs: Minimum number of timed runs.
        min_seconds: Keep timing at least this long.
        max_seconds: Stop timing after this long, even below `runs` (at least 10 runs).
    """

    warmup_runs: int = 10
    warmup_seconds: float = 0.5
    runs: int = 100
    min_seconds: float = 2.0
    max_seconds: float = 60.0


@dataclass(frozen=True)
class LatencyStats:
    """Latency figures of one measurement (milliseconds per call)."""

    p10_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    runs: int
    batch: int
    threads: int
    throughput_ips: float
    total_seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def stats_from_samples(
    samples_s: np.ndarray, batch: int, threads: int, total_seconds: float
) -> LatencyStats:
    """Summarise per-call durations (seconds) into latency statistics."""
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        raise ValueError("no latency samples")
    p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
    mean = float(ms.mean())
    return LatencyStats(
        p10_ms=float(p10),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=mean,
        std_ms=float(ms.std(ddof=1)) if ms.size > 1 else 0.0,
        min_ms=float(ms.min()),
        runs=int(ms.size),
        batch=batch,
        threads=threads,
        throughput_ips=batch * 1e3 / mean if mean > 0 else 0.0,
        total_seconds=total_seconds,
    )


def measure(
    call: Callable[[], object],
    batch: int,
    threads: int,
    options: LatencyOptions | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> LatencyStats:
    """Time `call` like a benchmark tool.

    Warm-up runs first (at least ``warmup_runs`` and ``warmup_seconds``), then
    each call is timed with ``perf_counter_ns`` until at least ``runs`` calls
    and ``min_seconds`` have passed (or ``max_seconds``, with at least 10 runs).

    Args:
        call: Runs one inference synchronously.
        batch: Batch size of one call, for throughput.
        threads: Thread count the runtime uses, recorded in the result.
        options: Measurement lengths.
        on_progress: Called as (done, planned) while timing.

    Returns:
        The latency statistics.
    """
    opts = options or LatencyOptions()
    start = time.perf_counter()
    done = 0
    while done < opts.warmup_runs or time.perf_counter() - start < opts.warmup_seconds:
        call()
        done += 1
    samples: list[int] = []
    clock = time.perf_counter_ns
    began = clock()
    deadline_min = began + int(opts.min_seconds * 1e9)
    deadline_max = began + int(opts.max_seconds * 1e9)
    while True:
        t0 = clock()
        call()
        t1 = clock()
        samples.append(t1 - t0)
        n = len(samples)
        if on_progress is not None and n % 10 == 0:
            on_progress(n, opts.runs)
        if n >= opts.runs and t1 >= deadline_min:
            break
        if t1 >= deadline_max and n >= 10:
            break
    total = (clock() - began) / 1e9
    return stats_from_samples(np.asarray(samples) / 1e9, batch, threads, total)


def measure_alternating(
    call_a: Callable[[], object],
    call_b: Callable[[], object],
    blocks: int,
    pairs: int,
    warmup_pairs: int = 10,
) -> tuple[list[float], list[float]]:
    """Time two calls run by run, alternately, in `blocks` blocks of `pairs` pairs.

    Each pair runs both calls back to back, A first in even pairs and B first in odd
    ones, so neither side always follows the other. A load that comes and goes
    within a block hits both sides, which block-level interleaving (one side for a
    second, then the other) does not guarantee on a shared VM.

    Returns:
        Per block, the median of A's calls and the median of B's calls (milliseconds).
    """
    for _ in range(warmup_pairs):
        call_a()
        call_b()
    clock = time.perf_counter_ns
    a_medians: list[float] = []
    b_medians: list[float] = []
    for _ in range(blocks):
        times: dict[int, list[int]] = {0: [], 1: []}
        for i in range(pairs):
            for side in (0, 1) if i % 2 == 0 else (1, 0):
                call = call_a if side == 0 else call_b
                t0 = clock()
                call()
                times[side].append(clock() - t0)
        a_medians.append(float(np.median(times[0])) / 1e6)
        b_medians.append(float(np.median(times[1])) / 1e6)
    return a_medians, b_medians
