"""Runs a TensorRT engine: torch CUDA tensors as device buffers, tensors bound by name,
``execute_async_v3`` on a CUDA stream, input shapes set per call (TensorRT 10+ API).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import Runner
from deploykit.backends.tensorrt.metadata import EngineMetadata, check_compatible, current_gpu
from deploykit.backends.tensorrt.plan import ENGINE_FILE
from deploykit.errors import UserError


def torch_dtype(trt: Any, dtype: Any) -> Any:
    """The torch dtype of a TensorRT tensor data type."""
    import torch

    pairs = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int8": torch.int8,
        "int32": torch.int32,
        "int64": torch.int64,
        "bool": torch.bool,
    }
    for name, torch_type in pairs.items():
        if getattr(trt, name, None) == dtype:
            return torch_type
    raise UserError(f"the engine has a {dtype} input or output, which deploykit cannot bind")


class TensorRtRunner(Runner):
    """One execution context of an engine, on one CUDA stream.

    GPU runners expose ``stream`` (a ``torch.cuda.Stream``) and :meth:`enqueue`, which
    launches the prepared batch without waiting, so the GPU harness can put CUDA
    events around the enqueue and capture it in a CUDA graph.
    """

    name = "tensorrt"
    device = "cuda"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.engine: Any = None
        self.context: Any = None
        self.stream: Any = None
        self._buffers: dict[str, Any] = {}

    def activate(self) -> None:
        import tensorrt as trt
        import torch

        engine_file = self.folder / ENGINE_FILE
        meta = EngineMetadata.load(self.folder)
        check_compatible(meta, str(trt.__version__), current_gpu(), engine_file)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise UserError(
                f"TensorRT {trt.__version__} cannot load {engine_file}; engines are not "
                "portable: rebuild it here with deploykit export --target tensorrt"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1:
            raise UserError(f"{engine_file} has {len(self.inputs)} inputs; deploykit feeds one")
        self.stream = torch.cuda.Stream()

    def _bind(self, x: Any) -> None:
        """Set the input shape for this call, bind every tensor's address by name."""
        import torch

        trt, ctx, name = self._trt, self.context, self.inputs[0]
        want = torch_dtype(trt, self.engine.get_tensor_dtype(name))
        if x.dtype != want:
            x = x.to(want)
        x = x.contiguous()
        if not ctx.set_input_shape(name, tuple(x.shape)):
            raise UserError(
                f"input shape {tuple(x.shape)} is outside the engine's profile; rebuild with "
                "a --dynamic-batch range that covers it"
            )
        self._buffers[name] = x
        ctx.set_tensor_address(name, x.data_ptr())
        for out in self.outputs:
            shape = tuple(ctx.get_tensor_shape(out))
            held = self._buffers.get(out)
            if held is None or tuple(held.shape) != shape:
                held = torch.empty(
                    shape,
                    dtype=torch_dtype(trt, self.engine.get_tensor_dtype(out)),
                    device="cuda",
                )
                self._buffers[out] = held
            ctx.set_tensor_address(out, held.data_ptr())

    def enqueue(self) -> None:
        """Launch the bound tensors on ``self.stream`` without waiting."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UserError("TensorRT execute_async_v3 failed (see the TensorRT log)")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.cuda.stream(self.stream):
            x = torch.from_numpy(np.ascontiguousarray(batch)).to("cuda", non_blocking=True)
            self._bind(x)
            self.enqueue()
            out = self._buffers[self.outputs[0]].float().cpu()
        self.stream.synchronize()
        return np.asarray(out.numpy())

    def prepare(self, batch: np.ndarray) -> None:
        import torch

        with torch.cuda.stream(self.stream):
            self._bind(torch.from_numpy(np.ascontiguousarray(batch)).to("cuda"))
        self.stream.synchronize()

    def run_prepared(self) -> None:
        self.enqueue()
        self.stream.synchronize()

    def deactivate(self) -> None:
        self._buffers.clear()
        self.context = None
        self.engine = None
