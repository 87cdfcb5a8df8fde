"""One coverage row: export, fuse, calibrate once per encoding, then every target cell.

Errors are recorded in the row, never raised (see `deploykit.harness.coverage`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import DeployKitError, UserError
from deploykit.harness.coverage_graph import graph_structure, qdq_weight_scales, torch_conv_calls
from deploykit.harness.coverage_options import (
    CHAOTIC_GAIN,
    FP32_MIN_COSINE,
    INT8_MIN_COSINE,
    CoverageOptions,
    Row,
    Step,
    Target,
    known_issue,
)


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def run_row(
    row: Row,
    options: CoverageOptions,
    targets: list[Target],
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
        message = one_line(exc)
        result.setdefault("error", message)
        for target in targets:
            result["cells"][target.key] = skipped_cell(target, f"not run: {message}")
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result
    fp32_outputs: dict[str, np.ndarray] = {}
    for target in targets:
        if not target.available:
            result["cells"][target.key] = skipped_cell(target, f"unavailable: {target.reason}")
            continue
        step(f"{target.key}")
        result["cells"][target.key] = _run_cell(
            target, prepared, options, threads, work, fp32_outputs
        )
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def skipped_cell(target: Target, reason: str) -> dict[str, Any]:
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
    from deploykit.backends.torch.backend import reference_outputs

    reference = reference_outputs(module, inputs)
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
        prepared.export_error = one_line(exc)
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
        prepared.qdq_error = one_line(exc)
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
    from deploykit.backends.torch.backend import reference_outputs
    from deploykit.harness.fidelity import compare_outputs

    rng = np.random.default_rng(30_000 + seed)
    std = np.asarray(contract.std, dtype=np.float32).reshape(1, -1, 1, 1)
    noise = rng.uniform(-0.5, 0.5, size=inputs.shape).astype(np.float32) / 255.0 / std
    perturbed = reference_outputs(module, np.ascontiguousarray(inputs + noise, dtype=np.float32))
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
    target: Target,
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
        cell["error"] = one_line(exc)
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
    cell: dict[str, Any], target: Target, prepared: _Prepared, options: CoverageOptions
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
