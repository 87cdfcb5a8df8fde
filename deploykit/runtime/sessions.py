"""One small inference session per runtime, built from a bundle's bytes (nothing is extracted).

Each runtime is imported only when a session for it is created.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deploykit.errors import BackendUnavailableError
from deploykit.package.archive import BundleError


class Session:
    """Runs NCHW float32 batches; `batch` is the static batch size, or None when dynamic."""

    batch: int | None = None

    def run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OrtSession(Session):
    """ONNX Runtime on an ONNX or ``.ort`` model held in memory."""

    def __init__(
        self,
        model: bytes,
        ort_format: bool,
        threads: int | None = None,
        providers: list[str] | None = None,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                f"onnxruntime cannot be imported ({exc}); pip install onnxruntime"
            ) from exc
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if ort_format:
            options.add_session_config_entry("session.load_model_format", "ORT")
        try:
            self.session = ort.InferenceSession(
                model, options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleError(f"onnxruntime cannot load the bundle's model: {exc}") from exc
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.output_name = self.session.get_outputs()[0].name
        self.batch = _static(first.shape[0]) if first.shape else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(out, dtype=np.float32)


class OpenVinoSession(Session):
    """OpenVINO on an IR (xml/bin) held in memory, on the CPU device."""

    def __init__(self, xml: bytes, weights: bytes, hint: str, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailableError(
                f"openvino cannot be imported ({exc}); pip install openvino"
            ) from exc
        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core.read_model(
                model=xml, weights=ov.Tensor(np.frombuffer(weights, dtype=np.uint8))
            )
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise BundleError(f"OpenVINO cannot load the bundle's IR: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        shape = self.compiled.inputs[0].get_partial_shape()
        first = shape[0]
        self.batch = first.get_length() if first.is_static else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32, copy=True)


class TensorRtSession(Session):
    """A serialized TensorRT engine, run with TensorRT 10's tensor API and cuda-python.

    Not exercised by the test suite (no GPU there): see docs/packaging.md.
    """

    def __init__(self, plan: bytes) -> None:
        try:
            import tensorrt as trt
        except (ImportError, OSError) as exc:
            raise BackendUnavailableError(
                f"tensorrt cannot be imported ({exc}); run on an NVIDIA GPU machine with TensorRT"
            ) from exc
        self.cudart = _import_cudart()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise BundleError(
                "TensorRT could not deserialize the engine; rebuild it on this machine "
                "(deploykit export MODEL --target tensorrt) and package it again"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.batch = _static(self.engine.get_tensor_shape(self.input_name)[0])

    def _check(self, result: Any) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BundleError(f"CUDA call failed with error {err}")
        return rest[0] if rest else None

    def run(self, batch: np.ndarray) -> np.ndarray:
        cudart, trt = self.cudart, self.trt
        in_dtype = trt.nptype(self.engine.get_tensor_dtype(self.input_name))
        host_in = np.ascontiguousarray(batch, dtype=in_dtype)
        self.context.set_input_shape(self.input_name, host_in.shape)
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        out_dtype = trt.nptype(self.engine.get_tensor_dtype(self.output_name))
        host_out = np.empty(out_shape, dtype=out_dtype)
        d_in = self._check(cudart.cudaMalloc(host_in.nbytes))
        d_out = self._check(cudart.cudaMalloc(host_out.nbytes))
        stream = self._check(cudart.cudaStreamCreate())
        try:
            h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._check(cudart.cudaMemcpy(d_in, host_in.ctypes.data, host_in.nbytes, h2d))
            self.context.set_tensor_address(self.input_name, int(d_in))
            self.context.set_tensor_address(self.output_name, int(d_out))
            if not self.context.execute_async_v3(int(stream)):
                raise BundleError("TensorRT failed to run the engine")
            self._check(cudart.cudaStreamSynchronize(stream))
            self._check(cudart.cudaMemcpy(host_out.ctypes.data, d_out, host_out.nbytes, d2h))
        finally:
            cudart.cudaFree(d_in)
            cudart.cudaFree(d_out)
            cudart.cudaStreamDestroy(stream)
        return host_out.astype(np.float32)


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BackendUnavailableError(
                f"cuda-python is needed to run TensorRT bundles ({exc}); pip install cuda-python"
            ) from exc
    return cudart
