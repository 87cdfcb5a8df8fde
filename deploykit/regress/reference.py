"""The reference workload: a fixed small conv/GEMM network timed in the same backend.

Timing it in the same rounds as the models gives a measure of how fast the
machine is *right now*; a model's latency divided by it (the normalised
latency) still means something on a slightly faster or slower runner, and
cancels part of the drift of a shared machine between two measurements.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import Backend, CompileOptions, Runner
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource

REFERENCE_NAME = "conv-gemm-v1"
_CHANNELS = 32
_SIZE = 56
CONTRACT = InputContract(
    channels=_CHANNELS,
    height=_SIZE,
    width=_SIZE,
    mean=(0.0,) * _CHANNELS,
    std=(1.0,) * _CHANNELS,
    num_classes=1000,
)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261123)
    return {
        "w1": rng.normal(0, 0.05, (64, _CHANNELS, 3, 3)).astype(np.float32),
        "b1": rng.normal(0, 0.05, 64).astype(np.float32),
        "w2": rng.normal(0, 0.05, (64, 64, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.05, 64).astype(np.float32),
        "fc": rng.normal(0, 0.05, (1000, 64)).astype(np.float32),
        "fcb": rng.normal(0, 0.05, 1000).astype(np.float32),
    }


def reference_onnx(path: Path) -> Path:
    """Write the reference network as ONNX (conv 3x3 ×2, ReLU, global pool, GEMM)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = _weights()
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["output"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        REFERENCE_NAME,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", _CHANNELS, _SIZE, _SIZE])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1000])],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def reference_torch_net() -> Any:
    """The same network as a PyTorch module (for the torch target)."""
    import torch
    from torch import nn

    w = _weights()
    net = nn.Sequential(
        nn.Conv2d(_CHANNELS, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 1000),
    )
    with torch.no_grad():
        for param, key in zip(net.parameters(), ("w1", "b1", "w2", "b2", "fc", "fcb"), strict=True):
            param.copy_(torch.from_numpy(w[key]))
    return net.eval()


class ReferenceWorkload:
    """Compiles and runs the reference network on one backend; use as a context manager."""

    def __init__(self, backend: Backend, threads: int, device: str = "cpu") -> None:
        self.backend = backend
        self.threads = threads
        self.device = device
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.runner: Runner | None = None

    def __enter__(self) -> ReferenceWorkload:
        self._tmp = tempfile.TemporaryDirectory(prefix="deploykit-reference-")
        work = Path(self._tmp.name)
        options = CompileOptions(precision="fp32", device=self.device, threads=self.threads)
        if self.backend.capabilities().needs_onnx:
            onnx_path = reference_onnx(work / "reference.onnx")
            artifact = self.backend.compile(onnx_path, work, CONTRACT, options)
        else:
            source = ModelSource(
                kind="factory",
                ref="deploykit.regress.reference:reference_torch_net",
                name="reference",
            )
            artifact = self.backend.compile(None, work, CONTRACT, options, source=source)
        self.runner = self.backend.runner(artifact)
        self.runner.activate()
        rng = np.random.default_rng(0)
        self.runner.prepare(rng.normal(size=CONTRACT.shape(1)).astype(np.float32))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.runner is not None:
            self.runner.deactivate()
        if self._tmp is not None:
            self._tmp.cleanup()
