"""How reliable is `deploykit regress`? False alarms on unchanged models, and sensitivity.

    python -m deploykit.regress.reliability RUN_DIR [RUN_DIR...] --trials 20 --slowdown 0.2

Records a baseline for the run folders, then runs `trials` checks of the
unchanged artifacts (every alarm is a false alarm) and `trials` checks with a
real delay of `slowdown` x the baseline median added to every inference of the
first folder (every miss is a missed regression), and prints the counts and the
time one check takes. The delay is a busy wait, so it costs CPU time the way a
slower kernel would.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploykit import api
from deploykit.harness.environment import cpu_info
from deploykit.regress.measure import MeasureOptions
from deploykit.regress.verdict import CheckOptions


def busy_delay(extra_s: float) -> Callable[[str, Callable[[], None]], Callable[[], None]]:
    """A `wrap` for :func:`deploykit.api.regress` adding `extra_s` of busy work per inference."""

    def wrap(key: str, call: Callable[[], None]) -> Callable[[], None]:
        def slowed() -> None:
            call()
            end = time.perf_counter() + extra_s
            while time.perf_counter() < end:
                pass

        return slowed

    return wrap


def run(
    run_dirs: list[str],
    trials: int,
    slowdown: float,
    tolerance: float,
    options: MeasureOptions,
    pair: bool = True,
) -> dict[str, Any]:
    """Measure the false-alarm count and the detection count; see the module docstring."""
    check = CheckOptions(tolerance=tolerance, pair=pair)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = Path(tmp) / "baseline.json"
        api.regress(
            baseline, run_dirs=list(run_dirs), measure_options=options, update_baseline=True
        )
        stored = json.loads(baseline.read_text())
        first = next(iter(stored["entries"].values()))
        delay_s = slowdown * first["latency"]["p50_ms"] / 1e3
        first_key = next(iter(stored["entries"]))
        unchanged, detected, seconds, ratios = [], [], [], []
        for _ in range(trials):
            started = time.perf_counter()
            result = api.regress(
                baseline, run_dirs=list(run_dirs), check=check, measure_options=options
            )
            seconds.append(time.perf_counter() - started)
            unchanged.append(result["regressions"] > 0)
            ratios.append([round(v["ratio"], 3) for v in result["verdicts"]])
        slow_ratios = []
        for _ in range(trials):
            result = api.regress(
                baseline,
                run_dirs=[run_dirs[0]],
                check=check,
                measure_options=options,
                wrap=busy_delay(delay_s),
            )
            verdict = result["verdicts"][0]
            detected.append(verdict["verdict"] == "slower")
            slow_ratios.append(round(verdict["ratio"], 3))
    return {
        "cpu": cpu_info(),
        "entries": list(stored["entries"]),
        "trials": trials,
        "tolerance": tolerance,
        "rounds": options.rounds,
        "paired": pair,
        "false_alarms": sum(unchanged),
        "unchanged_ratios": ratios,
        "injected_slowdown": slowdown,
        "injected_on": first_key,
        "injected_delay_ms": delay_s * 1e3,
        "detected": sum(detected),
        "slowed_ratios": slow_ratios,
        "seconds_per_check": {"min": min(seconds), "max": max(seconds)},
    }


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--slowdown", type=float, default=0.20)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=0.3)
    parser.add_argument(
        "--no-pair", action="store_true", help="compare with stored numbers only (no A/B)"
    )
    args = parser.parse_args()
    options = MeasureOptions(rounds=args.rounds, runs=args.runs, min_seconds=args.min_seconds)
    result = run(
        args.run_dirs, args.trials, args.slowdown, args.tolerance, options, pair=not args.no_pair
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
