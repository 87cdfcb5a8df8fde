"""What `deploykit export` takes and returns: :class:`ExportRequest` and :class:`ExportResult`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.backends.base import BatchRange
from deploykit.errors import UserError
from deploykit.harness.report import Report

Step = Callable[[str], None]


def quiet(_: str) -> None:
    """The progress callback that says nothing."""
    return None


@dataclass
class ExportRequest:
    """Everything `deploykit export` accepts; saved as recipe.resolved.yaml in the run folder.

    Attributes:
        model: Catalogue name, ``package.module:factory``, or a .onnx/.pt2/TorchScript path.
        target: Backend name (torch, onnxruntime, openvino, tensorrt).
        precision: fp32, fp16, bf16 (int8 arrives with calibration).
        device: cpu or cuda.
        weights: Optional local state_dict file.
        seed: Seed of random initialisation and of the check inputs.
        input_size: Optional (height, width) override of the model's input size.
        batch: Batch to export (static) and measure at; default 1, or OPT of a dynamic range.
        dynamic_batch: ``MIN:OPT:MAX`` for a dynamic batch dimension.
        opset: ONNX opset.
        exporter: auto, dynamo or torchscript.
        threads: Runtime threads; default all usable cores.
        runs: Minimum timed runs.
        warmup: Warm-up runs.
        min_seconds: Minimum timing duration.
        fidelity_samples: Inputs compared against the FP32 PyTorch model.
        out: Output root; the run folder is ``<out>/<model>/<target>-<precision>``.
        calib: INT8 calibration data: a folder of images, a .npy/.npz file, or ``synthetic``.
        calib_method: minmax, entropy, percentile or mse.
        calib_samples: Number of calibration inputs.
        calib_percentile: Percentile for ``calib_method="percentile"``.
        per_channel: Per-channel weight scales (per-tensor when False).
        bias_correction: Per-channel bias correction after quantization; None = on for
            depthwise-heavy nets.
        weight_rounding: INT8 weight rounding: nearest, gptq
            (`deploykit.stages.rounding`), or auto (gptq for depthwise-heavy nets).
        calib_cache: Reuse cached calibration statistics (``--no-calib-cache`` recomputes).
        quantizer: ``deploykit`` (one Q/DQ ONNX for every backend) or the backend's own
            (``nncf`` for OpenVINO).
        int8_encoding: Q/DQ activation encoding (s8s8, u8s8, mixed); None = the target's
            own (`Capabilities.int8_encoding`).
        exact_residuals: mixed encoding: make OpenVINO round each Conv output that enters
            a residual Add, as ONNX Runtime does (slower; see
            `deploykit.stages.ovqdq.materialise_residual_inputs`).
        overflow_fix: auto, on or off: bound INT8 weight scales so CPUs without VNNI
            cannot saturate their 16-bit sums (`deploykit.stages.overflow`).
        keep_float: Layers kept in float from the start: node names of the fused graph,
            or run folders whose float layers (named and fallen back) are reused, so one
            backend's accuracy fallback carries to the others
            (`deploykit.pipeline.int8.keep_float_layers`).
        eval_data: Evaluation sets (names, manifests or labelled folders); None = the
            model's own sets when it has real weights, none otherwise.
        eval_samples: Inputs per evaluation set; None = the whole set.
        max_accuracy_drop: Largest top-1 drop (points) against FP32 on a labelled set.
        min_top5_overlap: Smallest top-5 overlap with FP32 (percent) on every evaluation
            set; None = not gated. Like the drop budget, a miss under INT8 starts the
            fallback.
        fallback: When INT8 misses the budget, keep the most sensitive layers in float.
        max_fallback_layers: Most layers the fallback may keep in float; None = a quarter
            of the quantized layers (at least 4).
        bn_recalibrate: Re-estimate a random-weight model's BatchNorm statistics on
            calibration images before export (``deploykit.stages.bnrecal``; ONNX targets
            only: the torch target rebuilds the model as built). Off by default: deep
            random-weight nets with realistic activations amplify INT8 rounding noise
            (see docs/coverage.md), so only `deploykit coverage` turns it on.
    """

    model: str
    target: str
    precision: str = "fp32"
    device: str = "cpu"
    weights: str | None = None
    seed: int = 0
    input_size: tuple[int, int] | None = None
    batch: int | None = None
    dynamic_batch: str | None = None
    opset: int = 18
    exporter: str = "auto"
    threads: int | None = None
    runs: int = 100
    warmup: int = 10
    min_seconds: float = 2.0
    fidelity_samples: int = 100
    out: str = "out"
    calib: str | None = None
    calib_method: str = "minmax"
    # 256: on the real-weight EfficientNet-Lite0 (its 256-view calibration set, 1,024
    # natural-image views, onnxruntime 1.32 / OpenVINO 2026.4) the INT8 logits' cosine
    # against FP32 rose from 0.99805 / 0.99815 with 128 inputs to 0.99835 / 0.99841, and
    # top-5 overlap from 96.4% / 96.3% to 96.9% / 96.7%. NNCF's default is 300.
    calib_samples: int = 256
    calib_percentile: float = 99.999
    per_channel: bool = True
    bias_correction: bool | None = None
    weight_rounding: str = "auto"
    calib_cache: bool = True
    quantizer: str = "deploykit"
    int8_encoding: str | None = None
    exact_residuals: bool = False
    overflow_fix: str = "auto"
    keep_float: list[str] | None = None
    eval_data: list[str] | None = None
    eval_samples: int | None = None
    max_accuracy_drop: float = 1.0
    min_top5_overlap: float | None = None
    fallback: bool = True
    max_fallback_layers: int | None = None
    bn_recalibrate: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    # Stop before the backend build: write what it would build from and print its plan.
    dry_run: bool = False

    def batch_range(self) -> BatchRange | None:
        """The parsed dynamic batch range, or None."""
        if self.dynamic_batch is None:
            return None
        try:
            return BatchRange.parse(self.dynamic_batch)
        except ValueError as exc:
            raise UserError(f"{exc}; e.g. --dynamic-batch 1:4:16") from exc

    def measure_batch(self) -> int:
        """Batch used for latency and fidelity."""
        rng = self.batch_range()
        if self.batch is not None:
            if self.batch < 1:
                raise UserError(f"--batch must be at least 1, got {self.batch}")
            if rng is not None and not rng.min <= self.batch <= rng.max:
                raise UserError(f"--batch {self.batch} is outside --dynamic-batch {rng}")
            return self.batch
        return rng.opt if rng is not None else 1


@dataclass
class ExportResult:
    """A finished run: its folder and its report."""

    run_dir: Path
    report: Report
