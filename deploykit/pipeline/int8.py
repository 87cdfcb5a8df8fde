"""The INT8 stages of a run: calibration, a backend's own quantizer, accuracy and fallback.

Each stage records itself in the run's report (:func:`record_stage`); the calibration
data and options travel on to the fallback, which recalibrates with layers excluded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.fsutil import staged_dir, write_text_atomic
from deploykit.harness.environment import versions
from deploykit.harness.report import Report
from deploykit.models.contract import InputContract
from deploykit.models.loaders import load_torch, resolve
from deploykit.pipeline.records import (
    REFERENCE_BATCH,
    fp32_reference,
    hash_artifacts,
    import_onnx,
    record_stage,
)
from deploykit.pipeline.request import ExportRequest, Step, quiet


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
    weight_rounding: str = "auto",
    calib_cache: bool = True,
    weights: str | None = None,
    input_size: tuple[int, int] | None = None,
    opset: int = 18,
    seed: int = 0,
    exact_residuals: bool = False,
    overflow_fix: str = "auto",
    keep_float: Sequence[str] = (),
    on_step: Step = quiet,
) -> dict[str, Any]:
    """Export, fuse and calibrate `model` into ``<out>/model.int8.qdq.onnx`` (no backend).

    The default encoding is the portable symmetric one (s8s8: zero points 0, float
    biases), which TensorRT's strongly typed builder requires, checked against TensorRT's
    Q/DQ rules; u8s8 is what ONNX Runtime runs fastest on x86, mixed what OpenVINO does.
    `keep_float` names layers (or run folders, see :func:`keep_float_layers`) left in
    float, e.g. the layers an export's accuracy fallback kept on another backend.

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
        weight_rounding=weight_rounding,
        use_cache=calib_cache,
        exact_residuals=exact_residuals,
        overflow_fix=overflow_fix,
    )
    options.validate()
    source, contract = resolve(model, weights, seed, input_size)
    options = dataclasses.replace(
        options, nodes_to_exclude=keep_float_layers(keep_float, source.name)
    )
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
            onnx_src = import_onnx(Path(source.ref), work / "model.onnx")
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
            "artifacts": hash_artifacts(work),
        }
        write_text_atomic(work / "calibration.json", json.dumps(result, indent=2) + "\n")
    result["out"] = str(final)
    return result


def keep_float_layers(values: Iterable[str], model: str) -> tuple[str, ...]:
    """The layers `--keep-float` names, in order, without repeats.

    Each value is a comma-separated list of node names of the fused graph, or a run
    folder (or its report.json): that run's float layers, the ones it was told to keep
    and the ones its accuracy fallback kept. So the layers one backend's fallback found
    carry to another backend's export, or to the portable file for TensorRT.

    Args:
        values: What `--keep-float` was given.
        model: The model being quantized (a run folder must be of the same model).

    Raises:
        UserError: A run folder whose report cannot be read, of another model, or
            without INT8 calibration.
    """
    layers: list[str] = []
    for value in values:
        for part in (p.strip() for p in value.split(",")):
            path = Path(part)
            if path.is_dir() or (path.suffix == ".json" and path.is_file()):
                layers += _run_float_layers(path if path.is_dir() else path.parent, model)
            elif part:
                layers.append(part)
    return tuple(dict.fromkeys(layers))


def _run_float_layers(run_dir: Path, model: str) -> list[str]:
    """What a run folder kept in float: named layers, then the fallback's."""
    from deploykit.harness.report import load_report

    report = load_report(run_dir)
    if report.model != model:
        raise UserError(
            f"{run_dir} is a run of {report.model}, not {model}: --keep-float takes a run "
            f"folder of {model}"
        )
    if report.precision != "int8" or not any(s.name == "calibrate" for s in report.stages):
        raise UserError(
            f"{run_dir} is not a deploykit INT8 run (precision {report.precision}, no "
            "calibration stage): --keep-float takes node names or an INT8 run folder"
        )
    named, fallen = float_layers(report)
    return named + fallen


def float_layers(report: Report) -> tuple[list[str], list[str]]:
    """The layers a run keeps in float on purpose: (named with --keep-float, fallen back)."""
    calibrate = next((s for s in report.stages if s.name == "calibrate"), None)
    named = list(calibrate.details.get("nodes_excluded") or []) if calibrate else []
    fallen = list((report.fallback or {}).get("excluded") or [])
    return named, fallen


def bn_recalibration_stage(
    report: Report,
    work: Path,
    module: Any,
    source: Any,
    contract: InputContract,
    request: ExportRequest,
    caps: Any,
) -> None:
    """Re-estimate a random-weight model's BatchNorm statistics and record it in `weights`.

    `export` has checked that the model has random weights.
    """
    from deploykit.stages.bnrecal import recalibrate_model

    if not request.bn_recalibrate:
        return
    if not caps.needs_onnx:
        report.notes.append(
            "BatchNorm statistics not re-estimated: the torch target rebuilds the model "
            "from its source"
        )
        return
    started = time.perf_counter()
    recal = recalibrate_model(module, source.ref, contract, seed=request.seed)
    report.weights = recal.weights_label
    record_stage(report, "bn-recalibration", started, work, None, recal.to_dict())


def calibrate_stage(
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
    record_stage(report, "calibrate", started, work, qdq, calib_report.to_dict())
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


def native_quantize_stage(
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
    record_stage(report, "calibrate", started, work, path, details)
    return Path(path)


def accuracy_stage(
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
    """Evaluate on real data, gate the top-1 drop (and the top-5 overlap when asked), and
    fall back layers if INT8 misses either.

    Returns:
        The artifact to keep: the first one, or the fallback's last.
    """
    from deploykit.harness.accuracy import AccuracyCheck

    on_step(f"evaluating on {', '.join(sets)}")
    started = time.perf_counter()
    reference, label = fp32_reference(module, work / "model.onnx")
    check = AccuracyCheck.load(
        sets,
        contract,
        request.eval_samples,
        reference,
        label,
        batch,
        request.max_accuracy_drop,
        reference_batch=REFERENCE_BATCH if module is not None else None,
        min_top5_overlap=request.min_top5_overlap,
    )
    with backend.runner(artifact) as runner:
        report.accuracy = check.evaluate(runner.infer)
    record_stage(report, "accuracy", started, work, None, {"sets": sets})
    drop = check.worst_drop()
    if not check.met() and calibrated is not None and request.fallback:
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
    drop: float | None,
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
    kept = tuple(options.nodes_to_exclude)  # --keep-float's layers stay in float throughout
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
        in_float = tuple(dict.fromkeys((*kept, *excluded)))
        calibrate_onnx(fused, qdq, data, dataclasses.replace(options, nodes_to_exclude=in_float))
        built.append(compile_model(qdq))
        with backend.runner(built[-1]) as runner:
            results = check.evaluate(runner.infer)
        worst = check.worst_drop(results)
        return (worst if worst is not None else 0.0), results

    result = run_fallback(
        ranking,
        attempt,
        request.max_accuracy_drop,
        drop,
        limit,
        on_step,
        quantized,
        accept=lambda _drop, results: check.met(results),
        min_top5_overlap=request.min_top5_overlap,
    )
    report.fallback = result.to_dict()
    record_stage(
        report, "fallback", started, work, qdq, {"met": result.met, "layers": result.excluded}
    )
    if not result.met:
        target = f"the {request.max_accuracy_drop:g} pt budget"
        if request.min_top5_overlap is not None:
            target += f" or the {request.min_top5_overlap:g}% top-5 overlap"
        report.notes.append(
            f"accuracy fallback kept {len(result.excluded)} layer(s) in float and still missed "
            f"{target}"
        )
    return built[-1] if built else artifact
