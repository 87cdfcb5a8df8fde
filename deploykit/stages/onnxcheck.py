"""Shared ONNX helpers: load with a clear error, op counts, run with ONNX Runtime."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import OnnxFileError, UserError


def load_onnx(path: Path, check: bool = True) -> Any:
    """Load an ONNX model and run the checker, turning failures into one-line errors."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise OnnxFileError(
            f"cannot read ONNX file {path}: {type(exc).__name__}; re-export it or check the file"
        ) from exc
    if check:
        try:
            onnx.checker.check_model(model if model.ByteSize() < 2**31 - 1 else str(path))
        except Exception as exc:  # onnx.checker.ValidationError and friends
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise OnnxFileError(f"{path.name} fails the ONNX checker: {first}") from exc
    return model


def op_counts(model: Any) -> dict[str, int]:
    """Count nodes of the main graph by op type, most frequent first."""
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return dict(counts.most_common())


def graph_opset(model: Any) -> int:
    """The default-domain opset a model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


class OrtSession:
    """A minimal CPU ONNX Runtime session used for numeric checks between stages."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UserError(
                "onnxruntime is needed to check exported graphs; install deploykit[cpu] "
                "(or deploykit[gpu])"
            ) from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else ""
            raise OnnxFileError(f"onnxruntime cannot load {path.name}: {first}") from exc
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        """First output for one batch."""
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])


def exposing_session(model: Any, names: Sequence[str]) -> Any:
    """An ONNX Runtime CPU session on a copy of `model` with `names` added as graph outputs.

    Graph optimisations are off, so every named intermediate tensor still exists.
    """
    import onnx
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        augmented.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
