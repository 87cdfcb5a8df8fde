"""The recipe schema: `deploykit export` options written down as typed, strict sections.

Every section forbids unknown keys, so a typo is an error with the key's path and a
close-match suggestion instead of an option that is silently ignored. The JSON Schema in
``recipes/schema.json`` is generated from these models (``deploykit.recipes.jsonschema``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Precision = Literal["fp32", "fp16", "bf16", "int8"]
BackendName = Literal["torch", "onnxruntime", "openvino", "tensorrt"]


class _Section(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """The network to deploy: a catalogue name or a file, and its weights."""

    name: str | None = Field(
        default=None,
        min_length=1,
        description="Catalogue name (deploykit models) or package.module:factory.",
    )
    path: str | None = Field(
        default=None,
        min_length=1,
        description="A .onnx, .pt2 or TorchScript file (instead of name).",
    )
    weights: str | None = Field(default=None, description="Local state_dict file.")
    seed: int = Field(default=0, ge=0, description="Seed of random weights and check inputs.")
    bn_recalibrate: bool = Field(
        default=False,
        description="Re-estimate a random-weight model's BatchNorm statistics on calibration "
        "images before export (ONNX targets).",
    )

    @model_validator(mode="after")
    def _name_or_path(self) -> ModelSection:
        if (self.name is None) == (self.path is None):
            raise ValueError("set exactly one of model.name and model.path")
        return self

    @property
    def ref(self) -> str:
        """The model reference `deploykit export` takes (name or path)."""
        return self.name if self.name is not None else str(self.path)


class InputSection(_Section):
    """Input shape: spatial size and batch."""

    size: tuple[int, int] | None = Field(
        default=None,
        description="[height, width] (or one number for a square input); default the "
        "model's own input size.",
    )
    batch: int | None = Field(
        default=None, ge=1, description="Batch to export and measure at [default: 1, or OPT]."
    )
    dynamic_batch: str | None = Field(
        default=None,
        pattern=r"^\d+:\d+(:\d+)?$",
        description="Dynamic batch range 'MIN:OPT:MAX' (quoted), e.g. '1:4:16'.",
    )

    @field_validator("size", mode="before")
    @classmethod
    def _square(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if isinstance(value, str) and value.lower().replace("x", "").isdigit():
            parts = value.lower().split("x")
            return (int(parts[0]), int(parts[-1]))
        return value

    @field_validator("size")
    @classmethod
    def _min_size(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and min(value) < 8:
            raise ValueError("each side must be at least 8")
        return value

    @field_validator("dynamic_batch", mode="before")
    @classmethod
    def _range_is_text(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ValueError("write the range as quoted text, e.g. '1:4:16'")
        return value

    @field_validator("dynamic_batch")
    @classmethod
    def _valid_range(cls, value: str | None) -> str | None:
        if value is not None:
            parts = [int(p) for p in value.split(":")]
            if len(parts) == 2:
                parts.append(parts[1])
            if not 1 <= parts[0] <= parts[1] <= parts[2]:
                raise ValueError("expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
        return value


class ExportSection(_Section):
    """PyTorch → ONNX export."""

    opset: int = Field(default=18, ge=7, le=30, description="ONNX opset.")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto", description="torch.onnx exporter; auto tries dynamo, then TorchScript."
    )


class CalibrationSection(_Section):
    """INT8 calibration (used when precision is int8)."""

    data: str | None = Field(
        default=None,
        description="A set from `deploykit datasets` (calibration/*.json), an image folder, "
        "a .npy/.npz file, or 'synthetic'; default the model's own set when it has real weights.",
    )
    method: Literal["minmax", "entropy", "percentile", "mse"] = Field(
        default="minmax", description="Calibration statistics."
    )
    samples: int = Field(default=256, ge=1, description="Number of calibration inputs.")
    percentile: float = Field(
        default=99.999, gt=0, le=100, description="Percentile for method 'percentile'."
    )
    per_channel: bool = Field(default=True, description="Per-channel INT8 weight scales.")
    bias_correction: bool | None = Field(
        default=None,
        description="Per-channel bias correction after quantization; null = on for "
        "depthwise-heavy nets.",
    )
    weight_rounding: Literal["auto", "nearest", "gptq"] = Field(
        default="auto",
        description="INT8 weight rounding: nearest, or gptq (each layer's rounding errors "
        "cancel on its calibration inputs); auto = gptq for depthwise-heavy nets.",
    )
    cache: bool = Field(default=True, description="Reuse cached calibration statistics.")
    encoding: Literal["s8s8", "u8s8", "mixed"] | None = Field(
        default=None,
        description="Q/DQ activation encoding; null = the target's fastest (u8s8 for "
        "onnxruntime, mixed for openvino, s8s8 for tensorrt).",
    )
    exact_residuals: bool = Field(
        default=False,
        description="mixed encoding (OpenVINO): round each Conv output that enters a "
        "residual Add, as ONNX Runtime does (OpenVINO's Conv+Add fusion skips it).",
    )
    overflow_fix: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Bound INT8 weight scales so CPUs without VNNI cannot saturate their "
        "16-bit sums; auto: for the CPU encodings on such a CPU.",
    )
    keep_float: list[str] | None = Field(
        default=None,
        description="Layers kept in float: fused-graph node names, or INT8 run folders "
        "whose float layers (named and fallen back) carry over.",
    )
    quantizer: str = Field(
        default="deploykit",
        min_length=1,
        description="deploykit (one Q/DQ ONNX for every backend) or the backend's own "
        "(nncf for openvino).",
    )


class TargetSection(_Section):
    """Where the artifact runs."""

    backend: BackendName = Field(description="Runtime to compile for.")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="cpu or cuda.")
    threads: int | None = Field(
        default=None, ge=1, description="Runtime threads [default: all usable cores]."
    )


class TensorRtSection(_Section):
    """TensorRT-only options (passed to the TensorRT build as ``CompileOptions.extra``)."""

    opt_batch: int | None = Field(
        default=None,
        ge=1,
        description="OPT batch of the optimization profile; replaces the OPT of "
        "input.dynamic_batch (which must be set).",
    )
    workspace: str | None = Field(
        default=None,
        pattern=r"^\s*\d+(\.\d+)?\s*([KMGkmg]([iI]?[bB])?)?\s*$",
        description="Workspace memory-pool limit, e.g. '512M' or '4G' (a bare number is MiB).",
    )
    builder_opt_level: int | None = Field(
        default=None, ge=0, le=5, description="Builder optimisation level 0-5 [default: 3]."
    )
    timing_cache: str | None = Field(
        default=None,
        description="Timing cache to start from [default: the previous build's in the run folder].",
    )

    @field_validator("workspace", mode="before")
    @classmethod
    def _number_is_mib(cls, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value}M"
        return value


class TorchSection(_Section):
    """Options of the torch (eager baseline) target."""

    compile: bool = Field(default=False, description="Run under torch.compile.")


class OnnxRuntimeSection(_Section):
    """Options of the onnxruntime target."""

    ort_tensorrt: bool = Field(
        default=False,
        description="device cuda: TensorRT execution provider first, CUDA for the rest.",
    )


# Backend name -> the recipe section holding its own options (ExportRequest.extra).
BACKEND_SECTIONS = ("torch", "onnxruntime", "tensorrt")


class MeasureSection(_Section):
    """Latency and fidelity measurement."""

    runs: int = Field(default=100, ge=1, description="Minimum timed runs.")
    warmup: int = Field(default=10, ge=0, description="Warm-up runs.")
    min_seconds: float = Field(default=2.0, ge=0, description="Minimum timing duration.")
    fidelity_samples: int = Field(
        default=100, ge=1, description="Inputs compared against the FP32 PyTorch model."
    )


class EvaluationSection(_Section):
    """Accuracy on real data."""

    data: list[str] | None = Field(
        default=None,
        description="Evaluation sets (names, manifests or labelled folders); [] = none; "
        "null = the model's own sets when it has real weights.",
    )
    samples: int | None = Field(
        default=None, ge=1, description="Inputs per evaluation set [default: all]."
    )


class GatesSection(_Section):
    """Budgets a run must meet (a miss is exit 1 with the numbers)."""

    max_accuracy_drop: float = Field(
        default=1.0, ge=0, description="Largest top-1 drop against FP32 (points)."
    )
    min_top5_overlap: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Smallest top-5 overlap with FP32 (percent) on every evaluation set.",
    )
    latency_budget_ms: float | None = Field(
        default=None, gt=0, description="Largest allowed p50 latency in milliseconds."
    )
    fallback: bool = Field(
        default=True,
        description="Keep sensitive layers in float when INT8 misses max_accuracy_drop "
        "or min_top5_overlap.",
    )
    max_fallback_layers: int | None = Field(
        default=None, ge=1, description="Most layers the fallback may keep in float."
    )


class OutputsSection(_Section):
    """Where the run folder goes: ``<out>/<model>/<backend>-<precision>``."""

    out: str = Field(default="out", min_length=1, description="Output root folder.")


class Recipe(_Section):
    """One deploykit recipe: everything `deploykit export` accepts, plus gates."""

    base: str | None = Field(
        default=None,
        description="A recipe file (relative to this one) whose keys this one overrides; "
        "one level only.",
    )
    description: str | None = Field(default=None, description="Free text.")
    model: ModelSection
    input: InputSection = Field(default_factory=InputSection)
    export: ExportSection = Field(default_factory=ExportSection)
    precision: Precision = Field(
        default="fp32",
        description="fp32, fp16, bf16 or int8 [default: fp16 for tensorrt, fp32 otherwise].",
    )
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)
    target: TargetSection
    torch: TorchSection = Field(default_factory=TorchSection)
    onnxruntime: OnnxRuntimeSection = Field(default_factory=OnnxRuntimeSection)
    tensorrt: TensorRtSection = Field(default_factory=TensorRtSection)
    measure: MeasureSection = Field(default_factory=MeasureSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    gates: GatesSection = Field(default_factory=GatesSection)
    outputs: OutputsSection = Field(default_factory=OutputsSection)

    @model_validator(mode="before")
    @classmethod
    def _default_precision(cls, data: Any) -> Any:
        """No precision: what `deploykit export` picks (api.default_precision)."""
        if isinstance(data, dict) and data.get("precision") is None:
            target = data.get("target")
            backend = target.get("backend") if isinstance(target, dict) else None
            data = {**data, "precision": "fp16" if backend == "tensorrt" else "fp32"}
        return data

    @property
    def backend_options(self) -> dict[str, Any]:
        """The target backend's own options, as ``ExportRequest.extra`` holds them."""
        if self.target.backend not in BACKEND_SECTIONS:
            return {}
        options = getattr(self, self.target.backend).model_dump()
        return {
            k: v
            for k, v in options.items()
            if v is not None and v is not False and k != "opt_batch"
        }

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        for section in BACKEND_SECTIONS:
            options = getattr(self, section).model_dump(exclude_defaults=True)
            if options and self.target.backend != section:
                raise ValueError(
                    f"{section}.{sorted(options)[0]} applies only to target.backend "
                    f"{section}, not {self.target.backend}"
                )
        if self.tensorrt.opt_batch is not None and self.input.dynamic_batch is None:
            raise ValueError("tensorrt.opt_batch needs input.dynamic_batch (e.g. '1:8:32')")
        return self
