"""ONNX Runtime: compile = offline graph optimisation saved as the deployable model."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import (
    Availability,
    Backend,
    Capabilities,
    CompiledArtifact,
    CompileOptions,
    Runner,
)
from deploykit.errors import BackendUnavailableError, UserError
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource

FIX = "install it with `pip install 'deploykit[cpu]'` (or deploykit[gpu] for CUDA)"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _import_ort() -> Any:
    import onnxruntime

    return onnxruntime


def session_options(threads: int, level: str = "all") -> Any:
    """Session options that pin the thread count and run sequentially, as deploykit measures."""
    ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3
    return options


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime with the CPU (or CUDA) execution provider."""

    name = "onnxruntime"
    display_name = "ONNX Runtime"

    def is_available(self) -> Availability:
        try:
            _import_ort()
        except ImportError as exc:
            return Availability(False, f"onnxruntime is not installed ({exc})", FIX)
        return Availability(True)

    def version(self) -> str | None:
        try:
            return str(_import_ort().__version__)
        except ImportError:
            return None

    def capabilities(self) -> Capabilities:
        devices = ["cpu"]
        with contextlib.suppress(ImportError):
            if "CUDAExecutionProvider" in _import_ort().get_available_providers():
                devices.append("cuda")
        return Capabilities(
            precisions=("fp32", "int8"),
            devices=tuple(devices),
            dynamic_shapes=True,
            int8_encoding="u8s8",
        )

    def compile(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> CompiledArtifact:
        if onnx_path is None:
            raise UserError("the onnxruntime target needs an ONNX model")
        ort = _import_ort()
        provider = self._provider(options.device)
        folder = out_dir / "onnxruntime"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "model.onnx"
        tmp = folder / ".model.onnx.tmp"
        # "extended" fusions are valid for any CPU; "all" adds layout changes tied to this CPU,
        # which the runtime re-applies at load time anyway.
        level = "extended" if options.device == "cpu" else "basic"
        opts = session_options(options.threads, level)
        opts.optimized_model_filepath = str(tmp)
        ort.InferenceSession(str(onnx_path), opts, providers=[provider])
        os.replace(tmp, target)
        providers = runtime_providers(provider, options.device, options.extra)
        check = ort.InferenceSession(
            str(target),
            session_options(options.threads),
            providers=provider_options(providers, folder),
        )
        input_name = check.get_inputs()[0].name
        counts = compute_precisions(target)
        effective = options.precision
        if options.precision == "int8" and counts["int8"] <= counts["fp32"]:
            effective = "fp32"  # the Q/DQ pairs were not fused into integer kernels
        return CompiledArtifact(
            backend=self.name,
            folder=folder,
            files=["model.onnx"],
            precision=options.precision,
            effective_precision=effective,
            device=options.device,
            threads=options.threads,
            input_name=input_name,
            contract=contract,
            source=source,
            settings={
                "provider": provider,
                "providers": providers,
                "graph_optimization_level": "all",
            },
            info={
                "providers": check.get_providers(),
                "offline_optimization": level,
                "compute_ops": counts,
            },
        )

    def runner(self, artifact: CompiledArtifact) -> Runner:
        return OnnxRuntimeRunner(
            artifact.folder / artifact.files[0],
            artifact.settings.get("provider", "CPUExecutionProvider"),
            artifact.threads,
            providers=artifact.settings.get("providers"),
        )

    def _provider(self, device: str) -> str:
        provider = _PROVIDERS.get(device)
        if provider is None:
            raise UserError(f"onnxruntime runs on cpu or cuda, not {device!r}")
        if provider not in _import_ort().get_available_providers():
            raise BackendUnavailableError(
                f"onnxruntime has no {provider} here; install deploykit[gpu] on a CUDA machine"
            )
        return provider


def runtime_providers(provider: str, device: str, extra: dict[str, Any]) -> list[str]:
    """Execution providers in priority order; ``extra["ort_tensorrt"]`` puts TensorRT's first.

    Raises:
        BackendUnavailableError: TensorRT EP asked for but not available here.
    """
    if not extra.get("ort_tensorrt"):
        return [provider]
    trt_ep = "TensorrtExecutionProvider"
    if device != "cuda" or trt_ep not in _import_ort().get_available_providers():
        raise BackendUnavailableError(
            f"onnxruntime has no {trt_ep} here: it needs --device cuda, onnxruntime-gpu and "
            "TensorRT's libraries (use the TensorRT image, docker/Dockerfile.tensorrt)"
        )
    return [trt_ep, provider]


def provider_options(providers: list[str], folder: Path) -> list[Any]:
    """Providers for InferenceSession; TensorRT's caches its engines in the artifact folder."""
    cache = str(folder / "trt_cache")
    return [
        (
            name,
            {
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
            },
        )
        if name == "TensorrtExecutionProvider"
        else name
        for name in providers
    ]


_INT8_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd"}
)
_FLOAT_OPS = frozenset({"Conv", "FusedConv", "Gemm", "MatMul", "FusedMatMul", "FusedGemm"})


def compute_precisions(path: Path) -> dict[str, int]:
    """Count compute nodes of an (optimised) ONNX model running in integer vs float kernels."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = [node.op_type for node in model.graph.node]
    return {
        "int8": sum(op in _INT8_OPS for op in ops),
        "fp32": sum(op in _FLOAT_OPS for op in ops),
    }


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX model in an InferenceSession."""

    name = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        provider: str,
        threads: int,
        providers: list[str] | None = None,
    ) -> None:
        self.model_path = model_path
        self.provider = provider
        self.providers = providers or [provider]
        self.threads = threads
        self.session: Any = None

    def activate(self) -> None:
        ort = _import_ort()
        self.session = ort.InferenceSession(
            str(self.model_path),
            session_options(self.threads),
            providers=provider_options(self.providers, self.model_path.parent),
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def infer(self, batch: np.ndarray) -> np.ndarray:
        result = self.session.run([self.output_name], {self.input_name: batch})[0]
        return np.asarray(result)

    def prepare(self, batch: np.ndarray) -> None:
        self._binding = self.session.io_binding()
        self._binding.bind_cpu_input(self.input_name, np.ascontiguousarray(batch))
        self._binding.bind_output(self.output_name)

    def run_prepared(self) -> None:
        self.session.run_with_iobinding(self._binding)

    def deactivate(self) -> None:
        self.session = None
