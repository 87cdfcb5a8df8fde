"""Calibration statistics: ONNX Runtime's calibrators run once over the data -> a range per tensor.

The ranges are collected exactly as ``quantize_static`` collects them (histogram
methods a group of inputs at a time, into the bins one pass would use); see
`deploykit.stages.calibrate` for how each method turns into a range and how the
encodings use it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.harness.datasets import Dataset
from deploykit.stages import entropy, mse
from deploykit.stages.onnxcheck import load_onnx


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
            ort_method(self.method),
            {
                name: TensorData(lowest=np.float32(lo), highest=np.float32(hi))
                for name, (lo, hi) in self.ranges.items()
            },
        )


@dataclass
class PreparedGraph:
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


@contextlib.contextmanager
def prepared(fused: Path) -> Iterator[PreparedGraph]:
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
            with quiet_ort():
                quant_pre_process(str(fused), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # ORT raises assorted types; the fused graph still quantizes
            path, note = fused, f"skipped: {type(exc).__name__}: {str(exc)[:160]}"
        yield PreparedGraph(
            path=path, note=note, model=load_onnx(path, check=False), workdir=workdir
        )


def collect(prep: PreparedGraph, data: Dataset, method: str, percentile: float) -> CalibrationStats:
    """Run the calibrator for `method` on the prepared graph and return its ranges.

    Args:
        prep: The graph to calibrate (`prepared`).
        data: Calibration inputs.
        method: minmax, entropy, percentile or mse.
        percentile: The percentile of ``method="percentile"``.
    """
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
    per_group = len(chunks) if method == "minmax" else max(1, HISTOGRAM_INPUTS // batch)
    groups = [chunks[i : i + per_group] for i in range(0, len(chunks), per_group)]

    with quiet_ort():
        calibrator = create_calibrator(
            prep.path,
            op_types_to_quantize(),
            augmented_model_path=str(prep.workdir / "augmented.onnx"),
            calibrate_method=ort_method(method),
            # Exactly what quantize_static passes (CalibPercentile); `symmetric` is left
            # at each calibrator's default — see the module docstring.
            extra_options={"percentile": percentile, **_method_options(method)},
        )
        try:
            if len(groups) > 1:
                _seed_histograms(calibrator, chunks, name)
            for group in groups:
                calibrator.collect_data(Reader(group))
            if method in HISTOGRAM_SEARCHES:
                searched = _searched_ranges(calibrator, HISTOGRAM_SEARCHES[method])
                return CalibrationStats(method, None, searched)
            tensors = calibrator.compute_data()
        except ValueError as exc:
            if method == "minmax":
                raise
            # numpy cannot histogram a tensor whose range is (nearly) zero, e.g. a dead
            # ReLU on random weights: "Too many bins for data range".
            raise UserError(
                f"{method} calibration cannot build a histogram here ({exc}); "
                "use --calib-method minmax"
            ) from exc
    ranges: dict[str, tuple[float, float]] = {}
    for tensor, td in tensors.items():
        lo, hi = (np.asarray(v, dtype=np.float32).reshape(-1) for v in td.range_value)
        if lo.size != 1 or hi.size != 1:
            raise RuntimeError(f"expected one range per tensor, got {lo.size} for {tensor!r}")
        ranges[tensor] = (float(lo[0]), float(hi[0]))
    return CalibrationStats(method, percentile if method == "percentile" else None, ranges)


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


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """Silence ORT quantization's prints and warnings, restoring the logging level after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def ort_method(method: str) -> Any:
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


def op_types_to_quantize() -> list[str]:
    """The op types quantize_static quantizes (and calibrates) by default, in a stable order."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


def _static_batch(model: Any) -> int:
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1
