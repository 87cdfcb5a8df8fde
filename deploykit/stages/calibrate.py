"""Calibrate stage: fused FP32 ONNX + calibration data -> explicit Q/DQ INT8 ONNX.

Calibrate once, compile everywhere (DESIGN.md, principle 1). The stage has two
halves:

1. `collect_statistics`: ONNX Runtime's calibrators (min-max, entropy or
   percentile) run the model once over the calibration data and give one
   activation range ``[lo, hi]`` per tensor. The ranges are cached on disk
   (`deploykit.stages.calibcache`), keyed by the model, the data and the method.
2. `write_qdq`: ONNX Runtime's QDQ quantizer inserts QuantizeLinear /
   DequantizeLinear pairs from those ranges, with per-channel symmetric INT8
   weights, in the activation encoding each backend runs best (see ENCODINGS).

The ranges are collected exactly as ``quantize_static`` collects them (histogram
methods a group of inputs at a time, into the bins one pass would use), so every
encoding derives from one collection and, for minmax and percentile, equals what
``quantize_static`` writes given deploykit's two departures below (the signed u8s8
grid, float graph outputs):

- minmax: the calibrator runs with ``symmetric=False`` and returns the observed
  ``[min, max]``;
- entropy: ONNX Runtime's histogram of each tensor; the KL threshold ``t`` is
  deploykit's (TensorRT's search over ``|x|``, `deploykit.stages.entropy`, because
  ONNX Runtime's own search mis-handles ReLU outputs) and the range is
  ``[max(min, -t), min(max, t)]``;
- percentile: ONNX Runtime's default, a histogram of ``|x|``; the threshold ``t``
  becomes ``[max(min, -t), min(max, t)]`` (so a ReLU output gets ``[0, t]``);
- mse: entropy's histograms; ``t`` minimises the expected squared quantization error
  on the tensor's grid (deploykit's, `deploykit.stages.mse`: ONNX Runtime has no MSE
  search), the range as for entropy.

u8s8 uses ``[lo, hi]`` as is (asymmetric UINT8) for non-negative ranges and the
symmetric INT8 grid, shifted to UINT8, for signed ones (scale ``max(|lo|, |hi|) / 127``,
zero point 128); s8s8 uses ``max(|lo|, |hi|)`` (zero point 0), which the quantizer
derives from the same range; mixed uses ``[0, hi]`` (UINT8, zero point 0) for
non-negative ranges and ``max(|lo|, |hi|)`` (INT8, zero point 0) for signed ones. So
the two put a tensor both quantize with the same range on the same grid, and the ONNX
Runtime and OpenVINO models of one calibration compute the same function up to kernel
rounding (and OpenVINO's Conv+Add fusion, which skips the rounding of a Conv output
before a residual Add unless ``exact_residuals``; see `deploykit.stages.ovqdq`).
Both give a Concat's inputs and output one shared range (`qdqedit.unified_concat`);
u8s8 then puts back a ReLU the quantizer folded into a Q that no longer clips at zero
(`qdqedit.restore_activations`) and gives an average pool's output its own grid rather
than its input's (`qdqedit.regrid_pool_outputs`), as mixed does. The graph outputs stay
float (see `qdqedit.float_outputs`). The statistics themselves are collected in
`deploykit.stages.calibstats`.

After Q/DQ insertion, optional GPTQ weight rounding (`deploykit.stages.rounding`)
re-rounds the INT8 weights on their grids to cancel each layer's output error on the
calibration inputs, and optional bias correction (`deploykit.stages.biascorrect`)
then shifts Conv/Gemm biases so that per-channel output means match the FP32 model.
Both are on by default for depthwise-heavy nets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.harness.datasets import Dataset
from deploykit.stages import (
    CALIBRATION_METHODS,
    calibcache,
    calibstats,
    overflow,
    ovqdq,
    qdqedit,
    rounding,
)
from deploykit.stages.calibstats import CalibrationStats, PreparedGraph
from deploykit.stages.onnxcheck import load_onnx, op_counts

METHODS = CALIBRATION_METHODS


# s8s8: symmetric INT8 activations and weights, zero points 0 — what TensorRT's strongly
#   typed build requires; the portable file.
# u8s8: asymmetric UINT8 activations, symmetric INT8 per-channel weights. Measured with
#   onnxruntime 1.32 on an AVX2-only 2-core AMD EPYC (random-weight mobilenet_v2, 224x224):
#   FP32 6.11 ms, u8s8 4.84 ms (cosine 0.9986 vs FP32), s8s8 15.7 ms with cosine 0.52 — the
#   s8s8 kernels are slower and saturate on CPUs without VNNI. OpenVINO 2026.4 on the same
#   machine: u8s8 5.14 ms, s8s8 5.88 ms, FP32 6.38 ms.
# mixed: what OpenVINO runs fastest — NNCF's placement and signedness from the same
#   ranges. Activations are quantized only where they enter the ops of MIXED_OPS (no Q/DQ
#   on outputs or on data movement), UINT8 with zero
#   point 0 where the calibrated range is non-negative (after ReLU/ReLU6) and symmetric
#   INT8 where it is signed. Measured with OpenVINO 2026.4 on a 2-core AVX-512-VNNI/AMX
#   Xeon (random-weight models, batch 1, 7 interleaved rounds, median ms): mobilenet_v2
#   u8s8 1.53, s8s8 1.87, mixed 1.46, NNCF's own quantization 1.45; shufflenet_v2_x1_0
#   u8s8 2.20, s8s8 2.09, mixed 1.85, NNCF 1.77. ONNX Runtime cannot fuse a Conv without a
#   Q on its output (it would run in float), so this encoding is for OpenVINO only.
ENCODINGS = ("s8s8", "u8s8", "mixed")


# The ops whose activation inputs the mixed encoding quantizes (and only those): compute
# ops, residual adds, and Concat/pooling so those run on INT8 data. All inputs (and the
# output) of a Concat share one range, so OpenVINO concatenates without requantizing —
# NNCF's "unified scales". SqueezeNet 1.1 (same machine, 7 rounds): Conv/Gemm/MatMul/Add
# inputs only 1.16 ms, plus Concat/pool inputs 1.13, plus unified Concat ranges 1.07, NNCF
# 0.91; shufflenet_v2_x1_0 1.88 / 1.93 / 1.79, NNCF 1.77. ONNX Runtime's quantizer leaves
# a pool whose input is not quantized (and every ReduceMean) alone, so ovqdq then quantizes
# pooling inputs itself: SqueezeNet 1.1 1.107 -> 0.825 ms (NNCF 0.843, 7 rounds).
# Bias correction in the mixed encoding shifts existing biases only (as NNCF's fast bias
# correction does) and gives no bias to a Conv that has none: OpenVINO's CPU plugin folds
# the per-channel dequantization scale of a bias-free INT8 convolution into its output
# quantization but keeps it, and the bias Add, as post-ops when there is a bias.
# Random-weight mobilenet_v2 (zero BatchNorm shifts fold to no bias), 7 interleaved
# rounds: 1.655 ms with the biases bias correction had added, 1.569 ms without, NNCF
# 1.569 ms. A trained network has a bias on every Conv (folded BatchNorm), so this
# changes nothing there.
MIXED_OPS = (
    "Add",
    "AveragePool",
    "Concat",
    "Conv",
    "ConvTranspose",
    "Gemm",
    "GlobalAveragePool",
    "MatMul",
    "MaxPool",
)


@dataclass(frozen=True)
class CalibrationOptions:
    """How to calibrate.

    Attributes:
        method: minmax, entropy (KL), percentile or mse.
        percentile: Percentile of |activation| kept with ``method="percentile"``.
        encoding: s8s8 (portable, symmetric), u8s8 (ONNX Runtime on x86) or mixed
            (OpenVINO); see ENCODINGS.
        per_channel: Per-output-channel weight scales (per-tensor when False).
        bias_correction: Shift Conv/Gemm biases so per-channel output means match FP32.
            None decides from the graph (on when at least a quarter of the Conv nodes
            are depthwise; see `deploykit.stages.biascorrect.DEPTHWISE_SHARE`).
        use_cache: Reuse cached statistics and GPTQ codes; False computes both afresh and
            rewrites the entries.
        nodes_to_exclude: Node names (of the fused graph) kept in float: no Q/DQ on
            their weights (for per-layer fallback).
        exact_residuals: mixed only: make OpenVINO round each Conv output that enters a
            residual Add, as the file says (`ovqdq.materialise_residual_inputs`), so
            it computes what ONNX Runtime computes from the u8s8 file; slower.
        overflow_fix: auto, on or off: bound the weight scales so that CPUs without
            VNNI cannot saturate their 16-bit INT8 sums (`deploykit.stages.overflow`);
            auto does it for u8s8/mixed on such a CPU.
        weight_rounding: nearest (the quantizer's), gptq (`deploykit.stages.rounding`)
            or auto (gptq where bias correction's depthwise rule turns it on).
    """

    method: str = "minmax"
    percentile: float = 99.999
    encoding: str = "s8s8"
    per_channel: bool = True
    bias_correction: bool | None = None
    use_cache: bool = True
    nodes_to_exclude: tuple[str, ...] = ()
    exact_residuals: bool = False
    overflow_fix: str = "auto"
    weight_rounding: str = "auto"

    def validate(self) -> None:
        """Raise UserError for unknown choices."""
        if self.method not in METHODS:
            raise UserError(
                f"unknown calibration method {self.method!r}: choose {', '.join(METHODS)}"
            )
        if self.encoding not in ENCODINGS:
            raise UserError(
                f"unknown INT8 encoding {self.encoding!r}: choose {', '.join(ENCODINGS)}"
            )
        if self.exact_residuals and self.encoding != "mixed":
            raise UserError(
                f"--exact-residuals applies to the mixed encoding (OpenVINO's), not "
                f"{self.encoding}: use it with --target openvino or --encoding mixed"
            )
        if self.overflow_fix not in overflow.MODES:
            raise UserError(
                f"unknown overflow fix {self.overflow_fix!r}: choose {', '.join(overflow.MODES)}"
            )
        if self.weight_rounding not in rounding.MODES:
            raise UserError(
                f"unknown weight rounding {self.weight_rounding!r}: choose "
                f"{', '.join(rounding.MODES)}"
            )
        if not 90.0 <= self.percentile < 100.0:
            raise UserError(f"--calib-percentile must be in [90, 100), got {self.percentile}")
        if isinstance(self.nodes_to_exclude, str) or not all(
            isinstance(n, str) for n in self.nodes_to_exclude
        ):
            raise UserError("nodes_to_exclude must be a list of node names")


@dataclass
class CalibrationReport:
    """What the calibrate stage did.

    Attributes:
        cache: ``hit``, ``miss``, ``rebuilt: <reason>`` or ``off`` (``off: <reason>`` when
            the entry could not be written).
        statistics_seconds: Time to collect the statistics (or read them from the cache).
        qdq_seconds: Time to write the Q/DQ model from the statistics.
        bias_correction: What bias correction did (see `BiasCorrectionReport`).
        weight_rounding: What weight rounding did (see `RoundingReport`).
    """

    method: str
    encoding: str
    per_channel: bool
    data: dict[str, Any]
    quantize_nodes: int
    dequantize_nodes: int
    seconds: float
    cache: str = "off"
    cache_key: str = ""
    statistics_seconds: float = 0.0
    qdq_seconds: float = 0.0
    tensors_calibrated: int = 0
    nodes_excluded: list[str] = field(default_factory=list)
    preprocess: str = "ok"
    bias_correction: dict[str, Any] = field(default_factory=dict)
    exact_residuals: bool = False
    overflow_fix: dict[str, Any] = field(default_factory=dict)
    weight_rounding: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dict(self.__dict__)


def calibrate_onnx(
    fused: Path, out_path: Path, data: Dataset, options: CalibrationOptions
) -> CalibrationReport:
    """Write a Q/DQ INT8 model of `fused` to `out_path`, calibrated on `data`.

    Statistics come from the cache when an entry for (model, data, method) exists
    and verifies; otherwise they are collected and stored. The Q/DQ model is
    written in `options.encoding`, without Q/DQ on the weights of
    `options.nodes_to_exclude`, and bias-corrected when `options.bias_correction`
    (or its auto rule) says so.

    Args:
        fused: The FP32 model (the fuse stage's output).
        out_path: Where the Q/DQ model goes (written atomically).
        data: Calibration inputs.
        options: Method, encoding, cache, bias correction, excluded nodes.

    Returns:
        What was done, with the cache outcome and the timings.

    Raises:
        UserError: Bad options, or data that does not fit the model.
    """
    from deploykit.stages import biascorrect

    options.validate()
    started = time.perf_counter()
    with calibstats.prepared(fused) as prep:
        _check_inputs(prep, data)
        _check_excluded(prep, options.nodes_to_exclude)
        t0 = time.perf_counter()
        stats, cache, key = _statistics(fused, prep, data, options)
        t1 = time.perf_counter()
        model, fix = _write_qdq(prep, stats, options, data.inputs)
        t2 = time.perf_counter()
        counts = op_counts(model)
        if not counts.get("QuantizeLinear"):
            raise UserError(f"{fused.name} has no operator that ONNX Runtime can quantize")
        mode, why = rounding.decide(options.weight_rounding, prep.model)
        if mode == "gptq":
            rounded = rounding.round_weights(
                prep.path, model, data.inputs, why, cache=options.use_cache
            )
        else:
            rounded = rounding.RoundingReport(mode=mode, applied=False, reason=why)
        enabled, reason = biascorrect.decide(options.bias_correction, prep.model)
        if enabled:
            bias = biascorrect.correct_biases(
                prep.path, model, data.inputs, reason, add_missing=options.encoding != "mixed"
            )
        else:
            bias = biascorrect.BiasCorrectionReport(applied=False, reason=reason)
        _save_checked(model, out_path)
    return CalibrationReport(
        method=options.method,
        encoding=options.encoding,
        per_channel=options.per_channel,
        data=data.describe(),
        quantize_nodes=counts.get("QuantizeLinear", 0),
        dequantize_nodes=counts.get("DequantizeLinear", 0),
        seconds=time.perf_counter() - started,
        cache=cache,
        cache_key=key,
        statistics_seconds=t1 - t0,
        qdq_seconds=t2 - t1,
        tensors_calibrated=len(stats.ranges),
        nodes_excluded=list(options.nodes_to_exclude),
        preprocess=prep.note,
        bias_correction=bias.to_dict(),
        exact_residuals=options.exact_residuals,
        overflow_fix=fix.to_dict(),
        weight_rounding=rounded.to_dict(),
    )


def collect_statistics(fused: Path, data: Dataset, options: CalibrationOptions) -> CalibrationStats:
    """Run ONNX Runtime's calibrator for `options.method` over `data` (no cache).

    Raises:
        UserError: Bad options, or data that does not fit the model.
    """
    options.validate()
    with calibstats.prepared(fused) as prep:
        _check_inputs(prep, data)
        return calibstats.collect(prep, data, options.method, options.percentile)


def write_qdq(
    fused: Path,
    stats: CalibrationStats,
    out_path: Path,
    encoding: str,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    exact_residuals: bool = False,
    overflow_fix: str = "auto",
) -> Any:
    """Write the Q/DQ model of `fused` in `encoding` from precomputed `stats` (no calibration).

    Args:
        fused: The FP32 model the statistics were collected on.
        stats: Ranges from `collect_statistics` (or the cache).
        out_path: Where the Q/DQ model goes (written atomically).
        encoding: s8s8, u8s8 or mixed.
        per_channel: Per-output-channel weight scales.
        nodes_to_exclude: Nodes kept in float (no Q/DQ on their weights).
        exact_residuals: mixed only: see `CalibrationOptions.exact_residuals`.
        overflow_fix: See `CalibrationOptions.overflow_fix`; without calibration data the
            bound assumes every input code can reach 255.

    Returns:
        The Q/DQ ``onnx.ModelProto`` that was written.

    Raises:
        UserError: Unknown encoding or node names, or statistics for tensors the model lacks.
    """
    options = CalibrationOptions(
        method=stats.method,
        encoding=encoding,
        per_channel=per_channel,
        nodes_to_exclude=tuple(nodes_to_exclude),
        exact_residuals=exact_residuals,
        overflow_fix=overflow_fix,
    )
    options.validate()
    with calibstats.prepared(fused) as prep:
        _check_excluded(prep, options.nodes_to_exclude)
        unknown = sorted(set(stats.ranges) - prep.tensor_names)
        if unknown:
            raise UserError(
                f"statistics name {len(unknown)} tensors that {fused.name} lacks "
                f"(first: {unknown[0]!r}); collect them on this model"
            )
        model, _ = _write_qdq(prep, stats, options, None)
        _save_checked(model, out_path)
    return model


def _statistics(
    fused: Path, prep: PreparedGraph, data: Dataset, options: CalibrationOptions
) -> tuple[CalibrationStats, str, str]:
    """Statistics from the cache or a fresh collection; returns (stats, cache status, key)."""
    key = calibcache.CacheKey.build(fused, data, options.method, options.percentile)
    percentile = options.percentile if options.method == "percentile" else None
    status = "off"
    if options.use_cache:
        found = calibcache.load(key, prep.tensor_names)
        if found.ranges is not None:
            return CalibrationStats(options.method, percentile, found.ranges), "hit", key.digest()
        status = found.status
    stats = calibstats.collect(prep, data, options.method, options.percentile)
    try:
        calibcache.store(key, stats.ranges)
    except OSError as exc:
        status = f"off: cannot write {calibcache.cache_dir()}: {exc.strerror or exc}"
    return stats, status, key.digest()


def _write_qdq(
    prep: PreparedGraph,
    stats: CalibrationStats,
    options: CalibrationOptions,
    inputs: np.ndarray | None,
) -> tuple[Any, overflow.OverflowReport]:
    """The Q/DQ ModelProto of the prepared graph, as ``quantize_static`` would write it.

    `inputs` (calibration data) give the overflow fix its per-channel bounds; without
    them it assumes the worst code.
    """
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import (
        load_model_with_shape_infer,
        update_opset_version,
    )

    encoding, per_channel = options.encoding, options.per_channel
    activation = QuantType.QInt8 if encoding == "s8s8" else QuantType.QUInt8
    op_types = calibstats.op_types_to_quantize()
    extra: dict[str, Any] = {
        "ActivationSymmetric": encoding == "s8s8",
        "WeightSymmetric": True,
        "CalibPercentile": options.percentile,
    }
    if encoding in ("u8s8", "mixed"):
        # Both CPU files give each Concat (and split chain) one range, so they share the
        # grid there too: fmnist_squeezenet's ONNX Runtime and OpenVINO INT8 files agreed
        # on 99.63% of the 10,000 test images with a range per Concat input, 99.98% so;
        # fmnist_shufflenet_v1 (with regrid_pool_outputs) 98.74% -> 99.27%. ONNX Runtime
        # no longer requantizes in QLinearConcat: u8s8 latency 0.88x (squeezenet1_1) to
        # 0.96x (inception_v3) on five Concat nets (7 interleaved rounds).
        stats = CalibrationStats(
            stats.method, stats.percentile, qdqedit.unified_concat(prep.model, stats.ranges)
        )
    if encoding == "u8s8":
        overrides = {}
        for tensor, (lo, hi) in stats.ranges.items():
            if lo < 0.0:
                scale, zero = qdqedit.u8s8_grid(lo, hi)
                overrides[tensor] = [
                    {"quant_type": QuantType.QUInt8, "scale": scale, "zero_point": zero}
                ]
        extra["TensorQuantOverrides"] = overrides
    if encoding == "mixed":
        op_types = [op for op in op_types if op in MIXED_OPS]
        extra["OpTypesToExcludeOutputQuantization"] = list(MIXED_OPS)
        extra["TensorQuantOverrides"] = {
            tensor: [{"quant_type": QuantType.QInt8, "symmetric": True}]
            for tensor, (lo, _) in stats.ranges.items()
            if lo < 0.0
        }
    fix = _overflow_overrides(prep, stats, options, inputs)
    if fix.overrides:
        extra.setdefault("TensorQuantOverrides", {}).update(fix.overrides)
    with calibstats.quiet_ort():
        model = load_model_with_shape_infer(prep.path)
        model = update_opset_version(model, QuantType.QInt8, activation)
        quantizer = QDQQuantizer(
            model,
            per_channel,
            False,  # reduce_range
            QuantType.QInt8,
            activation,
            stats.tensors_data(),
            [],  # nodes_to_quantize: all
            list(options.nodes_to_exclude),
            op_types,
            extra,
        )
        quantizer.quantize_model()
        quantizer.model.topological_sort()
    model = quantizer.model.model
    if encoding == "u8s8":
        qdqedit.restore_activations(model, prep.model)
        qdqedit.regrid_pool_outputs(model, stats.ranges)
    if encoding == "mixed":
        ovqdq.quantize_pool_inputs(model, stats.ranges)
        ovqdq.drop_maxpool_requantize(model)
        ovqdq.hoist_above_shape_ops(model)
        if options.exact_residuals:
            ovqdq.materialise_residual_inputs(model)
    qdqedit.float_outputs(model, keep_conv=encoding == "u8s8")
    return model, fix


def _overflow_overrides(
    prep: PreparedGraph,
    stats: CalibrationStats,
    options: CalibrationOptions,
    inputs: np.ndarray | None,
) -> overflow.OverflowReport:
    """The overflow fix's decision and, when it applies, its weight overrides."""
    enabled, reason = overflow.decide(options.overflow_fix, options.encoding)
    if not enabled:
        return overflow.OverflowReport(applied=False, reason=reason)
    weights = overflow.candidates(prep.model, options.nodes_to_exclude)
    peaks = None
    if inputs is not None:
        wanted = [w.input for w in weights if w.input in stats.ranges]
        peaks = overflow.channel_peaks(prep.model, wanted, inputs)
    return overflow.weight_overrides(weights, stats.ranges, peaks, options.per_channel, reason)


def _check_inputs(prep: PreparedGraph, data: Dataset) -> None:
    dims = prep.model.graph.input[0].type.tensor_type.shape.dim
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
    if all(isinstance(d, int) and d > 0 for d in expected) and data.inputs.shape[1:] != expected:
        raise UserError(
            f"calibration inputs have shape {data.inputs.shape[1:]}, the model takes {expected}"
        )


def _check_excluded(prep: PreparedGraph, nodes: Sequence[str]) -> None:
    unknown = sorted(set(nodes) - prep.node_names)
    if unknown:
        weighted = [n.name for n in prep.model.graph.node if n.op_type in ("Conv", "Gemm")]
        raise UserError(
            f"--keep-float names layers the fused graph lacks: {', '.join(unknown[:5])} "
            f"(a run folder must exist); its Conv/Gemm nodes are: {', '.join(weighted[:8])}"
            f"{' ...' if len(weighted) > 8 else ''}"
        )


def _save_checked(model: Any, out_path: Path) -> None:
    """Save `model` through a temporary file and the ONNX checker, then rename into place."""
    import onnx

    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        onnx.save(model, str(tmp))
        load_onnx(tmp)
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
