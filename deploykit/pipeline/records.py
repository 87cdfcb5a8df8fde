"""What every pipeline stage leaves behind: stage records, artifact hashes, the references."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.fsutil import sha256_file
from deploykit.harness.report import Report, StageRecord

# PyTorch references take any batch: evaluation sets are handed to them this many at a time
# (the reference splits them further; see deploykit.backends.torch.backend.reference_outputs).
REFERENCE_BATCH = 64


def record_stage(
    report: Report,
    name: str,
    started: float,
    work: Path,
    artifact: Path | None,
    details: dict[str, Any],
) -> None:
    """Append a stage to `report`: its wall time since `started`, artifact and size, details.

    An artifact is recorded relative to the run folder `work`; a folder's size is the sum
    of its files, an ONNX file's includes its ``.data`` side file.
    """
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


def hash_artifacts(work: Path) -> dict[str, str]:
    """sha256 of every file in the run folder but report.json and hidden files."""
    hashes = {}
    for path in sorted(work.rglob("*")):
        if path.is_file() and not path.name.startswith(".") and path.name != "report.json":
            hashes[str(path.relative_to(work))] = sha256_file(path)
    return hashes


def import_onnx(src: Path, dst: Path) -> Any:
    """Check a user's ONNX file (checker, and it loads in ONNX Runtime), copy it to `dst`."""
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


def gpu_device(device: str) -> dict[str, Any]:
    """The report's ``device`` for a CUDA run: the GPU's name, capability and clocks."""
    from deploykit.harness.gpu import gpu_info, gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    return {"kind": device, "note": reason} if reason else gpu_info()


def fp32_reference(module: Any, onnx_path: Path) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """The FP32 reference: the PyTorch model, or ONNX Runtime on the input ONNX file."""
    if module is not None:
        from deploykit.backends.torch.backend import reference_outputs

        def torch_reference(x: np.ndarray) -> np.ndarray:
            return reference_outputs(module, x)

        return torch_reference, "pytorch fp32"
    from deploykit.stages.onnxcheck import OrtSession

    return OrtSession(onnx_path).run, "onnxruntime fp32 on the input ONNX file"
