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
Both give a Concat's inputs and output one shared range (`_unified_concat`);
u8s8 then puts back a ReLU the quantizer folded into a Q that no longer clips at zero
(`restore_activations`) and gives an average pool's output its own grid rather than
its input's (`regrid_pool_outputs`), as mixed does. The graph outputs stay float (see
`float_outputs`).

After Q/DQ insertion, optional bias correction (`deploykit.stages.biascorrect`)
shifts Conv/Gemm biases so that per-channel output means match the FP32 model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.harness.datasets import Dataset
from deploykit.stages import CALIBRATION_METHODS, calibcache, entropy, mse, overflow, ovqdq
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
# u8s8 puts a signed tensor on mixed's symmetric INT8 grid (scale amax/127) as UINT8 with
# zero point 128, instead of ONNX Runtime's asymmetric [lo, hi] grid. Measured on the
# real-weight EfficientNet-Lite0 (1,024 natural-image views, onnxruntime 1.32, OpenVINO
# 2026.4, graph outputs float): ONNX Runtime u8s8 against OpenVINO mixed, cosine 0.99877
# -> 0.99920 and top-1 agreement 97.0% -> 97.7%; against FP32, agreement 96.5% -> 96.3%
# and top-5 overlap 96.6% -> 96.9% (within the set's noise). ONNX Runtime's kernels take
# any zero point at the same speed. OpenVINO does not: giving mixed the asymmetric grid
# instead cost 4.5-9.4% latency on five models, so the grids meet on mixed's.
U8_SIGNED_ZERO_POINT = 128
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
        use_cache: Reuse cached statistics; False collects afresh and rewrites the entry.
        nodes_to_exclude: Node names (of the fused graph) kept in float: no Q/DQ on
            their weights (for per-layer fallback).
        exact_residuals: mixed only: make OpenVINO round each Conv output that enters a
            residual Add, as the file says (`ovqdq.materialise_residual_inputs`), so
            it computes what ONNX Runtime computes from the u8s8 file; slower.
        overflow_fix: auto, on or off: bound the weight scales so that CPUs without
            VNNI cannot saturate their 16-bit INT8 sums (`deploykit.stages.overflow`);
            auto does it for u8s8/mixed on such a CPU.
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
        if not 90.0 <= self.percentile < 100.0:
            raise UserError(f"--calib-percentile must be in [90, 100), got {self.percentile}")
        if isinstance(self.nodes_to_exclude, str) or not all(
            isinstance(n, str) for n in self.nodes_to_exclude
        ):
            raise UserError("nodes_to_exclude must be a list of node names")


@dataclass
class CalibrationStats:
    """Per-tensor activation ranges from one calibration pass; every encoding derives from them.

    Attributes:
        method: The calibration method that produced them.
        percentile: The percentile used (``method="percentile"`` only).
        ranges: Tensor name -> (lo, hi), float32 values held as Python floats.
    """

    method: str
    percentile: float | None
    ranges: dict[str, tuple[float, float]]

    def symmetric_amax(self, name: str) -> float:
        """The symmetric (s8s8) range of `name`: ``max(|lo|, |hi|)``."""
        lo, hi = self.ranges[name]
        return max(abs(lo), abs(hi))

    def tensors_data(self) -> Any:
        """A fresh onnxruntime ``TensorsData`` (the quantizer edits the one it is given)."""
        from onnxruntime.quantization.calibrate import TensorData, TensorsData

        return TensorsData(
            _ort_method(self.method),
            {
                name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                for name, (lo, hi) in self.ranges.items()
            },
        )


@dataclass
class CalibrationReport:
    """What the calibrate stage did.

    Attributes:
        cache: ``hit``, ``miss``, ``rebuilt: <reason>`` or ``off`` (``off: <reason>`` when
            the entry could not be written).
        statistics_seconds: Time to collect the statistics (or read them from the cache).
        qdq_seconds: Time to write the Q/DQ model from the statistics.
        bias_correction: What bias correction did (see `BiasCorrectionReport`).
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

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dict(self.__dict__)


@dataclass
class _Prepared:
    """The graph that is calibrated and quantized (the fused graph after ORT pre-processing)."""

    path: Path
    note: str
    model: Any
    workdir: Path

    @property
    def tensor_names(self) -> set[str]:
        graph = self.model.graph
        return {t for node in graph.node for t in node.output} | {i.name for i in graph.input}

    @property
    def node_names(self) -> set[str]:
        return {node.name for node in self.model.graph.node}


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
    with _prepared(fused) as prep:
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
    )


def collect_statistics(fused: Path, data: Dataset, options: CalibrationOptions) -> CalibrationStats:
    """Run ONNX Runtime's calibrator for `options.method` over `data` (no cache).

    Raises:
        UserError: Bad options, or data that does not fit the model.
    """
    options.validate()
    with _prepared(fused) as prep:
        _check_inputs(prep, data)
        return _collect(prep, data, options)


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
    with _prepared(fused) as prep:
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
    fused: Path, prep: _Prepared, data: Dataset, options: CalibrationOptions
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
    stats = _collect(prep, data, options)
    try:
        calibcache.store(key, stats.ranges)
    except OSError as exc:
        status = f"off: cannot write {calibcache.cache_dir()}: {exc.strerror or exc}"
    return stats, status, key.digest()


def _collect(prep: _Prepared, data: Dataset, options: CalibrationOptions) -> CalibrationStats:
    """Run the calibrator on the prepared graph and return its ranges."""
    from onnxruntime.quantization import CalibrationDataReader
    from onnxruntime.quantization.calibrate import create_calibrator

    batch = _static_batch(prep.model)
    inputs = data.inputs
    name = prep.model.graph.input[0].name
    chunks = [inputs[i : i + batch] for i in range(0, inputs.shape[0] - batch + 1, batch)]
    if not chunks:
        raise UserError(
            f"the model takes batches of {batch}; pass at least {batch} calibration inputs"
        )

    class Reader(CalibrationDataReader):
        def __init__(self, batches: list[np.ndarray]) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            chunk = next(self.items, None)
            return None if chunk is None else {name: chunk}

    # Min-max keeps two reduced values per tensor and batch: one pass. A histogram
    # calibrator keeps every exposed activation of every batch it is given until it
    # histograms them, so it is fed a group of batches at a time (see HISTOGRAM_INPUTS).
    per_group = len(chunks) if options.method == "minmax" else max(1, HISTOGRAM_INPUTS // batch)
    groups = [chunks[i : i + per_group] for i in range(0, len(chunks), per_group)]

    with _quiet_ort():
        calibrator = create_calibrator(
            prep.path,
            _op_types_to_quantize(),
            augmented_model_path=str(prep.workdir / "augmented.onnx"),
            calibrate_method=_ort_method(options.method),
            # Exactly what quantize_static passes (CalibPercentile); `symmetric` is left
            # at each calibrator's default — see the module docstring.
            extra_options={"percentile": options.percentile, **_method_options(options.method)},
        )
        try:
            if len(groups) > 1:
                _seed_histograms(calibrator, chunks, name)
            for group in groups:
                calibrator.collect_data(Reader(group))
            if options.method in HISTOGRAM_SEARCHES:
                searched = _searched_ranges(calibrator, HISTOGRAM_SEARCHES[options.method])
                return CalibrationStats(options.method, None, searched)
            tensors = calibrator.compute_data()
        except ValueError as exc:
            if options.method == "minmax":
                raise
            # numpy cannot histogram a tensor whose range is (nearly) zero, e.g. a dead
            # ReLU on random weights: "Too many bins for data range".
            raise UserError(
                f"{options.method} calibration cannot build a histogram here ({exc}); "
                "use --calib-method minmax"
            ) from exc
    ranges: dict[str, tuple[float, float]] = {}
    for tensor, td in tensors.items():
        lo, hi = (np.asarray(v, dtype=np.float32).reshape(-1) for v in td.range_value)
        if lo.size != 1 or hi.size != 1:
            raise RuntimeError(f"expected one range per tensor, got {lo.size} for {tensor!r}")
        ranges[tensor] = (float(lo[0]), float(hi[0]))
    percentile = options.percentile if options.method == "percentile" else None
    return CalibrationStats(options.method, percentile, ranges)


def _seed_histograms(calibrator: Any, batches: list[np.ndarray], input_name: str) -> None:
    """Give a histogram calibrator empty histograms over each tensor's whole range.

    ONNX Runtime's collector bins a tensor over the range of the first data it sees
    and widens the histogram with bins of that width when later data exceed it, so
    groups fed one after another would not histogram like one pass. With the bin
    edges one pass would use (from a first pass that keeps only each tensor's
    extremes), every group adds into the same bins and the result is one pass's.
    """
    from onnxruntime.quantization.calibrate import HistogramCollector

    session = calibrator.infer_session
    names = [o.name for o in session.get_outputs()]
    wanted = [n for n in names if n in calibrator.tensors_to_calibrate]
    low: dict[str, float] = {}
    high: dict[str, float] = {}
    smallest_abs: dict[str, float] = {}
    for batch in batches:
        outputs = dict(zip(names, session.run(None, {input_name: batch}), strict=True))
        for tensor in wanted:
            value = np.asarray(outputs[tensor], dtype=np.float32)
            if value.size == 0:
                continue
            low[tensor] = min(low.get(tensor, np.inf), float(np.nanmin(value)))
            high[tensor] = max(high.get(tensor, -np.inf), float(np.nanmax(value)))
            smallest = float(np.nanmin(np.abs(value)))
            smallest_abs[tensor] = min(smallest_abs.get(tensor, np.inf), smallest)
    collector = HistogramCollector(
        method=calibrator.method,
        symmetric=calibrator.symmetric,
        num_bins=calibrator.num_bins,
        num_quantized_bins=calibrator.num_quantized_bins,
        percentile=calibrator.percentile,
        scenario=calibrator.scenario,
    )
    for tensor in low:
        lo, hi = np.float32(low[tensor]), np.float32(high[tensor])
        if calibrator.method == "entropy":  # HistogramCollector.collect_value
            threshold = np.float32(max(abs(lo), abs(hi)))
            span = (float(-threshold), float(threshold))
            hist, edges = np.histogram(np.zeros(0, np.float32), calibrator.num_bins, span)
            collector.histogram_dict[tensor] = (hist, edges, lo, hi, threshold)
        else:  # collect_absolute_value: bins over [min |x|, max |x|]
            bounds = np.array([smallest_abs[tensor], max(abs(lo), abs(hi))], dtype=np.float32)
            hist, edges = np.histogram(bounds, bins=calibrator.num_bins)
            collector.histogram_dict[tensor] = (
                np.zeros_like(hist),
                edges.astype(np.float32),
                lo,
                hi,
            )
    calibrator.collector = collector


def _write_qdq(
    prep: _Prepared,
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
    op_types = _op_types_to_quantize()
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
        stats = CalibrationStats(stats.method, stats.percentile, _unified_concat(prep, stats))
    if encoding == "u8s8":
        overrides = {}
        for tensor, (lo, hi) in stats.ranges.items():
            if lo < 0.0:
                scale, zero = u8s8_grid(lo, hi)
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
    with _quiet_ort():
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
        restore_activations(model, prep.model)
        regrid_pool_outputs(model, stats.ranges)
    if encoding == "mixed":
        ovqdq.quantize_pool_inputs(model, stats.ranges)
        ovqdq.drop_maxpool_requantize(model)
        ovqdq.hoist_above_shape_ops(model)
        if options.exact_residuals:
            ovqdq.materialise_residual_inputs(model)
    float_outputs(model, keep_conv=encoding == "u8s8")
    return model, fix


def _overflow_overrides(
    prep: _Prepared,
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


def restore_activations(model: Any, original: Any) -> list[str]:
    """Put back each Relu/Clip the quantizer removed where the Q/DQ after it does not clip.

    With asymmetric activations ONNX Runtime's quantizer drops a Relu or Clip and lets
    the QuantizeLinear after it do the clipping (``QDQRemovableActivation``): a ReLU
    output's range starts at 0, so the zero point is the grid's lowest value. That stops
    holding when the range is widened past the activation's bounds: a ReLU output that
    shares a Concat's signed range sits on the symmetric grid (zero point 128), and the
    negative values the ReLU removed came back. Random-weight ``cliquenet_small``
    (Concat of a signed AveragePool output and ReLU outputs) fell to INT8 cosine 0.45
    against FP32 so. The activation goes back between the pair's DequantizeLinear and a
    copy of the pair (same scale and zero point), which is exact: rounding to a grid
    commutes with clipping at one of its points.

    Args:
        model: The quantized ModelProto, edited in place.
        original: The float model it was quantized from.

    Returns:
        The outputs of the restored activations.
    """
    from onnx import helper, numpy_helper

    producers, consumers, inits = ovqdq.graph_index(model)
    _, _, float_inits = ovqdq.graph_index(original)
    restored = []
    for node in original.graph.node:
        out = node.output[0] if node.output else ""
        producer = producers.get(out)
        if node.op_type not in ("Relu", "Clip") or producer is None:
            continue
        if producer.op_type == node.op_type:
            continue  # kept by the quantizer
        quants = [c for c in consumers.get(out, []) if c.op_type == "QuantizeLinear"]
        if len(quants) != 1 or len(consumers[out]) != 1 or len(quants[0].input) < 3:
            continue
        q = quants[0]
        scale = float(numpy_helper.to_array(inits[q.input[1]]).reshape(-1)[0])
        zero = numpy_helper.to_array(inits[q.input[2]])
        info = np.iinfo(zero.dtype)
        grid_lo = (float(info.min) - float(zero.reshape(-1)[0])) * scale
        grid_hi = (float(info.max) - float(zero.reshape(-1)[0])) * scale
        lo, hi = _activation_bounds(node, float_inits)
        if grid_lo >= lo - scale / 2 and grid_hi <= hi + scale / 2:
            continue  # the Q clips where the activation did
        for dq in list(consumers.get(q.output[0], [])):
            if dq.op_type != "DequantizeLinear":
                continue
            tag = f"{out}_restored_{dq.name or dq.output[0]}"
            act = helper.make_node(
                node.op_type,
                [dq.output[0], *node.input[1:]],
                [f"{tag}_act"],
                name=f"{tag}_{node.op_type}",
            )
            act.attribute.extend(node.attribute)
            q2 = helper.make_node(
                "QuantizeLinear", [f"{tag}_act", *q.input[1:]], [f"{tag}_q"], name=f"{tag}_Q"
            )
            dq2 = helper.make_node(
                "DequantizeLinear", [f"{tag}_q", *dq.input[1:]], [f"{tag}_dq"], name=f"{tag}_DQ"
            )
            for user in consumers.get(dq.output[0], []):
                user.input[:] = [f"{tag}_dq" if i == dq.output[0] else i for i in user.input]
            for extra in node.input[1:]:
                if extra and extra in float_inits and extra not in inits:
                    model.graph.initializer.append(float_inits[extra])
                    inits[extra] = float_inits[extra]
            model.graph.node.extend([act, q2, dq2])
        restored.append(out)
    if restored:
        from onnxruntime.quantization.onnx_model import ONNXModel

        ONNXModel(model).topological_sort()
    return restored


def regrid_pool_outputs(model: Any, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """Give each average pool's output the u8s8 grid of its own calibrated range.

    ONNX Runtime's quantizer puts an AveragePool's output on its input's grid; the
    mixed encoding quantizes it with its own range (for a Concat input, the Concat's
    shared one), so the two CPU files rounded it differently. ONNX Runtime's
    QLinearAveragePool takes any output scale, so u8s8 follows mixed.

    Args:
        model: A u8s8 Q/DQ ModelProto, edited in place.
        ranges: The calibrated range of each tensor (Concat-unified).

    Returns:
        The pool outputs whose grid changed.
    """
    from onnx import numpy_helper

    _, consumers, inits = ovqdq.graph_index(model)
    changed = []
    for node in model.graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type not in ("AveragePool", "GlobalAveragePool") or out not in ranges:
            continue
        quants = [c for c in consumers.get(out, []) if c.op_type == "QuantizeLinear"]
        if len(quants) != 1 or len(quants[0].input) < 3:
            continue
        scale, zero = u8s8_grid(*ranges[out])
        q = quants[0]
        old = [numpy_helper.to_array(inits[name]) for name in q.input[1:3] if name in inits]
        if len(old) == 2 and np.array_equal(old[0], scale) and np.array_equal(old[1], zero):
            continue
        params = [f"{out}_grid_scale", f"{out}_grid_zero_point"]
        model.graph.initializer.extend(
            [numpy_helper.from_array(scale, params[0]), numpy_helper.from_array(zero, params[1])]
        )
        q.input[1:3] = params
        for dq in consumers.get(q.output[0], []):
            if dq.op_type == "DequantizeLinear":
                dq.input[1:3] = params
        changed.append(out)
    return changed


def u8s8_grid(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The u8s8 encoding's (scale, UINT8 zero point) for the range ``[lo, hi]``.

    A signed range takes mixed's symmetric INT8 grid shifted to UINT8 (scale
    ``max(|lo|, |hi|) / 127``, zero point 128); a non-negative one ONNX Runtime's own
    ``[0, hi]`` grid, which is also mixed's.
    """
    if lo < 0.0:
        scale = np.array(max(abs(lo), abs(hi)) / 127.0, dtype=np.float32)
        return scale, np.array(U8_SIGNED_ZERO_POINT, dtype=np.uint8)
    return ovqdq.quantization_params(lo, hi)


def _activation_bounds(node: Any, inits: dict[str, Any]) -> tuple[float, float]:
    """The [lo, hi] a Relu or Clip node clips to (infinite where it does not)."""
    from onnx import numpy_helper

    if node.op_type == "Relu":
        return 0.0, float("inf")
    bounds = [float("-inf"), float("inf")]
    for index in (1, 2):  # opset >= 11: min and max are inputs
        if len(node.input) > index and node.input[index] in inits:
            bounds[index - 1] = float(numpy_helper.to_array(inits[node.input[index]]))
    for attr in node.attribute:  # opset < 11
        if attr.name in ("min", "max"):
            bounds[attr.name == "max"] = attr.f
    return bounds[0], bounds[1]


def float_outputs(model: Any, keep_conv: bool) -> list[str]:
    """Remove the Q/DQ pair in front of each graph output, so the outputs stay float.

    Quantizing a model's output (the logits of a classifier) only adds rounding error:
    ONNX Runtime runs a Gemm/MatMul with a float output as QGemm, and OpenVINO and
    TensorRT run an INT8 layer with a float output as well. Measured on the real-weight
    EfficientNet-Lite0 (u8s8 on ONNX Runtime, 1,024 natural-image views): top-1
    agreement with FP32 94.6% -> 96.5%, cosine 0.99821 -> 0.99848; latency 0.994-1.009x
    on five models. The quantized logits also tied near-equal classes.

    Args:
        model: A Q/DQ ModelProto, edited in place.
        keep_conv: Keep the pair after a Conv/ConvTranspose (ONNX Runtime fuses a
            QLinearConv only with a QuantizeLinear on its output).

    Returns:
        The graph outputs that were made float.
    """
    graph = model.graph
    producers, consumers, _ = ovqdq.graph_index(model)
    outputs = {out.name for out in graph.output}
    changed = []
    for output in graph.output:
        dq = producers.get(output.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(dq.input[0]) != [dq]:
            continue
        source = q.input[0]
        producer = producers.get(source)
        if source in outputs or producer is None:
            continue
        if keep_conv and producer.op_type in ("Conv", "ConvTranspose"):
            continue
        graph.node.remove(dq)
        graph.node.remove(q)
        for node in graph.node:
            node.output[:] = [output.name if o == source else o for o in node.output]
            node.input[:] = [output.name if i == source else i for i in node.input]
        for info in list(graph.value_info):
            if info.name == source:
                graph.value_info.remove(info)
        changed.append(output.name)
    if changed:
        used = {name for node in graph.node for name in node.input}
        for init in list(graph.initializer):
            if init.name not in used:
                graph.initializer.remove(init)
    return changed


def _unified_concat(prep: _Prepared, stats: CalibrationStats) -> dict[str, tuple[float, float]]:
    """Ranges where every Concat's inputs and output share the union of their ranges.

    Around a channel split (ShuffleNet v2: Concat -> channel shuffle -> Split -> the
    next Concat) the sharing is closed transitively by `ovqdq.split_groups`, so nothing
    is requantized after the Split.
    """
    concats = [[*n.input, *n.output] for n in prep.model.graph.node if n.op_type == "Concat"]
    ranges = dict(stats.ranges)
    # Each Concat in graph order, then each split group, takes the union of its ranges.
    for group in [*concats, *ovqdq.split_groups(prep.model)]:
        names = [t for t in group if t in ranges]
        if names:
            lo = min(ranges[t][0] for t in names)
            hi = max(ranges[t][1] for t in names)
            ranges.update({t: (lo, hi) for t in names})
    return ranges


@contextlib.contextmanager
def _prepared(fused: Path) -> Iterator[_Prepared]:
    """ORT's quantization pre-processing (shape inference, basic optimisation) in a temp folder.

    Pre-processing is an optimisation: when it fails, the fused graph is quantized
    as is and the reason is recorded.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="deploykit-calib-") as tmp:
        workdir = Path(tmp)
        pre = workdir / "model.pre.onnx"
        path, note = pre, "ok"
        try:
            with _quiet_ort():
                quant_pre_process(str(fused), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # ORT raises assorted types; the fused graph still quantizes
            path, note = fused, f"skipped: {type(exc).__name__}: {str(exc)[:160]}"
        yield _Prepared(path=path, note=note, model=load_onnx(path, check=False), workdir=workdir)


def _check_inputs(prep: _Prepared, data: Dataset) -> None:
    dims = prep.model.graph.input[0].type.tensor_type.shape.dim
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
    if all(isinstance(d, int) and d > 0 for d in expected) and data.inputs.shape[1:] != expected:
        raise UserError(
            f"calibration inputs have shape {data.inputs.shape[1:]}, the model takes {expected}"
        )


def _check_excluded(prep: _Prepared, nodes: Sequence[str]) -> None:
    unknown = sorted(set(nodes) - prep.node_names)
    if unknown:
        weighted = [n.name for n in prep.model.graph.node if n.op_type in ("Conv", "Gemm")]
        raise UserError(
            f"nodes_to_exclude names nodes the graph lacks: {', '.join(unknown[:5])}; "
            f"Conv/Gemm nodes are: {', '.join(weighted[:8])}{' ...' if len(weighted) > 8 else ''}"
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


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Silence ORT quantization's prints and warnings, restoring the logging level after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def _ort_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "mse": CalibrationMethod.Entropy,  # its histograms; the search is deploykit's
        "percentile": CalibrationMethod.Percentile,
    }[method]


# Inputs a histogram calibrator (entropy, percentile) is given at once. ONNX Runtime's
# holds all their activations in memory: 256 inputs of EfficientNet-Lite1 (240x240) at
# once took 24 GB and were killed on a 24 GB machine. 32 at a time: `deploykit calibrate
# efficientnet_lite2 --calib-method percentile` (260x260, 256 inputs) peaks at 6.0 GB.
HISTOGRAM_INPUTS = 32

# Entropy (KL) needs a histogram much finer than the 128 levels it searches over (with
# onnxruntime's default of 128 bins there is a single candidate and "entropy" silently
# equals minmax). ONNX Runtime histograms x over [-amax, amax]; 4096 bins give the 2048
# bins of |x| that TensorRT's calibrator searches.
ENTROPY_BINS = 4096


def _method_options(method: str) -> dict[str, Any]:
    return {"num_bins": ENTROPY_BINS} if method in HISTOGRAM_SEARCHES else {}


# Methods whose threshold deploykit searches on ONNX Runtime's entropy histograms:
# ONNX Runtime's own KL search mis-handles ReLU outputs (deploykit.stages.entropy) and
# it has no MSE search (deploykit.stages.mse).
HISTOGRAM_SEARCHES = {"entropy": entropy.entropy_range, "mse": mse.mse_range}


def _searched_ranges(calibrator: Any, search: Any) -> dict[str, tuple[float, float]]:
    """Each tensor's range from the calibrator's signed histogram, by ``search``."""
    histograms = calibrator.collector.histogram_dict
    return {
        tensor: search(hist, edges, float(lo), float(hi))
        for tensor, (hist, edges, lo, hi, _threshold) in histograms.items()
    }


def _op_types_to_quantize() -> list[str]:
    """The op types quantize_static quantizes (and calibrates) by default, in a stable order."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _static_batch(model: Any) -> int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
