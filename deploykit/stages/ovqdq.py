"""Graph passes that finish the ``mixed`` Q/DQ encoding for OpenVINO.

ONNX Runtime's quantizer writes the Q/DQ graph; two things it does not do are
what OpenVINO's low-precision transformations need to run a network the way
they run NNCF's placement.

- **Pooling inputs.** ONNX Runtime quantizes a MaxPool/AveragePool only when its
  input is already quantized, and has no Q/DQ rule for ReduceMean (what a global
  average pool exports as). In the mixed encoding nothing quantizes a Conv's
  output, so those pools ran in f32 behind a standalone FakeQuantize.
  `quantize_pool_inputs` puts the Q/DQ on the pool's input instead, from the
  same calibrated range, so the producing Conv writes UINT8 and the pool runs on
  it. SqueezeNet 1.1 has one such MaxPool and its final ReduceMean.
- **No requantization after MaxPool or data movement.** The maximum commutes with
  a monotonic quantizer, and Split/Reshape/Transpose/Slice/Flatten/Squeeze/
  Unsqueeze only move values, so a Q/DQ on such an op's output with the scale
  and zero point of the Q/DQ its data came through is a no-op;
  `drop_requantize` removes it, so OpenVINO does not requantize between the op
  and the next Conv or Concat. The mixed writer gives a Concat's inputs and
  output, and the two sides of a data-movement op, one range (NNCF's unified
  scales; see `unified_ranges`), so the pairs after a channel-shuffle Split
  repeat their source's parameters and go too.
- Weights stay INT8 initializers behind a DequantizeLinear. OpenVINO then folds
  the per-channel dequantization of a Conv into its output quantization unless
  a bias Add sits between them (see the bias-correction note in
  :mod:`deploykit.stages.calibrate`); storing the weights in float behind a Q/DQ
  pair, as a FakeQuantize, would do the same at four times the file size.

Measured with OpenVINO 2026.4 on a 2-core AVX-512-VNNI/AMX Xeon: see the
``mixed`` notes in :mod:`deploykit.stages.calibrate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Pooling ops whose input the mixed encoding quantizes when ONNX Runtime did not.
POOL_OPS = ("AveragePool", "GlobalAveragePool", "MaxPool", "ReduceMean")
# Ops that move or select values without changing them (their data input is input 0).
MOVEMENT_OPS = ("Flatten", "Reshape", "Slice", "Split", "Squeeze", "Transpose", "Unsqueeze")


def unified_ranges(
    model: Any, ranges: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    """Ranges where linked tensors share the union of their ranges.

    Linked: a Concat's inputs and output (so OpenVINO concatenates without
    requantizing), and a data-movement op's input and outputs (the values are the
    same, so one quantizer serves both sides). Groups are closed transitively, as
    NNCF's unified scales are: in a ShuffleNet stage the Concat, the channel shuffle
    and the Split that feeds the next Concat form one group.
    """
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for node in model.graph.node:
        if node.op_type == "Concat":
            linked = [*node.input, *node.output]
        elif node.op_type in MOVEMENT_OPS and node.input:
            linked = [node.input[0], *node.output]
        else:
            continue
        for t in linked[1:]:
            parent[find(t)] = find(linked[0])
    groups: dict[str, list[str]] = {}
    for t in ranges:
        if t in parent:
            groups.setdefault(find(t), []).append(t)
    unified = dict(ranges)
    for members in groups.values():
        lo = min(ranges[t][0] for t in members)
        hi = max(ranges[t][1] for t in members)
        unified.update({t: (lo, hi) for t in members})
    return unified


def _index(model: Any) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
    """(producer of each tensor, consumers of each tensor, initializers by name)."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producers, consumers, {init.name: init for init in graph.initializer}


def quantization_params(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """The mixed encoding's (scale, zero point) for the range ``[lo, hi]``.

    UINT8 with zero point 0 when the range is non-negative; symmetric INT8 when it
    is signed. The scales are ONNX Runtime's own (``compute_scale_zp``), so a pair
    written here matches one its quantizer writes from the same range.
    """
    from onnxruntime.quantization.quant_utils import (
        QuantType,
        compute_scale_zp,
        get_qmin_qmax_for_qType,
    )

    signed = lo < 0.0
    qtype = QuantType.QInt8 if signed else QuantType.QUInt8
    qmin, qmax = get_qmin_qmax_for_qType(qtype.tensor_type, symmetric=signed)
    zero, scale = compute_scale_zp(
        np.array(min(lo, 0.0), dtype=np.float32),
        np.array(max(hi, 0.0), dtype=np.float32),
        qmin,
        qmax,
        symmetric=signed,
    )
    dtype = np.int8 if signed else np.uint8
    return np.asarray(scale, dtype=np.float32), np.asarray(zero, dtype=dtype)


def quantize_pool_inputs(model: Any, ranges: dict[str, tuple[float, float]]) -> int:
    """Give every pooling input that is not quantized a Q/DQ pair from its calibrated range.

    A pooling input that already has a Q/DQ for another consumer reuses it.
    Tensors without a range (never calibrated) and graph inputs are left alone.

    Returns:
        How many pooling inputs now read a DequantizeLinear.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    producers, consumers, _ = _index(model)
    done: dict[str, str] = {}  # float tensor -> its DequantizeLinear output
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            dqs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
            if dqs:
                done.setdefault(node.input[0], dqs[0].output[0])
    new_nodes: list[Any] = []
    changed = 0
    for node in graph.node:
        source = node.input[0] if node.op_type in POOL_OPS and node.input else ""
        producer = producers.get(source)
        if producer is not None and producer.op_type != "DequantizeLinear" and source in ranges:
            if source not in done:
                scale, zero = quantization_params(*ranges[source])
                base = f"{source}_pool"
                graph.initializer.extend(
                    [
                        numpy_helper.from_array(scale, f"{base}_scale"),
                        numpy_helper.from_array(zero, f"{base}_zero_point"),
                    ]
                )
                params = [f"{base}_scale", f"{base}_zero_point"]
                new_nodes += [
                    helper.make_node(
                        "QuantizeLinear",
                        [source, *params],
                        [f"{base}_QuantizeLinear_Output"],
                        name=f"{base}_QuantizeLinear",
                    ),
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_QuantizeLinear_Output", *params],
                        [f"{base}_DequantizeLinear_Output"],
                        name=f"{base}_DequantizeLinear",
                    ),
                ]
                done[source] = f"{base}_DequantizeLinear_Output"
            node.input[0] = done[source]
            changed += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return changed


def _same_params(a: Any, b: Any, inits: dict[str, Any]) -> bool:
    """True when two Q/DQ nodes have constant, equal scales and zero points."""
    from onnx import numpy_helper

    for i in (1, 2):
        names = (a.input[i] if len(a.input) > i else "", b.input[i] if len(b.input) > i else "")
        if names[0] == names[1]:
            continue
        if names[0] not in inits or names[1] not in inits:
            return False
        x, y = (numpy_helper.to_array(inits[n]) for n in names)
        if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(x, y):
            return False
    return True


def _grid_source(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> Any:
    """The DequantizeLinear whose grid `name`'s values lie on, or None.

    Through data movement, MaxPool, and Concats whose inputs all come from
    DequantizeLinear nodes with one scale and zero point.
    """
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "DequantizeLinear":
        return node
    if node.op_type in ("MaxPool", *MOVEMENT_OPS):
        return _grid_source(node.input[0], producers, inits)
    if node.op_type == "Concat":
        sources = [_grid_source(i, producers, inits) for i in node.input]
        if sources and all(s is not None and _same_params(sources[0], s, inits) for s in sources):
            return sources[0]
    return None


def drop_requantize(model: Any) -> int:
    """Remove the Q/DQ pairs on MaxPool and data-movement outputs that repeat their source's.

    The source is the DequantizeLinear whose grid the op's data input lies on (see
    `_grid_source`). Removing a pair with the same scale and zero point changes no
    value.

    Returns:
        How many pairs were removed.
    """
    graph = model.graph
    producers, consumers, inits = _index(model)
    outputs = {out.name for out in graph.output}
    drop: set[int] = set()
    rename: dict[str, str] = {}
    removed = 0
    for op in graph.node:
        if op.op_type not in ("MaxPool", *MOVEMENT_OPS) or not op.input:
            continue
        if op.op_type == "MaxPool" and len(op.output) != 1:
            continue  # with Indices the output is not only values
        source = _grid_source(op.input[0], producers, inits)
        if source is None:
            continue
        for out in op.output:
            for q in consumers.get(out, []):
                dqs = consumers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []
                if (
                    not dqs
                    or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs)
                    or not all(_same_params(source, x, inits) for x in (q, *dqs))
                ):
                    continue
                drop.add(id(q))
                removed += 1
                for dq in dqs:
                    drop.add(id(dq))
                    rename[dq.output[0]] = out
    if not drop:
        return 0
    kept = [node for node in graph.node if id(node) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    return removed
