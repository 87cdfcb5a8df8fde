"""Bias correction: per-channel output means of the INT8 model matched to FP32."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.harness.datasets import Dataset
from deploykit.stages import biascorrect, calibcache
from deploykit.stages.calibrate import CalibrationOptions, calibrate_onnx

pytestmark = pytest.mark.onnxruntime

SIZE = 16
CHANNELS = 16


def _dw_net(
    path: Path, outlier: float = 30.0, bias: bool = True, seed: int = 0, batch: int | str = "N"
) -> Path:
    """A MobileNet-like stack (stem, two depthwise/pointwise pairs, pool, Gemm), random weights.

    The first filter of each depthwise conv gets one weight `outlier` times the layer's
    largest: it sets that channel's INT8 scale (the whole layer's with per-tensor scales), the
    other weights round coarsely, and since their inputs are ReLU outputs (positive mean) the
    rounding error shifts the channels' means.
    """
    rng = np.random.default_rng(seed)
    inits: list[Any] = []
    nodes: list[Any] = []

    def conv(name: str, x: str, cin: int, cout: int, k: int, group: int = 1) -> str:
        w = rng.normal(0.0, (2.0 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k))
        if group > 1:
            w[0, 0, 0, 0] = outlier * np.abs(w).max()
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
        inputs = [x, f"{name}.w"]
        if bias:
            b = rng.normal(0.0, 0.1, cout).astype(np.float32)
            inits.append(numpy_helper.from_array(b, f"{name}.b"))
            inputs.append(f"{name}.b")
        nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [name],
                name=name,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
                group=group,
            )
        )
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}_relu"))
        return f"{name}.relu"

    x = conv("stem", "input", 3, CHANNELS, 3)
    x = conv("dw1", x, CHANNELS, CHANNELS, 3, group=CHANNELS)
    x = conv("pw1", x, CHANNELS, CHANNELS, 1)
    x = conv("dw2", x, CHANNELS, CHANNELS, 3, group=CHANNELS)
    x = conv("pw2", x, CHANNELS, CHANNELS, 1)
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    fc = rng.normal(0, 0.3, (10, CHANNELS)).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
    nodes.append(
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)
    )
    graph = helper.make_graph(
        nodes,
        "dwnet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _inputs(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (count, 3, SIZE, SIZE)).astype(np.float32)


def _data(count: int = 32) -> Dataset:
    inputs = _inputs(5, count)
    return Dataset(
        inputs=inputs, source="test", sha256=hashlib.sha256(inputs.tobytes()).hexdigest()
    )


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _errors(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(mean |per-output mean error|, cosine) of `out` against `ref`."""
    mean_error = float(np.abs((out - ref).mean(axis=0)).mean())
    cosine = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    return mean_error, cosine


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(calibcache.ENV_VAR, str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("encoding", "per_channel"),
    [("s8s8", False), ("s8s8", True), ("u8s8", False), ("u8s8", True)],
)
def test_bias_correction_brings_int8_means_back_to_fp32(
    encoding: str, per_channel: bool, tmp_path: Path
) -> None:
    net = _dw_net(tmp_path / "net.onnx")
    held_out = _inputs(11, 64)  # not the calibration inputs
    ref = _run(net, held_out)
    numbers = {}
    for corrected in (False, True):
        out = tmp_path / f"q{int(corrected)}.onnx"
        options = CalibrationOptions(
            encoding=encoding, per_channel=per_channel, bias_correction=corrected
        )
        report = calibrate_onnx(net, out, _data(), options)
        assert report.bias_correction["applied"] is corrected
        numbers[corrected] = _errors(_run(out, held_out), ref)
    bias = report.bias_correction
    (err_before, cos_before), (err_after, cos_after) = numbers[False], numbers[True]
    print(
        f"\n{encoding} {'per-channel' if per_channel else 'per-tensor'}: "
        f"held-out output mean error {err_before:.4f} -> {err_after:.4f}, "
        f"cosine {cos_before:.5f} -> {cos_after:.5f}; {bias['layers_corrected']} layers, "
        f"calibration-set output MSE {bias['output_mse_before']:.5f} -> "
        f"{bias['output_mse_after']:.5f}, {bias['seconds'] * 1e3:.0f} ms"
    )
    assert bias["layers_corrected"] == 6 and not bias["reverted"]
    assert bias["output_mse_after"] < 0.8 * bias["output_mse_before"]
    assert err_after < 0.8 * err_before
    assert cos_after > cos_before


def test_correction_keeps_the_qdq_structure_and_the_fp32_model(tmp_path: Path) -> None:
    net = _dw_net(tmp_path / "net.onnx")
    before = net.read_bytes()
    x = _inputs(3, 8)
    ref = _run(net, x)
    plain, corrected = tmp_path / "plain.onnx", tmp_path / "corrected.onnx"
    calibrate_onnx(net, plain, _data(), CalibrationOptions(bias_correction=False))
    calibrate_onnx(net, corrected, _data(), CalibrationOptions(bias_correction=True))
    assert net.read_bytes() == before
    np.testing.assert_array_equal(_run(net, x), ref)
    a, b = onnx.load(str(plain)), onnx.load(str(corrected))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    inits_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    inits_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    changed = {name for name in inits_a if not np.array_equal(inits_a[name], inits_b[name])}
    # Only the int32 biases move; weights, scales and zero points are untouched.
    assert changed == {f"{n}.b_quantized" for n in ("stem", "dw1", "pw1", "dw2", "pw2", "fc")}
    assert all(inits_b[name].dtype == np.int32 for name in changed)


def test_a_conv_without_bias_gets_an_int32_one(tmp_path: Path) -> None:
    net = _dw_net(tmp_path / "net.onnx", bias=False)
    held_out = _inputs(11, 32)
    ref = _run(net, held_out)
    numbers = []
    for corrected in (False, True):
        out = tmp_path / f"q{int(corrected)}.onnx"
        options = CalibrationOptions(per_channel=False, bias_correction=corrected)
        report = calibrate_onnx(net, out, _data(), options)
        numbers.append(_errors(_run(out, held_out), ref))
    assert report.bias_correction["layers_corrected"] == 6
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv":
            dq = producers[node.input[2]]
            assert dq.op_type == "DequantizeLinear"
            assert inits[dq.input[0]].data_type == TensorProto.INT32
    assert numbers[1][0] < 0.8 * numbers[0][0]


def test_openvino_encoding_corrects_existing_biases_only(tmp_path: Path) -> None:
    """No new bias Add for OpenVINO: it would keep the dequantization as a post-op."""
    net = _dw_net(tmp_path / "net.onnx", bias=False)
    options = CalibrationOptions(encoding="mixed", bias_correction=True)
    report = calibrate_onnx(net, tmp_path / "q.onnx", _data(), options)
    assert report.bias_correction["layers_corrected"] == 1  # the Gemm, which has a bias
    skipped = report.bias_correction["skipped"]
    assert len(skipped) == 5 and set(skipped.values()) == {"no bias (existing biases only)"}
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert all(len(n.input) == 2 for n in model.graph.node if n.op_type == "Conv")
    with_bias = _dw_net(tmp_path / "biased.onnx", bias=True)
    report = calibrate_onnx(with_bias, tmp_path / "qb.onnx", _data(), options)
    assert report.bias_correction["layers_corrected"] == 6


def test_excluded_layers_are_not_corrected(tmp_path: Path) -> None:
    net = _dw_net(tmp_path / "net.onnx")
    options = CalibrationOptions(bias_correction=True, nodes_to_exclude=("dw1",))
    report = calibrate_onnx(net, tmp_path / "q.onnx", _data(), options)
    assert report.bias_correction["layers_corrected"] == 5
    inits = {t.name for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert "dw1.b" in inits and "dw1.b_quantized" not in inits


def test_auto_mode_follows_the_depthwise_share(tmp_path: Path) -> None:
    net = _dw_net(tmp_path / "net.onnx")
    report = calibrate_onnx(net, tmp_path / "q.onnx", _data(), CalibrationOptions())
    assert report.bias_correction["applied"]
    assert report.bias_correction["reason"].startswith("auto on: 2 of 5 Conv nodes depthwise")
    model = onnx.load(str(net))
    assert biascorrect.decide(None, model)[0] is True
    assert biascorrect.decide(False, model) == (False, "off (requested)")
    for node in model.graph.node:  # make every depthwise conv a dense one: auto turns off
        for attr in node.attribute:
            if attr.name == "group":
                attr.i = 1
    assert biascorrect.depthwise_share(model) == (0, 5)
    enabled, reason = biascorrect.decide(None, model)
    assert not enabled and reason.startswith("auto off: 0 of 5")


def test_a_fixed_batch_model_is_corrected_in_whole_batches(tmp_path: Path) -> None:
    net = _dw_net(tmp_path / "net.onnx", batch=2)
    report = calibrate_onnx(net, tmp_path / "q.onnx", _data(7), CalibrationOptions())
    bias = report.bias_correction
    assert bias["applied"] and bias["layers_corrected"] == 6
    assert bias["output_mse_after"] < 0.8 * bias["output_mse_before"]


def test_a_correction_that_hurts_is_reverted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = _dw_net(tmp_path / "net.onnx")
    plain = tmp_path / "plain.onnx"
    calibrate_onnx(net, plain, _data(), CalibrationOptions(bias_correction=False))
    real = biascorrect._shift_bias

    def wrong_way(model: Any, target: Any, shift: np.ndarray) -> np.ndarray:
        return real(model, target, -3.0 * shift)

    monkeypatch.setattr(biascorrect, "_shift_bias", wrong_way)
    report = calibrate_onnx(
        net, tmp_path / "q.onnx", _data(), CalibrationOptions(bias_correction=True)
    )
    bias = report.bias_correction
    assert bias["reverted"] and not bias["applied"]
    assert bias["output_mse_after"] > bias["output_mse_before"]
    a, b = onnx.load(str(plain)), onnx.load(str(tmp_path / "q.onnx"))
    assert [numpy_helper.to_array(t).tolist() for t in a.graph.initializer] == [
        numpy_helper.to_array(t).tolist() for t in b.graph.initializer
    ]


def test_a_grouped_calibration_set_is_measured_across_its_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sets arrive grouped (a manifest photo by photo, a folder class by class): the
    correction must measure means on inputs from every group, not on the first one."""
    net = _dw_net(tmp_path / "net.onnx")
    quiet, loud = 0.2 * _inputs(5, 32), 3.0 * _inputs(6, 32)
    grouped = np.concatenate([quiet, loud])
    data = Dataset(inputs=grouped, source="grouped", sha256=hashlib.sha256(grouped).hexdigest())
    monkeypatch.setattr(biascorrect, "MAX_SAMPLES", 16)
    seen: list[np.ndarray] = []
    real = biascorrect._run_all

    def spy(model: Any, outputs: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        seen.append(inputs)
        return real(model, outputs, inputs)

    monkeypatch.setattr(biascorrect, "_run_all", spy)
    report = calibrate_onnx(net, tmp_path / "q.onnx", data, CalibrationOptions())
    assert report.bias_correction["applied"]
    used = seen[0]
    loud_rows = int(np.sum(np.abs(used).reshape(len(used), -1).max(axis=1) > 3.0))
    assert len(used) == 16 and 6 <= loud_rows <= 10, loud_rows


def test_spread_subset_takes_inputs_evenly_across_the_set() -> None:
    from deploykit.harness.inputs import spread_subset

    rows = np.arange(256)[:, None]
    picked = spread_subset(rows, 32).ravel()
    assert len(picked) == 32 and picked[0] == 0 and picked[-1] == 255
    assert np.all(np.diff(picked) >= 8) and np.all(np.diff(picked) <= 9)
    assert [int(p) // 64 for p in picked].count(0) == 8  # a quarter from each quarter
    assert len(spread_subset(rows[:10], 32)) == 10
