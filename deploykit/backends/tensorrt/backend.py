"""TensorRT: reports why it cannot run here. Engine builds arrive with the GPU targets."""

from __future__ import annotations

from pathlib import Path

from deploykit.backends.base import (
    Availability,
    Backend,
    Capabilities,
    CompiledArtifact,
    CompileOptions,
    Runner,
)
from deploykit.errors import BackendUnavailableError
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource

FIX = "run on an NVIDIA GPU machine with TensorRT 10+ (pip install 'deploykit[tensorrt]')"


class TensorRtBackend(Backend):
    """NVIDIA TensorRT."""

    name = "tensorrt"
    display_name = "TensorRT"

    def is_available(self) -> Availability:
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"TensorRT is not installed ({exc})", FIX)
        except OSError as exc:  # the wheel is present but libnvinfer cannot load
            return Availability(False, f"TensorRT cannot load its libraries ({exc})", FIX)
        return Availability(
            False,
            "TensorRT engine builds are not supported by this deploykit release",
            "use --target onnxruntime or openvino for now",
        )

    def version(self) -> str | None:
        try:
            import tensorrt
        except (ImportError, OSError):
            return None
        return str(tensorrt.__version__)

    def capabilities(self) -> Capabilities:
        return Capabilities(precisions=(), devices=("cuda",), dynamic_shapes=True)

    def compile(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> CompiledArtifact:
        raise BackendUnavailableError(
            f"target tensorrt unavailable: {self.is_available().message()}"
        )

    def runner(self, artifact: CompiledArtifact) -> Runner:
        raise BackendUnavailableError(
            f"target tensorrt unavailable: {self.is_available().message()}"
        )
