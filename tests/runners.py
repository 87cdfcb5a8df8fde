"""Run a model file one input at a time on each CPU runtime, for tests that compare them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def run_each(path: Path, x: np.ndarray, optimise: bool = True) -> np.ndarray:
    """ONNX Runtime on `path`, one input at a time (graph optimisations off: the reference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def openvino_each(path: Path, x: np.ndarray) -> np.ndarray:
    """OpenVINO (true FP32 where not INT8) on `path`, one input at a time."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.concatenate([compiled(x[i : i + 1])[0] for i in range(len(x))])
