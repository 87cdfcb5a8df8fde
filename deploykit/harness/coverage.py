"""The coverage matrix: every architecture and convolution type through every stage and backend.

Each row (a catalogue model) goes export -> fuse -> INT8 calibration (one Q/DQ
model per encoding, shared by every backend that runs it) -> compile and run on
each target backend x precision. A row records whether export worked, the fused
graph's op counts and grouped/depthwise structure, and per cell the fidelity
against the FP32 PyTorch model, a short latency and, for INT8, the agreement
with the same backend's FP32 outputs (and top-1 accuracy on trained models).

Random-weight rows get their BatchNorm statistics re-estimated on calibration
images first (`deploykit.stages.bnrecal`), so the numbers describe a network
whose activations have realistic scale.

This is a coverage run, not a benchmark: latency comes from a handful of runs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.harness.coverage_cell import one_line, run_row, skipped_cell
from deploykit.harness.coverage_graph import graph_structure, qdq_weight_scales, torch_conv_calls
from deploykit.harness.coverage_options import (
    CHAOTIC_GAIN,
    FP32_MIN_COSINE,
    INT8_MIN_COSINE,
    CoverageOptions,
    Row,
    Step,
    Target,
)
from deploykit.harness.coverage_report import (
    SCHEMA,
    SCHEMA_VERSION,
    cell_text,
    check_against_golden,
    load_coverage,
    render_markdown,
    write_outputs,
)

__all__ = [
    "CHAOTIC_GAIN",
    "FP32_MIN_COSINE",
    "INT8_MIN_COSINE",
    "SCHEMA",
    "SCHEMA_VERSION",
    "CoverageOptions",
    "cell_text",
    "check_against_golden",
    "graph_structure",
    "load_coverage",
    "qdq_weight_scales",
    "render_markdown",
    "run_coverage",
    "select_rows",
    "torch_conv_calls",
    "write_outputs",
]


def select_rows(options: CoverageOptions) -> list[Row]:
    """The rows to run: the named models, or the zoo's coverage rows (small or full)."""
    from deploykit.models.catalogue import get_model_spec

    if options.models:
        rows = []
        for name in options.models:
            spec = get_model_spec(name)  # unknown names raise with suggestions
            rows.append(Row(name=name, family=spec.family, kind="model", model=name))
        return rows
    from deploykit.models.zoo import coverage_rows

    rows = []
    for entry in coverage_rows():
        model = entry.full if options.full else entry.small
        if model is None:
            continue
        rows.append(Row(name=entry.name, family=entry.family, kind=entry.kind, model=model))
    if not rows:
        raise UserError(
            "the model zoo lists no coverage rows here; name models instead, e.g. "
            "`deploykit coverage mobilenet_v2 squeezenet1_1 --input-size 64`"
        )
    return rows


def _targets(options: CoverageOptions) -> list[Target]:
    from deploykit.backends.registry import get_backend

    targets = []
    for name in dict.fromkeys(options.backends):
        backend = get_backend(name)
        availability = backend.is_available()
        caps = backend.capabilities() if availability.ok else None
        for precision in options.precisions:
            if caps is None:
                targets.append(Target(backend.name, precision, False, availability.reason))
            elif precision not in caps.precisions:
                continue  # e.g. torch: the eager baseline runs fp32 only
            else:
                encoding = caps.int8_encoding if precision == "int8" else None
                targets.append(Target(backend.name, precision, True, "", encoding))
    return targets


def run_coverage(options: CoverageOptions, on_step: Step | None = None) -> dict[str, Any]:
    """Run the matrix and return the coverage document (see :func:`render_markdown`).

    Raises:
        UserError: Bad options or unknown model names (nothing is run).
    """
    from deploykit.harness.environment import cpu_info, usable_cores, versions

    step = on_step or (lambda _: None)
    options.validate()
    rows = select_rows(options)
    targets = _targets(options)
    threads = options.threads or usable_cores()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deploykit-coverage-") as tmp:
        root = Path(options.keep) if options.keep else Path(tmp)
        folders = []
        for index, row in enumerate(rows, start=1):
            work = root / f"{index:03d}-{row.model}"
            try:
                work.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(
                    f"cannot create {work}: {exc.strerror}; pass a writable --keep"
                ) from exc
            folders.append(work)
        results = _run_rows(rows, folders, options, targets, threads, step)
    doc = {
        "schema": SCHEMA,
        "version": SCHEMA_VERSION,
        "variant": "full" if options.full else ("named" if options.models else "small"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "device": cpu_info(),
        "versions": versions(),
        "options": _options_dict(options, threads),
        "thresholds": {
            "fp32_min_cosine": FP32_MIN_COSINE,
            "int8_min_cosine": INT8_MIN_COSINE,
            "max_accuracy_drop": options.max_accuracy_drop,
            "chaotic_gain": CHAOTIC_GAIN,
        },
        "targets": [
            {"key": t.key, "available": t.available, "reason": t.reason, "encoding": t.encoding}
            for t in targets
        ],
        "unavailable": _unavailable(options),
        "rows": results,
    }
    doc["summary"] = summarise(doc)
    return doc


def _run_rows(
    rows: list[Row],
    folders: list[Path],
    options: CoverageOptions,
    targets: list[Target],
    threads: int,
    step: Step,
) -> list[dict[str, Any]]:
    """Run the rows on `options.jobs` worker processes; results in row order."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    workers: queue.Queue[_Worker] = queue.Queue()
    for _ in range(options.jobs):
        workers.put(_Worker())

    def run_one(index: int) -> dict[str, Any]:
        row = rows[index]
        step(f"[{index + 1}/{len(rows)}] {row.model}")
        worker = workers.get()
        try:
            payload = (row, options, targets, threads, folders[index])
            result = worker.run(payload, _prefixed(step, row))
            # None: the worker died, a runtime crashed on this row.
            return result if result is not None else _crashed_row(row, targets, worker.crash_reason)
        finally:
            workers.put(worker)

    try:
        with ThreadPoolExecutor(max_workers=options.jobs) as pool:
            return list(pool.map(run_one, range(len(rows))))
    finally:
        while not workers.empty():
            workers.get().close()


class _Worker:
    """Runs rows in a child process, so a runtime that crashes (SIGSEGV) costs one row.

    The child stays alive between rows (imports are paid once) and is restarted after
    a crash. It reports progress and the finished row through a pipe.
    """

    def __init__(self) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self.crash_reason = ""

    def close(self) -> None:
        """Stop the child process."""
        if self._proc is not None and self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def run(self, payload: tuple[Any, ...], step: Step) -> dict[str, Any] | None:
        """The row's result, or None when the child died (see `crash_reason`)."""
        import signal

        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send(payload)
        last = "start"
        while True:
            try:
                if not self._conn.poll(1.0):
                    if not self._proc.is_alive():
                        raise EOFError
                    continue
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(timeout=10)
                code = self._proc.exitcode
                name = signal.Signals(-code).name if code is not None and code < 0 else code
                self.crash_reason = f"the worker process died ({name}) during {last}"
                self._proc = None
                return None
            if kind == "step":
                last = value
                step(value)
            else:
                return dict(value)


def _worker_main(conn: Any) -> None:
    """Child process: run each row sent through `conn` until None arrives."""
    while True:
        payload = conn.recv()
        if payload is None:
            return
        row, options, targets, threads, work = payload

        def step(text: str) -> None:
            conn.send(("step", text))

        try:
            result = run_row(row, options, targets, threads, work, step)
        except Exception as exc:  # a bug on one row must not lose the other rows' results
            result = _crashed_row(row, targets, f"unexpected error: {one_line(exc)}")
        conn.send(("done", result))


def _crashed_row(row: Row, targets: list[Target], reason: str) -> dict[str, Any]:
    return {
        "name": row.name,
        "family": row.family,
        "kind": row.kind,
        "model": row.model,
        "export": {"ok": False, "error": reason},
        "fuse": {},
        "int8": {},
        "error": reason,
        "cells": {
            t.key: skipped_cell(t, "unavailable: " + t.reason if not t.available else reason)
            for t in targets
        },
    }


def _prefixed(step: Step, row: Row) -> Step:
    def prefixed(text: str) -> None:
        step(f"{row.model}: {text}")

    return prefixed


def _unavailable(options: CoverageOptions) -> dict[str, str]:
    """Backend -> why it cannot run here, with the fix."""
    from deploykit.backends.registry import get_backend

    found = {}
    for name in dict.fromkeys(options.backends):
        availability = get_backend(name).is_available()
        if not availability.ok:
            found[name] = availability.message()
    return found


def _options_dict(options: CoverageOptions, threads: int) -> dict[str, Any]:
    data = dataclasses.asdict(options)
    data["backends"] = list(options.backends)
    data["precisions"] = list(options.precisions)
    data["input_size"] = list(options.input_size) if options.input_size else None
    data["threads"] = threads
    return data


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    """Counts of cells by status, and the rows with a failed or errored cell."""
    counts: dict[str, int] = {}
    failing = []
    for row in doc["rows"]:
        bad = False
        for cell in row["cells"].values():
            counts[cell["status"]] = counts.get(cell["status"], 0) + 1
            bad |= cell["status"] in ("fail", "error", "xpass")
        if bad or not row["export"]["ok"]:
            failing.append(row["model"])
    return {"rows": len(doc["rows"]), "cells": counts, "failing_rows": failing}
