"""The Backend interface: one small contract every runtime implements.

A backend compiles a (fused) ONNX model — or, for the torch backend, the PyTorch
model itself — into an artifact folder, and creates runners for it. Adding a
backend means adding a subpackage here and one line in the registry.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.fsutil import write_json_atomic
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource

ARTIFACT_FILE = "backend.json"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not why and how to fix it."""

    ok: bool
    reason: str = ""
    fix: str = ""

    def message(self) -> str:
        """One line: the reason and the fix."""
        return f"{self.reason}; {self.fix}" if self.fix else self.reason


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do on this machine."""

    precisions: tuple[str, ...]
    devices: tuple[str, ...]
    dynamic_shapes: bool
    needs_onnx: bool = True
    # Activation/weight encoding of the Q/DQ model this backend runs fastest and correctly
    # (see deploykit.stages.calibrate.ENCODINGS); None when it has no INT8 path.
    int8_encoding: str | None = None
    # The backend's own post-training quantizer (e.g. "nncf"), offered next to
    # deploykit's Q/DQ calibration; None when it has none here.
    native_quantizer: str | None = None


@dataclass(frozen=True)
class BatchRange:
    """Dynamic batch range min:opt:max."""

    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        """Parse ``MIN:OPT:MAX`` (or ``MIN:MAX``, opt = max)."""
        parts = text.split(":")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) == 2:
            values = [values[0], values[1], values[1]]
        if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
            raise ValueError(
                f"bad batch range {text!r}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX"
            )
        return cls(*values)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass
class CompileOptions:
    """Options every backend understands.

    Attributes:
        precision: Requested precision (fp32, fp16, bf16, int8).
        device: ``cpu`` or ``cuda``.
        threads: Intra-op threads; recorded in every report.
        batch: Batch the artifact is measured at.
        dynamic_batch: Dynamic batch range, or None for a static batch.
        extra: Backend-specific options.
    """

    precision: str = "fp32"
    device: str = "cpu"
    threads: int = 1
    batch: int = 1
    dynamic_batch: BatchRange | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompiledArtifact:
    """What `Backend.compile` produced, saved as ``backend.json`` in its folder.

    Attributes:
        backend: Backend name.
        folder: The artifact folder (inside the run folder).
        files: Main files, relative to `folder`.
        precision: Requested precision.
        effective_precision: Precision the runtime really computes in.
        device: Device it runs on.
        threads: Thread count.
        input_name: Name of the model input.
        contract: Input contract.
        source: The model source (for backends that rebuild the PyTorch model).
        settings: Backend settings a runner needs to reproduce the compiled state.
        info: Extra facts for the report (versions, op precisions, ...).
    """

    backend: str
    folder: Path
    files: list[str]
    precision: str
    effective_precision: str
    device: str
    threads: int
    input_name: str
    contract: InputContract
    source: ModelSource | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self) -> Path:
        """Write ``backend.json`` atomically and return its path."""
        data = asdict(self)
        data["folder"] = "."
        data["contract"] = self.contract.to_dict()
        data["source"] = self.source.to_dict() if self.source else None
        path = self.folder / ARTIFACT_FILE
        write_json_atomic(path, data)
        return path

    @classmethod
    def load(cls, folder: Path) -> CompiledArtifact:
        """Read ``backend.json`` from an artifact folder."""
        data = json.loads((folder / ARTIFACT_FILE).read_text())
        data["folder"] = folder
        data["contract"] = InputContract.from_dict(data["contract"])
        data["source"] = ModelSource.from_dict(data["source"]) if data.get("source") else None
        return cls(**data)


class Runner(abc.ABC):
    """Runs one compiled artifact. Use as a context manager or activate/deactivate."""

    name: str = "runner"

    def __enter__(self) -> Runner:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    @abc.abstractmethod
    def activate(self) -> None:
        """Load the artifact and allocate what inference needs."""

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (NCHW float32) and return the first output as numpy."""

    def deactivate(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources."""

    def prepare(self, batch: np.ndarray) -> None:
        """Bind `batch` for repeated timed calls of :meth:`run_prepared` (default: keep it)."""
        self._prepared = batch

    def run_prepared(self) -> None:
        """Run the prepared batch once, synchronously; used by the latency harness."""
        self.infer(self._prepared)


class Backend(abc.ABC):
    """A deployment runtime."""

    name: str = ""
    display_name: str = ""

    @abc.abstractmethod
    def is_available(self) -> Availability:
        """Whether the runtime is importable and usable here, with the reason if not."""

    @abc.abstractmethod
    def version(self) -> str | None:
        """Runtime version, or None when not installed."""

    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """Precisions, devices and shape support on this machine."""

    @abc.abstractmethod
    def compile(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> CompiledArtifact:
        """Compile the model into `out_dir` and return the artifact description."""

    @abc.abstractmethod
    def runner(self, artifact: CompiledArtifact) -> Runner:
        """Create a runner for a compiled artifact."""

    def quantize(
        self,
        onnx_path: Path,
        calibration: np.ndarray,
        out_dir: Path,
        contract: InputContract,
        options: dict[str, Any],
    ) -> tuple[Path, dict[str, Any]]:
        """Quantize the FP32 ONNX model to INT8 with the backend's own quantizer.

        Args:
            onnx_path: The fused FP32 ONNX model.
            calibration: Preprocessed NCHW calibration inputs.
            out_dir: Run folder to write the quantized model into.
            contract: The model's input contract.
            options: Calibration options (``method``, ``per_channel``, ``bias_correction``...).

        Returns:
            The quantized model file (which :meth:`compile` accepts) and what was done.

        Raises:
            UserError: The backend has no native quantizer here.
        """
        raise UserError(f"{self.name} has no native INT8 quantizer; use --quantizer deploykit")

    def plan(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> dict[str, Any]:
        """What :meth:`compile` would do, without doing it (``deploykit export --dry-run``).

        Backends whose build is long or needs hardware that may be absent (TensorRT)
        prepare their inputs and return a detailed plan; the default describes the call.

        Returns:
            The plan, with ``summary`` lines for the terminal.
        """
        summary = [
            f"{self.display_name or self.name} {self.version() or '(not installed)'}",
            f"input: {onnx_path.name if onnx_path else 'the PyTorch model'}",
            f"precision {options.precision} on {options.device}, {options.threads} threads, "
            f"batch {options.dynamic_batch or options.batch}",
        ]
        return {
            "backend": self.name,
            "onnx": str(onnx_path) if onnx_path else None,
            "options": asdict(options) | {"dynamic_batch": str(options.dynamic_batch or "")},
            "summary": summary,
        }
