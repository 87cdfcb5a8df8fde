"""Edits deploykit makes to the Q/DQ graph ONNX Runtime's quantizer writes.

The u8s8 file puts signed tensors on the mixed file's symmetric grid (`u8s8_grid`),
puts back activations the quantizer folded into a QuantizeLinear that no longer clips
where they did (`restore_activations`) and gives an average pool's output its own grid
(`regrid_pool_outputs`); both CPU files give a Concat's inputs and output one range
(`unified_concat`) and keep the graph outputs float (`float_outputs`). The OpenVINO
placement edits of the mixed file are in `deploykit.stages.ovqdq`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deploykit.stages import ovqdq

# u8s8 puts a signed tensor on mixed's symmetric INT8 grid (scale amax/127) as UINT8 with
# zero point 128, instead of ONNX Runtime's asymmetric [lo, hi] grid. Measured on the
# real-weight EfficientNet-Lite0 (1,024 natural-image views, onnxruntime 1.32, OpenVINO
# 2026.4, graph outputs float): ONNX Runtime u8s8 against OpenVINO mixed, cosine 0.99877
# -> 0.99920 and top-1 agreement 97.0% -> 97.7%; against FP32, agreement 96.5% -> 96.3%
# and top-5 overlap 96.6% -> 96.9% (within the set's noise). ONNX Runtime's kernels take
# any zero point at the same speed. OpenVINO does not: giving mixed the asymmetric grid
# instead cost 4.5-9.4% latency on five models, so the grids meet on mixed's.
U8_SIGNED_ZERO_POINT = 128


def unified_concat(
    model: Any, ranges: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Ranges where every Concat's inputs and output share the union of their ranges.

    Around a channel split (ShuffleNet v2: Concat -> channel shuffle -> Split -> the
    next Concat) the sharing is closed transitively by `ovqdq.split_groups`, so nothing
    is requantized after the Split.
    """
    concats = [[*n.input, *n.output] for n in model.graph.node if n.op_type == "Concat"]
    ranges = dict(ranges)
    # Each Concat in graph order, then each split group, takes the union of its ranges.
    for group in [*concats, *ovqdq.split_groups(model)]:
        names = [t for t in group if t in ranges]
        if names:
            lo = min(ranges[t][0] for t in names)
            hi = max(ranges[t][1] for t in names)
            ranges.update({t: (lo, hi) for t in names})
    return ranges


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
