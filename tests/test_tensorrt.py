"""TensorRT target: everything around the engine build, tested without libnvinfer,
and the build itself where TensorRT and a GPU are installed (marked, skipped otherwise).

Nothing here imitates TensorRT's API: the CPU tests exercise the FP16 conversion
(checked in ONNX Runtime), the Q/DQ rules, the build plan, the engine metadata and
the CLI paths that must work on a machine without TensorRT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from runners import run_each

from deploykit.backends.base import BatchRange
from deploykit.backends.tensorrt.metadata import (
    EngineMetadata,
    GpuInfo,
    check_compatible,
)
from deploykit.backends.tensorrt.plan import make_plan, parse_workspace
from deploykit.backends.tensorrt.qdq import check_qdq, fold_bias_dequantize
from deploykit.cli import main
from deploykit.errors import NumericMismatchError, UserError
from deploykit.fsutil import sha256_file
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.models.loaders import load_torch, resolve
from deploykit.stages import overflow
from deploykit.stages.export import ExportOptions, export_onnx
from deploykit.stages.fp16 import convert_fp16, verify_fp16
from deploykit.stages.fuse import fuse_onnx

TINY = "tinynets:tiny_net"
SIZE = 32


@pytest.fixture(scope="module")
def fused(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, InputContract]:
    folder = tmp_path_factory.mktemp("tiny")
    source, contract = resolve(TINY, input_size=(SIZE, SIZE))
    options = ExportOptions()
    art = export_onnx(load_torch(source), contract, folder / "model.onnx", options)
    fused_art, _ = fuse_onnx(art, folder / "model.fused.onnx", contract, options.check_batches())
    return fused_art.path, contract


@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from deploykit import api

    root = tmp_path_factory.mktemp("qdq")
    out = {}
    for encoding in ("s8s8", "u8s8"):
        api.calibrate(
            TINY,
            "synthetic",
            root / encoding,
            samples=16,
            encoding=encoding,
            input_size=(SIZE, SIZE),
            calib_cache=False,
        )
        out[encoding] = root / encoding / "model.int8.qdq.onnx"
    return out


# ---------------------------------------------------------------- FP16 conversion


def test_fp16_conversion_keeps_io_fp32_and_matches_fp32_in_onnxruntime(
    fused: tuple[Path, InputContract], tmp_path: Path
) -> None:
    path, contract = fused
    report = convert_fp16(path, tmp_path / "model.fp16.onnx")
    model = onnx.load(str(tmp_path / "model.fp16.onnx"))
    assert set(report.io_types.values()) == {"FLOAT"}
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == TensorProto.FLOAT16 for i in weights)
    assert report.nodes_fp16 > 0 and report.casts_added >= 2
    # The global average pool is exported as ReduceMean: a reduction stays in FP32.
    assert report.nodes_fp32.get("ReduceMean") == 1
    fid = verify_fp16(path, tmp_path / "model.fp16.onnx", synthetic_images(contract, 8), 1, report)
    assert fid.cosine > 0.999 and fid.top1_agreement == 1.0
    assert report.fidelity is not None and "onnxruntime" in report.verified_with
    # FP16 rounding is really there: not bit-identical to FP32.
    assert fid.max_abs_err > 0


def _graph(nodes: list[Any], inits: list[Any], shape: list[int], out_shape: list[int]) -> Any:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_keeps_softmax_in_fp32(tmp_path: Path) -> None:
    w = numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")
    model = _graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Softmax", ["m"], ["y"])],
        [w],
        [1, 4],
        [1, 4],
    )
    onnx.save(model, tmp_path / "a.onnx")
    report = convert_fp16(tmp_path / "a.onnx", tmp_path / "b.onnx")
    converted = onnx.load(str(tmp_path / "b.onnx"))
    softmax = next(n for n in converted.graph.node if n.op_type == "Softmax")
    producer = next(n for n in converted.graph.node if softmax.input[0] in n.output)
    assert producer.op_type == "Cast"
    assert helper.get_attribute_value(producer.attribute[0]) == TensorProto.FLOAT
    assert report.nodes_fp32 == {"Softmax": 1}


def test_fp16_check_fails_when_values_leave_fp16_range(tmp_path: Path) -> None:
    big = numpy_helper.from_array(np.array(1000.0, np.float32), "k")
    model = _graph(
        [helper.make_node("Mul", ["x", "k"], ["a"]), helper.make_node("Mul", ["a", "k"], ["y"])],
        [big],
        [1, 8],
        [1, 8],
    )
    onnx.save(model, tmp_path / "a.onnx")
    report = convert_fp16(tmp_path / "a.onnx", tmp_path / "b.onnx")
    x = np.random.default_rng(0).uniform(1, 2, (4, 8)).astype(np.float32)  # 1e6 * x > 65504
    with pytest.raises(NumericMismatchError, match="--precision fp32"):
        verify_fp16(tmp_path / "a.onnx", tmp_path / "b.onnx", x, 1, report)


# ---------------------------------------------------------------- Q/DQ rules


def test_symmetric_qdq_passes_after_bias_folding_with_the_same_outputs(
    fused: tuple[Path, InputContract], qdq_models: dict[str, Path], tmp_path: Path
) -> None:
    from deploykit.harness.datasets import Dataset
    from deploykit.stages.calibrate import CalibrationOptions, calibrate_onnx

    # What onnxruntime's quantizer writes (INT32 biases behind DequantizeLinear) ...
    path, contract = fused
    data = Dataset(inputs=synthetic_images(contract, 16), source="synthetic", sha256="0" * 64)
    src = tmp_path / "model.int8.qdq.onnx"
    calibrate_onnx(path, src, data, CalibrationOptions(use_cache=False))
    # ... which `deploykit calibrate` folds before writing its portable file.
    assert check_qdq(qdq_models["s8s8"]).ok
    before = check_qdq(src)
    assert not before.ok and all("INT32" in e for e in before.errors)  # quantized biases
    dst = tmp_path / "model.int8.trt.onnx"
    assert fold_bias_dequantize(src, dst) == len(before.errors)
    after = check_qdq(dst)
    assert after.ok, after.errors
    assert after.int8_layers >= 4 and after.per_channel_weights >= 3 and not after.float_layers
    x = synthetic_images(InputContract(height=SIZE, width=SIZE, num_classes=10), 2)
    # The logits are float (no output Q/DQ): the classifier adds its bias in the integer
    # accumulator in one file and in float in the other, so they match to float rounding.
    # Without VNNI ONNX Runtime's S8S8 kernels saturate their 16-bit sums (the s8s8 file
    # is TensorRT's, so the overflow fix leaves it alone; deploykit.stages.overflow): there
    # the two files are compared on ONNX Runtime's float reference path instead.
    optimise = not overflow.cpu_saturates()
    a, b = run_each(src, x[:1], optimise), run_each(dst, x[:1], optimise)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_asymmetric_uint8_qdq_is_rejected(qdq_models: dict[str, Path]) -> None:
    report = check_qdq(qdq_models["u8s8"])
    assert not report.ok
    assert any("uint8" in e and "INT8" in e for e in report.errors)


def _qdq_conv(
    tmp_path: Path,
    act_zp: int = 0,
    weight_axis: int = 0,
    act_scale: np.ndarray | None = None,
    q_feeds_relu: bool = False,
) -> Path:
    """x -> Q -> DQ -> Conv(DQ(int8 W)) -> y, with one property bent per test."""
    rng = np.random.default_rng(0)
    scale = act_scale if act_scale is not None else np.array(0.02, np.float32)
    inits = [
        numpy_helper.from_array(scale.astype(np.float32), "xs"),
        numpy_helper.from_array(np.full(scale.shape, act_zp, np.int8), "xz"),
        numpy_helper.from_array(rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
    ]
    q_out = "xq"
    axis = {"axis": 1} if scale.size > 1 else {}
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q", **axis)]
    if q_feeds_relu:
        nodes.append(helper.make_node("Relu", ["xq"], ["xr"], name="relu_on_int8"))
        q_out = "xr"
    nodes += [
        helper.make_node("DequantizeLinear", [q_out, "xs", "xz"], ["xd"], name="dq", **axis),
        helper.make_node(
            "DequantizeLinear", ["wq", "ws", "wz"], ["w"], name="dqw", axis=weight_axis
        ),
        helper.make_node("Conv", ["xd", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    model = _graph(nodes, inits, [1, 3, 8, 8], [1, 4, 8, 8])
    path = tmp_path / "qdq.onnx"
    onnx.save(model, path)
    return path


def test_handmade_symmetric_qdq_conv_passes(tmp_path: Path) -> None:
    report = check_qdq(_qdq_conv(tmp_path))
    assert report.ok, report.errors
    assert report.int8_layers == 1 and report.per_channel_weights == 1


@pytest.mark.parametrize(
    ("bend", "message"),
    [
        ({"act_zp": 3}, "zero point 3 is not 0"),
        ({"weight_axis": 1}, "output-channel axis 0"),
        ({"act_scale": np.full(3, 0.02)}, "per-channel scales on an activation"),
        ({"q_feeds_relu": True}, "instead of DequantizeLinear"),
    ],
)
def test_qdq_rules_tensorrt_rejects(tmp_path: Path, bend: dict[str, Any], message: str) -> None:
    report = check_qdq(_qdq_conv(tmp_path, **bend))
    assert not report.ok
    assert any(message in e for e in report.errors), report.errors


def test_float_model_is_not_a_qdq_model(fused: tuple[Path, InputContract]) -> None:
    report = check_qdq(fused[0])
    assert not report.ok and "no QuantizeLinear" in report.errors[-1]


# ---------------------------------------------------------------- build plan


def test_plan_profiles_workspace_level_cache_and_log(tmp_path: Path) -> None:
    contract = InputContract(height=64, width=48)
    plan = make_plan(
        tmp_path / "model.fp16.onnx",
        tmp_path / "tensorrt",
        contract,
        "input",
        "fp16",
        batch=1,
        dynamic_batch=BatchRange.parse("1:8:32"),
        extra={"workspace": "512M", "builder_opt_level": 5},
        tensorrt_version=None,
    )
    (p,) = plan.profiles
    assert (p.min, p.opt, p.max) == ((1, 3, 64, 48), (8, 3, 64, 48), (32, 3, 64, 48))
    assert plan.workspace_bytes == 512 * 2**20 and plan.builder_optimization_level == 5
    assert plan.network_flags == ["STRONGLY_TYPED"] and plan.builder_flags == []
    data = plan.to_dict()
    assert data["timing_cache"] == "tensorrt/timing.cache"
    assert data["log_file"] == "tensorrt/build.log"
    assert data["engine_file"] == "tensorrt/engine.plan"
    assert data["profiles"]["input"]["max"] == [32, 3, 64, 48]
    text = "\n".join(plan.describe())
    assert "builder precision flags: none" in text and "opt [8, 3, 64, 48]" in text
    static = make_plan(
        tmp_path / "m.onnx", tmp_path / "t", contract, "input", "fp32", 4, None, {}, "10.13.0"
    )
    assert not static.dynamic and static.profiles[0].opt == (4, 3, 64, 48)
    assert static.workspace_bytes is None and static.builder_optimization_level == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512M", 512 * 2**20), ("4G", 4 * 2**30), ("1GiB", 2**30), ("256", 2**28)],
)
def test_parse_workspace(text: str, expected: int) -> None:
    assert parse_workspace(text) == expected


@pytest.mark.parametrize(
    "extra",
    [
        {"workspace": "lots"},
        {"workspace": "-1G"},
        {"builder_opt_level": 6},
        {"timing_cache": "/nonexistent/timing.cache"},
    ],
)
def test_plan_rejects_bad_options(tmp_path: Path, extra: dict[str, Any]) -> None:
    with pytest.raises(UserError):
        make_plan(
            tmp_path / "m.onnx", tmp_path, InputContract(), "input", "fp32", 1, None, extra, None
        )


def test_plan_rejects_bf16(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bf16"):
        make_plan(
            tmp_path / "m.onnx", tmp_path, InputContract(), "input", "bf16", 1, None, {}, None
        )


# ---------------------------------------------------------------- engine metadata


H100 = GpuInfo("NVIDIA H100 80GB HBM3", "9.0", "13.0", "580.65.06", 79.1)


def _meta(tmp_path: Path, engine: bytes = b"engine bytes") -> EngineMetadata:
    (tmp_path / "engine.plan").write_bytes(engine)
    meta = EngineMetadata(
        tensorrt_version="10.13.3.9",
        gpu=H100,
        precision="fp16",
        strongly_typed=True,
        profiles={
            "input": {"min": [1, 3, 224, 224], "opt": [8, 3, 224, 224], "max": [32, 3, 224, 224]}
        },
        onnx_file="model.fp16.onnx",
        onnx_sha256="0" * 64,
        engine_sha256=sha256_file(tmp_path / "engine.plan"),
    )
    meta.save(tmp_path)
    return meta


def test_metadata_round_trip_and_same_machine_passes(tmp_path: Path) -> None:
    _meta(tmp_path)
    loaded = EngineMetadata.load(tmp_path)
    data = json.loads((tmp_path / "engine.json").read_text())
    assert data["tensorrt_version"] == "10.13.3.9" and data["gpu"]["compute_capability"] == "9.0"
    assert data["gpu"]["driver"] == "580.65.06" and data["precision"] == "fp16"
    assert data["profiles"]["input"]["opt"] == [8, 3, 224, 224]
    check_compatible(loaded, "10.13.3.9", H100, tmp_path / "engine.plan")


@pytest.mark.parametrize(
    ("version", "gpu", "message"),
    [
        ("10.14.1.48", H100, "built with TensorRT 10.13.3.9, this machine has 10.14.1.48"),
        ("11.4.0.106", H100, "this machine has 11.4.0.106"),
        ("10.13.3.9", GpuInfo("NVIDIA A100-SXM4-80GB", "8.0"), "compute capability 9.0"),
        ("10.13.3.9", GpuInfo("NVIDIA H100 PCIe", "9.0"), "this GPU is NVIDIA H100 PCIe"),
    ],
)
def test_engine_from_elsewhere_fails_with_rebuild(
    tmp_path: Path, version: str, gpu: GpuInfo, message: str
) -> None:
    meta = _meta(tmp_path)
    with pytest.raises(UserError, match="rebuild it here") as info:
        check_compatible(meta, version, gpu, tmp_path / "engine.plan")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_engine_changed_after_build_fails(tmp_path: Path) -> None:
    meta = _meta(tmp_path)
    (tmp_path / "engine.plan").write_bytes(b"another engine")
    with pytest.raises(UserError, match="sha256 differs"):
        check_compatible(meta, "10.13.3.9", H100, tmp_path / "engine.plan")


def test_missing_or_corrupt_metadata_says_rebuild(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no engine\.json; rebuild"):
        EngineMetadata.load(tmp_path)
    (tmp_path / "engine.json").write_text("{not json")
    with pytest.raises(UserError, match="rebuild"):
        EngineMetadata.load(tmp_path)


# ---------------------------------------------------------------- CLI without TensorRT

needs_no_tensorrt = pytest.mark.skipif(
    __import__("deploykit.backends.tensorrt.backend", fromlist=["x"]).tensorrt_version()
    is not None,
    reason="TensorRT is installed: the unavailable-path tests do not apply",
)


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False, env={"COLUMNS": "200"})


@needs_no_tensorrt
def test_target_tensorrt_without_tensorrt_exits_2_with_reason_and_docker(tmp_path: Path) -> None:
    result = _cli(["export", TINY, "-t", "tensorrt", "--input-size", "32", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "TensorRT is not installed" in result.stderr
    assert "docker/Dockerfile.tensorrt" in result.stderr and "--gpus all" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.rglob("*.onnx"))  # nothing written


@needs_no_tensorrt
def test_backends_says_why_tensorrt_is_unavailable() -> None:
    rows = json.loads(_cli(["backends", "--json"]).stdout)
    trt = next(r for r in rows if r["name"] == "tensorrt")
    assert not trt["available"] and "not installed" in trt["reason"]
    assert "Dockerfile.tensorrt" in trt["reason"]


def test_dry_run_fp16_writes_build_onnx_and_plan(tmp_path: Path) -> None:
    args = ["export", TINY, "-t", "tensorrt", "--input-size", "32", "-o", str(tmp_path)]
    result = _cli([*args, "--dynamic-batch", "1:4:16", "--workspace", "1G", "--dry-run"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "tiny_net" / "tensorrt-fp16.dry-run"  # fp16 is TensorRT's default
    assert "STRONGLY_TYPED" in result.stdout and "max [16, 3, 32, 32]" in result.stdout
    assert "FP16 ONNX vs FP32" in result.stdout and "workspace limit: 1024 MiB" in result.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["status"] == "dry-run" and report["latency"] is None
    plan = json.loads((run / "tensorrt" / "plan.json").read_text())
    assert plan["onnx"] == "model.fp16.onnx" and plan["precision"] == "fp16"
    assert plan["onnx_details"]["fp16"]["fidelity"]["cosine"] > 0.999
    assert "model.fp16.onnx" in report["artifacts"]
    assert not (run / "tensorrt" / "engine.plan").exists()
    # A dry run never replaces a built run folder of the same name.
    assert not (tmp_path / "tiny_net" / "tensorrt-fp16").exists()


def test_dry_run_int8_writes_tensorrt_ready_qdq(tmp_path: Path) -> None:
    args = ["export", TINY, "-t", "tensorrt", "-p", "int8", "--calib", "synthetic"]
    result = _cli(
        [*args, "--calib-samples", "16", "--input-size", "32", "-o", str(tmp_path), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "tiny_net" / "tensorrt-int8.dry-run"
    assert check_qdq(run / "model.int8.trt.onnx").ok
    stages = [s["name"] for s in json.loads((run / "report.json").read_text())["stages"]]
    assert stages[-4:] == ["export", "fuse", "calibrate", "plan"]


# ---------------------------------------------------------------- real builds (TensorRT + GPU)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_and_run_matches_pytorch(tmp_path: Path, precision: str) -> None:
    args = ["export", TINY, "-t", "tensorrt", "-p", precision, "--input-size", "32"]
    if precision == "int8":
        args += ["--calib", "synthetic", "--calib-samples", "32"]
    args += ["--dynamic-batch", "1:2:8", "-o", str(tmp_path), "--json", "--runs", "20"]
    result = _cli([*args, "--fidelity-samples", "8", "--min-seconds", "0.1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "ok" and report["effective_precision"] == precision
    run = tmp_path / "tiny_net" / f"tensorrt-{precision}" / "tensorrt"
    meta = EngineMetadata.load(run)
    assert meta.strongly_typed and meta.profiles["input"]["max"] == [8, 3, 32, 32]
    assert (run / "timing.cache").stat().st_size > 0 and (run / "build.log").is_file()
    assert report["device"]["name"] == meta.gpu.name


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_timing_cache_is_reused_by_the_next_build(tmp_path: Path) -> None:
    args = [
        "export",
        TINY,
        "-t",
        "tensorrt",
        "-p",
        "fp32",
        "--input-size",
        "32",
        "-o",
        str(tmp_path),
    ]
    fast = ["--runs", "10", "--fidelity-samples", "2", "--min-seconds", "0.1"]
    assert _cli([*args, *fast]).exit_code == 0
    assert _cli([*args, *fast]).exit_code == 0
    plan = json.loads(
        (tmp_path / "tiny_net" / "tensorrt-fp32" / "tensorrt" / "plan.json").read_text()
    )
    assert plan["timing_cache_seed"] and plan["timing_cache_seed"].endswith("timing.cache")


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"Format/Datatype": "Row major linear FP32 format (kLINEAR)"}, "fp32"),
        ({"Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}, "fp16"),
        ({"Format/Datatype": "Row major Int8 format"}, "int8"),
        ({"DataType": "Float", "Format": "Row major linear FP32 format (kLINEAR)"}, "fp32"),
        ({"DataType": "Half"}, "fp16"),
        ({"DataType": "Int8"}, "int8"),
    ],
)
def test_inspector_data_types_of_tensorrt_10_and_11(entry: dict[str, str], expected: str) -> None:
    # Strings as NVIDIA documents them for the engine inspector's JSON (10.x and 11.x).
    from deploykit.backends.tensorrt.builder import _dtype_of

    assert _dtype_of(entry) == expected


def test_effective_precision_is_the_lowest_precision_layers_run_in() -> None:
    from deploykit.backends.tensorrt.builder import effective_precision

    assert effective_precision({"int8": 50, "fp32": 3}, "int8") == "int8"
    assert effective_precision({"fp16": 90, "fp32": 2}, "fp16") == "fp16"
    assert effective_precision({"fp32": 40}, "fp16") == "fp32"  # an FP16 request that fell back
    assert effective_precision({}, "fp32") == "fp32"
