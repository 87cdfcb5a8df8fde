"""Measure run folders in interleaved rounds, each paired with the reference workload.

Round r times every candidate in turn, and right after each candidate the
reference workload on the same backend, so both see the same machine state.
A slow drift of a shared machine then hits every candidate and its reference
alike, and the spread of the rounds is an honest estimate of the noise.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from deploykit.backends.base import CompiledArtifact, Runner
from deploykit.backends.registry import require_backend
from deploykit.errors import UserError
from deploykit.fsutil import sha256_file
from deploykit.harness.environment import cpu_info, versions
from deploykit.harness.inputs import synthetic_images
from deploykit.harness.latency import LatencyOptions, LatencyStats, measure
from deploykit.harness.report import Report, load_report
from deploykit.regress.baseline import (
    Entry,
    EntryLatency,
    Measurements,
    entry_key,
    median,
)
from deploykit.regress.reference import REFERENCE_NAME, ReferenceWorkload

Step = Callable[[str], None]
# (entry key, the timed call) -> the call actually timed; benchmarks use it to inject delays.
Wrap = Callable[[str, Callable[[], None]], Callable[[], None]]


@dataclass(frozen=True)
class MeasureOptions:
    """How to measure.

    Attributes:
        rounds: Independent interleaved rounds (the noise estimate needs at least 3).
        runs: Minimum timed runs per round and candidate.
        min_seconds: Minimum timing per round and candidate.
        warmup: Warm-up runs before each timing.
        threads: Override the run folders' thread counts.
        batch: Override the run folders' batch (dynamic-batch artifacts only).
        fresh_runner: Load the artifact anew for every round. Off by default: on the shared
            2-core VM this was developed on, 14 fresh loads of one IR varied no more than
            14 time slices of one load (cv 7-17% either way), so the time is better spent
            measuring.
    """

    rounds: int = 20
    runs: int = 10
    min_seconds: float = 0.3
    warmup: int = 3
    threads: int | None = None
    batch: int | None = None
    fresh_runner: bool = False

    def validate(self) -> None:
        """Raise UserError on values that cannot be measured."""
        if self.rounds < 1 or self.runs < 1 or self.min_seconds < 0 or self.warmup < 0:
            raise UserError("--rounds and --runs must be at least 1, timings not negative")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")


_TWIN = "#baseline"


@dataclass
class _Candidate:
    key: str
    folder: Path
    report: Report
    artifact: CompiledArtifact
    batch: int
    runner: Runner
    reference: ReferenceWorkload | None
    call: Callable[[], None]
    wrap: Wrap | None = None


def measure_run_dirs(
    run_dirs: list[Path],
    options: MeasureOptions,
    on_step: Step = lambda _: None,
    wrap: Wrap | None = None,
    pair_with: Callable[[str], Path | None] | None = None,
    labels: list[str] | None = None,
) -> Measurements:
    """Measure each run folder's compiled artifact in interleaved rounds.

    Args:
        run_dirs: Run folders made by `deploykit export`.
        options: How long and how often to measure.
        on_step: Progress callback.
        wrap: Wraps each timed call of the run folders (not of paired baselines).
        pair_with: Entry key -> a baseline run folder to re-measure in the same rounds
            (A/B interleaving), or None.
        labels: One key per run folder instead of its baseline entry key (two variants
            of one model, target and precision can then be measured side by side).
            Labelled folders are compared with each other, not with a baseline: no
            reference workload is timed, and every other round takes them in reverse
            order so that no folder always runs after the same one.

    Returns:
        A measurement set (the baseline format), one entry per run folder, and in
        ``paired`` the re-measured baseline artifacts.

    Raises:
        UserError: A folder is not a deploykit run, its backend is unavailable, or two
            folders describe the same entry.
    """
    options.validate()
    if not run_dirs:
        raise UserError("no run folders given")
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError("one label per run folder")
    with ExitStack() as stack:
        candidates = [
            _open(
                Path(d),
                options,
                stack,
                wrap,
                reference=labels is None,
                key=labels[i] if labels is not None else None,
            )
            for i, d in enumerate(run_dirs)
        ]
        keys = [c.key for c in candidates]
        if len(set(keys)) != len(keys):
            raise UserError(f"two run folders describe the same entry: {', '.join(keys)}")
        twins: list[_Candidate] = []
        for cand in list(candidates):
            twin_dir = pair_with(cand.key) if pair_with else None
            if twin_dir is not None:
                twin = _open(twin_dir, options, stack, None, reference=False)
                twin.key = cand.key + _TWIN
                twins.append(twin)
        # Each baseline twin is timed next to its candidate, alternating which goes first
        # (A B, B A, ...), so an order effect cannot masquerade as a difference.
        groups = [[c, *[t for t in twins if t.key == c.key + _TWIN]] for c in candidates]
        twinned = {t.key[: -len(_TWIN)] for t in twins}
        model_rounds: dict[str, list[LatencyStats]] = {c.key: [] for g in groups for c in g}
        ref_rounds: dict[str, list[LatencyStats]] = {c.key: [] for g in groups for c in g}
        lat = LatencyOptions(
            warmup_runs=options.warmup,
            warmup_seconds=0.1 if options.fresh_runner else 0.0,
            runs=options.runs,
            min_seconds=options.min_seconds,
            max_seconds=max(30.0, options.min_seconds),
        )
        ref_lat = LatencyOptions(
            warmup_runs=options.warmup,
            warmup_seconds=0.0,
            runs=options.runs,
            min_seconds=options.min_seconds / 2,
            max_seconds=max(15.0, options.min_seconds),
        )
        for index in range(options.rounds):
            turn = groups if labels is None or index % 2 == 0 else groups[::-1]
            order = [c for g in turn for c in (g if index % 2 == 0 else g[::-1])]
            for cand in order:
                on_step(f"round {index + 1}/{options.rounds}: {cand.key}")
                if index and options.fresh_runner:
                    _reload(cand)
                time.sleep(0.02)  # let the previous runtime's worker threads go idle
                model_rounds[cand.key].append(
                    measure(cand.call, cand.batch, cand.artifact.threads, lat)
                )
                # A paired candidate is judged against its twin, not normalised: skip the
                # reference workload there and spend the time on the comparison itself.
                has_twin = cand.key in twinned
                if (
                    not has_twin
                    and cand.reference is not None
                    and cand.reference.runner is not None
                ):
                    ref_rounds[cand.key].append(
                        measure(
                            cand.reference.runner.run_prepared, 1, cand.artifact.threads, ref_lat
                        )
                    )
        entries = {c.key: _entry(c, model_rounds[c.key], ref_rounds[c.key]) for c in candidates}
        paired = {
            t.key[: -len(_TWIN)]: _entry(t, model_rounds[t.key], ref_rounds[t.key]) for t in twins
        }
    return Measurements(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment(),
        reference_workload=REFERENCE_NAME,
        rounds=options.rounds,
        entries=entries,
        paired=paired,
    )


def artifact_digest(folder: Path, report: Report) -> str:
    """One sha256 over the backend artifact's files as they are on disk now."""
    backend_dir = folder / report.backend_folder()
    parts = sorted(
        f"{p.relative_to(backend_dir)}={sha256_file(p)}"
        for p in backend_dir.rglob("*")
        if p.is_file()
    )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def environment() -> dict[str, object]:
    """What describes the measuring machine and software."""
    return {"cpu": cpu_info(), "versions": versions()}


def run_batch(report: Report, override: int | None = None) -> int:
    """The batch a run folder's artifact is timed at: `override` (dynamic batch) or its own."""
    return override or int(report.input.get("batch", 1))


def _open(
    folder: Path,
    options: MeasureOptions,
    stack: ExitStack,
    wrap: Wrap | None,
    reference: bool = True,
    key: str | None = None,
) -> _Candidate:
    report = load_report(folder)
    backend = require_backend(report.target)
    artifact = CompiledArtifact.load(folder / report.backend_folder())
    if options.threads is not None:
        artifact.threads = options.threads
        if "INFERENCE_NUM_THREADS" in artifact.settings:
            artifact.settings["INFERENCE_NUM_THREADS"] = options.threads
    batch = run_batch(report, options.batch)
    key = key or entry_key(report.model, report.target, report.precision, batch)
    runner = backend.runner(artifact)
    runner.activate()
    stack.callback(runner.deactivate)
    runner.prepare(synthetic_images(artifact.contract, batch, seed=99))
    workload = (
        stack.enter_context(ReferenceWorkload(backend, artifact.threads, device=artifact.device))
        if reference
        else None
    )
    cand = _Candidate(key, folder, report, artifact, batch, runner, workload, runner.run_prepared)
    cand.wrap = wrap
    _bind(cand)
    return cand


def _bind(cand: _Candidate) -> None:
    call = cand.runner.run_prepared
    cand.call = call if cand.wrap is None else cand.wrap(cand.key, call)


def _reload(cand: _Candidate) -> None:
    cand.runner.deactivate()
    cand.runner.activate()
    cand.runner.prepare(synthetic_images(cand.artifact.contract, cand.batch, seed=99))
    _bind(cand)  # run_prepared may be a new bound method after a reload


def _entry(cand: _Candidate, model: list[LatencyStats], ref: list[LatencyStats]) -> Entry:
    report = cand.report
    accuracy: dict[str, float] = {}
    if report.fidelity:
        accuracy["fidelity_cosine"] = float(report.fidelity["cosine"])
        accuracy["top1_agreement"] = float(report.fidelity["top1_agreement"])
    if report.accuracy and report.accuracy.get("top1") is not None:
        accuracy["top1"] = float(report.accuracy["top1"])
    return Entry(
        model=report.model,
        target=report.target,
        precision=report.precision,
        batch=cand.batch,
        threads=cand.artifact.threads,
        latency=EntryLatency(
            p50_ms=median([s.p50_ms for s in model]),
            p90_ms=median([s.p90_ms for s in model]),
            p99_ms=median([s.p99_ms for s in model]),
            mean_ms=median([s.mean_ms for s in model]),
            std_ms=median([s.std_ms for s in model]),
            runs=sum(s.runs for s in model),
            round_p50s_ms=[s.p50_ms for s in model],
            reference_round_p50s_ms=[s.p50_ms for s in ref],
            round_p10s_ms=[s.p10_ms for s in model],
            round_mins_ms=[s.min_ms for s in model],
            reference_round_p10s_ms=[s.p10_ms for s in ref],
        ),
        accuracy=accuracy,
        run_dir=str(cand.folder.resolve()),
        artifact_sha256=artifact_digest(cand.folder, report),
        backend_version=str(report.backend.get("version")) if report.backend else None,
    )
