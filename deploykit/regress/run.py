"""`deploykit bench` and `deploykit regress`: measure run folders, judge them against a baseline."""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import UserError
from deploykit.fsutil import staged_dir
from deploykit.harness.environment import cpu_info, versions
from deploykit.harness.report import load_report
from deploykit.pipeline.records import gpu_device
from deploykit.pipeline.request import Step, quiet
from deploykit.regress.baseline import median

if TYPE_CHECKING:
    from deploykit.harness.report import Report
    from deploykit.regress.measure import MeasureOptions


def bench(
    run_dir: str | Path,
    runs: int = 100,
    warmup: int = 10,
    min_seconds: float = 2.0,
    threads: int | None = None,
    batch: int | None = None,
    rounds: int = 5,
    on_step: Step = quiet,
) -> dict[str, Any]:
    """Measure the latency of an existing run folder's backend artifact again.

    The runs and seconds are spread over `rounds` independent rounds, each paired
    with the reference workload, so the result can serve as `deploykit regress --current`.

    Returns:
        A dict with model, target, precision, device, versions, latency and the round data.
    """
    from deploykit.regress.measure import measure_run_dirs

    if rounds < 1 or runs < 1:
        raise UserError("--rounds and --runs must be at least 1")
    folder = Path(run_dir)
    report = load_report(folder)
    options = _spread(runs, warmup, min_seconds, threads, batch, rounds)
    measured = measure_run_dirs([folder], options, on_step=on_step)
    entry = next(iter(measured.entries.values()))
    lat = entry.latency
    return {
        "schema_version": 1,
        "kind": "bench",
        "run_dir": str(folder),
        "model": report.model,
        "target": report.target,
        "precision": report.precision,
        "effective_precision": report.effective_precision,
        "device": _device(report),
        "versions": versions(),
        "latency": {
            "p50_ms": lat.p50_ms,
            "p90_ms": lat.p90_ms,
            "p99_ms": lat.p99_ms,
            "mean_ms": lat.mean_ms,
            "std_ms": lat.std_ms,
            "runs": lat.runs,
            "rounds": len(lat.round_p50s_ms),
            "batch": entry.batch,
            "threads": entry.threads,
            "throughput_ips": entry.batch * 1e3 / lat.mean_ms,
        },
        "created": measured.created,
        "environment": measured.environment,
        "reference_workload": measured.reference_workload,
        "entry": entry.model_dump(mode="json"),
    }


def bench_several(
    run_dirs: list[str | Path],
    runs: int = 100,
    warmup: int = 10,
    min_seconds: float = 2.0,
    threads: int | None = None,
    batch: int | None = None,
    rounds: int = 5,
    on_step: Step = quiet,
    wrap: Any = None,
) -> dict[str, Any]:
    """Measure several run folders in one process, in interleaved rounds, each against the first.

    For the question "how much does this variant cost": a fallback model against the
    plain INT8 one, INT8 against FP32 or bf16 of the same model. Each round times every
    folder in turn (in reverse order every other round), so a load that comes and goes
    hits them alike; a folder's ratio is the median over the rounds of its p50 over the
    first folder's p50 in the same round.

    Args:
        run_dirs: Two or more run folders; the first is the base of the ratios.
        wrap: Wraps each timed call by label (tests inject delays with it).

    Returns:
        A dict with device, versions, rounds and one entry per folder (latency,
        per-round p50s, ratio to the first and the range of the per-round ratios).

    Raises:
        UserError: Fewer than two folders, or bad counts.
    """
    from deploykit.regress.measure import measure_run_dirs, run_batch

    if len(run_dirs) < 2:
        raise UserError("give two or more run folders to compare (one: deploykit bench RUN_DIR)")
    if rounds < 3 or runs < 1:
        raise UserError("comparing run folders needs --rounds of at least 3 and --runs of 1")
    folders = [Path(d) for d in run_dirs]
    labels = [f"{i + 1}: {d}" for i, d in enumerate(run_dirs)]
    reports = [load_report(folder) for folder in folders]
    batches = sorted({run_batch(r, batch) for r in reports})
    if len(batches) > 1:
        raise UserError(
            f"the run folders run different batches ({', '.join(map(str, batches))}); "
            "compare folders of one batch, or give --batch for dynamic-batch ones"
        )
    options = _spread(runs, warmup, min_seconds, threads, batch, rounds)
    measured = measure_run_dirs(folders, options, on_step=on_step, wrap=wrap, labels=labels)
    base = measured.entries[labels[0]].latency.round_p50s_ms
    entries = []
    for label, folder, report in zip(labels, folders, reports, strict=True):
        entry = measured.entries[label]
        ratios = [a / b for a, b in zip(entry.latency.round_p50s_ms, base, strict=True)]
        entries.append(
            {
                "run_dir": str(folder),
                "model": entry.model,
                "target": entry.target,
                "precision": entry.precision,
                "effective_precision": report.effective_precision,
                "batch": entry.batch,
                "threads": entry.threads,
                "p50_ms": entry.latency.p50_ms,
                "p90_ms": entry.latency.p90_ms,
                "fastest_round_p50_ms": min(entry.latency.round_p50s_ms),
                "runs": entry.latency.runs,
                "round_p50s_ms": entry.latency.round_p50s_ms,
                "ratio": median(ratios),
                "ratio_range": [min(ratios), max(ratios)],
            }
        )
    return {
        "schema_version": 1,
        "kind": "bench-compare",
        "device": _device(reports[0]),
        "versions": versions(),
        "created": measured.created,
        "rounds": rounds,
        "entries": entries,
    }


def _device(report: Report) -> dict[str, Any]:
    """What a run folder's artifact is measured on here: this CPU, or the CUDA GPU."""
    return cpu_info() if report.device.get("kind", "cpu") == "cpu" else gpu_device("cuda")


def _spread(
    runs: int, warmup: int, min_seconds: float, threads: int | None, batch: int | None, rounds: int
) -> MeasureOptions:
    """`bench`'s totals (runs, seconds) spread evenly over `rounds` rounds."""
    from deploykit.regress.measure import MeasureOptions

    return MeasureOptions(
        rounds=rounds,
        runs=-(-runs // rounds),
        min_seconds=min_seconds / rounds,
        warmup=warmup,
        threads=threads,
        batch=batch,
    )


def regress(
    baseline: str | Path,
    current: list[str | Path] | None = None,
    run_dirs: list[str | Path] | None = None,
    check: Any = None,
    measure_options: Any = None,
    update_baseline: bool = False,
    store_artifacts: bool = False,
    on_step: Step = quiet,
    wrap: Any = None,
) -> dict[str, Any]:
    """Compare measurements with a stored baseline, or record the baseline.

    Args:
        baseline: Baseline file (JSON, deploykit-measurements schema).
        current: Measurement files (`deploykit bench --json` outputs or measurement sets).
        run_dirs: Run folders to measure now, in interleaved rounds.
        check: :class:`deploykit.regress.verdict.CheckOptions`.
        measure_options: :class:`deploykit.regress.measure.MeasureOptions` for `run_dirs`.
        update_baseline: Write the current measurements into the baseline instead of judging.
        store_artifacts: With `update_baseline`, copy each measured run folder beside the
            baseline (``<baseline>.artifacts/``) so later checks can re-measure it (A/B).
        on_step: Progress callback.
        wrap: Wraps each timed call (benchmarks of the check itself inject delays with it).

    Returns:
        The verdicts (``regressions`` counts the failing entries), or what was recorded.

    Raises:
        UserError: Missing/corrupt baseline, schema mismatch, an entry missing from it.
    """
    from deploykit.regress.baseline import load_measurements, merge
    from deploykit.regress.measure import MeasureOptions, measure_run_dirs
    from deploykit.regress.verdict import (
        CheckOptions,
        environment_differences,
        judge,
        should_normalise,
    )

    check = check or CheckOptions()
    if not 0 < check.tolerance < 1:
        raise UserError(f"tolerance must be between 0% and 100%, got {100 * check.tolerance:g}%")
    if check.normalise not in ("auto", "on", "off"):
        raise UserError(f"--normalise must be auto, on or off, not {check.normalise!r}")
    path = Path(baseline)
    stored = None
    if not update_baseline or path.exists():
        stored = load_measurements(path, "baseline")
    sets = [load_measurements(Path(f), "current measurements") for f in current or []]
    unpaired: dict[str, str] = {}
    if run_dirs:
        options = measure_options or MeasureOptions()
        if update_baseline:
            # The baseline is judged against many later runs: measure it twice as long, so
            # its own noise adds little to theirs.
            options = dataclasses.replace(options, rounds=2 * options.rounds)

        def pair_with(key: str) -> Path | None:
            if update_baseline or stored is None or not check.pair:
                return None
            found, reason = _baseline_artifact(stored, key, path.parent)
            if found is None:
                unpaired[key] = reason
            return found

        sets.append(
            measure_run_dirs([Path(d) for d in run_dirs], options, on_step, wrap, pair_with)
        )
    measured = merge(sets)
    if update_baseline and store_artifacts:
        _store_artifacts(measured, path)
    if update_baseline:
        if stored is not None:
            new = stored.model_copy(deep=True)
            new.entries.update(measured.entries)
            new.environment, new.created = measured.environment, measured.created
            new.rounds = measured.rounds
        else:
            new = measured
        try:
            new.save(path)
        except OSError as exc:
            raise UserError(f"cannot write baseline {path}: {exc.strerror}") from exc
        return {
            "schema_version": 1,
            "kind": "regress-update",
            "baseline": str(path),
            "updated": sorted(measured.entries),
            "entries": sorted(new.entries),
            "environment_differences": (
                environment_differences(stored, measured) if stored else []
            ),
            "regressions": 0,
        }
    assert stored is not None
    verdicts = judge(stored, measured, check)
    for verdict in verdicts:
        if verdict.key in unpaired:
            verdict.notes.append(
                f"unpaired ({unpaired[verdict.key]}): compared with the stored numbers, "
                "which carry the machine's drift since the baseline was recorded"
            )
    return {
        "schema_version": 1,
        "kind": "regress",
        "baseline": str(path),
        "rounds": measured.rounds,
        "normalised": should_normalise(check, stored, measured),
        "options": asdict(check),
        "environment_differences": environment_differences(stored, measured),
        "verdicts": [v.to_dict() for v in verdicts],
        "regressions": sum(v.regression for v in verdicts),
        "current": measured.model_dump(mode="json"),
    }


def _store_artifacts(measured: Any, baseline: Path) -> None:
    """Copy each entry's run folder under ``<baseline>.artifacts/`` and point the entry at it."""
    root = baseline.with_name(baseline.name + ".artifacts")
    for key, entry in measured.entries.items():
        if not entry.run_dir:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
        source = Path(entry.run_dir)
        report = load_report(source)
        backend_dir = report.backend_folder()
        # What a later run needs: report.json and the backend artifact (not the ONNX stages).
        with staged_dir(root / name) as work:
            shutil.copy2(source / "report.json", work / "report.json")
            shutil.copytree(source / backend_dir, work / backend_dir)
        entry.run_dir = str((root / name).relative_to(baseline.parent))


def _baseline_artifact(stored: Any, key: str, base_dir: Path) -> tuple[Path | None, str]:
    """The baseline entry's run folder if it still holds the very artifact measured then."""
    from deploykit.regress.measure import artifact_digest

    entry = stored.entries.get(key)
    if entry is None or not entry.run_dir or not entry.artifact_sha256:
        return None, "the baseline records no artifact"
    folder = base_dir / entry.run_dir  # relative paths are relative to the baseline file
    try:
        report = load_report(folder)
    except UserError:
        return None, f"baseline run folder {folder} is gone"
    if artifact_digest(folder, report) != entry.artifact_sha256:
        return None, f"the artifact in {folder} changed since the baseline was recorded"
    return folder, ""
