"""Calibration statistics: collected once, cached, verified on read, emitted in both encodings."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deploykit.errors import UserError
from deploykit.harness.datasets import Dataset
from deploykit.harness.fidelity import compare_outputs
from deploykit.stages import calibcache, calibrate, calibstats, qdqedit
from deploykit.stages.calibrate import (
    CalibrationOptions,
    CalibrationStats,
    calibrate_onnx,
    collect_statistics,
    write_qdq,
)

pytestmark = pytest.mark.onnxruntime

SIZE = 12


def _net(path: Path, seed: int = 0, linear_pw: bool = False, concat: bool = False) -> Path:
    """Conv-ReLU, depthwise Conv-ReLU, 1x1 Conv, global pool, Gemm: a few kB, random weights.

    With `linear_pw` the 1x1 Conv has no ReLU (a linear bottleneck: a signed tensor).
    With `concat` (and `linear_pw`) that signed tensor is concatenated with an
    AveragePool of the stem and a side Conv-ReLU (ShuffleNet v1's and CliqueNet's
    pattern), so the Concat's shared range is signed.
    """
    rng = np.random.default_rng(seed)
    inits: list[Any] = []
    nodes: list[Any] = []

    def conv(
        name: str, x: str, cin: int, cout: int, k: int, group: int = 1, relu: bool = True
    ) -> str:
        w = rng.normal(0.0, (2.0 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k))
        b = rng.normal(0.0, 0.1, cout)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"{name}.b"))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [name],
                name=name,
                kernel_shape=[k, k],
                pads=[k // 2] * 4,
                group=group,
            )
        )
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"], name=f"{name}_relu"))
        return f"{name}.relu"

    x = conv("stem", "input", 3, 8, 3)
    x = conv("dw", x, 8, 8, 3, group=8)
    x = conv("pw", x, 8, 8, 1, relu=not linear_pw)
    width = 8
    if concat:
        nodes.append(
            helper.make_node(
                "AveragePool", ["stem.relu"], ["pool"], kernel_shape=[3, 3], pads=[1] * 4
            )
        )
        side = conv("side", "stem.relu", 8, 8, 1)
        nodes.append(helper.make_node("Concat", [x, "pool", side], ["cat"], axis=1))
        x, width = "cat", 24
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"))
    fc = rng.normal(0, 0.3, (5, width)).astype(np.float32)
    inits.append(numpy_helper.from_array(fc, "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(5, np.float32), "fc.b"))
    nodes.append(
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)
    )
    graph = helper.make_graph(
        nodes,
        "cachenet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _data(seed: int = 1, count: int = 6) -> Dataset:
    inputs = np.random.default_rng(seed).normal(0, 1, (count, 3, SIZE, SIZE)).astype(np.float32)
    return Dataset(
        inputs=inputs, source="test", sha256=hashlib.sha256(inputs.tobytes()).hexdigest()
    )


@pytest.fixture(autouse=True)
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(calibcache.ENV_VAR, str(tmp_path / "cache"))
    return tmp_path / "cache" / "calibration"


@pytest.fixture
def net(tmp_path: Path) -> Path:
    return _net(tmp_path / "net.onnx")


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _assert_same_initializers(a: Path, b: Path) -> None:
    first, second = _inits(a), _inits(b)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].dtype == second[name].dtype, name
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def _forbid_collection(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the calibrator ran although the cache holds the statistics")

    monkeypatch.setattr(calibstats, "collect", boom)


def _entry(root: Path) -> Path:
    entries = list(root.glob("*.json"))
    assert len(entries) == 1, entries
    return entries[0]


def test_second_call_hits_the_cache(net: Path, tmp_path: Path, cache_root: Path) -> None:
    data = _data()
    first = calibrate_onnx(net, tmp_path / "a.onnx", data, CalibrationOptions())
    assert first.cache == "miss" and first.tensors_calibrated > 0
    entry = json.loads(_entry(cache_root).read_text())
    assert entry["key"] == first.cache_key == _entry(cache_root).stem
    assert entry["key_fields"]["method"] == "minmax" and entry["key_fields"]["data_count"] == 6
    assert len(entry["checksum"]) == 64

    with pytest.MonkeyPatch.context() as patch:
        _forbid_collection(patch)
        second = calibrate_onnx(net, tmp_path / "b.onnx", data, CalibrationOptions())
    assert second.cache == "hit"
    assert second.statistics_seconds < 0.5 * max(first.statistics_seconds, 1e-3)
    _assert_same_initializers(tmp_path / "a.onnx", tmp_path / "b.onnx")
    print(
        f"\nstatistics: collect {first.statistics_seconds * 1e3:.1f} ms, "
        f"cache hit {second.statistics_seconds * 1e3:.1f} ms; "
        f"Q/DQ writing {second.qdq_seconds * 1e3:.1f} ms; stage {second.seconds * 1e3:.1f} ms"
    )


@pytest.mark.parametrize(
    ("change", "hit"),
    [
        ("data", False),
        ("count", False),
        ("method", False),
        ("model", False),
        ("percentile", False),
        ("percentile-unused-by-minmax", True),
        ("encoding", True),
        ("per-channel", True),
    ],
)
def test_what_invalidates_an_entry(change: str, hit: bool, net: Path, tmp_path: Path) -> None:
    method = "percentile" if change == "percentile" else "minmax"
    calibrate_onnx(net, tmp_path / "a.onnx", _data(), CalibrationOptions(method=method))
    model, data, options = net, _data(), CalibrationOptions(method=method)
    if change == "data":
        data = _data(seed=2)
    elif change == "count":
        data = _data(count=5)
    elif change == "method":
        options = CalibrationOptions(method="entropy")
    elif change == "model":
        model = _net(tmp_path / "other.onnx", seed=7)
    elif change.startswith("percentile"):
        options = CalibrationOptions(method=method, percentile=99.9)
    elif change == "encoding":
        options = CalibrationOptions(encoding="u8s8")
    elif change == "per-channel":
        options = CalibrationOptions(per_channel=False)
    report = calibrate_onnx(model, tmp_path / "b.onnx", data, options)
    assert report.cache == ("hit" if hit else "miss")


def test_a_changed_preprocessing_with_the_same_source_digest_is_a_miss(
    net: Path, tmp_path: Path
) -> None:
    data = _data()
    calibrate_onnx(net, tmp_path / "a.onnx", data, CalibrationOptions())
    # Same files (same source digest), different normalisation: different inputs.
    shifted = Dataset(inputs=data.inputs * 0.5 + 0.1, source="test", sha256=data.sha256)
    assert calibrate_onnx(net, tmp_path / "b.onnx", shifted, CalibrationOptions()).cache == "miss"


def _truncate(entry: dict[str, Any], text: str) -> str:
    return text[: len(text) // 2]


def _flip_number(entry: dict[str, Any], text: str) -> str:
    name = sorted(entry["ranges"])[0]
    entry["ranges"][name][1] = entry["ranges"][name][1] * 2 + 1
    return json.dumps(entry)


def _flip_checksum(entry: dict[str, Any], text: str) -> str:
    entry["checksum"] = ("0" if entry["checksum"][0] != "0" else "1") + entry["checksum"][1:]
    return json.dumps(entry)


def _resign(entry: dict[str, Any]) -> str:
    """Recompute the checksum, as a hand edit that knows the format would."""
    body = {"key_fields": entry["key_fields"], "ranges": entry["ranges"]}
    entry["checksum"] = hashlib.sha256(calibcache._canonical(body).encode()).hexdigest()
    return json.dumps(entry)


def _unknown_tensor(entry: dict[str, Any], text: str) -> str:
    entry["ranges"]["no_such_tensor"] = [0.0, 1.0]
    return _resign(entry)


def _wrong_key_field(entry: dict[str, Any], text: str) -> str:
    entry["key_fields"]["method"] = "entropy"
    return _resign(entry)


def _inverted_range(entry: dict[str, Any], text: str) -> str:
    name = sorted(entry["ranges"])[0]
    entry["ranges"][name] = [1.0, -1.0]
    return _resign(entry)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_truncate, "invalid JSON"),
        (_flip_number, "checksum mismatch"),
        (_flip_checksum, "checksum mismatch"),
        (_unknown_tensor, "'no_such_tensor' does not exist in the model"),
        (_wrong_key_field, "key fields differ (method)"),
        (_inverted_range, "bad range"),
    ],
)
def test_a_corrupt_entry_is_rebuilt_with_the_reason(
    corrupt: Any, reason: str, net: Path, tmp_path: Path, cache_root: Path
) -> None:
    data = _data()
    calibrate_onnx(net, tmp_path / "fresh.onnx", data, CalibrationOptions())
    path = _entry(cache_root)
    text = path.read_text()
    path.write_text(corrupt(json.loads(text), text))
    report = calibrate_onnx(net, tmp_path / "rebuilt.onnx", data, CalibrationOptions())
    assert report.cache.startswith("rebuilt: ") and reason in report.cache, report.cache
    _assert_same_initializers(tmp_path / "fresh.onnx", tmp_path / "rebuilt.onnx")
    assert path.read_text() == text  # rewritten: the same statistics, valid again
    again = calibrate_onnx(net, tmp_path / "again.onnx", data, CalibrationOptions())
    assert again.cache == "hit"


def test_use_cache_false_collects_afresh_and_rewrites_the_entry(
    net: Path, tmp_path: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _data()
    calibrate_onnx(net, tmp_path / "a.onnx", data, CalibrationOptions())
    entry = _entry(cache_root)
    good = entry.read_text()
    entry.write_text(good.replace('"ranges"', '"rangez"'))
    calls: list[int] = []
    real = calibstats.collect

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibstats, "collect", counting)
    report = calibrate_onnx(net, tmp_path / "b.onnx", data, CalibrationOptions(use_cache=False))
    assert report.cache == "off" and calls == [1]
    assert entry.read_text() == good
    assert calibrate_onnx(net, tmp_path / "c.onnx", data, CalibrationOptions()).cache == "hit"
    assert calls == [1]


def test_an_unwritable_cache_is_reported_not_fatal(
    net: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(calibcache.ENV_VAR, str(blocker))
    report = calibrate_onnx(net, tmp_path / "a.onnx", _data(), CalibrationOptions())
    assert report.cache.startswith("off: cannot write"), report.cache
    assert (tmp_path / "a.onnx").is_file()


def test_collection_is_deterministic(net: Path) -> None:
    options = CalibrationOptions(method="entropy")
    first = collect_statistics(net, _data(), options)
    second = collect_statistics(net, _data(), options)
    assert first.ranges == second.ranges and first.ranges


def _zero_points(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]


def _weight_scales(path: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    scales = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            dq = producers[node.input[1]]
            assert dq.op_type == "DequantizeLinear", node.name
            scales[node.name] = inits[dq.input[1]]
    return scales


def test_both_encodings_come_from_one_collection(net: Path, tmp_path: Path) -> None:
    stats = collect_statistics(net, _data(), CalibrationOptions())
    write_qdq(net, stats, tmp_path / "s8s8.onnx", "s8s8")
    # Off: on a CPU without VNNI the overflow fix would bound u8s8's weight scales
    # (tests/test_overflow.py); the weights are otherwise the same in every encoding.
    write_qdq(net, stats, tmp_path / "u8s8.onnx", "u8s8", overflow_fix="off")
    s8, u8 = _zero_points(tmp_path / "s8s8.onnx"), _zero_points(tmp_path / "u8s8.onnx")
    assert s8 and all(z.dtype == np.int8 and not np.any(z) for z in s8)
    assert u8 and all(z.dtype == np.uint8 for z in u8)
    assert len({int(z) for z in u8}) > 1  # asymmetric: ReLU outputs sit at 0, others do not
    # A signed tensor sits on the symmetric INT8 grid (what OpenVINO's mixed file uses),
    # shifted to UINT8: zero point 128, scale max(|lo|, |hi|) / 127.
    u8_model = onnx.load(str(tmp_path / "u8s8.onnx"))
    u8_inits = {t.name: numpy_helper.to_array(t) for t in u8_model.graph.initializer}
    signed = [t for t, (lo, _) in stats.ranges.items() if lo < 0]
    assert "input" in signed
    for node in u8_model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in signed:
            assert int(u8_inits[node.input[2]]) == 128, node.input[0]
            assert float(u8_inits[node.input[1]]) == pytest.approx(
                stats.symmetric_amax(node.input[0]) / 127, rel=1e-6
            )
    s8_scales, u8_scales = (
        _weight_scales(tmp_path / "s8s8.onnx"),
        _weight_scales(tmp_path / "u8s8.onnx"),
    )
    assert s8_scales.keys() == u8_scales.keys() == {"stem", "dw", "pw", "fc"}
    for name in s8_scales:
        np.testing.assert_array_equal(s8_scales[name], u8_scales[name], err_msg=name)
        assert s8_scales[name].shape == ((5,) if name == "fc" else (8,))
    # The symmetric activation scale is max(|lo|, |hi|) / 127 of the same range.
    model = onnx.load(str(tmp_path / "s8s8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q_input = next(
        n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input"
    )
    assert inits[q_input.input[1]] == pytest.approx(stats.symmetric_amax("input") / 127, rel=1e-6)


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_statistics_fed_in_groups_match_one_pass(
    method: str, net: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Histogram calibrators are fed a few inputs at a time (memory) and merge the groups."""
    data = _data(count=12)
    options = CalibrationOptions(method=method)
    whole = collect_statistics(net, data, options)
    monkeypatch.setattr(calibstats, "HISTOGRAM_INPUTS", 4)
    from onnxruntime.quantization.calibrate import HistogramCalibrater

    calls = []
    original = HistogramCalibrater.collect_data

    def counted(self: Any, reader: Any) -> None:
        calls.append(reader)
        original(self, reader)

    monkeypatch.setattr(HistogramCalibrater, "collect_data", counted)
    grouped = collect_statistics(net, data, options)
    assert len(calls) == 3
    assert grouped.ranges.keys() == whole.ranges.keys()
    for tensor, (lo, hi) in whole.ranges.items():
        span = max(hi - lo, 1e-6)
        assert abs(grouped.ranges[tensor][0] - lo) <= 1e-3 * span, tensor
        assert abs(grouped.ranges[tensor][1] - hi) <= 1e-3 * span, tensor


@pytest.mark.parametrize("concat", [False, True], ids=["chain", "concat"])
def test_onnxruntime_and_openvino_files_share_one_grid(tmp_path: Path, concat: bool) -> None:
    """u8s8 (ONNX Runtime) and mixed (OpenVINO) quantize each tensor on the same grid.

    Then the two backends' models of one calibration compute the same function up to
    kernel rounding; a u8s8 file with ONNX Runtime's own asymmetric grid on a signed
    tensor (the linear 1x1 output here) would fail, and so would one with a range per
    Concat input or an AveragePool output left on its input's grid (ONNX Runtime's
    quantizer does both).
    """
    net = _net(tmp_path / "linear.onnx", linear_pw=True, concat=concat)
    stats = collect_statistics(net, _data(), CalibrationOptions())
    grids = {}
    for encoding in ("u8s8", "mixed"):
        model = write_qdq(net, stats, tmp_path / f"{encoding}.onnx", encoding)
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        grids[encoding] = {
            n.input[0]: (float(inits[n.input[1]]), inits[n.input[2]])
            for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits
        }
        assert "logits" not in grids[encoding]  # the graph output stays float
    signed = {t for t, (lo, _) in stats.ranges.items() if lo < 0}
    if concat:  # the Concat's inputs take its signed range
        signed |= {"pool", "side.relu"}
    shared = grids["u8s8"].keys() & grids["mixed"].keys()
    assert {"input", "pw"} <= shared & signed
    assert shared - signed  # and some ReLU outputs
    assert not concat or {"pool", "side.relu"} <= shared
    for tensor in shared:
        (u8_scale, u8_zero), (mixed_scale, mixed_zero) = (
            grids["u8s8"][tensor],
            grids["mixed"][tensor],
        )
        assert u8_scale == pytest.approx(mixed_scale, rel=1e-6), tensor
        assert u8_zero.dtype == np.uint8
        assert int(u8_zero) - int(mixed_zero) == (128 if tensor in signed else 0), tensor
        assert mixed_zero.dtype == (np.int8 if tensor in signed else np.uint8), tensor


def test_u8s8_keeps_a_relu_whose_shared_range_is_signed(tmp_path: Path) -> None:
    """A ReLU output on a Concat's signed grid keeps its Relu in the u8s8 file.

    ONNX Runtime's quantizer drops a Relu and lets the QuantizeLinear after it clip at
    zero, which only holds on an unsigned grid: on the shared signed one the side
    Conv's negative outputs came through (random-weight CliqueNet: INT8 cosine 0.45).
    """
    import onnxruntime as ort

    net = _net(tmp_path / "cat.onnx", linear_pw=True, concat=True)
    data = _data(count=16)
    stats = collect_statistics(net, data, CalibrationOptions())
    path = tmp_path / "u8s8.onnx"
    model = write_qdq(net, stats, path, "u8s8")
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    assert [n.input[0] for n in relus] == ["side.relu_DequantizeLinear_Output"]
    outputs = []
    for file in (net, path):
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input": data.inputs})[0])
    cosine = compare_outputs(outputs[0], outputs[1]).cosine
    assert cosine > 0.999, cosine


def test_float_outputs_keeps_a_conv_output_quantized_for_onnxruntime(tmp_path: Path) -> None:
    """ONNX Runtime fuses a QLinearConv only with a Q on its output: u8s8 keeps that one."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer

    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    stats = CalibrationStats("minmax", None, {"x": (-1.0, 1.0), "y": (-3.0, 3.0)})
    quantizer = QDQQuantizer(
        model,
        True,
        False,
        QuantType.QInt8,
        QuantType.QUInt8,
        stats.tensors_data(),
        [],
        [],
        ["Conv"],
        {"WeightSymmetric": True},
    )
    quantizer.quantize_model()
    quantizer.model.topological_sort()
    quantized = quantizer.model.model
    kept = onnx.ModelProto()
    kept.CopyFrom(quantized)
    assert qdqedit.float_outputs(kept, keep_conv=True) == []
    assert [n.op_type for n in kept.graph.node].count("QuantizeLinear") == 2
    assert qdqedit.float_outputs(quantized, keep_conv=False) == ["y"]
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("QuantizeLinear") == 1  # the input's
    conv = next(n for n in quantized.graph.node if n.op_type == "Conv")
    assert list(conv.output) == ["y"]
    onnx.checker.check_model(quantized)


# Not entropy: quantize_static cannot pass a histogram size, and with its default
# (128 bins for 128 quantized bins) entropy degenerates to minmax; deploykit uses 2048.
@pytest.mark.parametrize("method", ["minmax", "percentile"])
@pytest.mark.parametrize("encoding", ["s8s8", "u8s8"])
def test_cached_statistics_write_what_quantize_static_writes(
    method: str, encoding: str, net: Path, tmp_path: Path
) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    data = _data()
    options = CalibrationOptions(
        method=method,
        encoding=encoding,
        bias_correction=False,
        overflow_fix="off",
        weight_rounding="nearest",  # quantize_static rounds weights to nearest
    )
    calibrate_onnx(net, tmp_path / "warm.onnx", data, options)
    # deploykit's two departures from quantize_static's defaults, given to it as options:
    # u8s8 puts signed tensors on the symmetric INT8 grid (from a fresh collection, not
    # the cache under test), and every encoding keeps the graph output float. The
    # overflow fix (bounded weight scales on CPUs without VNNI) is off: it has no
    # quantize_static counterpart.
    overrides = {}
    if encoding == "u8s8":
        fresh = collect_statistics(net, data, options)
        overrides = {
            t: [
                {
                    "quant_type": QuantType.QUInt8,
                    "scale": np.array(fresh.symmetric_amax(t) / 127, dtype=np.float32),
                    "zero_point": np.array(128, dtype=np.uint8),
                }
            ]
            for t, (lo, _) in fresh.ranges.items()
            if lo < 0
        }
    with pytest.MonkeyPatch.context() as patch:
        _forbid_collection(patch)
        report = calibrate_onnx(net, tmp_path / "cached.onnx", data, options)
    assert report.cache == "hit"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(data.inputs[i : i + 1] for i in range(data.inputs.shape[0]))

        def get_next(self) -> dict[str, Any] | None:
            chunk = next(self.items, None)
            return None if chunk is None else {"input": chunk}

    pre = tmp_path / "pre.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(str(net), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp_path / "direct.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if encoding == "u8s8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibstats.ort_method(method),
            extra_options={
                "ActivationSymmetric": encoding == "s8s8",
                "WeightSymmetric": True,
                "CalibPercentile": 99.999,
                "TensorQuantOverrides": overrides,
            },
        )
    direct = onnx.load(str(tmp_path / "direct.onnx"))
    assert qdqedit.float_outputs(direct, keep_conv=encoding == "u8s8") == ["logits"]
    onnx.save(direct, str(tmp_path / "direct.onnx"))
    _assert_same_initializers(tmp_path / "direct.onnx", tmp_path / "cached.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "direct.onnx")).graph.node]
    assert sorted(ops) == sorted(
        n.op_type for n in onnx.load(str(tmp_path / "cached.onnx")).graph.node
    )


def test_excluded_nodes_keep_float_weights(net: Path, tmp_path: Path) -> None:
    options = CalibrationOptions(nodes_to_exclude=("dw",))
    report = calibrate_onnx(net, tmp_path / "q.onnx", _data(), options)
    assert report.nodes_excluded == ["dw"]
    model = onnx.load(str(tmp_path / "q.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        if node.name == "dw":
            assert node.input[1] in inits and inits[node.input[1]].data_type == TensorProto.FLOAT
            assert node.input[1] not in producers
        else:
            assert producers[node.input[1]].op_type == "DequantizeLinear", node.name


def test_unknown_excluded_node_is_bad_input(net: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--keep-float names layers the fused graph lacks: nope"):
        calibrate_onnx(
            net, tmp_path / "q.onnx", _data(), CalibrationOptions(nodes_to_exclude=("nope",))
        )
    assert not (tmp_path / "q.onnx").exists()


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(calibcache.ENV_VAR, str(tmp_path / "dk"))
    assert calibcache.cache_dir() == tmp_path / "dk" / "calibration"
    monkeypatch.delenv(calibcache.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibcache.cache_dir() == tmp_path / "xdg" / "deploykit" / "calibration"


def test_entropy_is_not_minmax(net: Path) -> None:
    """Entropy (KL) thresholds clip the tails that minmax keeps."""
    data = _data(seed=8, count=16)
    minmax = calibrate.collect_statistics(net, data, calibrate.CalibrationOptions()).ranges
    entropy = calibrate.collect_statistics(
        net, data, calibrate.CalibrationOptions(method="entropy")
    ).ranges
    narrower = [t for t in minmax if entropy[t][1] - entropy[t][0] < minmax[t][1] - minmax[t][0]]
    assert len(narrower) >= len(minmax) // 2


def test_mse_ranges_lie_within_minmax_and_differ_from_entropy(net: Path) -> None:
    """MSE thresholds come from the same histograms as entropy but by their own search."""
    data = _data(seed=8, count=16)
    minmax = calibrate.collect_statistics(net, data, calibrate.CalibrationOptions()).ranges
    stats = calibrate.collect_statistics(net, data, calibrate.CalibrationOptions(method="mse"))
    entropy = calibrate.collect_statistics(
        net, data, calibrate.CalibrationOptions(method="entropy")
    ).ranges
    assert stats.method == "mse" and stats.percentile is None
    assert stats.ranges.keys() == minmax.keys()
    for tensor, (lo, hi) in stats.ranges.items():
        assert minmax[tensor][0] <= lo <= hi <= minmax[tensor][1], tensor
    narrower = [
        t for t in minmax if stats.ranges[t][1] - stats.ranges[t][0] < minmax[t][1] - minmax[t][0]
    ]
    assert len(narrower) >= len(minmax) // 2
    assert any(stats.ranges[t] != entropy[t] for t in entropy)
