"""The library API. The CLI is a thin layer over these functions."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import BatchRange, CompileOptions, Runner
from deploykit.backends.registry import backend_names, get_backend, require_backend
from deploykit.errors import GateError, UserError
from deploykit.fsutil import sha256_file, staged_dir, write_text_atomic
from deploykit.harness.environment import cpu_info, usable_cores, versions
from deploykit.harness.fidelity import PRECISION_TOLERANCE, Fidelity, compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.harness.latency import LatencyOptions, LatencyStats, measure
from deploykit.harness.report import Gate, Report, StageRecord, load_report
from deploykit.models.catalogue import ModelSpec, list_models
from deploykit.models.contract import InputContract
from deploykit.models.loaders import RANDOM_WEIGHTS_NOTE, load_torch, resolve

Step = Callable[[str], None]
# PyTorch references take any batch: evaluation sets run through them in chunks this big.
REFERENCE_BATCH = 64


def _quiet(_: str) -> None:
    return None


@dataclass
class ExportRequest:
    """Everything `deploykit export` accepts; saved as recipe.resolved.yaml in the run folder.

    Attributes:
        model: Catalogue name, ``package.module:factory``, or a .onnx/.pt2/TorchScript path.
        target: Backend name (torch, onnxruntime, openvino, tensorrt).
        precision: fp32, fp16, bf16 (int8 arrives with calibration).
        device: cpu or cuda.
        weights: Optional local state_dict file.
        seed: Seed of random initialisation and of the check inputs.
        input_size: Optional (height, width) override of the model's input size.
        batch: Batch to export (static) and measure at; default 1, or OPT of a dynamic range.
        dynamic_batch: ``MIN:OPT:MAX`` for a dynamic batch dimension.
        opset: ONNX opset.
        exporter: auto, dynamo or torchscript.
        threads: Runtime threads; default all usable cores.
        runs: Minimum timed runs.
        warmup: Warm-up runs.
        min_seconds: Minimum timing duration.
        fidelity_samples: Inputs compared against the FP32 PyTorch model.
        out: Output root; the run folder is ``<out>/<model>/<target>-<precision>``.
        calib: INT8 calibration data: a folder of images, a .npy/.npz file, or ``synthetic``.
        calib_method: minmax, entropy, percentile or mse.
        calib_samples: Number of calibration inputs.
        calib_percentile: Percentile for ``calib_method="percentile"``.
        per_channel: Per-channel weight scales (per-tensor when False).
        bias_correction: Per-channel bias correction after quantization; None = on for
            depthwise-heavy nets.
        calib_cache: Reuse cached calibration statistics (``--no-calib-cache`` recomputes).
        quantizer: ``deploykit`` (one Q/DQ ONNX for every backend) or the backend's own
            (``nncf`` for OpenVINO).
        int8_encoding: Q/DQ activation encoding (s8s8, u8s8, mixed); None = the target's
            own (`Capabilities.int8_encoding`).
        exact_residuals: mixed encoding: make OpenVINO round each Conv output that enters
            a residual Add, as ONNX Runtime does (slower; see
            `deploykit.stages.ovqdq.materialise_residual_inputs`).
        overflow_fix: auto, on or off: bound INT8 weight scales so CPUs without VNNI
            cannot saturate their 16-bit sums (`deploykit.stages.overflow`).
        eval_data: Evaluation sets (names, manifests or labelled folders); None = the
            model's own sets when it has real weights, none otherwise.
        eval_samples: Inputs per evaluation set; None = the whole set.
        max_accuracy_drop: Largest top-1 drop (points) against FP32 on a labelled set.
        fallback: When INT8 misses the budget, keep the most sensitive layers in float.
        max_fallback_layers: Most layers the fallback may keep in float; None = a quarter
            of the quantized layers (at least 4).
        bn_recalibrate: Re-estimate a random-weight model's BatchNorm statistics on
            calibration images before export (``deploykit.stages.bnrecal``; ONNX targets
            only: the torch target rebuilds the model as built). Off by default: deep
            random-weight nets with realistic activations amplify INT8 rounding noise
            (see docs/coverage.md), so only `deploykit coverage` turns it on.
    """

    model: str
    target: str
    precision: str = "fp32"
    device: str = "cpu"
    weights: str | None = None
    seed: int = 0
    input_size: tuple[int, int] | None = None
    batch: int | None = None
    dynamic_batch: str | None = None
    opset: int = 18
    exporter: str = "auto"
    threads: int | None = None
    runs: int = 100
    warmup: int = 10
    min_seconds: float = 2.0
    fidelity_samples: int = 100
    out: str = "out"
    calib: str | None = None
    calib_method: str = "minmax"
    # 256: on the real-weight EfficientNet-Lite0 (its 256-view calibration set, 1,024
    # natural-image views, onnxruntime 1.32 / OpenVINO 2026.4) the INT8 logits' cosine
    # against FP32 rose from 0.99805 / 0.99815 with 128 inputs to 0.99835 / 0.99841, and
    # top-5 overlap from 96.4% / 96.3% to 96.9% / 96.7%. NNCF's default is 300.
    calib_samples: int = 256
    calib_percentile: float = 99.999
    per_channel: bool = True
    bias_correction: bool | None = None
    calib_cache: bool = True
    quantizer: str = "deploykit"
    int8_encoding: str | None = None
    exact_residuals: bool = False
    overflow_fix: str = "auto"
    eval_data: list[str] | None = None
    eval_samples: int | None = None
    max_accuracy_drop: float = 1.0
    fallback: bool = True
    max_fallback_layers: int | None = None
    bn_recalibrate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Stop before the backend build: write what it would build from and print its plan.
    dry_run: bool = False

    def batch_range(self) -> BatchRange | None:
        """The parsed dynamic batch range, or None."""
        if self.dynamic_batch is None:
            return None
        try:
            return BatchRange.parse(self.dynamic_batch)
        except ValueError as exc:
            raise UserError(f"{exc}; e.g. --dynamic-batch 1:4:16") from exc

    def measure_batch(self) -> int:
        """Batch used for latency and fidelity."""
        rng = self.batch_range()
        if self.batch is not None:
            if self.batch < 1:
                raise UserError(f"--batch must be at least 1, got {self.batch}")
            if rng is not None and not rng.min <= self.batch <= rng.max:
                raise UserError(f"--batch {self.batch} is outside --dynamic-batch {rng}")
            return self.batch
        return rng.opt if rng is not None else 1


def default_precision(target: str) -> str:
    """The precision `export` uses when none is given: FP16 engines for TensorRT, else FP32."""
    return "fp16" if target in ("tensorrt", "trt") else "fp32"


def list_catalogue() -> list[ModelSpec]:
    """The model catalogue, emphasis families first."""
    return list_models()


def list_datasets() -> list[dict[str, Any]]:
    """The shipped calibration/evaluation sets, with whether their files are installed."""
    from deploykit.harness.evalsets import list_manifests, origin_root

    rows = []
    for manifest in list_manifests():
        reason = ""
        try:
            for origin in sorted({f.origin for f in manifest.files}):
                origin_root(origin)
        except UserError as exc:
            reason = str(exc)
        rows.append(
            {
                **manifest.to_json(),
                "available": not reason,
                "reason": reason,
                "path": str(manifest.path),
            }
        )
    return rows


def list_backends() -> list[dict[str, Any]]:
    """Every backend: availability (with the reason), version and capabilities."""
    rows = []
    for name in backend_names():
        backend = get_backend(name)
        availability = backend.is_available()
        row: dict[str, Any] = {
            "name": name,
            "display_name": backend.display_name,
            "available": availability.ok,
            "reason": "" if availability.ok else availability.message(),
            "version": backend.version(),
        }
        if availability.ok:
            caps = backend.capabilities()
            row.update(precisions=list(caps.precisions), devices=list(caps.devices))
        rows.append(row)
    return rows


@dataclass
class ExportResult:
    """A finished run: its folder and its report."""

    run_dir: Path
    report: Report


def export(request: ExportRequest, on_step: Step = _quiet) -> ExportResult:
    """Run export -> fuse -> compile -> measure and write the run folder.

    Returns:
        The run folder and its report (also written there as report.json).

    Raises:
        UserError: Bad input or unavailable backend (nothing is written).
        GateError: A numeric gate failed; the run folder is kept with status failed.
    """
    from deploykit.stages.export import ExportOptions, OnnxArtifact, export_onnx
    from deploykit.stages.fuse import fuse_onnx

    backend = get_backend(request.target) if request.dry_run else require_backend(request.target)
    caps = backend.capabilities()
    if request.device == "cpu" and "cpu" not in caps.devices:
        request = dataclasses.replace(request, device=caps.devices[0])  # GPU-only targets
    if request.precision not in caps.precisions:
        raise UserError(
            f"target {backend.name} cannot run {request.precision} here; "
            f"choose --precision {' or '.join(caps.precisions) or '(none)'}"
        )
    if request.device not in caps.devices:
        why = ""
        if request.device == "cuda":
            from deploykit.harness.gpu import gpu_unavailable_reason

            why = f": {gpu_unavailable_reason() or 'its CUDA runtime is not installed'}"
        raise UserError(
            f"target {backend.name} has no {request.device} device here "
            f"({', '.join(caps.devices)}){why}"
        )
    if request.precision not in PRECISION_TOLERANCE:
        raise UserError(f"precision {request.precision} is not supported yet")
    calib_options = None
    source, contract = resolve(request.model, request.weights, request.seed, request.input_size)
    pretrained = _pretrained(source)
    if request.precision == "int8":
        from deploykit.stages.calibrate import CalibrationOptions

        if request.calib is None and pretrained is not None and pretrained.calib_set:
            request = dataclasses.replace(request, calib=pretrained.calib_set)
        if request.calib is None:
            raise UserError(
                "--precision int8 needs calibration data: --calib FOLDER|FILE.npy|synthetic "
                "(synthetic inputs prove fidelity only)"
            )
        calib_options = CalibrationOptions(
            method=request.calib_method,
            percentile=request.calib_percentile,
            encoding=request.int8_encoding or caps.int8_encoding or "s8s8",
            per_channel=request.per_channel,
            bias_correction=request.bias_correction,
            use_cache=request.calib_cache,
            exact_residuals=request.exact_residuals,
            overflow_fix=request.overflow_fix,
        )
        calib_options.validate()
        if request.quantizer not in ("deploykit", caps.native_quantizer):
            native = f" or {caps.native_quantizer}" if caps.native_quantizer else ""
            hint = "" if native else f" (if {request.quantizer} is not installed: pip install it)"
            raise UserError(
                f"{backend.name} has no {request.quantizer!r} quantizer here; choose "
                f"--quantizer deploykit{native}{hint}"
            )
    if request.max_accuracy_drop < 0:
        raise UserError(f"--max-accuracy-drop must be >= 0, got {request.max_accuracy_drop}")
    if request.max_fallback_layers is not None and request.max_fallback_layers < 1:
        raise UserError(
            f"--max-fallback-layers must be at least 1, got {request.max_fallback_layers}; "
            "use --no-fallback to turn the fallback off"
        )
    eval_sets = _eval_sets(request, pretrained)
    rng = request.batch_range()
    batch = request.measure_batch()
    threads = request.threads or usable_cores()
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    options = ExportOptions(
        opset=request.opset,
        exporter=request.exporter,
        batch=batch if rng is None else 1,
        dynamic_batch=rng,
    )
    if source.is_torch:
        options.order()  # validate opset/exporter before any work
    final = Path(request.out) / source.name / f"{backend.name}-{request.precision}"
    if request.dry_run:  # never replaces a built run folder
        final = final.with_name(final.name + ".dry-run")
    report = Report(
        model=source.name,
        model_source=source.to_dict(),
        target=backend.name,
        device=cpu_info() if request.device == "cpu" else _gpu_device(request.device),
        precision=request.precision,
        weights="random" if source.random_weights else (source.weights_sha256 or "in-file"),
        notes=[RANDOM_WEIGHTS_NOTE] if source.random_weights else [],
        input={**contract.to_dict(), "batch": batch, "dynamic_batch": str(rng) if rng else None},
        versions=versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    failure: GateError | None = None
    with staged_dir(final) as work:
        try:
            module = None
            if source.is_torch:
                on_step("loading the PyTorch model")
                module = load_torch(source)
                _bn_recalibration_stage(report, work, module, source, contract, request, caps)
            onnx_fused: OnnxArtifact | None = None
            if caps.needs_onnx:
                started = time.perf_counter()
                if module is not None:
                    on_step("exporting to ONNX")
                    onnx_src = export_onnx(module, contract, work / "model.onnx", options, on_step)
                else:
                    onnx_src = _import_onnx(Path(source.ref), work / "model.onnx")
                _stage(
                    report,
                    "export",
                    started,
                    work,
                    onnx_src.path,
                    {
                        "exporter": onnx_src.exporter or "none (ONNX input)",
                        "opset": onnx_src.opset,
                        "attempts": onnx_src.attempts,
                        "checks": onnx_src.checks,
                    },
                )
                on_step("fusing the graph")
                started = time.perf_counter()
                onnx_fused, fuse_report = fuse_onnx(
                    onnx_src, work / "model.fused.onnx", contract, options.check_batches()
                )
                _stage(report, "fuse", started, work, onnx_fused.path, fuse_report.to_dict())
            compile_input = onnx_fused.path if onnx_fused else None
            calibrated: tuple[Any, Any] | None = None
            if calib_options is not None and onnx_fused is not None:
                if request.quantizer == "deploykit":
                    compile_input, calibrated = _calibrate_stage(
                        report, work, onnx_fused.path, contract, request, calib_options, on_step
                    )
                else:
                    compile_input = _native_quantize_stage(
                        report, work, onnx_fused.path, contract, request, backend, on_step
                    )
            compile_options = CompileOptions(
                precision=request.precision,
                device=request.device,
                threads=threads,
                batch=batch,
                dynamic_batch=rng,
                extra=_backend_extra(request, backend.name, final),
            )
            if request.dry_run:
                _plan_stage(
                    report, work, backend, compile_input, contract, compile_options, on_step
                )
                raise _DryRunDone

            def compile_model(path: Path | None) -> Any:
                built = backend.compile(path, work, contract, compile_options, source=source)
                built.save()
                report.effective_precision = built.effective_precision
                report.backend = {
                    "name": backend.name,
                    "version": backend.version(),
                    "folder": built.folder.name,
                    "settings": built.settings,
                    **built.info,
                }
                return built

            on_step(f"compiling for {backend.display_name}")
            started = time.perf_counter()
            artifact = compile_model(compile_input)
            _stage(report, "compile", started, work, artifact.folder, {"backend": backend.name})
            if eval_sets:
                artifact = _accuracy_stage(
                    report,
                    work,
                    backend,
                    artifact,
                    compile_model,
                    module,
                    contract,
                    batch,
                    request,
                    eval_sets,
                    calibrated,
                    on_step,
                )
            report.gates.insert(0, _precision_gate(request.precision, artifact, report.fallback))
            with backend.runner(artifact) as runner:
                on_step(f"checking fidelity on {request.fidelity_samples} inputs")
                started = time.perf_counter()
                fidelity, reference = _fidelity(
                    runner,
                    module,
                    work / "model.onnx",
                    contract,
                    request.fidelity_samples,
                    batch,
                    request.seed,
                )
                report.fidelity = fidelity.to_dict()
                report.fidelity_reference = reference
                tolerance = PRECISION_TOLERANCE[request.precision]
                violations = tolerance.violations(fidelity)
                report.gates.insert(
                    1,
                    Gate(
                        name="fidelity",
                        passed=not violations,
                        detail="; ".join(violations)
                        or (
                            f"cosine {fidelity.cosine:.6f} >= {tolerance.min_cosine}, "
                            f"rel err {fidelity.rel_err:.2g} <= {tolerance.max_rel_err:g}"
                        ),
                    ),
                )
                _stage(report, "fidelity", started, work, None, {"reference": reference})
                on_step("measuring latency")
                started = time.perf_counter()
                latency = _latency(runner, contract, batch, threads, request)
                report.latency = latency.to_dict()
                _stage(report, "latency", started, work, None, {})
            del module
            failed = [g for g in report.gates if not g.passed]
            if failed:
                report.status = "failed: " + ", ".join(g.name for g in failed)
                failure = GateError(
                    f"{source.name} on {backend.name}: "
                    + "; ".join(f"{g.name} gate failed ({g.detail})" for g in failed)
                )
        except GateError as exc:
            report.status = f"failed: {exc}"
            failure = exc
        except _DryRunDone:
            report.status = "dry-run"
        write_text_atomic(work / "recipe.resolved.yaml", _recipe_yaml(request, batch, threads))
        report.artifacts = _hash_artifacts(work)
        report.save(work)
    if failure is not None:
        failure.run_dir = final
        raise failure
    return ExportResult(run_dir=final, report=report)


def bench(
    run_dir: str | Path,
    runs: int = 100,
    warmup: int = 10,
    min_seconds: float = 2.0,
    threads: int | None = None,
    batch: int | None = None,
    rounds: int = 5,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """Measure the latency of an existing run folder's backend artifact again.

    The runs and seconds are spread over `rounds` independent rounds, each paired
    with the reference workload, so the result can serve as `deploykit regress --current`.

    Returns:
        A dict with model, target, precision, device, versions, latency and the round data.
    """
    from deploykit.regress.measure import MeasureOptions, measure_run_dirs

    if rounds < 1 or runs < 1:
        raise UserError("--rounds and --runs must be at least 1")
    folder = Path(run_dir)
    report = load_report(folder)
    options = MeasureOptions(
        rounds=rounds,
        runs=-(-runs // rounds),
        min_seconds=min_seconds / rounds,
        warmup=warmup,
        threads=threads,
        batch=batch,
    )
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
        "device": cpu_info() if report.device.get("kind", "cpu") == "cpu" else _gpu_device("cuda"),
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


def regress(
    baseline: str | Path,
    current: list[str | Path] | None = None,
    run_dirs: list[str | Path] | None = None,
    check: Any = None,
    measure_options: Any = None,
    update_baseline: bool = False,
    store_artifacts: bool = False,
    on_step: Step = _quiet,
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


def calibrate(
    model: str,
    calib: str,
    out: str | Path,
    method: str = "minmax",
    samples: int = 256,
    percentile: float = 99.999,
    encoding: str = "s8s8",
    per_channel: bool = True,
    bias_correction: bool | None = None,
    calib_cache: bool = True,
    weights: str | None = None,
    input_size: tuple[int, int] | None = None,
    opset: int = 18,
    seed: int = 0,
    exact_residuals: bool = False,
    overflow_fix: str = "auto",
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """Export, fuse and calibrate `model` into ``<out>/model.int8.qdq.onnx`` (no backend).

    The default encoding is the portable symmetric one (s8s8: zero points 0, float
    biases), which TensorRT's strongly typed builder requires, checked against TensorRT's
    Q/DQ rules; u8s8 is what ONNX Runtime runs fastest on x86, mixed what OpenVINO does.

    Returns:
        What was written, with the calibration details (also in ``calibration.json``).
    """
    from deploykit.harness.datasets import load_dataset
    from deploykit.stages.calibrate import CalibrationOptions, calibrate_onnx
    from deploykit.stages.export import ExportOptions, export_onnx
    from deploykit.stages.fuse import fuse_onnx

    options = CalibrationOptions(
        method=method,
        percentile=percentile,
        encoding=encoding,
        per_channel=per_channel,
        bias_correction=bias_correction,
        use_cache=calib_cache,
        exact_residuals=exact_residuals,
        overflow_fix=overflow_fix,
    )
    options.validate()
    source, contract = resolve(model, weights, seed, input_size)
    export_options = ExportOptions(opset=opset)
    if source.is_torch:
        export_options.order()
    data = load_dataset(calib, contract, samples, seed=seed)
    final = Path(out)
    with staged_dir(final) as work:
        if source.is_torch:
            on_step("exporting to ONNX")
            onnx_src = export_onnx(
                load_torch(source), contract, work / "model.onnx", export_options, on_step
            )
        else:
            onnx_src = _import_onnx(Path(source.ref), work / "model.onnx")
        on_step("fusing the graph")
        fused, _ = fuse_onnx(onnx_src, work / "model.fused.onnx", contract, [1])
        on_step(f"calibrating on {samples} inputs ({method})")
        qdq_path = work / "model.int8.qdq.onnx"
        calib_report = calibrate_onnx(fused.path, qdq_path, data, options)
        tensorrt = None
        if encoding == "s8s8":
            # The portable file: float biases (TensorRT's DequantizeLinear reads INT8 only)
            # and TensorRT's explicit-quantization rules checked before it travels.
            from deploykit.backends.tensorrt.qdq import check_qdq, fold_bias_dequantize

            folded = fold_bias_dequantize(qdq_path, qdq_path)
            tensorrt = {
                "bias_dequantize_folded": folded,
                "qdq_check": check_qdq(qdq_path).to_dict(),
            }
        result = {
            "schema_version": 1,
            "kind": "calibration",
            "model": source.name,
            "model_source": source.to_dict(),
            "input": contract.to_dict(),
            "calibration": calib_report.to_dict(),
            "tensorrt": tensorrt,
            "versions": versions(),
            "artifacts": _hash_artifacts(work),
        }
        write_text_atomic(work / "calibration.json", json.dumps(result, indent=2) + "\n")
    result["out"] = str(final)
    return result


def _bn_recalibration_stage(
    report: Report,
    work: Path,
    module: Any,
    source: Any,
    contract: InputContract,
    request: ExportRequest,
    caps: Any,
) -> None:
    """Re-estimate a random-weight model's BatchNorm statistics and record it in `weights`."""
    from deploykit.stages.bnrecal import recalibrate_model

    wanted = request.bn_recalibrate
    if wanted and not source.random_weights:
        raise UserError("bn_recalibrate applies to random-weight models only; drop it")
    if not wanted:
        return
    if not caps.needs_onnx:
        if wanted:
            report.notes.append(
                "BatchNorm statistics not re-estimated: the torch target rebuilds the model "
                "from its source"
            )
        return
    started = time.perf_counter()
    recal = recalibrate_model(module, source.ref, contract, seed=request.seed)
    report.weights = recal.weights_label
    _stage(report, "bn-recalibration", started, work, None, recal.to_dict())


def _calibrate_stage(
    report: Report,
    work: Path,
    fused: Path,
    contract: InputContract,
    request: ExportRequest,
    options: Any,
    on_step: Step,
) -> tuple[Path, tuple[Any, Any]]:
    """Calibrate the fused model into ``model.int8.qdq.onnx`` and record the stage.

    Returns:
        The Q/DQ model, and the calibration data and options (for the fallback).
    """
    from deploykit.stages.calibrate import calibrate_onnx

    on_step(f"calibrating on {request.calib_samples} inputs ({request.calib_method})")
    started = time.perf_counter()
    data = _calibration_data(report, request, contract)
    qdq = work / "model.int8.qdq.onnx"
    calib_report = calibrate_onnx(fused, qdq, data, options)
    _stage(report, "calibrate", started, work, qdq, calib_report.to_dict())
    if options.encoding != "s8s8" and not calib_report.overflow_fix.get("applied"):
        from deploykit.stages.overflow import cpu_saturates

        if cpu_saturates():
            report.notes.append(
                "INT8 weights use their full range on a CPU without VNNI, whose 16-bit "
                "INT8 sums can saturate: expect lost accuracy (--overflow-fix auto bounds them)"
            )
    return qdq, (data, options)


def _calibration_data(report: Report, request: ExportRequest, contract: InputContract) -> Any:
    """Load the calibration set; a synthetic one is noted in the report."""
    from deploykit.harness.datasets import SYNTHETIC, load_dataset

    assert request.calib is not None
    data = load_dataset(request.calib, contract, request.calib_samples, seed=request.seed)
    if data.source == SYNTHETIC:
        report.notes.append("INT8 calibrated on synthetic inputs: fidelity only, not accuracy")
    return data


def _native_quantize_stage(
    report: Report,
    work: Path,
    fused: Path,
    contract: InputContract,
    request: ExportRequest,
    backend: Any,
    on_step: Step,
) -> Path:
    """Quantize with the backend's own quantizer (e.g. NNCF) and record the stage."""
    on_step(f"quantizing with {request.quantizer} on {request.calib_samples} inputs")
    started = time.perf_counter()
    data = _calibration_data(report, request, contract)
    options = {
        "method": request.calib_method,
        "percentile": request.calib_percentile,
        "per_channel": request.per_channel,
        "seed": request.seed,
    }
    path, details = backend.quantize(fused, data.inputs, work, contract, options)
    details = {"quantizer": request.quantizer, "data": data.describe(), **details}
    _stage(report, "calibrate", started, work, path, details)
    return Path(path)


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


def _import_onnx(src: Path, dst: Path) -> Any:
    from deploykit.stages.export import OnnxArtifact
    from deploykit.stages.onnxcheck import OrtSession, graph_opset, load_onnx, op_counts

    model = load_onnx(src)
    OrtSession(src)  # the file must also load in a runtime
    shutil.copyfile(src, dst)
    return OnnxArtifact(
        path=dst,
        opset=graph_opset(model),
        input_name=model.graph.input[0].name,
        op_counts=op_counts(model),
    )


def _stage(
    report: Report,
    name: str,
    started: float,
    work: Path,
    artifact: Path | None,
    details: dict[str, Any],
) -> None:
    size = None
    rel = None
    if artifact is not None:
        rel = str(artifact.relative_to(work))
        if artifact.is_dir():
            size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
        else:
            extra = artifact.with_name(artifact.name + ".data")
            size = artifact.stat().st_size + (extra.stat().st_size if extra.exists() else 0)
    report.stages.append(
        StageRecord(
            name=name,
            seconds=round(time.perf_counter() - started, 3),
            artifact=rel,
            size_bytes=size,
            details=details,
        )
    )


def _precision_gate(requested: str, artifact: Any, fallback: dict[str, Any] | None) -> Gate:
    """The runtime must compute in the requested precision.

    After an accuracy fallback the model is mixed on purpose: it passes when the
    runtime still runs integer kernels for the layers left in INT8.
    """
    effective = artifact.effective_precision
    if requested == "int8" and fallback and fallback.get("excluded"):
        int8, other = _int8_layer_counts(artifact.info)
        kept = len(fallback["excluded"])
        return Gate(
            name="precision",
            passed=int8 > 0,
            detail=f"mixed: {int8} compute layers in int8, {other} in float "
            f"({kept} kept in float by the accuracy fallback)",
        )
    return Gate(
        name="precision",
        passed=requested == effective,
        detail=f"requested {requested}, runtime computes in {effective}",
    )


def _int8_layer_counts(info: dict[str, Any]) -> tuple[int, int]:
    """(integer, float) compute layers from a backend's compile info."""
    if "compute_ops" in info:  # onnxruntime
        ops = info["compute_ops"]
        return int(ops.get("int8", 0)), int(ops.get("fp32", 0))
    layers = info.get("compute_layer_precisions", {})  # openvino
    int8 = sum(n for p, n in layers.items() if p in ("i8", "u8"))
    return int(int8), int(sum(layers.values()) - int8)


def _pretrained(source: Any) -> Any:
    """The catalogue's pretrained-weights entry when `source` uses those weights."""
    from deploykit.models.catalogue import get_model_spec

    if source.kind != "catalogue" or source.weights_origin is None:
        return None
    return get_model_spec(source.ref).pretrained


def _eval_sets(request: ExportRequest, pretrained: Any) -> list[str]:
    if request.eval_data is not None:
        return list(request.eval_data)
    return list(pretrained.eval_sets) if pretrained is not None else []


def _reference(module: Any, onnx_path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """The FP32 reference: the PyTorch model, or ONNX Runtime on the input ONNX file."""
    if module is not None:
        import torch

        from deploykit.backends.torch.backend import first_tensor

        def torch_reference(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return np.asarray(first_tensor(module(torch.from_numpy(x))).float().numpy())

        return torch_reference, "pytorch fp32"
    from deploykit.stages.onnxcheck import OrtSession

    return OrtSession(onnx_path).run, "onnxruntime fp32 on the input ONNX file"


def _accuracy_stage(
    report: Report,
    work: Path,
    backend: Any,
    artifact: Any,
    compile_model: Callable[[Path | None], Any],
    module: Any,
    contract: InputContract,
    batch: int,
    request: ExportRequest,
    sets: list[str],
    calibrated: tuple[Any, Any] | None,
    on_step: Step,
) -> Any:
    """Evaluate on real data, gate the top-1 drop, and fall back layers if INT8 misses it.

    Returns:
        The artifact to keep: the first one, or the fallback's last.
    """
    from deploykit.harness.accuracy import AccuracyCheck

    on_step(f"evaluating on {', '.join(sets)}")
    started = time.perf_counter()
    reference, label = _reference(module, work / "model.onnx")
    check = AccuracyCheck.load(
        sets,
        contract,
        request.eval_samples,
        reference,
        label,
        batch,
        request.max_accuracy_drop,
        reference_batch=REFERENCE_BATCH if module is not None else None,
    )
    with backend.runner(artifact) as runner:
        report.accuracy = check.evaluate(runner.infer)
    _stage(report, "accuracy", started, work, None, {"sets": sets})
    drop = check.worst_drop()
    if (
        drop is not None
        and drop > request.max_accuracy_drop
        and calibrated is not None
        and request.fallback
    ):
        artifact = _fallback_stage(
            report,
            work,
            backend,
            artifact,
            compile_model,
            check,
            drop,
            request,
            calibrated,
            on_step,
        )
        report.accuracy = check.results
    report.gates.extend(check.gates())
    return artifact


def _fallback_stage(
    report: Report,
    work: Path,
    backend: Any,
    artifact: Any,
    compile_model: Callable[[Path | None], Any],
    check: Any,
    drop: float,
    request: ExportRequest,
    calibrated: tuple[Any, Any],
    on_step: Step,
) -> Any:
    """Keep the most sensitive layers in float, one step at a time, until the budget holds.

    Returns:
        The last artifact tried, or `artifact` when no step could be tried.
    """
    from deploykit.harness.inputs import spread_subset
    from deploykit.stages.calibrate import calibrate_onnx
    from deploykit.stages.fallback import quantized_layers, rank_layers, run_fallback
    from deploykit.stages.onnxcheck import load_onnx

    data, options = calibrated
    fused, qdq = work / "model.fused.onnx", work / "model.int8.qdq.onnx"
    started = time.perf_counter()
    on_step("ranking layers by INT8 sensitivity")
    # The fused graph has the export batch (1 when the batch is dynamic).
    graph_batch = 1 if request.batch_range() else request.measure_batch()
    ranking = rank_layers(fused, qdq, spread_subset(data.inputs, 64), graph_batch)
    limit = request.max_fallback_layers or max(4, len(ranking) // 4)
    quantized = {node.name for node in quantized_layers(load_onnx(qdq, check=False))}
    built: list[Any] = []

    def attempt(excluded: list[str]) -> tuple[float, dict[str, Any]]:
        calibrate_onnx(fused, qdq, data, dataclasses.replace(options, nodes_to_exclude=excluded))
        built.append(compile_model(qdq))
        with backend.runner(built[-1]) as runner:
            results = check.evaluate(runner.infer)
        worst = check.worst_drop(results)
        return (worst if worst is not None else 0.0), results

    result = run_fallback(
        ranking, attempt, request.max_accuracy_drop, drop, limit, on_step, quantized
    )
    report.fallback = result.to_dict()
    _stage(report, "fallback", started, work, qdq, {"met": result.met, "layers": result.excluded})
    if not result.met:
        report.notes.append(
            f"accuracy fallback kept {len(result.excluded)} layer(s) in float and still missed "
            f"the {request.max_accuracy_drop:g} pt budget"
        )
    return built[-1] if built else artifact


def evaluate(
    run_dir: str | Path,
    data: str,
    samples: int | None = None,
    save: bool = True,
    against: str | Path | None = None,
    stability: int = 0,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """Evaluate a run folder's compiled artifact on a set, next to the FP32 reference.

    With `against`, the reference is another run folder's artifact instead (e.g. the
    OpenVINO INT8 model against the ONNX Runtime one built from the same statistics);
    the labels, where the set has them, still score both.

    Args:
        run_dir: A run folder made by ``deploykit export``.
        data: A set name (``deploykit datasets``), a manifest, or an image folder with
            labels (sub-folder names or a labels file).
        samples: Inputs to use; None = the whole set.
        save: Record the result in the run's report.json under ``accuracy`` (not with
            `against`).
        against: Another run folder whose artifact is the reference.
        stability: Also run this many copies of the set with each input moved by one
            grey level in one value, and compare the artifact with itself
            (`deploykit.harness.stability`): the floor for any agreement figure.

    Returns:
        The evaluation (see :class:`deploykit.harness.evaluate.Evaluation`).

    Raises:
        UserError: A negative `stability`, or a run folder or set that cannot be read.
    """
    from deploykit.backends.base import CompiledArtifact
    from deploykit.harness.datasets import load_eval_data
    from deploykit.harness.evaluate import evaluate_outputs, run_batched
    from deploykit.models.loaders import ModelSource
    from deploykit.stages import bnrecal

    if stability < 0:
        raise UserError(f"--stability takes a number of draws (0 = off), got {stability}")
    folder = Path(run_dir)
    report = load_report(folder)
    backend = require_backend(report.target)
    artifact = CompiledArtifact.load(folder / report.backend_folder())
    source = ModelSource.from_dict(report.model_source)
    on_step(f"loading {data}")
    dataset = load_eval_data(data, artifact.contract, samples)
    batch = int(report.input.get("batch", 1))
    on_step(f"evaluating {dataset.inputs.shape[0]} inputs")
    if against is not None:
        other_dir = Path(against)
        other = load_report(other_dir)
        other_artifact = CompiledArtifact.load(other_dir / other.backend_folder())
        with require_backend(other.target).runner(other_artifact) as other_runner:
            reference_outputs = run_batched(
                other_runner.infer, dataset.inputs, int(other.input.get("batch", 1))
            )
        label = f"{other.target} {other.precision} ({other_dir})"
        save = False
    else:
        module = load_torch(source) if source.is_torch else None
        if module is not None and report.weights == bnrecal.WEIGHTS_LABEL:
            # The run exported the re-estimated model: rebuild the same reference.
            bnrecal.recalibrate_model(module, source.ref, artifact.contract, seed=source.seed)
        reference, label = _reference(module, folder / "model.onnx")
        reference_outputs = run_batched(
            reference, dataset.inputs, REFERENCE_BATCH if module is not None else batch
        )
    with backend.runner(artifact) as runner:
        started = time.perf_counter()
        outputs = run_batched(runner.infer, dataset.inputs, batch)
        result = evaluate_outputs(
            outputs, reference_outputs, dataset, label, time.perf_counter() - started
        )
        if stability:
            from deploykit.harness.stability import measure_stability

            on_step(f"stability: {stability} one-grey-level draws")
            contract = artifact.contract
            steady = measure_stability(
                runner.infer,
                dataset.inputs,
                contract.mean,
                contract.std,
                batch,
                stability,
                base=outputs,
            )
            result = dataclasses.replace(result, stability=steady.to_dict())
    if save:
        report.accuracy = {**(report.accuracy or {}), result.dataset: result.to_dict()}
        report.save(folder)
    return {
        "schema_version": 1,
        "kind": "eval",
        "run_dir": str(folder),
        "model": report.model,
        "target": report.target,
        "precision": report.precision,
        "evaluation": result.to_dict(),
        "summary": result.summary(),
    }


def _fidelity(
    runner: Runner,
    module: Any,
    onnx_path: Path,
    contract: InputContract,
    samples: int,
    batch: int,
    seed: int,
) -> tuple[Fidelity, str]:
    if samples < 1:
        raise UserError("--fidelity-samples must be at least 1")
    count = -(-samples // batch) * batch
    inputs = synthetic_images(contract, count, seed=10_000 + seed)
    reference, label = _reference(module, onnx_path)
    refs, outs = [], []
    for start in range(0, count, batch):
        chunk = inputs[start : start + batch]
        refs.append(reference(chunk))
        outs.append(runner.infer(chunk))
    return compare_outputs(np.concatenate(refs), np.concatenate(outs)), label


def _latency(
    runner: Runner, contract: InputContract, batch: int, threads: int, request: ExportRequest
) -> LatencyStats:
    if request.runs < 1:
        raise UserError("--runs must be at least 1")
    runner.prepare(synthetic_images(contract, batch, seed=99))
    options = LatencyOptions(
        warmup_runs=request.warmup,
        runs=request.runs,
        min_seconds=request.min_seconds,
        max_seconds=max(60.0, request.min_seconds),
    )
    if getattr(runner, "device", "cpu") == "cuda" and hasattr(runner, "enqueue"):
        from deploykit.harness.gpu import latency_stats

        return latency_stats(
            runner,  # type: ignore[arg-type]  # a CUDA runner: has stream and enqueue
            synthetic_images(contract, batch, seed=99),
            request.runs,
            request.warmup,
        )
    return measure(runner.run_prepared, batch=batch, threads=threads, options=options)


class _DryRunDone(Exception):
    """Ends a ``--dry-run`` export after the plan stage (the run folder is still written)."""


def _gpu_device(device: str) -> dict[str, Any]:
    """The report's ``device`` for a CUDA run: the GPU's name, capability and clocks."""
    from deploykit.harness.gpu import gpu_info, gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    return {"kind": device, "note": reason} if reason else gpu_info()


def _backend_extra(request: ExportRequest, backend: str, final: Path) -> dict[str, Any]:
    """Backend options; TensorRT reuses the timing cache of the previous build of this run."""
    extra = dict(request.extra)
    previous = final.with_name(final.name.removesuffix(".dry-run")) / "tensorrt" / "timing.cache"
    if backend == "tensorrt" and not extra.get("timing_cache") and previous.is_file():
        extra["timing_cache"] = str(previous)
    return extra


def _plan_stage(
    report: Report,
    work: Path,
    backend: Any,
    compile_input: Path | None,
    contract: InputContract,
    options: CompileOptions,
    on_step: Step,
) -> None:
    """Record what the backend would build (``--dry-run``); TensorRT writes its build ONNX."""
    on_step(f"planning the {backend.display_name} build")
    started = time.perf_counter()
    availability = backend.is_available()
    plan = backend.plan(compile_input, work, contract, options)
    report.backend = {
        "name": backend.name,
        "version": backend.version(),
        "dry_run": True,
        "available": availability.ok,
        "reason": "" if availability.ok else availability.message(),
        "plan": plan,
    }
    onnx = Path(work, plan["onnx"]) if plan.get("onnx") else None  # relative to the run folder
    _stage(report, "plan", started, work, onnx, {"backend": backend.name})


def _hash_artifacts(work: Path) -> dict[str, str]:
    hashes = {}
    for path in sorted(work.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name != "report.json":
            hashes[str(path.relative_to(work))] = sha256_file(path)
    return hashes


def _recipe_yaml(request: ExportRequest, batch: int, threads: int) -> str:
    # The resolved recipe (deploykit.recipes): `deploykit run` replays it.
    from deploykit.recipes.resolve import request_yaml

    return request_yaml(request, batch, threads)


def package(
    run_dir: str | Path,
    out: str | Path | None = None,
    options: Any = None,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """Package a run folder into a verifiable edge bundle (see :mod:`deploykit.package.build`).

    Args:
        run_dir: A run folder written by `export`.
        out: The ``.dkb`` file to write.
        options: :class:`deploykit.package.formats.PackageOptions` (format, labels, ...).
        on_step: Progress callback.
    """
    from deploykit.package.build import package as build_package

    return build_package(run_dir, out, options, on_step)


def verify_bundle(
    bundle: str | Path, extract_to: str | Path | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Verify a bundle here: hashes, manifest, compatibility, smoke and reference inference."""
    from deploykit.package.verify import verify

    return verify(bundle, extract_to=extract_to, threads=threads)


def inspect_bundle(bundle: str | Path) -> dict[str, Any]:
    """What a bundle holds (hashes and manifest checked, nothing run)."""
    from deploykit.package.verify import inspect

    return inspect(bundle)
