"""PyTorch eager in inference mode. Its 'artifact' is the model source, rebuilt on load."""

from __future__ import annotations

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
from deploykit.errors import UserError
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource, load_torch

FIX = "install it with `pip install 'deploykit[torch]'`"


def first_tensor(output: Any) -> Any:
    """The first tensor of a model output (tensor, tuple, list, dict or namedtuple)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        return first_tensor(next(iter(output.values())))
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise TypeError(f"model returned {type(output).__name__}, expected a tensor")


class TorchBackend(Backend):
    """PyTorch eager on the CPU (CUDA arrives with the GPU targets)."""

    name = "torch"
    display_name = "PyTorch eager"

    def is_available(self) -> Availability:
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"torch is not installed ({exc})", FIX)
        return Availability(True)

    def version(self) -> str | None:
        try:
            import torch
        except ImportError:
            return None
        return str(torch.__version__)

    def capabilities(self) -> Capabilities:
        return Capabilities(
            precisions=("fp32",), devices=("cpu",), dynamic_shapes=True, needs_onnx=False
        )

    def compile(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> CompiledArtifact:
        if source is None or not source.is_torch:
            raise UserError(
                "the torch target needs a PyTorch model (catalogue name, module:factory, "
                "TorchScript or .pt2), not an ONNX file"
            )
        if options.device != "cpu":
            raise UserError("the torch target runs on the cpu here; CUDA arrives with GPU targets")
        if options.precision != "fp32":
            raise UserError(f"the torch target runs fp32 only, not {options.precision}")
        folder = out_dir / "torch"
        folder.mkdir(parents=True, exist_ok=True)
        return CompiledArtifact(
            backend=self.name,
            folder=folder,
            files=[],
            precision="fp32",
            effective_precision="fp32",
            device="cpu",
            threads=options.threads,
            input_name="input",
            contract=contract,
            source=source,
            settings={"mode": "eager", "inference_mode": True},
        )

    def runner(self, artifact: CompiledArtifact) -> Runner:
        if artifact.source is None:
            raise UserError(f"{artifact.folder} records no model source to rebuild")
        return TorchRunner(artifact.source, artifact.threads)


class TorchRunner(Runner):
    """Runs the PyTorch model eagerly under ``torch.inference_mode``."""

    name = "torch"

    def __init__(self, source: ModelSource, threads: int, module: Any = None) -> None:
        self.source = source
        self.threads = threads
        self.module = module

    def activate(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        if self.module is None:
            self.module = load_torch(self.source)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = first_tensor(self.module(torch.from_numpy(np.ascontiguousarray(batch))))
        return np.asarray(out.float().numpy())

    def prepare(self, batch: np.ndarray) -> None:
        import torch

        self._tensor = torch.from_numpy(np.ascontiguousarray(batch))

    def run_prepared(self) -> None:
        import torch

        with torch.inference_mode():
            self.module(self._tensor)
