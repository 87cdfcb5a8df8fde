"""`deploykit export`: export -> fuse -> [calibrate] -> compile -> accuracy -> fidelity -> latency.

:func:`export` checks the whole request before it writes anything (bad input is a
:class:`UserError` and no run folder), then builds the run folder in a staging folder
that replaces the old one only when the report is written.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import BatchRange, CompileOptions, Runner
from deploykit.backends.registry import get_backend, require_backend
from deploykit.errors import GateError, UserError
from deploykit.fsutil import staged_dir, write_text_atomic
from deploykit.harness.environment import cpu_info, usable_cores, versions
from deploykit.harness.fidelity import PRECISION_TOLERANCE, Fidelity, compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.harness.latency import LatencyOptions, LatencyStats, measure
from deploykit.harness.report import Gate, Report, gate_failures, gate_status
from deploykit.models.contract import InputContract
from deploykit.models.loaders import RANDOM_WEIGHTS_NOTE, ModelSource, load_torch, resolve
from deploykit.pipeline import calibrated as calibration_folder
from deploykit.pipeline import int8
from deploykit.pipeline.records import (
    fp32_reference,
    gpu_device,
    hash_artifacts,
    import_onnx,
    record_stage,
)
from deploykit.pipeline.request import ExportRequest, ExportResult, Step, quiet


@dataclass
class _Plan:
    """A checked request and what it resolved to, before anything is written."""

    request: ExportRequest
    backend: Any
    source: ModelSource
    contract: InputContract
    calib_options: Any  # CalibrationOptions for INT8, else None
    eval_sets: list[str]
    batch_range: BatchRange | None
    batch: int
    threads: int
    export_options: Any  # deploykit.stages.export.ExportOptions
    final: Path
    prebuilt: calibration_folder.CalibrationFolder | None = None  # a calibrate folder as MODEL


def export(request: ExportRequest, on_step: Step = quiet) -> ExportResult:
    """Run export -> fuse -> compile -> measure and write the run folder.

    Returns:
        The run folder and its report (also written there as report.json).

    Raises:
        UserError: Bad input or unavailable backend (nothing is written).
        GateError: A numeric gate failed; the run folder is kept with status failed.
    """
    plan = _check(request)
    request = plan.request
    report = _new_report(plan)
    failure: GateError | None = None
    with staged_dir(plan.final) as work:
        try:
            _run(plan, report, work, on_step)
            failure = _gate_failure(plan, report)
        except GateError as exc:
            report.status = f"failed: {exc}"
            failure = exc
        except _DryRunDone:
            report.status = "dry-run"
        write_text_atomic(
            work / "recipe.resolved.yaml", _recipe_yaml(request, plan.batch, plan.threads)
        )
        report.artifacts = hash_artifacts(work)
        report.save(work)
    if failure is not None:
        failure.run_dir = plan.final
        raise failure
    return ExportResult(run_dir=plan.final, report=report)


def _check(request: ExportRequest) -> _Plan:
    """Check every option and resolve the model; raises UserError before any work."""
    from deploykit.stages.export import ExportOptions

    request, backend = _check_target(request)
    prebuilt = calibration_folder.find(request.model)
    if prebuilt is not None:
        calibration_folder.check_request(request, prebuilt, backend.capabilities())
        source, contract = prebuilt.source(), prebuilt.contract()
    else:
        source, contract = resolve(request.model, request.weights, request.seed, request.input_size)
        _refuse_quantized_onnx(source)
    if request.bn_recalibrate and not source.random_weights:
        raise UserError("bn_recalibrate applies to random-weight models only; drop it")
    pretrained = _pretrained(source)
    calib_options = None
    if request.precision == "int8" and prebuilt is None:
        if request.calib is None and pretrained is not None and pretrained.calib_set:
            request = dataclasses.replace(request, calib=pretrained.calib_set)
        calib_options = _int8_options(request, backend, source.name)
    if request.max_accuracy_drop < 0:
        raise UserError(f"--max-accuracy-drop must be >= 0, got {request.max_accuracy_drop}")
    if request.min_top5_overlap is not None and not 0 < request.min_top5_overlap <= 100:
        raise UserError(
            f"--min-top5-overlap is a percentage in (0, 100], got {request.min_top5_overlap}"
        )
    if request.max_fallback_layers is not None and request.max_fallback_layers < 1:
        raise UserError(
            f"--max-fallback-layers must be at least 1, got {request.max_fallback_layers}; "
            "use --no-fallback to turn the fallback off"
        )
    eval_sets = _eval_sets(request, pretrained)
    if request.min_top5_overlap is not None and not eval_sets:
        raise UserError(
            "--min-top5-overlap needs evaluation data: pass --eval-data SET "
            "(`deploykit datasets` lists the shipped sets)"
        )
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
    if source.is_torch and prebuilt is None:
        options.order()  # validate opset/exporter before any work
    final = Path(request.out) / source.name / f"{backend.name}-{request.precision}"
    if request.dry_run:  # never replaces a built run folder
        final = final.with_name(final.name + ".dry-run")
    return _Plan(
        request=request,
        backend=backend,
        source=source,
        contract=contract,
        calib_options=calib_options,
        eval_sets=eval_sets,
        batch_range=rng,
        batch=batch,
        threads=threads,
        export_options=options,
        final=final,
        prebuilt=prebuilt,
    )


def _refuse_quantized_onnx(source: ModelSource) -> None:
    """An ONNX file that is already Q/DQ INT8 has no FP32 model to start from.

    Raises:
        UserError: The file holds QuantizeLinear/DequantizeLinear nodes.
    """
    if source.kind != "onnx":
        return
    from deploykit.stages.onnxcheck import load_onnx, op_counts

    counts = op_counts(load_onnx(Path(source.ref), check=False))
    if counts.get("QuantizeLinear") or counts.get("DequantizeLinear"):
        raise UserError(
            f"{source.ref} is already quantized ({counts.get('QuantizeLinear', 0)} "
            "QuantizeLinear nodes): export the FP32 model, or compile a `deploykit calibrate` "
            "folder (deploykit export FOLDER --target T)"
        )


def _check_target(request: ExportRequest) -> tuple[ExportRequest, Any]:
    """The backend, which must run the request's precision on its device."""
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
    return request, backend


def _int8_options(request: ExportRequest, backend: Any, model: str) -> Any:
    """The checked calibration options of an INT8 request."""
    from deploykit.stages.calibrate import CalibrationOptions

    caps = backend.capabilities()
    if request.calib is None:
        raise UserError(
            "--precision int8 needs calibration data: --calib FOLDER|FILE.npy|synthetic "
            "(synthetic inputs prove fidelity only)"
        )
    options = CalibrationOptions(
        method=request.calib_method,
        percentile=request.calib_percentile,
        encoding=request.int8_encoding or caps.int8_encoding or "s8s8",
        per_channel=request.per_channel,
        bias_correction=request.bias_correction,
        weight_rounding=request.weight_rounding,
        use_cache=request.calib_cache,
        exact_residuals=request.exact_residuals,
        overflow_fix=request.overflow_fix,
        nodes_to_exclude=int8.keep_float_layers(request.keep_float or (), model),
    )
    options.validate()
    if options.nodes_to_exclude and request.quantizer != "deploykit":
        raise UserError(
            f"--keep-float edits deploykit's Q/DQ file; --quantizer {request.quantizer} "
            "quantizes by itself: drop --keep-float or use --quantizer deploykit"
        )
    if request.quantizer not in ("deploykit", caps.native_quantizer):
        native = f" or {caps.native_quantizer}" if caps.native_quantizer else ""
        hint = "" if native else f" (if {request.quantizer} is not installed: pip install it)"
        raise UserError(
            f"{backend.name} has no {request.quantizer!r} quantizer here; choose "
            f"--quantizer deploykit{native}{hint}"
        )
    return options


def _new_report(plan: _Plan) -> Report:
    """The report a run starts with: what was asked, on what, with which versions."""
    request, source, rng = plan.request, plan.source, plan.batch_range
    return Report(
        model=source.name,
        model_source=source.to_dict(),
        target=plan.backend.name,
        device=cpu_info() if request.device == "cpu" else gpu_device(request.device),
        precision=request.precision,
        weights="random" if source.random_weights else (source.weights_sha256 or "in-file"),
        notes=[RANDOM_WEIGHTS_NOTE] if source.random_weights else [],
        input={
            **plan.contract.to_dict(),
            "batch": plan.batch,
            "dynamic_batch": str(rng) if rng else None,
        },
        versions=versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _run(plan: _Plan, report: Report, work: Path, on_step: Step) -> None:
    """Every stage, in order, into the staging folder `work`."""
    request, backend, source, contract = plan.request, plan.backend, plan.source, plan.contract
    caps = backend.capabilities()
    module = None
    if source.is_torch and plan.prebuilt is None:
        on_step("loading the PyTorch model")
        module = load_torch(source)
        int8.bn_recalibration_stage(report, work, module, source, contract, request, caps)
    fused = None
    if plan.prebuilt is not None:
        compile_input: Path | None = calibration_folder.stage(
            report, work, plan.prebuilt, caps, on_step
        )
    elif caps.needs_onnx:
        fused = _onnx_stages(plan, report, work, module, on_step)
        compile_input = fused
    else:
        compile_input = None
    calibrated: tuple[Any, Any] | None = None
    if plan.calib_options is not None and fused is not None:
        if request.quantizer == "deploykit":
            compile_input, calibrated = int8.calibrate_stage(
                report, work, fused, contract, request, plan.calib_options, on_step
            )
        else:
            compile_input = int8.native_quantize_stage(
                report, work, fused, contract, request, backend, on_step
            )
    compile_options = CompileOptions(
        precision=request.precision,
        device=request.device,
        threads=plan.threads,
        batch=plan.batch,
        dynamic_batch=plan.batch_range,
        extra=_backend_extra(request, backend.name, plan.final),
    )
    if request.dry_run:
        _plan_stage(report, work, backend, compile_input, contract, compile_options, on_step)
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
    record_stage(report, "compile", started, work, artifact.folder, {"backend": backend.name})
    if plan.eval_sets:
        artifact = int8.accuracy_stage(
            report,
            work,
            backend,
            artifact,
            compile_model,
            module,
            contract,
            plan.batch,
            request,
            plan.eval_sets,
            calibrated,
            on_step,
        )
    report.gates.insert(0, _precision_gate(request.precision, artifact, report))
    _measure_stages(plan, report, work, artifact, module, on_step)


def _onnx_stages(plan: _Plan, report: Report, work: Path, module: Any, on_step: Step) -> Path:
    """Export (or import) the ONNX model and fuse it; returns the fused model."""
    from deploykit.stages.export import export_onnx
    from deploykit.stages.fuse import fuse_onnx

    started = time.perf_counter()
    if module is not None:
        on_step("exporting to ONNX")
        onnx_src = export_onnx(
            module, plan.contract, work / "model.onnx", plan.export_options, on_step
        )
    else:
        onnx_src = import_onnx(Path(plan.source.ref), work / "model.onnx")
    details = {
        "exporter": onnx_src.exporter or "none (ONNX input)",
        "opset": onnx_src.opset,
        "attempts": onnx_src.attempts,
        "checks": onnx_src.checks,
    }
    record_stage(report, "export", started, work, onnx_src.path, details)
    on_step("fusing the graph")
    started = time.perf_counter()
    fused, fuse_report = fuse_onnx(
        onnx_src, work / "model.fused.onnx", plan.contract, plan.export_options.check_batches()
    )
    record_stage(report, "fuse", started, work, fused.path, fuse_report.to_dict())
    return Path(fused.path)


def _measure_stages(
    plan: _Plan, report: Report, work: Path, artifact: Any, module: Any, on_step: Step
) -> None:
    """Fidelity against the FP32 model (a gate), then latency."""
    request = plan.request
    with plan.backend.runner(artifact) as runner:
        on_step(f"checking fidelity on {request.fidelity_samples} inputs")
        started = time.perf_counter()
        fidelity, reference = _fidelity(
            runner,
            module,
            work / "model.onnx",
            plan.contract,
            request.fidelity_samples,
            plan.batch,
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
        record_stage(report, "fidelity", started, work, None, {"reference": reference})
        on_step("measuring latency")
        started = time.perf_counter()
        latency = _latency(runner, plan.contract, plan.batch, plan.threads, request)
        report.latency = latency.to_dict()
        record_stage(report, "latency", started, work, None, {})


def _gate_failure(plan: _Plan, report: Report) -> GateError | None:
    """Mark the report failed and return the error when any gate failed."""
    failures = gate_failures(report.gates)
    if not failures:
        return None
    report.status = gate_status(report.gates)
    return GateError(f"{plan.source.name} on {plan.backend.name}: {failures}")


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


def _precision_gate(requested: str, artifact: Any, report: Report) -> Gate:
    """The runtime must compute in the requested precision.

    With layers kept in float (`--keep-float`, or by the accuracy fallback) the model
    is mixed on purpose: it passes when the runtime still runs integer kernels for the
    layers left in INT8.
    """
    effective = artifact.effective_precision
    named, fallen = int8.float_layers(report) if requested == "int8" else ([], [])
    if named or fallen:
        counts, why = _int8_layer_counts(artifact.info), []
        if named:
            why.append(f"{len(named)} kept in float by --keep-float")
        if fallen:
            why.append(f"{len(fallen)} kept in float by the accuracy fallback")
        return Gate(
            name="precision",
            passed=counts[0] > 0,
            detail=f"mixed: {counts[0]} compute layers in int8, {counts[1]} in float "
            f"({', '.join(why)})",
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
    reference, label = fp32_reference(module, onnx_path)
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
    record_stage(report, "plan", started, work, onnx, {"backend": backend.name})


def _recipe_yaml(request: ExportRequest, batch: int, threads: int) -> str:
    # The resolved recipe (deploykit.recipes): `deploykit run` replays it.
    from deploykit.recipes.resolve import request_yaml

    return request_yaml(request, batch, threads)
