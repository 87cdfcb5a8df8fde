"""Accuracy-aware per-layer fallback: keep the most sensitive layers in float.

When an INT8 model loses more top-1 than the budget allows, the layers are
ranked by how much error their own quantization adds, measured in one pass:
both the FP32 and the Q/DQ model run the same inputs with every quantized
layer's input and output exposed, and a layer's sensitivity is the
signal-to-quantization-noise ratio (SQNR) it loses, from its input to its
output (``SQNR_in - SQNR_out``, in dB). The fallback then removes the Q/DQ of
the top-ranked layers a few at a time (1, 2, 3, 4, 6, 9, ... layers), each
step recompiled and evaluated on the real backend, until the budget holds or
the limit is reached.

ONNX Runtime's ``qdq_loss_debug`` compares activations the same way, but it
needs both models augmented and matched by its own naming; the few lines here
match layers by their output tensor, which the Q/DQ writer keeps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.stages.onnxcheck import exposing_session, load_onnx
from deploykit.stages.ovqdq import SHAPE_OPS

QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass(frozen=True)
class LayerSensitivity:
    """How much error one quantized activation adds, and the layers that own it.

    Attributes:
        tensor: The activation tensor carrying a QuantizeLinear/DequantizeLinear pair.
        nodes: Compute layers (producer and consumers) to keep in float to remove that pair.
        sqnr_in_db: Worst SQNR of the producer's (dequantized) inputs, against FP32.
        sqnr_out_db: SQNR of the dequantized tensor.
        loss_db: ``sqnr_in_db - sqnr_out_db``: the error the layer and its quantization add.
    """

    tensor: str
    nodes: tuple[str, ...]
    sqnr_in_db: float
    sqnr_out_db: float
    loss_db: float


@dataclass
class FallbackStep:
    """One attempt: the layers kept in float and the accuracy that gave."""

    excluded: list[str]
    worst_drop: float
    results: dict[str, Any]
    seconds: float


@dataclass
class FallbackResult:
    """What the fallback did.

    Attributes:
        budget: Top-1 drop allowed, in points.
        initial_drop: Worst drop before any fallback (None without a labelled set).
        met: True when the budget (and the top-5 overlap target) holds with `excluded`
            in float.
        excluded: Layers kept in float in the final model.
        candidates: Quantized layers that could fall back.
        ranking: The most sensitive layers, most sensitive first.
        steps: Every attempt, in order.
    """

    budget: float
    initial_drop: float | None
    met: bool = False
    excluded: list[str] = field(default_factory=list)
    candidates: int = 0
    ranking: list[LayerSensitivity] = field(default_factory=list)
    steps: list[FallbackStep] = field(default_factory=list)
    min_top5_overlap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the ranking cut to the 20 most sensitive layers)."""
        data = asdict(self)
        data["ranking"] = [{**r, "nodes": list(r["nodes"])} for r in data["ranking"][:20]]
        return data


def quantized_layers(qdq: Any) -> list[Any]:
    """Compute nodes of a Q/DQ graph whose weight comes through a DequantizeLinear."""
    producers = {out: node for node in qdq.graph.node for out in node.output}
    layers = []
    for node in qdq.graph.node:
        if node.op_type not in QUANTIZABLE or len(node.input) < 2:
            continue
        weight = producers.get(node.input[1])
        if weight is not None and weight.op_type == "DequantizeLinear":
            layers.append(node)
    return layers


def rank_layers(fused: Path, qdq: Path, inputs: np.ndarray, batch: int) -> list[LayerSensitivity]:
    """Rank the quantized activations of `qdq` by the SQNR they lose, most sensitive first.

    Each activation Q/DQ pair is compared, dequantized, with the FP32 tensor of the
    same name; the SQNR is the mean over channels of the per-channel noise ratio, so
    a few large channels cannot hide many crushed small ones (the classic outlier
    failure of per-tensor activation scales).

    Args:
        fused: The FP32 model the Q/DQ model was made from.
        qdq: The Q/DQ model.
        inputs: A few preprocessed inputs (16-64 are plenty).
        batch: The models' static batch (1 for a dynamic one).
    """
    fp_model = load_onnx(fused, check=False)
    q_model = load_onnx(qdq, check=False)
    fp_tensors = {out for node in fp_model.graph.node for out in node.output}
    graph_inputs = {i.name for i in q_model.graph.input}
    producers = {out: node for node in q_model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in q_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    compute = {node.name for node in quantized_layers(q_model)}
    # Activation pairs: float tensor -> QuantizeLinear -> DequantizeLinear (output).
    pairs: dict[str, tuple[str, str]] = {}  # fp32 tensor -> (dq output, float tensor in qdq)
    for node in q_model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        name = node.input[0]
        fp_name = name.removesuffix("_QuantizeLinear_Input")
        dqs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        if (fp_name in fp_tensors or fp_name in graph_inputs) and dqs:
            pairs[fp_name] = (dqs[0].output[0], name)
    q_names = sorted({dq for dq, _ in pairs.values()})
    fp_out = _run_exposing(fp_model, sorted(pairs), inputs, batch)
    q_out = _run_exposing(q_model, q_names, inputs, batch)
    # The model input is quantized too: its SQNR is the first layer's upstream.
    sqnr = {fp: _sqnr_db(fp_out[fp], q_out[dq]) for fp, (dq, _) in pairs.items()}
    by_dq = {dq: fp for fp, (dq, _) in pairs.items()}
    initializers = {t.name for t in q_model.graph.initializer}
    memo: dict[str, float] = {}

    def upstream(name: str, depth: int = 0) -> float:
        """Worst SQNR of the quantized activations `name` is computed from."""
        if name in by_dq:
            return sqnr[by_dq[name]]
        if name in memo:
            return memo[name]
        producer = producers.get(name)
        if producer is None or depth > 50 or producer.op_type == "DequantizeLinear":
            return 120.0
        found = [upstream(i, depth + 1) for i in producer.input if i and i not in initializers]
        memo[name] = min(found, default=120.0)
        return memo[name]

    ranking = []
    for fp_name, (dq, float_name) in pairs.items():
        producer = producers.get(float_name)
        upstream_db = upstream(float_name) if producer is not None else 120.0
        nodes = {producer.name} & compute if producer is not None else set()
        nodes |= {c.name for c in _through_shape_ops(dq, consumers) if c.name in compute}
        if not nodes or fp_name in graph_inputs:
            continue
        sqnr_in = upstream_db
        ranking.append(
            LayerSensitivity(
                tensor=fp_name,
                nodes=tuple(sorted(nodes)),
                sqnr_in_db=round(sqnr_in, 3),
                sqnr_out_db=round(sqnr[fp_name], 3),
                loss_db=round(sqnr_in - sqnr[fp_name], 3),
            )
        )
    return sorted(ranking, key=lambda r: (-r.loss_db, r.sqnr_out_db))


def _through_shape_ops(name: str, consumers: dict[str, list[Any]]) -> list[Any]:
    """The nodes that read `name`, looking through ops that only reshape it.

    The mixed encoding quantizes a classifier's input before its Flatten/Reshape
    (`deploykit.stages.ovqdq.hoist_above_shape_ops`); the Gemm behind the reshape
    still owns that Q/DQ pair.
    """
    found = []
    for node in consumers.get(name, []):
        if node.op_type in SHAPE_OPS and node.output:
            found += _through_shape_ops(node.output[0], consumers)
        else:
            found.append(node)
    return found


def schedule(candidates: int, max_layers: int) -> list[int]:
    """How many layers each step keeps in float: 1, 2, 3, 4, 6, 9, ... up to the limit."""
    limit = min(candidates, max_layers)
    counts: list[int] = []
    count = 1
    while count <= limit:
        counts.append(count)
        count = count + 1 if count < 4 else math.ceil(count * 1.5)
    if limit and (not counts or counts[-1] != limit):
        counts.append(limit)
    return counts


def run_fallback(
    ranking: list[LayerSensitivity],
    attempt: Callable[[list[str]], tuple[float, dict[str, Any]]],
    budget: float,
    initial_drop: float | None,
    max_layers: int,
    on_step: Callable[[str], None] = lambda _: None,
    quantized: Collection[str] | None = None,
    accept: Callable[[float, dict[str, Any]], bool] | None = None,
    min_top5_overlap: float | None = None,
) -> FallbackResult:
    """Keep more and more of the most sensitive layers in float until the budget holds.

    Args:
        ranking: Layers, most sensitive first (:func:`rank_layers`).
        attempt: Builds, compiles and evaluates the model with the given layers in
            float; returns the worst top-1 drop (points) and the evaluation details.
        budget: Largest drop allowed.
        initial_drop: The drop with every layer quantized.
        max_layers: Most ranked activations whose layers may fall back.
        on_step: Progress callback.
        quantized: Every quantized compute layer of the model (`quantized_layers`); a
            step that would keep all of them in float is not tried. Without it, the
            ranked layers stand for all of them.
        accept: Whether a step's (drop, details) meets every target; default: the drop
            is within `budget`.
        min_top5_overlap: The top-5 overlap target `accept` also judges, for the record.
    """
    result = FallbackResult(
        budget=budget,
        initial_drop=initial_drop,
        candidates=len(ranking),
        ranking=ranking,
        min_top5_overlap=min_top5_overlap,
    )
    meets = accept or (lambda drop, _details: drop <= budget + 1e-9)
    every = set(quantized) if quantized is not None else {n for r in ranking for n in r.nodes}
    for count in schedule(len(ranking), max_layers):
        excluded = sorted({node for r in ranking[:count] for node in r.nodes})
        if set(excluded) == every and len(every) > 1:
            break  # everything in float is not an INT8 model any more
        on_step(f"accuracy fallback: {len(excluded)} layer(s) in float")
        started = time.perf_counter()
        drop, details = attempt(excluded)
        result.steps.append(
            FallbackStep(
                excluded=excluded,
                worst_drop=round(drop, 4),
                results=details,
                seconds=round(time.perf_counter() - started, 3),
            )
        )
        result.excluded = excluded
        if meets(drop, details):
            result.met = True
            break
    return result


def _run_exposing(
    model: Any, names: list[str], inputs: np.ndarray, batch: int
) -> dict[str, np.ndarray]:
    """Run `model` with the named tensors added as outputs; concatenate over batches.

    A graph input among `names` is returned as fed (it cannot be a graph output).
    """
    usable = inputs.shape[0] - inputs.shape[0] % batch or inputs.shape[0]
    fed = {i.name for i in model.graph.input} & set(names)
    names = [name for name in names if name not in fed]
    session = exposing_session(model, names)
    input_name = session.get_inputs()[0].name
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, usable if names else 0, batch):
        outs = session.run(names, {input_name: inputs[start : start + batch]})
        for name, value in zip(names, outs, strict=True):
            collected[name].append(np.asarray(value, dtype=np.float32))
    result = {name: np.concatenate(values) for name, values in collected.items() if values}
    result.update({name: inputs[:usable] for name in fed})
    return result


def _sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """SQNR in dB from the mean over channels (axis 1) of the per-channel noise ratio."""
    ref = reference.astype(np.float64)
    axes = (0, *range(2, ref.ndim)) if ref.ndim >= 2 else (0,)
    signal = np.sum(ref**2, axis=axes)
    noise = np.sum((ref - candidate.astype(np.float64)) ** 2, axis=axes)
    live = signal > 0
    if not np.any(live):
        return 120.0 if not np.any(noise) else -120.0
    ratio = float(np.mean(noise[live] / signal[live]))
    if ratio == 0.0:
        return 120.0
    return float(max(-120.0, min(120.0, -10.0 * math.log10(ratio))))
