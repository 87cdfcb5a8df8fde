"""FP16 ONNX from FP32 ONNX: the input of TensorRT's strongly typed FP16 build.

A strongly typed TensorRT network computes each layer in the type its tensors
have in the ONNX graph (TensorRT 11 has no FP16 builder flag any more), so the
FP16 engine is built from an FP16 ONNX file. The conversion keeps the model's
inputs and outputs in FP32 (callers feed and read float32) and keeps
numerically fragile ops — normalisations, reductions, exponentials, resampling —
in FP32, with Cast nodes at the boundaries. It uses onnxconverter-common's
converter (pure Python, maintained by the ONNX project) and is checked with ONNX
Runtime on the CPU against the FP32 model, so it is verified on any machine.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import NumericMismatchError, UserError
from deploykit.fsutil import write_bytes_atomic
from deploykit.harness.fidelity import PRECISION_TOLERANCE, Fidelity, Tolerance, compare_outputs

# Ops kept in FP32: their FP16 forms lose accuracy through large intermediate sums
# (reductions, normalisations), range (Exp/Pow/Log overflow at 65504) or interpolation
# of coordinates (Resize). Elementwise and convolution ops run in FP16.
# Largest finite FP16 value.
FP16_MAX = 65504.0
FRAGILE_OPS: tuple[str, ...] = (
    "Softmax",
    "LogSoftmax",
    "Resize",
    "Upsample",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
    "ReduceProd",
    "LayerNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "BatchNormalization",
    "LpNormalization",
    "MeanVarianceNormalization",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Erf",
)


@dataclass
class Fp16Report:
    """What the FP16 conversion did and how close the result is to the FP32 model.

    Attributes:
        converter: The converter and its version.
        kept_fp32_ops: Op types held in FP32 (the block list).
        nodes_fp16: Compute nodes of the converted graph running in FP16.
        nodes_fp32: Compute nodes left in FP32 (blocked), by op type.
        casts_added: Cast nodes the converter inserted at FP16/FP32 boundaries.
        io_types: Input and output element types (kept FP32).
        fidelity: Converted model against the FP32 model in ONNX Runtime (CPU).
        verified_with: What ran both models.
        tolerance: The gate the check applied.
        max_activation: Largest |value| of any tensor produced by an FP16 node, measured on
            the FP32 model (FP16's largest finite value is 65504).
    """

    converter: str
    kept_fp32_ops: list[str]
    nodes_fp16: int
    nodes_fp32: dict[str, int]
    casts_added: int
    io_types: dict[str, str]
    fidelity: dict[str, Any] | None = None
    verified_with: str = ""
    tolerance: dict[str, float] = field(default_factory=dict)
    max_activation: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)


def _converter_version() -> str:
    from importlib import metadata

    try:
        return f"onnxconverter-common {metadata.version('onnxconverter-common')}"
    except metadata.PackageNotFoundError:
        return "onnxconverter-common"


def convert_fp16(
    src: Path,
    dst: Path,
    keep_fp32_ops: tuple[str, ...] = FRAGILE_OPS,
) -> Fp16Report:
    """Convert an FP32 ONNX model to FP16 with FP32 inputs/outputs and fragile ops in FP32.

    Args:
        src: The (fused) FP32 ONNX model.
        dst: Where to write the FP16 model (atomically).
        keep_fp32_ops: Op types that stay in FP32.

    Returns:
        The conversion report (without the numeric check; see :func:`verify_fp16`).

    Raises:
        UserError: onnxconverter-common is not installed, or the model cannot be converted.
    """
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise UserError(
            "FP16 conversion needs onnxconverter-common: pip install 'onnxconverter-common>=1.16'"
        ) from exc
    model = onnx.load(str(src))
    before = collections.Counter(n.op_type for n in model.graph.node)
    # The converter's own list holds ops without FP16 kernels (TopK, RoiAlign, ...): keep it.
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_fp32_ops))
    try:
        with warnings.catch_warnings():
            # One warning per weight clamped to FP16's range: expected, and summarised below.
            warnings.simplefilter("ignore", UserWarning)
            converted = float16.convert_float_to_float16(
                model, keep_io_types=True, op_block_list=block
            )
        # The converter leaves a stale FP32 value_info beside the FP16 one where a blocked
        # node's output is cast back (ONNX Runtime then rejects the graph): infer them anew.
        del converted.graph.value_info[:]
        converted = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises plain ValueError/KeyError on odd graphs
        raise UserError(
            f"cannot convert {src.name} to FP16 ({type(exc).__name__}: {exc}); "
            "build FP32 instead (--precision fp32)"
        ) from exc
    write_bytes_atomic(dst, converted.SerializeToString())
    return _describe(converted, before, block)


def _describe(converted: Any, before: collections.Counter[str], block: list[str]) -> Fp16Report:
    import onnx

    after = collections.Counter(n.op_type for n in converted.graph.node)
    blocked = {op: n for op, n in sorted(before.items()) if op in block}
    compute = sum(n for op, n in after.items() if op != "Cast" and op not in block)
    elem = onnx.TensorProto.DataType.Name
    io_types = {
        v.name: elem(v.type.tensor_type.elem_type)
        for v in [*converted.graph.input, *converted.graph.output]
    }
    return Fp16Report(
        converter=_converter_version(),
        kept_fp32_ops=[op for op in block if op in before],
        nodes_fp16=compute,
        nodes_fp32=blocked,
        casts_added=after.get("Cast", 0) - before.get("Cast", 0),
        io_types=io_types,
    )


def verify_fp16(
    fp32: Path,
    fp16: Path,
    inputs: np.ndarray,
    batch: int,
    report: Fp16Report,
    tolerance: Tolerance | None = None,
) -> Fidelity:
    """Run both models in ONNX Runtime on the CPU and compare the outputs.

    Args:
        fp32: The FP32 model.
        fp16: The converted model.
        inputs: NCHW float32 inputs, a multiple of `batch`.
        batch: The batch the graphs take (1 for dynamic-batch graphs is fine).
        report: Receives the fidelity, the runtime and the tolerance.
        tolerance: The gate; default the FP16 gate every backend is held to.

    Returns:
        The fidelity of the FP16 model against the FP32 model.

    Raises:
        NumericMismatchError: The FP16 model misses the tolerance.
    """
    from deploykit.stages.onnxcheck import OrtSession

    # ONNX Runtime's CPU provider runs most FP16 nodes through FP32 kernels (it inserts casts
    # and drops redundant ones), so the output comparison sees FP16 weights and boundaries but
    # not FP16 overflow inside the graph: check every FP16 tensor's range on the FP32 model.
    peaks = activation_peaks(fp32, inputs[:batch], set(report.kept_fp32_ops))
    report.max_activation = max(peaks.values(), default=0.0)
    over = {name: peak for name, peak in peaks.items() if not peak < FP16_MAX}
    if over:
        worst = max(over, key=lambda name: over[name])
        raise NumericMismatchError(
            f"FP16 ONNX of {fp32.name} would overflow: {len(over)} tensor(s) exceed FP16's "
            f"range 65504 (largest {over[worst]:.3g} at {worst!r}); build with --precision fp32"
        )
    tol = tolerance or PRECISION_TOLERANCE["fp16"]
    ref_session, cand_session = OrtSession(fp32), OrtSession(fp16)
    refs, outs = [], []
    for start in range(0, inputs.shape[0], batch):
        chunk = np.ascontiguousarray(inputs[start : start + batch], dtype=np.float32)
        refs.append(ref_session.run(chunk))
        outs.append(cand_session.run(chunk).astype(np.float32))
    fidelity = compare_outputs(np.concatenate(refs), np.concatenate(outs))
    import onnxruntime

    report.fidelity = fidelity.to_dict()
    report.verified_with = f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider"
    report.tolerance = {"min_cosine": tol.min_cosine, "max_rel_err": tol.max_rel_err}
    problems = tol.violations(fidelity)
    if problems:
        raise NumericMismatchError(
            f"FP16 ONNX of {fp32.name} differs from FP32 in ONNX Runtime: "
            + "; ".join(problems)
            + " (activations outside FP16 range, as random-weight models often have); "
            "build with --precision fp32"
        )
    return fidelity


def activation_peaks(model_path: Path, batch: np.ndarray, kept_fp32: set[str]) -> dict[str, float]:
    """Largest |value| of every float tensor produced by a node that runs in FP16.

    Args:
        model_path: The FP32 model.
        batch: One input batch.
        kept_fp32: Op types left in FP32 (their outputs are not FP16).

    Returns:
        Tensor name -> peak magnitude, over `batch`.
    """
    import onnx

    from deploykit.stages.onnxcheck import exposing_session

    model = onnx.load(str(model_path))
    inferred = onnx.shape_inference.infer_shapes(model)
    float_types = {
        v.name
        for v in [*inferred.graph.value_info, *inferred.graph.output]
        if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    names = [
        out
        for node in model.graph.node
        if node.op_type not in kept_fp32
        for out in node.output
        if out in float_types
    ]
    session = exposing_session(model, names)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)}
    values = session.run(names, feed)
    return {
        name: float(np.nan_to_num(np.abs(v).max(), nan=np.inf)) if v.size else 0.0
        for name, v in zip(names, values, strict=True)
    }
