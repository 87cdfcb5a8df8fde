"""The bundle manifest: a versioned, validated schema (``manifest.json`` in every bundle).

Additive changes keep :data:`SCHEMA_VERSION` (readers ignore fields they do not
know); breaking ones bump it, and an older deploykit then refuses the bundle with
"upgrade deploykit". The device runtime checks the fields it uses without pydantic
(:mod:`deploykit.runtime.model`); this schema is the full contract, checked by
``deploykit package``, ``verify`` and ``inspect``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploykit.package.archive import (
    SCHEMA_VERSION,
    BundleError,
    check_member_name,
)

Format = Literal["onnx", "onnx-fp16", "ort-mobile", "openvino", "tensorrt"]
FORMAT_BACKENDS: dict[str, str] = {
    "onnx": "onnxruntime",
    "onnx-fp16": "onnxruntime",
    "ort-mobile": "onnxruntime",
    "openvino": "openvino",
    "tensorrt": "tensorrt",
}


class _Section(BaseModel):
    # Readers ignore fields added later under the same schema version.
    model_config = ConfigDict(extra="allow")


class FileEntry(_Section):
    """One bundled file."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelInfo(_Section):
    """What the model is and where it came from."""

    name: str = Field(min_length=1)
    source: dict[str, Any]
    weights: str
    notes: list[str] = Field(default_factory=list)


class BackendInfo(_Section):
    """The runtime that runs the artifact and the versions it accepts."""

    name: Literal["onnxruntime", "openvino", "tensorrt"]
    min_version: str | None = None
    exact_version: str | None = None
    built_with: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)


class ArtifactInfo(_Section):
    """The model files, in the order the runtime reads them, and their tensor names."""

    files: list[str] = Field(min_length=1)
    input_name: str | None = None
    output_name: str | None = None
    batch: int | None = Field(default=None, ge=1)
    dynamic_batch: str | None = None
    operator_config: str | None = None
    source_file: str | None = None


class InputInfo(_Section):
    """The input contract: shape, dtype, layout, colour order, resize/crop and normalisation."""

    channels: int = Field(ge=1)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    resize: int = Field(ge=1)
    crop: list[int] | None = None
    mean: list[float]
    std: list[float]
    interpolation: Literal["bilinear", "bicubic", "nearest"]
    layout: Literal["NCHW"]
    color: Literal["RGB", "BGR", "GRAY"]
    dtype: Literal["float32"]
    scale: float = 1 / 255
    shape: list[int | str] | None = None

    @model_validator(mode="after")
    def _per_channel(self) -> InputInfo:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class OutputInfo(_Section):
    """What the output means."""

    kind: Literal["logits", "probabilities"] = "logits"
    num_classes: int = Field(ge=1)
    labels: str | None = None
    label_set: str | None = None
    shape: list[int | str] | None = None


class DeviceInfo(_Section):
    """The GPU and TensorRT version a TensorRT engine was built for."""

    kind: Literal["cuda"] = "cuda"
    gpu_name: str = Field(min_length=1)
    compute_capability: str = Field(min_length=1)
    tensorrt_version: str = Field(min_length=1)
    hardware_compatibility: str = "NONE"
    version_compatible: bool = False


class Tolerance(_Section):
    """How close the device's outputs must be to the stored reference outputs."""

    max_rel_err: float = Field(gt=0)
    min_cosine: float = Field(ge=-1, le=1)
    min_top1_agreement: float = Field(ge=0, le=1)


class ReferenceInfo(_Section):
    """Reference images and the outputs the run's own artifact produced for them."""

    images: list[str] = Field(min_length=1)
    outputs: str
    produced_by: str
    tolerance: Tolerance
    packaging_check: dict[str, Any] | None = None


class Manifest(_Section):
    """``manifest.json``: everything needed to feed the model correctly, and proof of what it is."""

    schema_version: int
    kind: Literal["deploykit-bundle"] = "deploykit-bundle"
    created: str
    deploykit_version: str
    model: ModelInfo
    format: Format
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    backend: BackendInfo
    artifact: ArtifactInfo
    input: InputInfo
    output: OutputInfo
    device: DeviceInfo | None = None
    measured: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    reference: ReferenceInfo | None = None
    versions: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry]

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != SCHEMA_VERSION:
            raise ValueError(f"schema version {value} is not {SCHEMA_VERSION}")
        return value

    @field_validator("files")
    @classmethod
    def _safe_names(cls, value: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in value:
            check_member_name(name)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if FORMAT_BACKENDS[self.format] != self.backend.name:
            raise ValueError(f"format {self.format} runs on {FORMAT_BACKENDS[self.format]}")
        named = list(self.artifact.files)
        for extra in (self.artifact.operator_config, self.output.labels):
            if extra:
                named.append(extra)
        if self.reference is not None:
            named += [*self.reference.images, self.reference.outputs]
        missing = [name for name in named if name not in self.files]
        if missing:
            raise ValueError(f"{missing[0]} is named but not in files")
        if self.format == "tensorrt" and self.device is None:
            raise ValueError("a tensorrt bundle needs the device it was built for")
        return self


def validate_manifest(data: dict[str, Any]) -> Manifest:
    """Validate a manifest.

    Raises:
        BundleError: The first problem, as one line.
    """
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise BundleError(
            f"bundle manifest is invalid at {where}: {first['msg']}; package the run again"
        ) from exc
