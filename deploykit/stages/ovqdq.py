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
- **No requantization after MaxPool.** The maximum commutes with a monotonic
  quantizer, so a Q/DQ on a MaxPool's output with the scale and zero point of
  its input's Q/DQ is a no-op; `drop_maxpool_requantize` removes it, so OpenVINO
  does not requantize between the pool and the next Conv.
- **Quantize before a reshape, not after.** A classifier's input arrives as
  ``GlobalAveragePool/ReduceMean -> Flatten/Reshape -> Q/DQ -> Gemm``. OpenVINO
  fuses a FakeQuantize into the pool only when it follows the pool directly, so
  the pool wrote f32, the reshape copied f32 and a standalone Subgraph quantized
  it (resnet50, mobilenet_v2). NNCF puts that FakeQuantize before the reshape.
  A per-tensor quantizer commutes with an op that only moves values, so
  `hoist_above_shape_ops` moves the pair above it, the pool writes UINT8 and the
  standalone quantization goes (measured in docs/benchmarks.md).
- Weights stay INT8 initializers behind a DequantizeLinear. OpenVINO then folds
  the per-channel dequantization of a Conv into its output quantization unless
  a bias Add sits between them (see the bias-correction note in
  :mod:`deploykit.stages.calibrate`); storing the weights in float behind a Q/DQ
  pair, as a FakeQuantize, would do the same at four times the file size.
- **One range around a channel split.** ShuffleNet v2 splits the shuffled output
  of one Concat and feeds a half to the next Concat; with a range per Concat
  OpenVINO requantized after every Split (11 standalone requantizations NNCF's
  graph does not have). `split_groups` links each Split to the Concats and
  shape ops around it, transitively, and the mixed writer gives each group one
  range (NNCF's unified scales), so the Q/DQ after a Split repeats its source's
  and OpenVINO drops it. Closing every Concat transitively instead (no Split
  needed) also lowered DPN's random-weight INT8 cosine from 0.992 to 0.982:
  its dual paths would share one range; DPN has no Split, so it keeps a range
  per Concat.

- **Residual Adds, on request (`materialise_residual_inputs`).** OpenVINO's CPU
  plugin fuses ``Conv -> FakeQuantize -> Add`` into the convolution (a sum
  post-op) and does not round the convolution's output to its FakeQuantize grid
  before adding: on the trained ResNet-8 (Fashion-MNIST, 2,000 test images) the
  first residual block's output differs from the ONNX semantics of the same Q/DQ
  file on 18% of its INT8 codes (by one step), and on 0.0004% once that Q/DQ is
  removed from the reference; ONNX Runtime follows the file (0.0003%). A 1x1
  MaxPool between the DequantizeLinear and the Add (an identity on the values)
  stops the fusion, so OpenVINO stores the rounded output as the file says.
  ONNX Runtime's u8s8 file and OpenVINO's mixed file of one calibration then
  compute the same function: top-1 agreement on the 10,000 test images 99.66% ->
  100.00% (ResNet-8), 99.25% -> 99.96% (ShuffleNet-v1). It costs OpenVINO the
  fusion: ``deploykit compare ... --targets openvino:int8,openvino:int8-exact``
  (15 interleaved rounds, 2-core AVX-512-VNNI EPYC) put EfficientNet-Lite0 at
  1.22x, resnet50 1.12x and mobilenet_v2 1.28x the latency (shufflenet_v2_x1_0,
  which has no residual Add and the same file twice, at 0.89x: the noise), so it
  is not the default.

Measured with OpenVINO 2026.4 on a 2-core AVX-512-VNNI/AMX Xeon: see the
``mixed`` notes in :mod:`deploykit.stages.calibrate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Pooling ops whose input the mixed encoding quantizes when ONNX Runtime did not.
POOL_OPS = ("AveragePool", "GlobalAveragePool", "MaxPool", "ReduceMean")
# Ops that only change a tensor's shape or order (the values stay the same).
SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Transpose", "Unsqueeze")


def split_groups(model: Any) -> list[set[str]]:
    """Groups of tensors that share one range because a Split connects them.

    Tensors are linked across Concat (inputs and output), Split (input and outputs)
    and shape ops (input and output); a group is a connected set of those links that
    contains a Split. Groups without a Split are not returned: there a range per
    Concat is kept.
    """
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    split_inputs = []
    for node in model.graph.node:
        if node.op_type == "Concat":
            linked = [*node.input, *node.output]
        elif node.op_type in ("Split", *SHAPE_OPS) and node.input:
            linked = [node.input[0], *node.output]
            if node.op_type == "Split":
                split_inputs.append(node.input[0])
        else:
            continue
        for t in linked[1:]:
            parent[find(t)] = find(linked[0])
    roots = {find(t) for t in split_inputs}
    groups: dict[str, set[str]] = {}
    for t in list(parent):
        if find(t) in roots:
            groups.setdefault(find(t), set()).add(t)
    return list(groups.values())


def graph_index(model: Any) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, Any]]:
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
    producers, consumers, _ = graph_index(model)
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


def drop_maxpool_requantize(model: Any) -> int:
    """Remove Q/DQ pairs on MaxPool outputs that repeat the Q/DQ on the MaxPool's input.

    Returns:
        How many QuantizeLinear nodes were removed (each with all its DequantizeLinear).
    """
    graph = model.graph
    producers, consumers, inits = graph_index(model)
    outputs = {out.name for out in graph.output}
    drop: set[int] = set()
    rename: dict[str, str] = {}
    removed = 0
    for pool in graph.node:
        if pool.op_type != "MaxPool" or len(pool.output) != 1:
            continue
        dq_in = producers.get(pool.input[0])
        if dq_in is None or dq_in.op_type != "DequantizeLinear":
            continue
        for q in consumers.get(pool.output[0], []):
            dqs = consumers.get(q.output[0], []) if q.op_type == "QuantizeLinear" else []
            if (
                not dqs
                or any(d.op_type != "DequantizeLinear" or d.output[0] in outputs for d in dqs)
                or not all(_same_params(dq_in, x, inits) for x in (q, *dqs))
            ):
                continue
            drop.add(id(q))
            removed += 1
            for dq in dqs:
                drop.add(id(dq))
                rename[dq.output[0]] = pool.output[0]
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


def materialise_residual_inputs(model: Any) -> int:
    """Put a 1x1 MaxPool between each quantized Conv output and the Add it enters.

    The values are unchanged (a 1x1 max is the identity); OpenVINO can no longer fuse
    the Add into the convolution, so it rounds the convolution's output to its
    Q/DQ grid before adding, as ONNX Runtime and the ONNX semantics of the file do.

    Returns:
        How many MaxPool nodes were inserted.
    """
    import onnx

    graph = model.graph
    producers, _, _ = graph_index(model)
    stored: dict[str, str] = {}  # DequantizeLinear output -> the MaxPool's output
    nodes: list[Any] = []
    for node in graph.node:
        for i, name in enumerate(node.input if node.op_type == "Add" else ()):
            dq = producers.get(name)
            q = producers.get(dq.input[0]) if dq and dq.op_type == "DequantizeLinear" else None
            conv = producers.get(q.input[0]) if q and q.op_type == "QuantizeLinear" else None
            if conv is None or conv.op_type != "Conv":
                continue
            if name not in stored:
                stored[name] = f"{name}_stored"
                nodes.append(
                    onnx.helper.make_node(
                        "MaxPool", [name], [stored[name]], name=stored[name], kernel_shape=[1, 1]
                    )
                )
            node.input[i] = stored[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return len(stored)


def hoist_above_shape_ops(model: Any) -> int:
    """Move each per-tensor Q/DQ pair that follows a shape op to the shape op's input.

    ``X -> Reshape -> Q -> DQ -> consumers`` becomes ``X -> Q -> DQ -> Reshape ->
    consumers``: the same values, since a per-tensor quantizer commutes with an op
    that only moves them. Applied while the shape op's only consumer is that Q, its
    input is float (not already a DequantizeLinear output) and nothing moved is a
    graph output; repeated through chains of shape ops.

    Returns:
        How many pairs were moved (a pair moved through two ops counts twice).
    """
    graph = model.graph
    outputs = {out.name for out in graph.output}
    moved = 0
    while True:
        producers, consumers, inits = graph_index(model)
        plan = None
        for q in graph.node:
            shape = producers.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
            if shape is None or shape.op_type not in SHAPE_OPS or len(shape.output) != 1:
                continue
            params = [inits.get(name) for name in q.input[1:3]]
            dqs = consumers.get(q.output[0], [])
            source = producers.get(shape.input[0])
            if (
                len(params) != 2
                or any(p is None or int(np.prod(p.dims)) != 1 for p in params)
                or len(dqs) != 1
                or dqs[0].op_type != "DequantizeLinear"
                or [id(n) for n in consumers.get(shape.output[0], [])] != [id(q)]
                or (source is not None and source.op_type == "DequantizeLinear")
                or {shape.output[0], dqs[0].output[0]} & outputs
            ):
                continue
            plan = (shape, q, dqs[0])
            break
        if plan is None:
            return moved
        shape, q, dq = plan
        # X -> Q -> DQ -> shape -> (what read DQ); the shape op keeps its output name.
        for node in consumers.get(dq.output[0], []):
            for i, name in enumerate(node.input):
                if name == dq.output[0]:
                    node.input[i] = shape.output[0]
        q.input[0] = shape.input[0]
        shape.input[0] = dq.output[0]
        nodes = [n for n in graph.node if n is not shape]
        at = next(i for i, n in enumerate(nodes) if n is dq)
        nodes.insert(at + 1, shape)
        del graph.node[:]
        graph.node.extend(nodes)
        moved += 1
