"""Bias correction for Q/DQ models: match per-channel output means to the FP32 model.

This is what NNCF calls bias correction (after Nagel et al., "Data-Free
Quantization", 2019): rounding a layer's weights and inputs to INT8 shifts the
expected value of each output channel, and the shift is not zero-mean when a
channel has few weights (a 3x3 depthwise filter has 9) or one outlier weight
sets the scale. For every Conv/Gemm whose weight is quantized, the
per-output-channel mean of its output on the calibration inputs is measured in
the FP32 model and in the Q/DQ model, and the difference is added to the bias:

- an int32 bias behind a DequantizeLinear (what onnxruntime's quantizer emits)
  is re-quantized with its own scale (``input_scale * weight_scale``), so QDQ
  fusion into integer kernels still applies;
- a float bias initializer is shifted in place;
- a Conv without a bias gets an int32 bias and its DequantizeLinear when its
  input and weight scales are plain initializers (otherwise it is left alone),
  unless the caller asks to correct existing biases only (`add_missing=False`,
  what the OpenVINO encoding does: see `deploykit.stages.calibrate`).

The layers are corrected in topological order and each one is measured with
every upstream layer already corrected: the Q/DQ graph is cut after each
corrected layer and run segment by segment, the tensors that cross a cut kept
in memory, and a layer's output shifted by its correction before the next
segment reads it. So the whole correction costs one FP32 run (all reference
means at once, as extra graph outputs), one segmented Q/DQ run and two plain
runs for the guard below, instead of one run per layer.

Two cheaper schemes were measured and rejected. Correcting all layers at once
from one Q/DQ run, over a few passes, overshoots on deep nets: every downstream
layer also "corrects" the error its upstream layers are fixing (EfficientNet-
Lite0, per-tensor: the first pass raised the channel-mean error from 0.0074 to
0.0108, and held-out top-1 fell from 0.90 to 0.55 after three). Measuring each
layer on FP32 inputs (NNCF's *fast* variant) ignores that upstream noise
dithers the rounding of small activations, and over-corrected a depthwise layer
with an outlier weight 3x (output MSE 0.059 -> 0.177 from that layer alone).

A guard runs the Q/DQ model before and after on the calibration inputs and
reverts the correction if its outputs moved further from FP32.

Auto mode (``bias_correction=None``) turns it on when at least DEPTHWISE_SHARE of
the Conv nodes are depthwise: MobileNet, EfficientNet, MnasNet and ShuffleNet
qualify (about a third of their convolutions are depthwise), ResNet, VGG and
SqueezeNet (none) do not; those have many weights per output channel, so the
rounding error averages out and correction costs time for little gain.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.harness.inputs import spread_subset

DEPTHWISE_SHARE = 0.25
DYNAMIC_BATCH = 16
# Calibration inputs the correction measures means on, spread over the set. The means
# depend on the content: EfficientNet-Lite0 (minmax, u8s8 on ONNX Runtime, scored on
# natural-images) corrected on the 64 views of one calibration photo reached mean cosine
# 0.99834 (astronaut), 0.99703 (rocket), 0.99771 (hubble_deep_field) or 0.99742 (china)
# against FP32; on 32 / 64 / 128 / 256 views spread over the four, 0.99793 / 0.99791 /
# 0.99803 / 0.99810. 128 views took 21 s per file on 2 cores, 32 took 6 s.
MAX_SAMPLES = 128
INT32 = np.iinfo(np.int32)


@dataclass
class GuardedReport:
    """What a guarded edit of a Q/DQ model did (bias correction, weight rounding).

    Attributes:
        applied: Whether the edit was kept.
        reason: Why it ran or not (requested, or the auto rule).
        seconds: Wall time, ONNX Runtime runs included.
        output_mse_before: Mean squared error of the model outputs against FP32 on the
            calibration inputs, before the edit.
        output_mse_after: The same after the edit (before a revert).
        reverted: The edit made the outputs worse on the calibration inputs and was undone.
        skipped: Quantized layers left alone, with the reason.
    """

    applied: bool
    reason: str
    seconds: float = 0.0
    output_mse_before: float = 0.0
    output_mse_after: float = 0.0
    reverted: bool = False
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dict(self.__dict__)


@dataclass
class BiasCorrectionReport(GuardedReport):
    """What bias correction did (see `GuardedReport` for the common fields).

    Attributes:
        layers_corrected: Conv/Gemm layers whose bias was shifted.
        mean_abs_shift: Mean |shift| over the corrected output channels (activation units).
    """

    layers_corrected: int = 0
    mean_abs_shift: float = 0.0


@dataclass
class _Target:
    """One quantized Conv/Gemm of the Q/DQ model and its FP32 twin."""

    node: Any
    twin: Any
    channels: int
    total_shift: np.ndarray = field(default_factory=lambda: np.zeros(0))


def depthwise_share(model: Any) -> tuple[int, int]:
    """(depthwise Conv nodes, all Conv nodes) of an ONNX model.

    A Conv is depthwise when ``group > 1`` and each group sees one input channel.
    """
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    depthwise = 0
    for node in convs:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = shapes.get(node.input[1])
        if group > 1 and weight is not None and len(weight) > 1 and weight[1] == 1:
            depthwise += 1
    return depthwise, len(convs)


def decide(option: bool | None, float_model: Any) -> tuple[bool, str]:
    """Whether to correct biases, and why (`option` None applies the depthwise rule)."""
    if option is not None:
        return option, "on (requested)" if option else "off (requested)"
    enabled, why = depthwise_rule(float_model)
    return enabled, f"auto {'on' if enabled else 'off'}: {why}"


def depthwise_rule(float_model: Any) -> tuple[bool, str]:
    """Whether `float_model` is depthwise-heavy (DEPTHWISE_SHARE of its Convs), and the count.

    The rule behind ``auto`` for bias correction and for GPTQ weight rounding.
    """
    depthwise, convs = depthwise_share(float_model)
    share = depthwise / convs if convs else 0.0
    heavy = bool(convs) and share >= DEPTHWISE_SHARE
    sign = ">=" if heavy else "<"
    return heavy, (
        f"{depthwise} of {convs} Conv nodes depthwise ({share:.0%} {sign} {DEPTHWISE_SHARE:.0%})"
    )


def correct_biases(
    float_path: Path,
    qdq_model: Any,
    inputs: np.ndarray,
    reason: str = "on (requested)",
    add_missing: bool = True,
) -> BiasCorrectionReport:
    """Shift the biases of `qdq_model` (in place) so per-channel means match `float_path`.

    Args:
        float_path: The FP32 model the Q/DQ model was made from (same node names). It is
            only read.
        qdq_model: The Q/DQ ``onnx.ModelProto`` (topologically sorted); its bias
            initializers are edited.
        inputs: Calibration inputs (NCHW float32); MAX_SAMPLES of them, spread over
            the set (`spread_subset`), are used.
        reason: Why correction runs, recorded in the report.
        add_missing: Give a Conv without a bias a new one; False corrects existing
            biases only (the Conv is listed in the report's skipped layers).

    Returns:
        What was corrected and by how much.
    """
    import onnx

    started = time.perf_counter()
    inputs = spread_subset(inputs, max(MAX_SAMPLES, batch_size(qdq_model)[0]))
    float_model = onnx.load(str(float_path))
    targets, skipped = _targets(float_model, qdq_model, add_missing)
    report = BiasCorrectionReport(applied=False, reason=reason, skipped=skipped)
    if not targets:
        report.reason += "; no quantized Conv/Gemm to correct"
        report.seconds = time.perf_counter() - started
        return report
    graph_outputs = [o.name for o in float_model.graph.output]
    measured = _run_all(float_model, graph_outputs + [t.twin.output[0] for t in targets], inputs)
    reference = measured[: len(graph_outputs)]
    fp_means = [_channel_mean(m) for m in measured[len(graph_outputs) :]]
    backup = onnx.ModelProto()
    backup.CopyFrom(qdq_model)
    report.output_mse_before = output_mse(_run_all(qdq_model, graph_outputs, inputs), reference)
    try:
        _correct_in_order(qdq_model, targets, fp_means, inputs)
    except _ort_errors() as exc:  # ORT cannot run a segment (e.g. control flow): keep the model
        qdq_model.CopyFrom(backup)
        report.reason += f"; not applied: a graph segment failed ({type(exc).__name__}: {exc})"
        report.seconds = time.perf_counter() - started
        return report
    report.output_mse_after = output_mse(_run_all(qdq_model, graph_outputs, inputs), reference)
    shifts = np.concatenate([t.total_shift for t in targets])
    report.layers_corrected = sum(bool(np.any(t.total_shift)) for t in targets)
    report.mean_abs_shift = float(np.mean(np.abs(shifts)))
    if report.output_mse_after > report.output_mse_before:
        qdq_model.CopyFrom(backup)
        report.reverted = True
    report.applied = bool(np.any(shifts)) and not report.reverted
    report.seconds = time.perf_counter() - started
    return report


def _correct_in_order(
    model: Any, targets: list[_Target], fp_means: list[np.ndarray], inputs: np.ndarray
) -> None:
    """Correct `targets` in graph order, each measured after its upstream was corrected.

    The graph is run in segments that end at each target; the tensors crossing a cut
    are kept (per input batch) and the target's output is shifted by the correction
    it just received before the next segment reads it.
    """
    nodes = list(model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}
    position = {n.name: i for i, n in enumerate(nodes)}
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            last_use[name] = i
    first = model.graph.input[0].name
    chunks = input_chunks(model, inputs)
    live: dict[str, list[np.ndarray]] = {first: chunks}
    start = 0
    for target, fp_mean in zip(targets, fp_means, strict=True):
        end = position[target.node.name] + 1
        produced = [out for node in nodes[start:end] for out in node.output if out]
        output = target.node.output[0]
        wanted = [t for t in produced if last_use.get(t, -1) >= end or t == output]
        segment = _segment(model, nodes[start:end], inits, live, wanted)
        results = [
            segment.run(wanted, {name: live[name][b] for name in segment.feeds})
            for b in range(len(chunks))
        ]
        for j, name in enumerate(wanted):
            live[name] = [np.asarray(r[j]) for r in results]
        values = live[output]
        mean = sum(_reduce(v).sum(axis=0) for v in values) / sum(v.shape[0] for v in values)
        realized = _shift_bias(model, target, fp_mean - mean)
        shape = (1, -1) + (1,) * (values[0].ndim - 2)
        step = realized.reshape(shape).astype(values[0].dtype)
        live[output] = [v + step for v in values]
        live = {k: v for k, v in live.items() if last_use.get(k, -1) >= end}
        start = end


@dataclass
class _Segment:
    """An ONNX Runtime session for a run of consecutive nodes, and the tensors it reads."""

    session: Any
    feeds: list[str]

    def run(self, outputs: list[str], feeds: dict[str, np.ndarray]) -> list[Any]:
        return list(self.session.run(outputs, feeds))


def _segment(
    model: Any,
    nodes: list[Any],
    inits: dict[str, Any],
    live: dict[str, list[np.ndarray]],
    outputs: list[str],
) -> _Segment:
    """A session that runs `nodes`, reading tensors from `live` and the initializers."""
    import onnx
    import onnxruntime as ort

    produced = {out for node in nodes for out in node.output}
    read = [name for node in nodes for name in node.input if name and name not in produced]
    feeds = [name for name in dict.fromkeys(read) if name not in inits]
    graph = onnx.helper.make_graph(
        nodes,
        "segment",
        [
            onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(live[name][0].dtype), None
            )
            for name in feeds
        ],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [inits[name] for name in dict.fromkeys(read) if name in inits],
    )
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import))
    sub.ir_version = model.ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        sub.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return _Segment(session, feeds)


def batch_size(model: Any) -> tuple[int, bool]:
    """(batch size to run, whether the model fixes it)."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value") and dim.dim_value > 0:
        return int(dim.dim_value), True
    return DYNAMIC_BATCH, False


def input_chunks(model: Any, inputs: np.ndarray) -> list[np.ndarray]:
    """`inputs` in batches the model accepts (whole batches only for a fixed batch size)."""
    batch, fixed = batch_size(model)
    stop = inputs.shape[0] - batch + 1 if fixed else inputs.shape[0]
    return [inputs[s : s + batch] for s in range(0, stop, batch)]


def _ort_errors() -> tuple[type[Exception], ...]:
    """The exception types ONNX Runtime raises for a graph it cannot build or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidGraph", "InvalidArgument", "RuntimeException", "NotImplemented")
    return tuple(getattr(state, name) for name in names if hasattr(state, name))


def use_counts(model: Any) -> dict[str, int]:
    """How many node inputs of `model` read each tensor."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def quantized_weights(qdq_model: Any) -> list[tuple[Any, Any]]:
    """(node, weight DequantizeLinear) of every Conv/Gemm whose weight is quantized."""
    producers = {out: n for n in qdq_model.graph.node for out in n.output}
    found = []
    for node in qdq_model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            found.append((node, dq))
    return found


def _targets(
    float_model: Any, qdq_model: Any, add_missing: bool = True
) -> tuple[list[_Target], dict[str, str]]:
    """Conv/Gemm nodes of `qdq_model` with a quantized weight, matched by name to FP32 nodes."""
    float_nodes = {n.name: n for n in float_model.graph.node if n.name}
    inits = {i.name: i for i in qdq_model.graph.initializer}
    producers = {out: n for n in qdq_model.graph.node for out in n.output}
    consumers = use_counts(qdq_model)
    targets: list[_Target] = []
    skipped: dict[str, str] = {}
    # A weight kept in float (excluded node) has no DequantizeLinear: nothing was rounded.
    for node, weight_dq in quantized_weights(qdq_model):
        twin = float_nodes.get(node.name)
        bias = node.input[2] if len(node.input) > 2 else ""
        channels = _out_channels(node, weight_dq, inits)
        why = ""
        if twin is None or twin.op_type != node.op_type:
            why = "no FP32 node of that name"
        elif bias and consumers.get(bias, 0) > 1:
            why = "bias shared with another node"
        elif bias and bias not in inits and not _is_int32_dq(producers.get(bias), inits):
            why = "bias is neither an initializer nor an int32 DequantizeLinear"
        elif not bias and node.op_type != "Conv":
            why = "Gemm without a bias"
        elif not bias and not add_missing:
            why = "no bias (existing biases only)"
        elif channels is None or not all(i in inits for i in weight_dq.input):
            why = "weight is not a quantized initializer"
        if why:
            skipped[node.name] = why
            continue
        assert channels is not None
        targets.append(_Target(node, twin, channels, total_shift=np.zeros(channels)))
    return targets, skipped


def _is_int32_dq(node: Any, inits: dict[str, Any]) -> bool:
    import onnx

    return (
        node is not None
        and node.op_type == "DequantizeLinear"
        and all(name in inits for name in node.input if name)
        and inits[node.input[0]].data_type == onnx.TensorProto.INT32
    )


def _out_channels(node: Any, weight_dq: Any, inits: dict[str, Any]) -> int | None:
    weight = inits.get(weight_dq.input[0])
    if weight is None or len(weight.dims) < 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(weight.dims[0] if trans_b else weight.dims[1])
    return int(weight.dims[0])


def _run_all(model: Any, outputs: list[str], inputs: np.ndarray) -> list[np.ndarray]:
    return run_reduced(model, outputs, inputs, _reduce)


def run_reduced(
    model: Any,
    outputs: list[str],
    inputs: np.ndarray,
    reduce: Callable[[np.ndarray], np.ndarray],
) -> list[np.ndarray]:
    """Run `model` over `inputs` in batches; return `reduce` of each of `outputs`, concatenated.

    Tensors that are not graph outputs are exposed as extra outputs.
    """
    session = exposing_session(model, outputs)
    first = session.get_inputs()[0]
    parts: list[list[np.ndarray]] = [[] for _ in outputs]
    for chunk in input_chunks(model, inputs):
        values = session.run(outputs, {first.name: chunk})
        for part, value in zip(parts, values, strict=True):
            part.append(reduce(np.asarray(value)))
    return [np.concatenate(p) for p in parts]


def exposing_session(model: Any, tensors: list[str]) -> Any:
    """An ONNX Runtime CPU session of `model` that can also return `tensors` (each
    intermediate tensor is added as a graph output)."""
    import onnx
    import onnxruntime as ort

    run_model = model
    present = {o.name for o in model.graph.output}
    extra = [name for name in dict.fromkeys(tensors) if name not in present]
    if extra:
        run_model = onnx.ModelProto()
        run_model.CopyFrom(model)
        for name in extra:
            run_model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        run_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _reduce(value: np.ndarray) -> np.ndarray:
    """Per-sample, per-channel means of an (N, C, ...) tensor (N, C) as float64."""
    if value.ndim <= 2:
        return value.astype(np.float64)
    return np.asarray(value.mean(axis=tuple(range(2, value.ndim)), dtype=np.float64))


def _channel_mean(per_sample: np.ndarray) -> np.ndarray:
    return per_sample.mean(axis=0) if per_sample.ndim > 1 else per_sample


def output_mse(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Mean squared error over every model output (per-sample, per-channel means)."""
    return float(np.mean([np.mean((o - r) ** 2) for o, r in zip(outputs, reference, strict=True)]))


def _shift_bias(model: Any, target: _Target, shift: np.ndarray) -> np.ndarray:
    """Add `shift` (one value per output channel) to the bias of `target.node`.

    Returns:
        The shift actually applied (after int32 rounding; zeros where none could be).
    """
    from onnx import numpy_helper

    node = target.node
    bias = node.input[2] if len(node.input) > 2 else ""
    if not bias:
        bias = _add_int32_bias(model, node, target.channels)
        if not bias:
            return np.zeros(target.channels)
    inits = {i.name: i for i in model.graph.initializer}
    if bias in inits:  # float bias
        values = numpy_helper.to_array(inits[bias]).astype(np.float64)
        if values.size != target.channels:
            return np.zeros(target.channels)
        new = (values.reshape(-1) + shift).astype(np.float32).reshape(values.shape)
        inits[bias].CopyFrom(numpy_helper.from_array(new, bias))
        realized = new.reshape(-1).astype(np.float64) - values.reshape(-1)
        target.total_shift += realized
        return realized
    dq = next(n for n in model.graph.node if bias in n.output)
    q_init = inits[dq.input[0]]
    q = numpy_helper.to_array(q_init).astype(np.int64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64).reshape(-1)
    if q.size != target.channels or scale.size not in (1, target.channels):
        return np.zeros(target.channels)
    new_q = np.clip(q.reshape(-1) + np.round(shift / scale), INT32.min, INT32.max).astype(np.int64)
    q_init.CopyFrom(numpy_helper.from_array(new_q.astype(np.int32).reshape(q.shape), q_init.name))
    realized = (new_q - q.reshape(-1)) * scale
    target.total_shift += realized
    return np.asarray(realized, dtype=np.float64)


def _add_int32_bias(model: Any, node: Any, channels: int) -> str:
    """Give a bias-less Conv an int32 bias (all zeros) behind a DequantizeLinear, if simple.

    Returns:
        The new bias tensor's name, or "" when the input or weight scale is not a plain
        initializer (then the layer is left as it is).
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    x_dq, w_dq = producers.get(node.input[0]), producers.get(node.input[1])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear":
        return ""
    if x_dq.input[1] not in inits or w_dq.input[1] not in inits:
        return ""
    x_scale = numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float32).reshape(-1)
    w_scale = numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32).reshape(-1)
    if x_scale.size != 1 or w_scale.size not in (1, channels):
        return ""
    scale = (x_scale * np.broadcast_to(w_scale, (channels,))).astype(np.float32)
    base = f"{node.name or node.output[0]}.bias_correction"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(channels, np.int32), f"{base}_quantized"),
            numpy_helper.from_array(scale, f"{base}_scale"),
        ]
    )
    dq = onnx.helper.make_node(
        "DequantizeLinear",
        [f"{base}_quantized", f"{base}_scale"],
        [base],
        name=f"{base}_DequantizeLinear",
        axis=0,
    )
    index = next(i for i, n in enumerate(graph.node) if n.name == node.name)
    graph.node.insert(index, dq)
    node = graph.node[index + 1]
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = base
    return base
