"""NNCF post-training INT8 quantization: fused FP32 ONNX -> INT8 OpenVINO IR.

OpenVINO's own quantizer, offered next to deploykit's Q/DQ calibration so the
benchmark can say which runs faster (DESIGN.md, principle 1). NNCF reads the
model through OpenVINO, collects activation ranges on the calibration inputs,
inserts FakeQuantize nodes where the CPU plugin runs INT8 (PERFORMANCE preset:
symmetric weights and activations), applies fast bias correction and stores the
weights as int8. The result is an IR (``model.int8.nncf.xml/.bin``) that
:meth:`OpenVinoBackend.compile` accepts like an ONNX file.

deploykit's calibration methods map onto NNCF's range estimators:

* ``minmax``: NNCF's defaults (weights: global min/max per channel; per-tensor
  activations: mean over samples of each sample's min/max).
* ``percentile``: activations take the mean over samples of each sample's
  ``1 - p`` and ``p`` quantiles (``p`` = ``--calib-percentile``); weights stay min/max.
* ``entropy`` (KL divergence) has no NNCF equivalent and is refused; so is ``mse``,
  which is not mapped onto NNCF's histogram search (``RangeEstimatorParametersSet.
  HISTOGRAM``, a quantization-error minimisation like deploykit's, not the same one).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError

IR_NAME = "model.int8.nncf.xml"
METHODS = ("minmax", "percentile")
FIX = "install it with `pip install nncf` (or `pip install 'deploykit[cpu]'`)"


def nncf_available() -> bool:
    """Whether NNCF is installed, checked without importing it (it imports torch)."""
    return importlib.util.find_spec("nncf") is not None


@dataclass(frozen=True)
class NncfOptions:
    """deploykit's calibration options as NNCF takes them.

    Attributes:
        method: ``minmax`` or ``percentile`` (see the module docstring).
        percentile: Percentile of activations kept with ``method="percentile"``.
        per_channel: Per-output-channel weight scales (per-tensor when False).
    """

    method: str = "minmax"
    percentile: float = 99.999
    per_channel: bool = True

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> NncfOptions:
        """Build from the options dict of ``Backend.quantize``, refusing what NNCF lacks.

        Raises:
            UserError: A method NNCF has no equivalent for, or a bad percentile.
        """
        built = cls(
            method=str(options.get("method", "minmax")),
            percentile=float(options.get("percentile", 99.999)),
            per_channel=bool(options.get("per_channel", True)),
        )
        if built.method not in METHODS:
            raise UserError(
                f"--quantizer nncf has no {built.method!r} calibration method; choose "
                f"--calib-method {' or '.join(METHODS)}, or --quantizer deploykit"
            )
        if not 90.0 <= built.percentile < 100.0:
            raise UserError(f"--calib-percentile must be in [90, 100), got {built.percentile}")
        return built


def quantize_to_ir(
    onnx_path: Path, calibration: np.ndarray, out_dir: Path, options: NncfOptions
) -> tuple[Path, dict[str, Any]]:
    """Quantize a fused FP32 ONNX model with NNCF and save the INT8 IR atomically.

    Args:
        onnx_path: The fused FP32 ONNX model.
        calibration: Preprocessed NCHW float32 calibration inputs.
        out_dir: Folder that receives ``model.int8.nncf.xml/.bin``.
        options: Method, percentile and weight granularity.

    Returns:
        The IR's xml path and what was done (versions, settings, seconds, node counts).

    Raises:
        UserError: NNCF is not installed, or the calibration data does not fit the model.
    """
    if not nncf_available():
        raise UserError(f"--quantizer nncf needs NNCF, which is not installed; {FIX}")
    import nncf
    import openvino as ov

    # convert_model (not read_model) folds the constant Reshape that the ONNX frontend puts
    # on grouped-convolution weights; behind that Reshape NNCF picks wrong weight-scale axes
    # and the CPU plugin runs every depthwise convolution in f32.
    model = ov.convert_model(str(onnx_path))
    batches = _batches(calibration, model.inputs[0].get_partial_shape()[0])
    started = time.perf_counter()
    with _nncf_output_to_stderr():
        quantized = nncf.quantize(
            model,
            nncf.Dataset(batches),
            preset=nncf.QuantizationPreset.PERFORMANCE,
            subset_size=len(batches),
            fast_bias_correction=True,
            model_type=None,
            advanced_parameters=_advanced_parameters(options),
        )
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / IR_NAME
    tmp_xml = out_dir / f".{final.stem}.tmp.xml"
    # FP32 stays FP32: only the weights NNCF quantized are stored as int8.
    ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    os.replace(tmp_xml.with_suffix(".bin"), final.with_suffix(".bin"))
    os.replace(tmp_xml, final)
    details = {
        "nncf_version": str(nncf.__version__),
        "preset": "performance (symmetric weights and activations)",
        "method": options.method,
        "range_estimator": _range_estimator_name(options),
        "percentile": options.percentile if options.method == "percentile" else None,
        "per_channel": options.per_channel,
        "subset_size": len(batches),
        "batch": int(batches[0].shape[0]),
        "samples_used": int(sum(b.shape[0] for b in batches)),
        "fast_bias_correction": True,
        "seconds": round(seconds, 3),
        "fake_quantize_ops": count_ops(quantized, "FakeQuantize"),
        "int8_weight_constants": _int8_constants(quantized),
        "ir": final.name,
    }
    return final, details


def count_ops(model: Any, type_name: str) -> int:
    """Number of nodes of one OpenVINO operation type in a model."""
    return sum(1 for op in model.get_ops() if op.get_type_name() == type_name)


def _int8_constants(model: Any) -> int:
    return sum(
        1
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
        and op.get_element_type().get_type_name() in ("i8", "u8")
    )


def _batches(calibration: np.ndarray, batch_dim: Any) -> list[np.ndarray]:
    """Split the inputs into the batches the model takes: 1 if its batch is dynamic."""
    if calibration.ndim != 4 or len(calibration) == 0:
        raise UserError(
            f"calibration inputs must be a non-empty NCHW array, got {calibration.shape}"
        )
    size = batch_dim.get_length() if batch_dim.is_static else 1
    if len(calibration) < size:
        raise UserError(
            f"the model takes batches of {size} but only {len(calibration)} calibration inputs "
            f"were given; pass --calib-samples {size} or more"
        )
    data = np.ascontiguousarray(calibration, dtype=np.float32)
    return [data[i : i + size] for i in range(0, len(data) - size + 1, size)]


def _advanced_parameters(options: NncfOptions) -> Any:
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    params = AdvancedQuantizationParameters()
    if not options.per_channel:
        params.weights_quantization_params = QuantizationParameters(per_channel=False)
    if options.method == "percentile":
        outlier = 1.0 - options.percentile / 100.0
        bound = StatisticsCollectorParameters(
            statistics_type=StatisticsType.QUANTILE,
            aggregator_type=AggregatorType.MEAN,
            quantile_outlier_prob=outlier,
        )
        params.activations_range_estimator_params = RangeEstimatorParameters(min=bound, max=bound)
    return params


def _range_estimator_name(options: NncfOptions) -> str:
    if options.method == "percentile":
        return "activations: mean of per-sample quantiles; weights: min/max"
    return "nncf default (activations: mean of per-sample min/max; weights: min/max)"


@contextlib.contextmanager
def _nncf_output_to_stderr() -> Iterator[None]:
    """Send NNCF's log lines and progress bars to stderr, so stdout stays clean for --json."""
    logger = logging.getLogger("nncf")
    moved = {
        handler: handler.stream
        for handler in logger.handlers
        if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr
    }
    for handler in moved:
        handler.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler, stream in moved.items():
            handler.setStream(stream)
