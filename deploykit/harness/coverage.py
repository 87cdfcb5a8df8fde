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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeployKitError, UserError
from deploykit.harness.coverage_graph import graph_structure, qdq_weight_scales, torch_conv_calls
from deploykit.harness.coverage_report import (
    SCHEMA,
    SCHEMA_VERSION,
    cell_text,
    check_against_golden,
    load_coverage,
    render_markdown,
    write_outputs,
)
from deploykit.stages import CALIBRATION_METHODS

__all__ = [
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
    "torch_conv_calls",
    "write_outputs",
]
BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")
PRECISIONS = ("fp32", "int8")
# Acceptance thresholds (issue: architecture and convolution coverage).
FP32_MIN_COSINE = 0.9999
INT8_MIN_COSINE = 0.99
DEFAULT_MAX_ACCURACY_DROP = 1.0
# A random-weight network that amplifies input perturbations more than this (median over
# the inputs of relative output error / relative input error) is chaotic: INT8 rounding at
# every layer is amplified beyond what any trained network does, so 8-bit logits cannot
# follow FP32. Measured (500 inputs): trained networks 0.5x (LeNet-5) to 1.85x
# (Fashion-MNIST SqueezeNet); the threshold is twice the largest. Random BatchNorm networks:
# ResNet basic 3.8x, ResNeXt 4.3x, DPN 4.4x, Xception 5.7x, ShuffleNet v2 6.5x, ResNet
# bottleneck 7.8x, MobileNet v3 17x, MobileNet v2 59x; single random blocks < 0.5x.
CHAOTIC_GAIN = 4.0
REFERENCE_BATCH = 64
Step = Callable[[str], None]


@dataclass(frozen=True)
class KnownIssue:
    """A cell known to fail, with the cause and a minimal reproduction.

    Attributes:
        model: Catalogue name of the row.
        target: ``backend/precision`` of the cell.
        reason: The cause (a named backend bug, or a measured limitation), and how to
            reproduce it in a few lines.
    """

    model: str
    target: str
    reason: str


_G8_REASON = (
    "min-max INT8 ranges: on this random-weight ShuffleNet v1 (g=8; noise gain 2.9x, above "
    "the trained networks' 1.85x) min-max calibration on 256 images gives logits cosine "
    "0.985 on both runtimes from the same Q/DQ model, so not a backend bug; percentile "
    "calibration, which clips the range tails, gives 0.9933 (onnxruntime) / 0.9890 "
    "(openvino). Reproduce: deploykit coverage shufflenet_v1_g8_small "
    "[--calib-method percentile]"
)
# Cells expected to fail, with the reason and how to reproduce; each has a strict xfail test.
KNOWN_ISSUES: tuple[KnownIssue, ...] = (
    KnownIssue("shufflenet_v1_g8_small", "onnxruntime/int8", _G8_REASON),
    KnownIssue("shufflenet_v1_g8_small", "openvino/int8", _G8_REASON),
)


def known_issue(model: str, target: str) -> KnownIssue | None:
    """The recorded backend bug of a cell, if any."""
    return next((k for k in KNOWN_ISSUES if k.model == model and k.target == target), None)


@dataclass
class CoverageOptions:
    """What the coverage run covers and how hard it looks.

    Attributes:
        models: Catalogue names to run instead of the zoo's coverage rows.
        full: Run the rows' full-size models at their own input size (the benchmark matrix).
        backends: Target backends (unavailable ones get an ``unavailable`` column).
        precisions: Precisions per backend (a backend that lacks one shows ``n/a``).
        input_size: Input size override for every row, (height, width).
        fidelity_samples: Inputs compared with PyTorch on random-weight rows.
        eval_samples: Labelled inputs for top-1 accuracy on rows with trained weights.
        calib_samples: INT8 calibration inputs (the whole shipped natural-images-calib set:
            with 32 the ranges miss outliers of held-out images, e.g. the shuffled grouped
            block's INT8 cosine is 0.958 with 32 and 0.9993 with 256).
        calib_method: minmax, entropy, percentile or mse.
        bn_samples: Images for BatchNorm re-estimation of random-weight rows.
        bn_recalibrate: Re-estimate BatchNorm statistics of random-weight rows.
        latency_runs: Timed runs per cell (a few: this is coverage, not a benchmark).
        jobs: Rows run at once, each in its own worker process.
        threads: Threads of every runtime and of PyTorch; None = all usable cores. The
            default is 1: a coverage run shares CI machines, where oversubscribed
            multi-threaded runtimes slow down tenfold, and its latency is indicative only.
        max_accuracy_drop: Largest INT8 top-1 drop (points) on trained rows.
        seed: Seed of random weights and inputs.
        keep: Keep each row's artifacts (ONNX, fused, Q/DQ, backend builds) under this
            folder, one sub-folder per row; None = a temporary folder, removed.
    """

    models: list[str] | None = None
    full: bool = False
    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = PRECISIONS
    input_size: tuple[int, int] | None = None
    fidelity_samples: int = 16
    eval_samples: int = 500
    calib_samples: int = 256
    calib_method: str = "minmax"
    bn_samples: int = 64
    bn_recalibrate: bool = True
    latency_runs: int = 5
    jobs: int = 1
    threads: int | None = 1
    max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP
    seed: int = 0
    keep: str | None = None

    def validate(self) -> None:
        """Raise UserError for options that cannot work."""
        from deploykit.backends.registry import get_backend

        for name in self.backends:
            get_backend(name)  # unknown names raise with a suggestion
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise UserError(f"unknown precision {bad[0]!r}: choose {' or '.join(PRECISIONS)}")
        for label, value in (
            ("--fidelity-samples", self.fidelity_samples),
            ("--calib-samples", self.calib_samples),
            ("--latency-runs", self.latency_runs),
            ("--eval-samples", self.eval_samples),
        ):
            if value < 1:
                raise UserError(f"{label} must be at least 1, got {value}")
        if self.calib_method not in CALIBRATION_METHODS:
            raise UserError(
                f"unknown calibration method {self.calib_method!r}: choose "
                f"{', '.join(CALIBRATION_METHODS)}"
            )
        if self.jobs < 1:
            raise UserError(f"--jobs must be at least 1, got {self.jobs}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.bn_samples < 2:
            raise UserError(f"--bn-samples must be at least 2, got {self.bn_samples}")


@dataclass(frozen=True)
class Row:
    """One row to run: what the reader sees and the catalogue model behind it."""

    name: str
    family: str
    kind: str
    model: str


@dataclass
class _Target:
    backend: str
    precision: str
    available: bool
    reason: str
    encoding: str | None = None

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.precision}"


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


def _targets(options: CoverageOptions) -> list[_Target]:
    from deploykit.backends.registry import get_backend

    targets = []
    for name in dict.fromkeys(options.backends):
        backend = get_backend(name)
        availability = backend.is_available()
        caps = backend.capabilities() if availability.ok else None
        for precision in options.precisions:
            if caps is None:
                targets.append(_Target(backend.name, precision, False, availability.reason))
            elif precision not in caps.precisions:
                continue  # e.g. torch: the eager baseline runs fp32 only
            else:
                encoding = caps.int8_encoding if precision == "int8" else None
                targets.append(_Target(backend.name, precision, True, "", encoding))
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
    targets: list[_Target],
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
            result = _run_row(row, options, targets, threads, work, step)
        except Exception as exc:  # a bug on one row must not lose the other rows' results
            result = _crashed_row(row, targets, f"unexpected error: {_one_line(exc)}")
        conn.send(("done", result))


def _crashed_row(row: Row, targets: list[_Target], reason: str) -> dict[str, Any]:
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
            t.key: _skipped_cell(t, "unavailable: " + t.reason if not t.available else reason)
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _run_row(
    row: Row,
    options: CoverageOptions,
    targets: list[_Target],
    threads: int,
    work: Path,
    step: Step,
) -> dict[str, Any]:
    """Run one row through every stage and target; errors are recorded, never raised."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "name": row.name,
        "family": row.family,
        "kind": row.kind,
        "model": row.model,
        "export": {"ok": False, "error": ""},
        "fuse": {},
        "int8": {},
        "cells": {},
    }
    try:
        prepared = _prepare(row, options, result, work, step)
    except (DeployKitError, RuntimeError, ValueError, TypeError) as exc:
        message = _one_line(exc)
        result.setdefault("error", message)
        for target in targets:
            result["cells"][target.key] = _skipped_cell(target, f"not run: {message}")
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result
    fp32_outputs: dict[str, np.ndarray] = {}
    for target in targets:
        if not target.available:
            result["cells"][target.key] = _skipped_cell(target, f"unavailable: {target.reason}")
            continue
        step(f"{target.key}")
        result["cells"][target.key] = _run_cell(
            target, prepared, options, threads, work, fp32_outputs
        )
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _skipped_cell(target: _Target, reason: str) -> dict[str, Any]:
    status = "unavailable" if reason.startswith("unavailable") else "error"
    return {"status": status, "error": reason}


@dataclass
class _Prepared:
    """What every cell of a row shares."""

    row: Row
    source: Any
    contract: Any
    module: Any
    torch_source: Any
    fused: Path | None
    export_error: str
    inputs: np.ndarray
    labels: list[int] | None
    reference: np.ndarray
    trained: bool
    noise_gain: float = 0.0
    qdq: dict[str, Path] = field(default_factory=dict)
    qdq_error: str = ""


def _prepare(
    row: Row, options: CoverageOptions, result: dict[str, Any], work: Path, step: Step
) -> _Prepared:
    """Load (and re-estimate BN), export, fuse, build the inputs and reference, calibrate."""
    from deploykit.fsutil import sha256_file
    from deploykit.models.loaders import load_torch, resolve
    from deploykit.stages import bnrecal

    source, contract = resolve(row.model, seed=options.seed, input_size=options.input_size)
    trained = not source.random_weights
    step("loading the PyTorch model")
    module = load_torch(source)
    result["params"] = int(sum(p.numel() for p in module.parameters()))
    result["input"] = contract.describe()
    result["weights"] = "trained" if trained else "random"
    torch_source = source
    if not trained and options.bn_recalibrate:
        step("re-estimating BatchNorm statistics")
        recal = bnrecal.recalibrate_model(
            module, row.model, contract, options.bn_samples, seed=options.seed
        )
        result["weights"] = recal.weights_label
        result["bn_recalibration"] = recal.to_dict()
        if recal.applied:
            import torch

            # The torch target rebuilds the model from its source: give it these statistics.
            path = work / "weights.bnrecal.pt"
            torch.save(module.state_dict(), path)
            torch_source = dataclasses.replace(
                source, weights=str(path), weights_sha256=sha256_file(path)
            )
    result["structure_torch"] = torch_conv_calls(module, contract)
    inputs, labels, data_label = _eval_inputs(row.model, contract, options, trained)
    result["inputs"] = data_label
    reference = _torch_outputs(module, inputs)
    floor, gain = rounding_sensitivity(module, inputs, reference, contract, options.seed)
    result["rounding_sensitivity_cosine"] = floor
    result["noise_gain"] = gain
    prepared = _Prepared(
        row=row,
        source=source,
        contract=contract,
        module=module,
        torch_source=torch_source,
        fused=None,
        export_error="",
        inputs=inputs,
        labels=labels,
        reference=reference,
        trained=trained,
    )
    prepared.noise_gain = gain
    if labels is not None:
        result["fp32_top1"] = _top1(reference, labels)
    _export_and_fuse(prepared, result, work, step)
    if prepared.fused is not None and "int8" in options.precisions:
        _calibrate(prepared, options, result, work, step)
    return prepared


def _export_and_fuse(prepared: _Prepared, result: dict[str, Any], work: Path, step: Step) -> None:
    from deploykit.stages.export import ExportOptions, export_onnx
    from deploykit.stages.fuse import fuse_onnx
    from deploykit.stages.onnxcheck import load_onnx

    step("exporting to ONNX")
    t0 = time.perf_counter()
    try:
        onnx_src = export_onnx(
            prepared.module, prepared.contract, work / "model.onnx", ExportOptions()
        )
    except DeployKitError as exc:
        prepared.export_error = _one_line(exc)
        result["export"] = {"ok": False, "error": prepared.export_error}
        return
    result["export"] = {
        "ok": True,
        "exporter": onnx_src.exporter,
        "seconds": round(time.perf_counter() - t0, 2),
        "error": "",
    }
    step("fusing the graph")
    t0 = time.perf_counter()
    fused, report = fuse_onnx(onnx_src, work / "model.fused.onnx", prepared.contract, [1])
    structure = graph_structure(load_onnx(fused.path, check=False))
    expected = result["structure_torch"]
    result["fuse"] = {
        "applied": report.applied,
        "note": report.note,
        "seconds": round(time.perf_counter() - t0, 2),
        "nodes_before": sum(report.ops_before.values()),
        "nodes_after": sum(report.ops_after.values()),
        "ops": report.ops_after,
        "structure": structure,
        "structure_ok": structure["depthwise_convs"] == expected["depthwise"]
        and structure["convs"] == expected["convs"]
        and structure["depthwise_group_ok"],
    }
    prepared.fused = fused.path


def _calibrate(
    prepared: _Prepared, options: CoverageOptions, result: dict[str, Any], work: Path, step: Step
) -> None:
    from deploykit.backends.registry import get_backend
    from deploykit.stages.bnrecal import recalibration_data
    from deploykit.stages.calibrate import CalibrationOptions, calibrate_onnx
    from deploykit.stages.onnxcheck import load_onnx

    assert prepared.fused is not None
    encodings = []
    for name in options.backends:
        backend = get_backend(name)
        if backend.is_available().ok and "int8" in backend.capabilities().precisions:
            encodings.append(backend.capabilities().int8_encoding or "s8s8")
    step(f"calibrating INT8 on {options.calib_samples} inputs")
    t0 = time.perf_counter()
    try:
        data, choice = recalibration_data(
            prepared.row.model, prepared.contract, options.calib_samples, seed=options.seed
        )
        info: dict[str, Any] = {"data": data.source, "data_choice": choice, "encodings": {}}
        for encoding in dict.fromkeys(encodings):
            path = work / f"model.int8.{encoding}.qdq.onnx"
            report = calibrate_onnx(
                prepared.fused,
                path,
                data,
                CalibrationOptions(encoding=encoding, method=options.calib_method),
            )
            prepared.qdq[encoding] = path
            info["encodings"][encoding] = {
                "quantize_nodes": report.quantize_nodes,
                "bias_correction": bool(report.bias_correction.get("applied")),
                **qdq_weight_scales(load_onnx(path, check=False)),
            }
        info["seconds"] = round(time.perf_counter() - t0, 2)
        info["ok"] = True
        result["int8"] = info
    except (DeployKitError, RuntimeError, ValueError) as exc:
        prepared.qdq_error = _one_line(exc)
        result["int8"] = {"ok": False, "error": prepared.qdq_error}


def _eval_inputs(
    model: str, contract: Any, options: CoverageOptions, trained: bool
) -> tuple[np.ndarray, list[int] | None, str]:
    """Inputs every cell runs: the trained model's labelled set, else held-out natural images."""
    from deploykit.harness.datasets import SYNTHETIC, load_dataset, load_eval_data
    from deploykit.models.catalogue import get_model_spec

    spec = get_model_spec(model)
    if trained and spec.pretrained is not None and spec.pretrained.eval_sets:
        from deploykit.harness import evalsets

        name = spec.pretrained.eval_sets[0]
        try:
            count = min(options.eval_samples, evalsets.find_manifest(name).size())
            data = load_eval_data(name, contract, count)
            return data.inputs, data.labels, f"{name} ({data.inputs.shape[0]})"
        except UserError as exc:
            note = f"{name} unavailable: {exc}"
    elif contract.channels in (1, 3):
        try:
            data = load_dataset("natural-images", contract, options.fidelity_samples, options.seed)
            return data.inputs, None, f"natural-images ({data.inputs.shape[0]})"
        except UserError as exc:
            note = f"natural-images unavailable: {exc}"
    else:
        note = f"{contract.channels}-channel inputs"
    data = load_dataset(SYNTHETIC, contract, options.fidelity_samples, options.seed)
    return data.inputs, None, f"synthetic ({data.inputs.shape[0]}; {note})"


def _torch_outputs(module: Any, inputs: np.ndarray) -> np.ndarray:
    import torch

    from deploykit.backends.torch.backend import first_tensor

    outs = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], REFERENCE_BATCH):
            chunk = torch.from_numpy(inputs[start : start + REFERENCE_BATCH])
            outs.append(first_tensor(module(chunk)).float().numpy())
    return np.concatenate(outs)


def rounding_sensitivity(
    module: Any, inputs: np.ndarray, reference: np.ndarray, contract: Any, seed: int
) -> tuple[float, float]:
    """How far half an 8-bit pixel step of input noise moves the FP32 outputs.

    Random-weight networks with BatchNorm are chaotic (perturbations grow with depth,
    as the mean-field theory of BatchNorm at initialisation predicts): an INT8 model
    adds rounding noise at every layer, and such a network amplifies it far beyond
    what a trained network does, so no 8-bit model can follow its FP32 logits.

    Returns:
        (smallest output cosine, largest gain): the gain is a sample's relative output
        error divided by its relative input error.
    """
    from deploykit.harness.fidelity import compare_outputs

    rng = np.random.default_rng(30_000 + seed)
    std = np.asarray(contract.std, dtype=np.float32).reshape(1, -1, 1, 1)
    noise = rng.uniform(-0.5, 0.5, size=inputs.shape).astype(np.float32) / 255.0 / std
    perturbed = _torch_outputs(module, np.ascontiguousarray(inputs + noise, dtype=np.float32))
    n = inputs.shape[0]

    def rel(delta: np.ndarray, base: np.ndarray) -> np.ndarray:
        num = np.linalg.norm(delta.reshape(n, -1).astype(np.float64), axis=1)
        den = np.linalg.norm(base.reshape(n, -1).astype(np.float64), axis=1)
        return num / np.where(den > 0, den, 1.0)

    gain = rel(perturbed - reference, reference) / np.maximum(rel(noise, inputs), 1e-12)
    cosine = compare_outputs(reference, perturbed).cosine
    return round(cosine, 6), round(float(np.nan_to_num(np.median(gain), nan=0.0)), 3)


def _top1(outputs: np.ndarray, labels: Sequence[int]) -> float:
    pred = outputs.reshape(outputs.shape[0], -1).argmax(axis=1)
    return round(100.0 * float(np.mean(pred == np.asarray(labels))), 3)


def _run_cell(
    target: _Target,
    prepared: _Prepared,
    options: CoverageOptions,
    threads: int,
    work: Path,
    fp32_outputs: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Compile, run and judge one backend x precision cell."""
    from deploykit.backends.base import CompileOptions
    from deploykit.backends.registry import get_backend
    from deploykit.harness.fidelity import compare_outputs

    backend = get_backend(target.backend)
    caps = backend.capabilities()
    if caps.needs_onnx and prepared.fused is None:
        return {"status": "error", "error": f"export failed: {prepared.export_error}"}
    model_path: Path | None = prepared.fused if caps.needs_onnx else None
    if target.precision == "int8":
        model_path = prepared.qdq.get(target.encoding or "s8s8")
        if model_path is None:
            return {"status": "error", "error": f"INT8 calibration failed: {prepared.qdq_error}"}
    started = time.perf_counter()
    cell: dict[str, Any] = {"status": "error", "error": ""}
    try:
        artifact = backend.compile(
            model_path,
            work / target.key.replace("/", "-"),
            prepared.contract,
            CompileOptions(precision=target.precision, threads=threads, batch=1),
            source=prepared.torch_source,
        )
        cell["effective_precision"] = artifact.effective_precision
        with backend.runner(artifact) as runner:
            outputs = np.concatenate(
                [runner.infer(prepared.inputs[i : i + 1]) for i in range(prepared.inputs.shape[0])]
            )
            cell["latency_ms"] = _short_latency(runner, prepared.inputs[:1], threads, options)
    except (DeployKitError, RuntimeError, ValueError, TypeError, OSError) as exc:
        cell["error"] = _one_line(exc)
        cell["seconds"] = round(time.perf_counter() - started, 2)
        return _judge_known(cell, prepared.row.model, target.key)
    cell["finite"] = bool(np.isfinite(outputs).all())
    fid = compare_outputs(prepared.reference, outputs)
    cell["fidelity"] = {
        "cosine": fid.cosine,
        "max_abs_err": fid.max_abs_err,
        "rel_err": fid.rel_err,
        "top1_agreement": fid.top1_agreement,
        "samples": fid.samples,
    }
    if target.precision == "fp32":
        fp32_outputs[target.backend] = outputs
    else:
        base = fp32_outputs.get(target.backend, prepared.reference)
        vs = compare_outputs(base, outputs)
        cell["vs_fp32"] = {
            "against": f"{target.backend}/fp32" if target.backend in fp32_outputs else "pytorch",
            "cosine": vs.cosine,
            "top1_agreement": vs.top1_agreement,
        }
    if prepared.labels is not None:
        cell["top1"] = _top1(outputs, prepared.labels)
    cell["seconds"] = round(time.perf_counter() - started, 2)
    cell["status"], cell["error"] = _verdict(cell, target, prepared, options)
    return _judge_known(cell, prepared.row.model, target.key)


def _short_latency(runner: Any, batch: np.ndarray, threads: int, options: CoverageOptions) -> float:
    from deploykit.harness.latency import LatencyOptions, measure

    runner.prepare(batch)
    stats = measure(
        runner.run_prepared,
        batch=1,
        threads=threads,
        options=LatencyOptions(
            warmup_runs=2,
            warmup_seconds=0.0,
            runs=options.latency_runs,
            min_seconds=0.0,
            max_seconds=10.0,
        ),
    )
    return round(stats.p50_ms, 3)


def _verdict(
    cell: dict[str, Any], target: _Target, prepared: _Prepared, options: CoverageOptions
) -> tuple[str, str]:
    """pass or fail, with the reason of a failure."""
    fid = cell["fidelity"]
    if not cell["finite"]:
        return "fail", "the outputs hold NaN or infinity"
    if target.precision == "fp32":
        if not fid["cosine"] >= FP32_MIN_COSINE:
            return "fail", f"cosine {fid['cosine']:.6f} < {FP32_MIN_COSINE} against PyTorch"
        return "pass", ""
    if cell.get("effective_precision") != "int8":
        return "fail", f"runtime computes in {cell.get('effective_precision')}, not int8"
    if prepared.trained and prepared.labels is not None:
        drop = _drop(cell, prepared)
        # One input of a small labelled set moves top-1 by 100/n points: the budget is at
        # least that (one of imagenet-photos20's 20 photos is 5 pt).
        budget = max(options.max_accuracy_drop, 100.0 / len(prepared.labels))
        cell["accuracy_drop"] = drop
        cell["accuracy_budget"] = round(budget, 3)
        if drop > budget:
            return "fail", f"top-1 drop {drop:.2f} pt > {budget:g} pt budget"
        return "pass", ""
    cosine = cell["vs_fp32"]["cosine"]
    if cosine >= INT8_MIN_COSINE:
        return "pass", ""
    gain = prepared.noise_gain
    if gain > CHAOTIC_GAIN and np.isfinite(cell["vs_fp32"]["cosine"]):
        return "xfail", (
            f"INT8 cosine {cosine:.4f} < {INT8_MIN_COSINE}: this random-weight network "
            f"amplifies input perturbations {gain:.1f}x (trained networks: <= 1.85x), so no "
            "8-bit model can follow its FP32 logits"
        )
    return "fail", f"INT8 cosine {cosine:.4f} < {INT8_MIN_COSINE} against FP32"


def _drop(cell: dict[str, Any], prepared: _Prepared) -> float:
    assert prepared.labels is not None
    return round(_top1(prepared.reference, prepared.labels) - float(cell["top1"]), 3)


def _judge_known(cell: dict[str, Any], model: str, key: str) -> dict[str, Any]:
    issue = known_issue(model, key)
    if issue is None:
        return cell
    cell["known_issue"] = issue.reason
    if cell["status"] in ("fail", "error"):
        cell["status"] = "xfail"
    elif cell["status"] == "pass":
        cell["status"] = "xpass"
        cell["error"] = "passes although recorded as a backend bug: remove the KNOWN_ISSUES entry"
    return cell
