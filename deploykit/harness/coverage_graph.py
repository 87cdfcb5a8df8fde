"""Grouped and depthwise structure of a model, in PyTorch and in its ONNX graphs.

The coverage matrix checks that export and fusion keep every depthwise convolution
as one Conv node with ``group`` = its channel count (never split into per-channel
convolutions), that a channel shuffle is one Reshape -> Transpose -> Reshape chain,
and that INT8 gives depthwise weights per-channel scales.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def torch_conv_calls(module: Any, contract: Any) -> dict[str, int]:
    """Convolution calls in one forward pass of `module`, by kind.

    Calls rather than modules, so a convolution shared across steps (CliqueNet's
    recurrent weights) counts once per use, as it appears in the exported graph.
    """
    import torch

    from deploykit.harness.inputs import synthetic_images

    counts = {"convs": 0, "depthwise": 0, "grouped": 0, "transposed": 0}

    def hook(mod: Any, _inputs: Any, _output: Any) -> None:
        if isinstance(mod, torch.nn.modules.conv._ConvTransposeNd):
            counts["transposed"] += 1
            return
        counts["convs"] += 1
        if mod.groups > 1 and mod.in_channels == mod.groups:
            counts["depthwise"] += 1
        elif mod.groups > 1:
            counts["grouped"] += 1

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, torch.nn.modules.conv._ConvNd)
    ]
    try:
        with torch.inference_mode():
            module(torch.from_numpy(synthetic_images(contract, 1, seed=5)))
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def _weight_shape(model: Any, node: Any, producers: dict[str, Any]) -> list[int] | None:
    """Shape of a Conv's weight: an initializer, or the input of its DequantizeLinear."""
    inits = _initializers(model)
    name = node.input[1]
    producer = producers.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear":
        name = producer.input[0]
    init = inits.get(name)
    return list(init.dims) if init is not None else None


def graph_structure(model: Any) -> dict[str, Any]:
    """Convolutions by kind and channel-shuffle chains of an ONNX graph.

    A depthwise Conv is one node with ``group`` = its channel count (weight shape
    ``[C*m, 1, kh, kw]``); a channel shuffle is one Reshape -> Transpose (rank 5) ->
    Reshape chain.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    convs = depthwise = grouped = shuffles = 0
    group_ok = True
    for node in model.graph.node:
        if node.op_type == "Conv":
            convs += 1
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            shape = _weight_shape(model, node, producers)
            if group > 1 and shape is not None and shape[1] == 1:
                depthwise += 1
                group_ok &= shape[0] % group == 0
            elif group > 1:
                grouped += 1
        elif node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
            before = producers.get(node.input[0])
            after = consumers.get(node.output[0], [])
            if (
                len(perm) == 5
                and before is not None
                and before.op_type == "Reshape"
                and len(after) == 1
                and after[0].op_type == "Reshape"
            ):
                shuffles += 1
    return {
        "convs": convs,
        "depthwise_convs": depthwise,
        "grouped_convs": grouped,
        "channel_shuffles": shuffles,
        "depthwise_group_ok": group_ok,
    }


def qdq_weight_scales(model: Any) -> dict[str, Any]:
    """How the Q/DQ model scales its depthwise Conv weights: per channel or per tensor."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inits = _initializers(model)
    per_channel = per_tensor = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        dq = producers.get(node.input[1])
        if group <= 1 or dq is None or dq.op_type != "DequantizeLinear":
            continue
        weight = inits.get(dq.input[0])
        scale = inits.get(dq.input[1])
        if weight is None or scale is None or weight.dims[1] != 1:
            continue
        count = int(np.prod(scale.dims)) if len(scale.dims) else 1
        if count == weight.dims[0] and count > 1:
            per_channel += 1
        else:
            per_tensor += 1
    return {"depthwise_per_channel": per_channel, "depthwise_per_tensor": per_tensor}
