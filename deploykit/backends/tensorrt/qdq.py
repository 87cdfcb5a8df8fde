"""Checks that a Q/DQ ONNX model is one TensorRT's explicit-quantization build accepts.

TensorRT 10 deprecated and TensorRT 11 removed implicit INT8 (calibrators and
the INT8 builder flag): the strongly typed build takes the quantization from
QuantizeLinear/DequantizeLinear nodes in the graph. TensorRT's rules for those
nodes (the "Working with Quantized Types" chapter of its developer guide):

- INT8 only for this path (UINT8 is not a TensorRT quantized type);
- symmetric: every zero point is 0;
- scales are positive, finite build-time constants;
- activations are quantized per tensor; weights per tensor or per output
  channel, with the axis on the output channels of the layer that consumes them;
- a QuantizeLinear feeds DequantizeLinear nodes (TensorRT fuses each pair into
  the neighbouring layers).

These checks need only onnx, so they run wherever the Q/DQ file is written,
long before a TensorRT machine sees it.
"""

from __future__ import annotations

import collections
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError

_QDQ = ("QuantizeLinear", "DequantizeLinear")
# Layers whose INT8 form TensorRT runs from Q/DQ inputs (data and weights).
_COMPUTE = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# onnx.TensorProto element types.
onnx_uint8, onnx_int8 = 2, 3


@dataclass
class QdqReport:
    """What the check found.

    Attributes:
        quantize_nodes: QuantizeLinear nodes.
        dequantize_nodes: DequantizeLinear nodes.
        per_channel_weights: Weight quantizers with per-channel scales.
        int8_layers: Conv/Gemm/MatMul layers whose data and weight inputs are both quantized.
        float_layers: Conv/Gemm/MatMul layers left in float (by name).
        errors: Violations TensorRT rejects; the build cannot proceed.
        warnings: Legal graphs that TensorRT runs slower than intended.
    """

    quantize_nodes: int = 0
    dequantize_nodes: int = 0
    per_channel_weights: int = 0
    int8_layers: int = 0
    float_layers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when TensorRT can build the graph."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {**asdict(self), "ok": self.ok}


class _Graph:
    """Producers, consumers and constant values of one ONNX graph."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.constants: dict[str, np.ndarray] = {
            init.name: numpy_helper.to_array(init) for init in model.graph.initializer
        }
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value":
                        self.constants[node.output[0]] = numpy_helper.to_array(attr.t)
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        for node in model.graph.node:
            for out in node.output:
                self.producer[out] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)

    def weight(self, name: str) -> np.ndarray | None:
        """The constant behind `name` (through Q/DQ/Transpose/Reshape), or None."""
        seen = name
        for _ in range(4):
            if seen in self.constants:
                return self.constants[seen]
            node = self.producer.get(seen)
            if node is None or node.op_type not in (*_QDQ, "Transpose", "Reshape", "Identity"):
                return None
            seen = node.input[0]
        return None

    def is_weight(self, name: str) -> bool:
        """A constant, possibly behind Q/DQ/Transpose/Reshape."""
        return self.weight(name) is not None


def _attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _weight_axis(consumer: Any, input_index: int) -> int | None:
    """The output-channel axis of a weight input, or None when it is not a weight input."""
    op = consumer.op_type
    if op == "Conv" and input_index == 1:
        return 0
    if op == "ConvTranspose" and input_index == 1:
        return 1
    if op == "Gemm" and input_index == 1:
        return 0 if _attr(consumer, "transB", 0) else 1
    if op == "MatMul" and input_index == 1:
        return -1
    return None


def check_qdq(path: Path) -> QdqReport:
    """Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules.

    Args:
        path: The Q/DQ ONNX file (e.g. ``model.int8.qdq.onnx`` in s8s8 encoding).

    Returns:
        The report; ``report.ok`` is False when TensorRT would reject the graph.

    Raises:
        UserError: The file cannot be read.
    """
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, OSError
        raise UserError(
            f"cannot read {path}: {type(exc).__name__}; re-run the INT8 export"
        ) from exc
    graph = _Graph(model)
    report = QdqReport()
    elem_name = onnx.TensorProto.DataType.Name
    for node in model.graph.node:
        if node.op_type not in _QDQ:
            continue
        if node.op_type == "QuantizeLinear":
            report.quantize_nodes += 1
        else:
            report.dequantize_nodes += 1
        where = f"{node.op_type} {node.name or node.output[0]}"
        _check_scale_and_zero_point(node, graph, where, report, elem_name)
        _check_axis(node, graph, where, report)
        if node.op_type == "QuantizeLinear":
            users = graph.consumers.get(node.output[0], [])
            others = sorted({u.op_type for u in users if u.op_type != "DequantizeLinear"})
            if others:
                report.errors.append(
                    f"{where} feeds {', '.join(others)} instead of DequantizeLinear; "
                    "TensorRT needs Q/DQ pairs"
                )
    _check_layers(model, graph, report)
    if report.quantize_nodes == 0 and report.dequantize_nodes == 0:
        report.errors.append(
            f"{path.name} has no QuantizeLinear/DequantizeLinear nodes; "
            "pass the INT8 Q/DQ model (deploykit calibrate)"
        )
    return report


def _check_scale_and_zero_point(
    node: Any, graph: _Graph, where: str, report: QdqReport, elem_name: Any
) -> None:
    scale = graph.constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None:
        report.errors.append(f"{where}: the scale is not a constant; TensorRT needs it at build")
    elif not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
        report.errors.append(f"{where}: scales must be positive and finite")
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if zp_name:
        zero_point = graph.constants.get(zp_name)
        if zero_point is None:
            report.errors.append(f"{where}: the zero point is not a constant")
            return
        if zero_point.dtype == np.int32:
            report.errors.append(
                f"{where}: INT32 (bias) dequantization; TensorRT's DequantizeLinear takes INT8 "
                "(the tensorrt target folds such biases back to float: model.int8.trt.onnx)"
            )
        elif zero_point.dtype != np.int8:
            report.errors.append(
                f"{where}: {zero_point.dtype} quantization; TensorRT's Q/DQ path takes INT8 "
                "(export the symmetric s8s8 encoding: deploykit calibrate --encoding s8s8)"
            )
        elif np.any(zero_point != 0):
            report.errors.append(
                f"{where}: zero point {int(np.abs(zero_point).max())} is not 0; TensorRT "
                "quantization is symmetric (use the s8s8 encoding)"
            )
    elif node.op_type == "QuantizeLinear":
        # Without a zero point ONNX quantizes to output_dtype (opset 21), else to UINT8.
        dtype = _attr(node, "output_dtype", 0) or onnx_uint8
        if dtype != onnx_int8:
            report.errors.append(
                f"{where}: no INT8 zero point, so it quantizes to {elem_name(dtype)}; "
                "TensorRT's Q/DQ path takes INT8"
            )


def _check_axis(node: Any, graph: _Graph, where: str, report: QdqReport) -> None:
    scale = graph.constants.get(node.input[1]) if len(node.input) > 1 else None
    if scale is None or scale.size <= 1:
        return
    data = node.input[0]
    if not graph.is_weight(data):
        report.errors.append(
            f"{where}: per-channel scales on an activation; TensorRT quantizes "
            "activations per tensor"
        )
        return
    if node.op_type == "QuantizeLinear":
        return  # checked on the DequantizeLinear that feeds the layer
    report.per_channel_weights += 1
    axis = _attr(node, "axis", 1)
    weight = graph.weight(data)
    rank = weight.ndim if weight is not None else None
    for consumer in graph.consumers.get(node.output[0], []):
        for index, name in enumerate(consumer.input):
            if name != node.output[0]:
                continue
            expected = _weight_axis(consumer, index)
            if expected is None:
                continue
            if expected < 0 and rank is not None:
                expected += rank
            actual = axis + rank if axis < 0 and rank is not None else axis
            if actual != expected:
                report.errors.append(
                    f"{where}: per-channel axis {axis} on the weights of {consumer.op_type} "
                    f"{consumer.name}; TensorRT needs the output-channel axis {expected}"
                )


def _check_layers(model: Any, graph: _Graph, report: QdqReport) -> None:
    for node in model.graph.node:
        if node.op_type not in _COMPUTE or len(node.input) < 2:
            continue
        data, weight = node.input[0], node.input[1]
        data_q = _from_dq(graph, data)
        weight_q = _from_dq(graph, weight)
        if data_q and weight_q:
            report.int8_layers += 1
            continue
        report.float_layers.append(node.name or node.output[0])
        if data_q != weight_q:
            side = "weights are" if weight_q else "input is"
            report.warnings.append(
                f"{node.op_type} {node.name}: only its {side} quantized; TensorRT runs it in float"
            )


def _from_dq(graph: _Graph, name: str) -> bool:
    node = graph.producer.get(name)
    while node is not None and node.op_type in ("Transpose", "Reshape", "Identity"):
        node = graph.producer.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def require_trt_qdq(path: Path) -> QdqReport:
    """:func:`check_qdq`, raising a one-line error listing the first violations.

    Raises:
        UserError: TensorRT would reject the graph.
    """
    report = check_qdq(path)
    if not report.ok:
        shown = "; ".join(report.errors[:3])
        more = f" (and {len(report.errors) - 3} more)" if len(report.errors) > 3 else ""
        raise UserError(f"{path.name} is not a TensorRT Q/DQ model: {shown}{more}")
    return report


def fold_bias_dequantize(src: Path, dst: Path) -> int:
    """Replace DequantizeLinear nodes over INT32 constants (quantized biases) by float constants.

    ONNX Runtime's Q/DQ quantizer stores Conv/Gemm biases as INT32 with a
    DequantizeLinear, which TensorRT's parser does not take (its DequantizeLinear
    reads INT8). The folded constant is exactly what that node computes,
    ``(q - zero_point) * scale`` in float32, so the model's outputs do not change.

    Args:
        src: The Q/DQ model.
        dst: Where to write the folded model (atomically; may equal `src`).

    Returns:
        How many nodes were folded.
    """
    import onnx
    from onnx import numpy_helper

    from deploykit.fsutil import write_bytes_atomic

    model = onnx.load(str(src))
    graph = _Graph(model)
    keep, folded = [], 0
    for node in model.graph.node:
        data = graph.constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if data is None or data.dtype != np.int32:
            keep.append(node)
            continue
        scale = graph.constants[node.input[1]].astype(np.float32)
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zero = graph.constants[zp_name].astype(np.int64) if zp_name else np.int64(0)
        axis = _attr(node, "axis", 1)
        if scale.size > 1:  # per-channel: broadcast the scale along `axis`
            shape = [1] * data.ndim
            shape[axis] = scale.size
            scale = scale.reshape(shape)
            if np.ndim(zero):
                zero = zero.reshape(shape)
        value = ((data.astype(np.int64) - zero).astype(np.float32) * scale).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(keep)
    used = {name for node in model.graph.node for name in node.input}
    used |= {out.name for out in model.graph.output}
    kept_inits = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_inits)
    onnx.checker.check_model(model)
    write_bytes_atomic(dst, model.SerializeToString())
    return folded
