"""INT8 weights that cannot overflow the 16-bit sums of CPUs without VNNI.

On x86 CPUs without VNNI (AVX2, or AVX-512 without VNNI) ONNX Runtime's U8S8 GEMM and
OpenVINO's (oneDNN's) INT8 convolutions multiply UINT8 activation codes by INT8 weights
with ``vpmaddubsw``, which adds each pair of neighbouring products into a *saturating*
16-bit integer before widening to 32 bits. A pair of weights near 127 that meets two
activation codes near 255 sums to ~64,800 and is clamped to 32,767. VNNI's ``vpdpbusd``
accumulates in 32 bits and never clamps. Signed activations are no escape: ONNX
Runtime's u8s8 file stores them as UINT8 around zero point 128, and oneDNN shifts INT8
activations by +128 before the same instruction.

Measured on a 2-core AVX2-only AMD EPYC (onnxruntime 1.32, OpenVINO 2026.4) with the
real-weight EfficientNet-Lite0 on the 256 natural-image views, against FP32: full-range
INT8 weights gave cosine 0.935 on ONNX Runtime and 0.905 on OpenVINO (top-1 agreement
83% / 70%), while the same file run with ONNX Runtime's graph optimisations off (float
arithmetic on the dequantized values) gave 0.9983 — the clamping, not the quantization,
lost the accuracy. ONNX Runtime's documented remedy, 7-bit weights (``reduce_range``;
NNCF's ``overflow_fix``), removed it but halves every weight's resolution: cosine 0.9937.

This module instead bounds what can actually overflow. For each output channel it picks
the smallest scale at which no neighbouring pair of weights, times the largest UINT8 code
its two input channels reach, can pass 32,767:

    |q_a| x_a + |q_b| x_b <= 32767,  q = round(w / scale),  x = the input code bound

"Neighbouring" is taken in both orders a kernel can pack a convolution's reduction axis:
input channel outermost (ONNX Runtime's im2col, ``ci, kh, kw``) and innermost (oneDNN's
blocked layouts, ``kh, kw, ci``). The code bound of an input channel is its zero point
plus `MARGIN` times the largest excursion above it on the calibration inputs (capped at
255; 255 without data), so a channel that never fires high costs its consumers no
resolution. Depthwise convolutions are left at full range: both runtimes compute them in
32-bit arithmetic (measured on Lite0 with full-range depthwise weights and the others
bounded: cosine against FP32 0.99712 with ONNX Runtime's INT8 kernels, 0.99713 on its
float reference path, 0.99721 on OpenVINO). Same machine and set, cosine against FP32
(top-1 agreement, top-5 overlap), ONNX Runtime u8s8 / OpenVINO mixed: 0.99768 (96.9%,
96.0%) / 0.99771 (96.5%, 96.3%) with these scales; 0.9971 / 0.9972 with the data-free
bound (every code 255); 0.9937 / 0.9939 with 7-bit weights. ONNX Runtime's float
reference path gives the bounded file the same 0.99768, so nothing is clamped. The two
files of one calibration get the same weight scales, so they still agree with each
other: top-1 98.83%, cosine 0.99921 (98.83%, 0.99919 on a VNNI CPU without the fix).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deploykit.harness.environment import cpu_info
from deploykit.stages.qdqedit import U8_SIGNED_ZERO_POINT

MODES = ("auto", "on", "off")
INT16_MAX = 32767
MAX_CODE = 255.0
# Headroom over the largest code excursion an input channel reached in calibration. On
# Lite0 (above) a margin on the whole code of 1.0 / 1.25 / 1.5 gave cosine 0.99797 /
# 0.99773 / 0.99787 on ONNX Runtime, none of them clamping: the figure moves within
# 0.0003, so the margin is set for safety on inputs calibration did not see.
MARGIN = 1.5
# Any of these means the CPU's INT8 dot product accumulates in 32 bits.
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass
class OverflowReport:
    """What the overflow fix did.

    Attributes:
        applied: Whether weight scales were bounded.
        reason: Why (the mode and, for auto, the CPU).
        layers: Weights whose scales were bounded.
        resolution: Mean over those weights of full-range scale / bounded scale (1.0 =
            no resolution lost, 0.5 = what 7-bit weights would give).
        bound: ``calibration`` (per-channel codes from the data) or ``full-range``.
        overrides: The onnxruntime ``TensorQuantOverrides`` entries for those weights.
    """

    applied: bool
    reason: str
    layers: int = 0
    resolution: float = 1.0
    bound: str = ""
    overrides: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (without the overrides)."""
        return {
            "applied": self.applied,
            "reason": self.reason,
            "layers": self.layers,
            "resolution": round(self.resolution, 4),
            "bound": self.bound,
        }


def cpu_saturates(info: Mapping[str, Any] | None = None) -> bool:
    """True on an x86 CPU whose INT8 dot product goes through saturating 16-bit sums."""
    info = info or cpu_info()
    if str(info.get("arch", "")).lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    return not any(f in info.get("features", ()) for f in VNNI_FEATURES)


def decide(mode: str, encoding: str, info: Mapping[str, Any] | None = None) -> tuple[bool, str]:
    """Whether to bound the weight scales, and why.

    ``auto`` bounds them for the CPU encodings (u8s8, mixed) on a CPU without VNNI, the
    machine the INT8 file is built and measured on; the portable s8s8 file is for
    TensorRT, whose GPU kernels accumulate in 32 bits.
    """
    if mode == "on":
        return True, "on"
    if mode == "off":
        return False, "off"
    if encoding == "s8s8":
        return False, "auto: s8s8 is TensorRT's encoding (32-bit accumulation)"
    info = info or cpu_info()
    if cpu_saturates(info):
        return True, f"auto: {info.get('name', 'this CPU')} has no VNNI (16-bit INT8 sums)"
    return False, "auto: this CPU has VNNI (32-bit INT8 sums)"


@dataclass(frozen=True)
class Candidate:
    """A Conv/Gemm weight the fix may bound, with its reduction-axis layout."""

    name: str
    input: str
    rows: np.ndarray  # (out channels, ...) float64, reduction axes after the first
    axis: int  # the weight's per-channel axis in the ONNX initializer


def candidates(model: Any, excluded: Sequence[str] = ()) -> list[Candidate]:
    """Conv (not depthwise) and Gemm weights of `model`, the ops whose kernels pair products."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.name in excluded or len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: a for a in node.attribute}
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if node.op_type == "Conv" and weight.ndim >= 3:
            group = attrs["group"].i if "group" in attrs else 1
            if group > 1 and weight.shape[1] == 1:
                continue  # depthwise: 32-bit arithmetic in both runtimes
            found.append(Candidate(node.input[1], node.input[0], weight, 0))
        elif node.op_type == "Gemm" and weight.ndim == 2:
            trans_b = "transB" in attrs and attrs["transB"].i == 1
            rows = weight if trans_b else weight.T
            found.append(Candidate(node.input[1], node.input[0], rows, 0 if trans_b else 1))
    return found


def input_codes(
    lo: float, hi: float, peaks: np.ndarray | None, channels: int, margin: float = MARGIN
) -> np.ndarray:
    """Per-input-channel bound on the UINT8 code a kernel multiplies.

    Args:
        lo, hi: The tensor's calibrated range (its Q/DQ grid).
        peaks: Largest value each channel reached on the calibration inputs, or None.
        channels: Input channels of the consumer.
        margin: Headroom on the code excursion the data showed.
    """
    if peaks is None or peaks.shape != (channels,) or hi <= 0.0:
        return np.full(channels, MAX_CODE)
    positive = np.maximum(peaks.astype(np.float64), 0.0)
    if lo < 0.0:  # symmetric grid around code 128 (u8s8) or INT8 shifted by +128 (oneDNN)
        codes = U8_SIGNED_ZERO_POINT + margin * positive / (max(-lo, hi) / 127.0)
    else:
        codes = margin * positive / (hi / MAX_CODE)
    return np.minimum(np.ceil(codes), MAX_CODE)


def bounded_amax(rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric range whose INT8 grid keeps every pair under INT16_MAX.

    `rows` is (out, in, *kernel) or (out, in); `codes` the bound per input channel. The
    returned range R gives scale R / 127, so |w| / scale <= 127 and, for neighbours,
    |q_a| x_a + |q_b| x_b <= 32767 even after each q rounds up by half a step.
    """
    out, cin = rows.shape[0], rows.shape[1]
    taps = int(np.prod(rows.shape[2:])) if rows.ndim > 2 else 1
    magnitude = np.abs(rows).reshape(out, cin, taps)
    scale = magnitude.reshape(out, -1).max(axis=1) / 127.0
    x = np.broadcast_to(codes[:, None], (cin, taps))
    layouts = (  # channel outermost, then channel innermost
        (magnitude.reshape(out, -1), x.reshape(-1)),
        (magnitude.transpose(0, 2, 1).reshape(out, -1), x.T.reshape(-1)),
    )
    for flat, xs in layouts[: 2 if taps > 1 else 1]:
        if flat.shape[1] < 2:
            continue
        pair = flat[:, :-1] * xs[:-1] + flat[:, 1:] * xs[1:]
        room = INT16_MAX - 0.5 * (xs[:-1] + xs[1:])
        scale = np.maximum(scale, (pair / room).max(axis=1))
    return scale * 127.0


def weight_overrides(
    weights: Sequence[Candidate],
    ranges: Mapping[str, tuple[float, float]],
    peaks: Mapping[str, np.ndarray] | None,
    per_channel: bool,
    reason: str,
) -> OverflowReport:
    """onnxruntime ``TensorQuantOverrides`` that bound each candidate weight's range.

    Args:
        weights: The candidates (`candidates`) of the prepared FP32 graph.
        ranges: Activation ranges, for the grid of each weight's input.
        peaks: Per-channel peaks of those inputs on the calibration data (None: 255).
        per_channel: Per-channel weight scales (else one range per weight).
        reason: Why the fix applies (`decide`), for the report.
    """
    overrides: dict[str, list[dict[str, Any]]] = {}
    ratios = []
    for weight in weights:
        if weight.input not in ranges:
            continue  # input stays float: the weight is not quantized either
        lo, hi = ranges[weight.input]
        channel_peaks = None if peaks is None else peaks.get(weight.input)
        codes = input_codes(lo, hi, channel_peaks, weight.rows.shape[1])
        amax = np.abs(weight.rows).reshape(weight.rows.shape[0], -1).max(axis=1)
        bound = bounded_amax(weight.rows, codes)
        if not per_channel:
            amax, bound = np.array([amax.max()]), np.array([bound.max()])
        bound = np.maximum(bound, np.finfo(np.float32).tiny)
        ratios.append(float(np.mean(amax / bound)))
        if per_channel:
            overrides[weight.name] = [
                {"axis": weight.axis, "rmin": -float(v), "rmax": float(v)} for v in bound
            ]
        else:
            overrides[weight.name] = [{"rmin": -float(bound[0]), "rmax": float(bound[0])}]
    return OverflowReport(
        applied=True,
        reason=reason,
        layers=len(overrides),
        resolution=float(np.mean(ratios)) if ratios else 1.0,
        bound="full-range" if peaks is None else "calibration",
        overrides=overrides,
    )


def channel_peaks(model: Any, tensors: Sequence[str], inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Largest value of each channel of `tensors` over `inputs` (FP32 ONNX Runtime run)."""
    from deploykit.stages.biascorrect import run_reduced

    names = [t for t in dict.fromkeys(tensors) if t]
    if not names or inputs.shape[0] == 0:
        return {}
    values = run_reduced(model, names, inputs, _channel_max)
    return {name: v.max(axis=0) for name, v in zip(names, values, strict=True)}


def _channel_max(value: np.ndarray) -> np.ndarray:
    """Per-sample, per-channel maxima of an (N, C, ...) tensor, (N, C)."""
    if value.ndim <= 2:
        return value.astype(np.float64)
    return np.asarray(value.max(axis=tuple(range(2, value.ndim))), dtype=np.float64)
