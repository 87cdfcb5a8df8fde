"""PyTorch eager (or torch.compile) in inference mode, on the CPU or a CUDA GPU.

Its 'artifact' is the model source, rebuilt on load. On CUDA it is the baseline every
GPU speedup is reported against; the runner exposes ``stream`` and ``enqueue`` so the
GPU harness (deploykit.harness.gpu) times it with CUDA events like every CUDA target.
"""

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


# PyTorch's CPU convolutions run an ImageNet-sized CNN fastest a few inputs at a time,
# while the activations stay in cache. Measured on a 2-core AMD EPYC (torch 2.14.1), 96
# random inputs in eager inference mode: efficientnet_lite0 5.6 s as one batch, 1.5-2.0 s
# in chunks of 2-4; efficientnet_lite2 (260x260) 11.0 s against 2.5-3.1 s; resnet50
# 10.5 s against 5.7-6.7 s. Small inputs (28x28 Fashion-MNIST) still go 64 or more at a time.
REFERENCE_CHUNK_VALUES = 4 * 3 * 224 * 224
REFERENCE_CHUNK_MAX = 64


def reference_outputs(module: Any, inputs: np.ndarray) -> np.ndarray:
    """`module`'s first output on the CPU for any number of `inputs`, as float32 NumPy.

    The inputs go through in chunks of at most REFERENCE_CHUNK_VALUES values (at least
    one input, at most REFERENCE_CHUNK_MAX); each input's output does not depend on the
    chunk it ran in beyond float rounding (about 1e-9 of the logits on EfficientNet-Lite0).
    """
    import torch

    per_input = max(1, int(np.prod(inputs.shape[1:])))
    step = max(1, min(REFERENCE_CHUNK_MAX, REFERENCE_CHUNK_VALUES // per_input))
    outs = []
    with torch.inference_mode():
        for start in range(0, inputs.shape[0], step):
            chunk = torch.from_numpy(np.ascontiguousarray(inputs[start : start + step]))
            outs.append(np.asarray(first_tensor(module(chunk)).float().numpy()))
    return np.concatenate(outs)


class TorchBackend(Backend):
    """PyTorch eager or torch.compile, on the CPU or CUDA."""

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
        from deploykit.harness.gpu import gpu_unavailable_reason

        devices = ("cpu", "cuda") if gpu_unavailable_reason() is None else ("cpu",)
        return Capabilities(
            precisions=("fp32",), devices=devices, dynamic_shapes=True, needs_onnx=False
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
        if options.device not in ("cpu", "cuda"):
            raise UserError(f"the torch target runs on cpu or cuda, not {options.device!r}")
        if options.device == "cuda":
            from deploykit.harness.gpu import require_gpu

            require_gpu()
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
            device=options.device,
            threads=options.threads,
            input_name="input",
            contract=contract,
            source=source,
            settings={
                "mode": "compile" if options.extra.get("compile") else "eager",
                "inference_mode": True,
                **_math_settings(options.device),
            },
        )

    def runner(self, artifact: CompiledArtifact) -> Runner:
        if artifact.source is None:
            raise UserError(f"{artifact.folder} records no model source to rebuild")
        return TorchRunner(
            artifact.source,
            artifact.threads,
            device=artifact.device,
            compile=artifact.settings.get("mode") == "compile",
        )


def _math_settings(device: str) -> dict[str, Any]:
    """The float math torch uses on `device` (TF32 on CUDA is recorded, not changed)."""
    if device != "cuda":
        return {}
    import torch

    return {
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cudnn_benchmark": True,
    }


class TorchRunner(Runner):
    """Runs the PyTorch model under ``torch.inference_mode``, eagerly or torch.compile'd.

    On CUDA the model and the prepared input live on the GPU, the work is issued on
    ``stream``, and :meth:`enqueue` launches one forward pass without waiting.
    """

    name = "torch"

    def __init__(
        self,
        source: ModelSource,
        threads: int,
        module: Any = None,
        device: str = "cpu",
        compile: bool = False,
    ) -> None:
        self.source = source
        self.threads = threads
        self.module = module
        self.device = device
        self.compile = compile
        self.stream: Any = None

    def activate(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        if self.module is None:
            self.module = load_torch(self.source)
        if self.device == "cuda":
            from deploykit.harness.gpu import require_gpu

            require_gpu()
            torch.backends.cudnn.benchmark = True
            self.module = self.module.to("cuda")
            self.stream = torch.cuda.Stream()
        if self.compile:
            self.module = torch.compile(self.module)

    def _forward(self, x: Any) -> Any:
        import torch

        with torch.inference_mode():
            return first_tensor(self.module(x))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device != "cuda":
            return np.asarray(self._forward(x).float().numpy())
        with torch.cuda.stream(self.stream):
            out = self._forward(x.to("cuda")).float().cpu()
        return np.asarray(out.numpy())

    def prepare(self, batch: np.ndarray) -> None:
        import torch

        self._tensor = torch.from_numpy(np.ascontiguousarray(batch))
        if self.device == "cuda":
            with torch.cuda.stream(self.stream):
                self._tensor = self._tensor.to("cuda")
            self.stream.synchronize()

    def enqueue(self) -> None:
        """Launch one forward pass of the prepared input on ``stream`` (CUDA only)."""
        import torch

        with torch.cuda.stream(self.stream):
            self._out = self._forward(self._tensor)

    def run_prepared(self) -> None:
        if self.device != "cuda":
            self._forward(self._tensor)
            return
        self.enqueue()
        self.stream.synchronize()
