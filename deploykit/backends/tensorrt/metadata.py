"""Engine metadata beside every engine, and the check that an engine fits this machine.

A TensorRT engine is specific to the TensorRT version that built it and to the
GPU (its compute capability; by default the exact model too), so an engine is
never portable. ``engine.json`` records what the engine was built with and for;
loading compares that with the running machine and fails with one line that
says to rebuild, instead of the deserialisation error or crash TensorRT gives.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.fsutil import sha256_file, write_json_atomic

METADATA_FILE = "engine.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GpuInfo:
    """The GPU and CUDA stack an engine is built for or loaded on."""

    name: str
    compute_capability: str
    cuda_runtime: str | None = None
    driver: str | None = None
    memory_gib: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


@dataclass
class EngineMetadata:
    """What ``engine.json`` holds.

    Attributes:
        tensorrt_version: ``tensorrt.__version__`` of the builder.
        gpu: The GPU the engine was built on.
        precision: fp32, fp16 or int8 (what the ONNX carries; the network is strongly typed).
        strongly_typed: The network was created strongly typed (always, in 11.x).
        profiles: Per input name, ``{"min": [...], "opt": [...], "max": [...]}``.
        onnx_file: The ONNX the engine was built from (relative to the run folder).
        onnx_sha256: Its digest.
        engine_sha256: Digest of the engine file.
        builder_optimization_level: The level the builder ran at.
        workspace_bytes: The workspace memory pool limit.
        hardware_compatibility: TensorRT's hardware compatibility level (``NONE`` by default).
        build_seconds: Wall time of the build.
    """

    tensorrt_version: str
    gpu: GpuInfo
    precision: str
    strongly_typed: bool
    profiles: dict[str, dict[str, list[int]]]
    onnx_file: str
    onnx_sha256: str
    engine_sha256: str = ""
    builder_optimization_level: int = 3
    workspace_bytes: int | None = None
    hardware_compatibility: str = "NONE"
    build_seconds: float | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        data = asdict(self)
        data["gpu"] = self.gpu.to_dict()
        return data

    def save(self, folder: Path) -> Path:
        """Write ``engine.json`` atomically into `folder`."""
        path = folder / METADATA_FILE
        write_json_atomic(path, self.to_dict())
        return path

    @classmethod
    def load(cls, folder: Path) -> EngineMetadata:
        """Read ``engine.json``.

        Raises:
            UserError: Missing or unreadable metadata (an engine without it cannot be trusted).
        """
        path = folder / METADATA_FILE
        try:
            data = json.loads(path.read_text())
            if data.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema_version {data.get('schema_version')}")
            data["gpu"] = GpuInfo(**data["gpu"])
            return cls(**data)
        except FileNotFoundError:
            raise UserError(
                f"{folder} has no {METADATA_FILE}; rebuild the engine with deploykit export "
                "--target tensorrt"
            ) from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise UserError(
                f"cannot read {path} ({exc}); rebuild the engine with deploykit export "
                "--target tensorrt"
            ) from exc


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def check_compatible(
    meta: EngineMetadata,
    tensorrt_version: str,
    gpu: GpuInfo,
    engine_file: Path | None = None,
) -> None:
    """Fail with one line when an engine cannot run on this machine.

    Engines are tied to the TensorRT version (major.minor; TensorRT also refuses
    patch mismatches unless built version-compatible) and to the GPU's compute
    capability; with hardware compatibility ``NONE`` (the default) TensorRT tunes
    for the exact GPU model as well.

    Args:
        meta: The engine's metadata.
        tensorrt_version: The running ``tensorrt.__version__``.
        gpu: The running GPU.
        engine_file: When given, its digest must match the metadata.

    Raises:
        UserError: The engine was built elsewhere; the message says to rebuild.
    """
    rebuild = "engines are not portable: rebuild it here with deploykit export --target tensorrt"
    if _major_minor(meta.tensorrt_version) != _major_minor(tensorrt_version) or (
        meta.tensorrt_version != tensorrt_version and not meta.extra.get("version_compatible")
    ):
        raise UserError(
            f"engine built with TensorRT {meta.tensorrt_version}, this machine has "
            f"{tensorrt_version}; {rebuild}"
        )
    if meta.gpu.compute_capability != gpu.compute_capability:
        raise UserError(
            f"engine built for {meta.gpu.name} (compute capability "
            f"{meta.gpu.compute_capability}), this GPU is {gpu.name} "
            f"({gpu.compute_capability}); {rebuild}"
        )
    if meta.hardware_compatibility == "NONE" and meta.gpu.name != gpu.name:
        raise UserError(f"engine built on {meta.gpu.name}, this GPU is {gpu.name}; {rebuild}")
    if engine_file is not None and meta.engine_sha256:
        if not engine_file.is_file():
            raise UserError(f"{engine_file} is missing; {rebuild}")
        if sha256_file(engine_file) != meta.engine_sha256:
            raise UserError(
                f"{engine_file.name} does not match its {METADATA_FILE} (sha256 differs); {rebuild}"
            )


def current_gpu(device: int = 0) -> GpuInfo:
    """The running GPU as torch sees it (name, compute capability, CUDA and driver).

    Raises:
        UserError: No CUDA GPU is visible.
    """
    import torch

    from deploykit.harness.gpu import driver_version

    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU is visible here; TensorRT engines need an NVIDIA GPU")
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(
        name=str(props.name),
        compute_capability=f"{props.major}.{props.minor}",
        cuda_runtime=torch.version.cuda,
        driver=driver_version(),
        memory_gib=round(props.total_memory / 2**30, 1),
    )
