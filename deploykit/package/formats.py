"""One builder per bundle format: which files of a run folder go in, converted how.

Each builder takes the run folder and the packaging options and returns a
:class:`Payload` (artifact files as bytes plus what the manifest says about them).
Adding a format means adding a builder and one line in :data:`BUILDERS`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.fsutil import sha256_file
from deploykit.harness.report import Report
from deploykit.runtime.compat import installed_version, parse_version

# Oldest ONNX Runtime release that implements each default-domain opset (ONNX Runtime's
# compatibility table); a newer opset or IR version falls back to the packaging machine's.
ORT_FOR_OPSET = {
    13: "1.7",
    14: "1.9",
    15: "1.10",
    16: "1.11",
    17: "1.12",
    18: "1.14",
    19: "1.15",
    20: "1.17",
    21: "1.18",
    22: "1.20",
}
# Oldest ONNX Runtime release that reads each ONNX IR version.
ORT_FOR_IR = {7: "1.6", 8: "1.10", 9: "1.15", 10: "1.18", 11: "1.22"}
TENSORRT_PLANS = ("engine.plan", "model.plan", "engine.engine", "model.engine")
TENSORRT_METADATA = ("engine.json", "metadata.json")
DEVICE_KEYS = ("gpu_name", "compute_capability", "tensorrt_version")


@dataclass
class PackageOptions:
    """Options of `deploykit package`.

    Attributes:
        format: Bundle format; None picks the run's own (onnx for onnxruntime runs).
        labels: Text file of class names, one per line; None uses the model's known labels.
        ort_platform: ``arm`` or ``amd64``: the CPU an ``.ort`` model is optimised for.
        type_reduction: Record operator types too in the reduced-build config (smaller builds).
        min_runtime_version: Override the oldest runtime version the bundle accepts.
        references: Reference images whose outputs the bundle carries (0 for none).
    """

    format: str | None = None
    labels: str | None = None
    ort_platform: str = "arm"
    type_reduction: bool = True
    min_runtime_version: str | None = None
    references: int = 2


@dataclass
class RunFolder:
    """A run folder and its report; files are checked against the report's hashes."""

    path: Path
    report: Report

    def file(self, relative: str) -> Path:
        """A file of the run, checked against report.json's sha256.

        Raises:
            UserError: Missing, or changed since the export.
        """
        path = self.path / relative
        if not path.is_file():
            raise UserError(f"run folder {self.path} has no {relative}; re-run deploykit export")
        expected = self.report.artifacts.get(relative)
        if expected is not None and sha256_file(path) != expected:
            raise UserError(
                f"{path} changed since the export (sha256 differs from report.json); "
                "re-run deploykit export"
            )
        return path

    def backend_folder(self) -> Path:
        """The backend artifact's folder."""
        return self.path / self.report.backend_folder()


@dataclass
class Payload:
    """What a format builder puts in the bundle."""

    files: dict[str, bytes]
    precision: str
    backend: dict[str, Any]
    artifact: dict[str, Any]
    device: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)


def portable_onnx(run: RunFolder) -> tuple[Path, str]:
    """The run's portable ONNX model: the INT8 Q/DQ model when there is one, else the fused FP32.

    Returns:
        The file and the precision it computes in.

    Raises:
        UserError: An INT8 run quantized into an OpenVINO IR (no portable INT8 ONNX).
    """
    stages = {stage.name: stage for stage in run.report.stages}
    for name in ("fallback", "calibrate"):
        stage = stages.get(name)
        if stage is not None and stage.artifact:
            if not stage.artifact.endswith(".onnx"):
                raise UserError(
                    f"this run was quantized into {stage.artifact} (not ONNX); package it "
                    "with --format openvino, or export with --quantizer deploykit for a "
                    "portable INT8 ONNX"
                )
            return run.file(stage.artifact), "int8"
    for name in ("fuse", "export"):
        stage = stages.get(name)
        if stage is not None and stage.artifact:
            return run.file(stage.artifact), "fp32"
    raise UserError(f"run folder {run.path} has no ONNX model; re-run deploykit export")


def _onnx_io(model: Any) -> dict[str, Any]:
    graph = model.graph
    initialisers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]

    def dims(value: Any) -> list[int | str]:
        shape = value.type.tensor_type.shape.dim
        return [d.dim_value if d.dim_value > 0 else (d.dim_param or "?") for d in shape]

    first = dims(inputs[0])
    return {
        "input_name": inputs[0].name,
        "output_name": graph.output[0].name,
        "batch": first[0] if first and isinstance(first[0], int) else None,
        "input_shape": first,
        "output_shape": dims(graph.output[0]),
    }


def _ort_min_version(model: Any) -> str:
    """The oldest ONNX Runtime that reads the model's IR version and implements its opset."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    here = ".".join(map(str, parse_version(installed_version("onnxruntime") or "1.20")[:2]))
    candidates = [ORT_FOR_OPSET.get(opset, here), ORT_FOR_IR.get(int(model.ir_version), here)]
    return max(candidates, key=parse_version)


def _major_minor(version: str | None) -> str | None:
    return ".".join(map(str, parse_version(version)[:2])) if version else None


def build_onnx(run: RunFolder, options: PackageOptions) -> Payload:
    """Portable ONNX: the fused FP32 model or the INT8 Q/DQ model, as exported."""
    import onnx

    path, precision = portable_onnx(run)
    model = onnx.load(str(path))
    io = _onnx_io(model)
    return Payload(
        files={"model.onnx": path.read_bytes()},
        precision=precision,
        backend={
            "name": "onnxruntime",
            "min_version": options.min_runtime_version or _ort_min_version(model),
            "built_with": installed_version("onnxruntime"),
        },
        artifact={"files": ["model.onnx"], "source_file": path.name, **_shapes(io)},
    )


def build_onnx_fp16(run: RunFolder, options: PackageOptions) -> Payload:
    """FP16 ONNX (FP32 inputs and outputs) for GPUs and NPUs that prefer half precision."""
    import onnx
    from onnxconverter_common import float16

    path, precision = portable_onnx(run)
    if precision != "fp32":
        raise UserError(
            "--format onnx-fp16 converts an FP32 model; package an fp32 run "
            "(deploykit export MODEL --target onnxruntime)"
        )
    with warnings.catch_warnings(record=True) as caught:
        # One warning per weight too small (or large) for FP16; counted in the notes instead.
        warnings.simplefilter("always", UserWarning)
        model = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    clamped = sum("truncated" in str(w.message) for w in caught)
    io = _onnx_io(model)
    return Payload(
        files={"model.onnx": model.SerializeToString()},
        precision="fp16",
        backend={
            "name": "onnxruntime",
            "min_version": options.min_runtime_version or _ort_min_version(model),
            "built_with": installed_version("onnxruntime"),
        },
        artifact={"files": ["model.onnx"], "source_file": path.name, **_shapes(io)},
        notes=[
            "converted to FP16 with onnxconverter-common (FP32 inputs and outputs kept)"
            + (f"; {clamped} weight values outside FP16's range were clamped" if clamped else "")
        ],
    )


def build_ort_mobile(run: RunFolder, options: PackageOptions) -> Payload:
    """ONNX Runtime's ``.ort`` format plus the operator config of a reduced (minimal) build."""
    import onnx

    if options.ort_platform not in ("arm", "amd64"):
        raise UserError(f"--ort-platform must be arm or amd64, not {options.ort_platform!r}")
    path, precision = portable_onnx(run)
    io = _onnx_io(onnx.load(str(path), load_external_data=False))
    with tempfile.TemporaryDirectory(prefix="deploykit-ort-") as tmp:
        work = Path(tmp)
        shutil.copyfile(path, work / "model.onnx")
        command = [
            sys.executable,
            "-m",
            "onnxruntime.tools.convert_onnx_models_to_ort",
            str(work / "model.onnx"),
            "--output_dir",
            str(work / "ort"),
            "--optimization_style",
            "Fixed",
            "--target_platform",
            options.ort_platform,
        ]
        if options.type_reduction:
            command.append("--enable_type_reduction")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        ort_file = work / "ort" / "model.ort"
        configs = sorted((work / "ort").glob("*.config"))
        if result.returncode != 0 or not ort_file.is_file() or not configs:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"onnxruntime could not convert {path.name} to .ort: {tail[0]}")
        config_name = configs[0].name.removeprefix("model.")
        files = {"model.ort": ort_file.read_bytes(), config_name: configs[0].read_bytes()}
    built_with = installed_version("onnxruntime")
    return Payload(
        files=files,
        precision=precision,
        backend={
            "name": "onnxruntime",
            # ORT format models load in the release that wrote them and later ones.
            "min_version": options.min_runtime_version or _major_minor(built_with),
            "built_with": built_with,
            "settings": {
                "optimization_style": "Fixed",
                "target_platform": options.ort_platform,
                "type_reduction": options.type_reduction,
            },
        },
        artifact={
            "files": ["model.ort"],
            "operator_config": config_name,
            "source_file": path.name,
            **_shapes(io),
        },
        notes=[
            f".ort converted with onnxruntime {built_with}'s convert_onnx_models_to_ort "
            f"(Fixed optimisation, {options.ort_platform}); build a minimal runtime with "
            f"--minimal_build --include_ops_by_config {config_name}"
        ],
    )


def build_openvino(run: RunFolder, options: PackageOptions) -> Payload:
    """The run's OpenVINO IR (model.xml + model.bin)."""
    if run.report.target != "openvino":
        raise UserError(
            f"--format openvino needs an openvino run folder, this one is {run.report.target}; "
            "export with --target openvino"
        )
    folder = run.report.backend_folder()
    meta = json.loads(run.file(f"{folder}/backend.json").read_text())
    xml, weights = meta["files"][0], meta["files"][1]
    settings = meta.get("settings", {})
    built_with = run.report.backend.get("version") or installed_version("openvino")
    return Payload(
        files={
            "model.xml": run.file(f"{folder}/{xml}").read_bytes(),
            "model.bin": run.file(f"{folder}/{weights}").read_bytes(),
        },
        precision=run.report.precision,
        backend={
            "name": "openvino",
            "min_version": options.min_runtime_version or _major_minor(built_with),
            "built_with": built_with,
            "settings": {
                "INFERENCE_PRECISION_HINT": settings.get("INFERENCE_PRECISION_HINT", "f32")
            },
        },
        artifact={
            "files": ["model.xml", "model.bin"],
            "input_name": meta.get("input_name"),
            "batch": run.report.input.get("batch")
            if not run.report.input.get("dynamic_batch")
            else None,
            "dynamic_batch": run.report.input.get("dynamic_batch"),
        },
    )


def build_tensorrt(run: RunFolder, options: PackageOptions) -> Payload:
    """A TensorRT engine folder: the serialized plan and its metadata (GPU, TensorRT version)."""
    folder = run.backend_folder()
    plan = next((name for name in TENSORRT_PLANS if (folder / name).is_file()), None)
    meta_name = next((name for name in TENSORRT_METADATA if (folder / name).is_file()), None)
    if plan is None or meta_name is None:
        raise UserError(
            f"{folder} holds no TensorRT engine ({' or '.join(TENSORRT_PLANS)} with "
            f"{' or '.join(TENSORRT_METADATA)}); export with --target tensorrt on the GPU machine"
        )
    prefix = run.report.backend_folder()
    meta_path = run.file(f"{prefix}/{meta_name}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path} is not valid JSON ({exc}); re-run the export") from exc
    device = engine_device(meta)
    missing = [key for key in DEVICE_KEYS if not device.get(key)]
    if missing:
        raise UserError(
            f"{meta_path} lacks {', '.join(missing)}; the engine's GPU and TensorRT version "
            "must be recorded to package it"
        )
    return Payload(
        files={
            "engine.plan": run.file(f"{prefix}/{plan}").read_bytes(),
            "engine.json": meta_path.read_bytes(),
        },
        precision=str(meta.get("precision", run.report.precision)),
        backend={
            "name": "tensorrt",
            "min_version": device["tensorrt_version"],
            "built_with": device["tensorrt_version"],
        },
        artifact={
            "files": ["engine.plan"],
            "input_name": meta.get("input_name"),
            "output_name": meta.get("output_name"),
            "batch": run.report.input.get("batch"),
            "dynamic_batch": run.report.input.get("dynamic_batch"),
        },
        device=device,
        notes=[
            "TensorRT engines run only on the GPU model and TensorRT version they were built with"
        ],
    )


def engine_device(meta: dict[str, Any]) -> dict[str, Any]:
    """The manifest's device section from an engine's metadata.

    Reads the TensorRT backend's ``engine.json`` (``tensorrt_version``, ``gpu.name``,
    ``gpu.compute_capability``, ``hardware_compatibility``, ``extra.version_compatible``)
    or a flat ``gpu_name`` / ``compute_capability`` record.
    """
    gpu: dict[str, Any] = meta["gpu"] if isinstance(meta.get("gpu"), dict) else {}
    extra: dict[str, Any] = meta["extra"] if isinstance(meta.get("extra"), dict) else {}
    return {
        "kind": "cuda",
        "gpu_name": str(meta.get("gpu_name") or gpu.get("name") or ""),
        "compute_capability": str(
            meta.get("compute_capability") or gpu.get("compute_capability") or ""
        ),
        "tensorrt_version": str(meta.get("tensorrt_version") or ""),
        "hardware_compatibility": str(meta.get("hardware_compatibility") or "NONE"),
        "version_compatible": bool(extra.get("version_compatible", False)),
    }


def _shapes(io: dict[str, Any]) -> dict[str, Any]:
    return {
        "input_name": io["input_name"],
        "output_name": io["output_name"],
        "batch": io["batch"],
    }


BUILDERS: dict[str, Callable[[RunFolder, PackageOptions], Payload]] = {
    "onnx": build_onnx,
    "onnx-fp16": build_onnx_fp16,
    "ort-mobile": build_ort_mobile,
    "openvino": build_openvino,
    "tensorrt": build_tensorrt,
}
DEFAULT_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino", "tensorrt": "tensorrt"}
