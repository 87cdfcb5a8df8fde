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


def openvino_runtime_layers(path: Path) -> list[tuple[str, ...]]:
    """OpenVINO's compiled CPU graph (true FP32 where not INT8), constants left out.

    Per layer: type, runtime precision, output precisions, fused-layer count, kernel.
    """
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = {key: rt_value.astype(str) for key, rt_value in op.get_rt_info().items()}
        if rt["layerType"] != "Const":
            fused = len(rt["originalLayersNames"].split(","))
            layers.append(
                (
                    rt["layerType"],
                    rt["runtimePrecision"],
                    rt["outputPrecisions"],
                    str(fused),
                    rt.get("primitiveType", ""),
                )
            )
    return layers
