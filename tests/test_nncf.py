"""NNCF on OpenVINO: INT8 IR from the fused ONNX, INT8 compute, report, errors, compare targets."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runners import openvino_runtime_layers

from deploykit import api
from deploykit.backends.registry import get_backend
from deploykit.errors import UserError
from deploykit.harness.compare import CompareOptions, TargetSpec, compare, to_markdown
from deploykit.models.contract import InputContract

pytestmark = [
    pytest.mark.openvino,
    pytest.mark.skipif(
        importlib.util.find_spec("nncf") is None,
        reason="nncf is not installed: pip install nncf",
    ),
]

CONTRACT = InputContract(height=32, width=32)
FAST: dict[str, Any] = {
    "input_size": (32, 32),
    "threads": 1,
    "runs": 5,
    "warmup": 1,
    "min_seconds": 0.05,
    "fidelity_samples": 8,
    "calib": "synthetic",
    "calib_samples": 8,
}


def _ops(xml: Path) -> Counter[str]:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    counts: Counter[str] = Counter(op.get_type_name() for op in model.get_ops())
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            counts[f"Constant:{op.get_element_type().get_type_name()}"] += 1
    return counts


@pytest.fixture(scope="module")
def nncf_run(tmp_path_factory: pytest.TempPathFactory) -> api.ExportResult:
    out = tmp_path_factory.mktemp("nncf")
    request = api.ExportRequest(
        model="tinynets:tiny_net",
        target="openvino",
        precision="int8",
        quantizer="nncf",
        out=str(out),
        **FAST,
    )
    return api.export(request)


def test_capabilities_offer_nncf() -> None:
    assert get_backend("openvino").capabilities().native_quantizer == "nncf"


def test_export_makes_an_int8_ir_that_runs_in_int8(nncf_run: api.ExportResult) -> None:
    report = nncf_run.report.model_dump(mode="json")
    assert report["status"] == "ok"
    assert report["precision"] == report["effective_precision"] == "int8"
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["export", "fuse", "calibrate", "compile", "fidelity", "latency"]
    cal = stages["calibrate"]["details"]
    assert cal["quantizer"] == "nncf" and cal["nncf_version"]
    assert cal["method"] == "minmax" and cal["fast_bias_correction"]
    assert cal["subset_size"] == 8 and cal["data"]["count"] == 8
    assert cal["fake_quantize_ops"] > 0 and cal["ir"] == "model.int8.nncf.xml"
    ir = nncf_run.run_dir / "model.int8.nncf.xml"
    assert ir.is_file() and ir.with_suffix(".bin").is_file()
    assert not list(nncf_run.run_dir.glob(".*tmp*"))  # written atomically, nothing left over
    quantized = _ops(ir)
    assert quantized["FakeQuantize"] == cal["fake_quantize_ops"]
    # compile re-saves the IR: FakeQuantize and int8 weights kept, nothing compressed to f16.
    compiled = _ops(nncf_run.run_dir / "openvino" / "model.xml")
    assert compiled["FakeQuantize"] == quantized["FakeQuantize"]
    assert compiled["Constant:i8"] == quantized["Constant:i8"]
    assert compiled["Constant:f16"] == 0
    backend = report["backend"]
    assert backend["input_format"] == "ir"
    assert backend["fake_quantize_ops"] == quantized["FakeQuantize"]
    # Every Conv, grouped and depthwise included, and the classifier run in INT8 with int8
    # weights: behind the ONNX frontend's Reshape on grouped weights NNCF chose wrong scale
    # axes and the CPU plugin ran depthwise convolutions in f32 (convert_model folds it).
    assert backend["compute_layer_precisions"] in ({"u8": 4}, {"u8": 3, "i8": 1})
    assert cal["int8_weight_constants"] == quantized["Constant:i8"] == 4
    assert report["fidelity"]["cosine"] >= 0.99


def test_percentile_and_per_tensor_options(nncf_run: api.ExportResult, tmp_path: Path) -> None:
    data = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    path, details = get_backend("openvino").quantize(
        nncf_run.run_dir / "model.fused.onnx",
        data,
        tmp_path,
        CONTRACT,
        {"method": "percentile", "percentile": 99.9, "per_channel": False, "seed": 0},
    )
    assert path == tmp_path / "model.int8.nncf.xml" and path.is_file()
    assert details["method"] == "percentile" and details["percentile"] == 99.9
    assert not details["per_channel"] and details["subset_size"] == 4
    assert _ops(path)["FakeQuantize"] > 0


@pytest.mark.parametrize("method", ["entropy", "kl"])
def test_methods_nncf_lacks_are_refused(
    nncf_run: api.ExportResult, tmp_path: Path, method: str
) -> None:
    data = np.zeros((2, 3, 32, 32), dtype=np.float32)
    with pytest.raises(UserError, match="choose --calib-method minmax or percentile"):
        get_backend("openvino").quantize(
            nncf_run.run_dir / "model.fused.onnx",
            data,
            tmp_path,
            CONTRACT,
            {"method": method},
        )
    assert list(tmp_path.iterdir()) == []


def test_export_with_entropy_is_bad_input(tmp_path: Path) -> None:
    request = api.ExportRequest(
        model="tinynets:tiny_net",
        target="openvino",
        precision="int8",
        quantizer="nncf",
        calib_method="entropy",
        out=str(tmp_path),
        **FAST,
    )
    with pytest.raises(UserError, match="nncf has no 'entropy' calibration method"):
        api.export(request)


def test_missing_nncf_says_how_to_install(
    nncf_run: api.ExportResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deploykit.backends.openvino import nncf_quantizer

    monkeypatch.setattr(nncf_quantizer, "nncf_available", lambda: False)
    backend = get_backend("openvino")
    assert backend.capabilities().native_quantizer is None
    with pytest.raises(UserError, match="pip install nncf"):
        backend.quantize(
            nncf_run.run_dir / "model.fused.onnx",
            np.zeros((1, 3, 32, 32), dtype=np.float32),
            tmp_path,
            CONTRACT,
            {"method": "minmax"},
        )
    with pytest.raises(UserError, match="pip install nncf"):
        TargetSpec.parse("openvino:int8-nncf", "fp32").check(backend)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("openvino", TargetSpec("openvino", "fp32", "deploykit")),
        ("openvino:int8", TargetSpec("openvino", "int8", "deploykit")),
        ("openvino:int8-nncf", TargetSpec("openvino", "int8", "nncf")),
        ("onnxruntime:fp32", TargetSpec("onnxruntime", "fp32", "deploykit")),
    ],
)
def test_compare_target_specs(spec: str, expected: TargetSpec) -> None:
    assert TargetSpec.parse(spec, "fp32") == expected


@pytest.mark.parametrize("spec", ["openvino:fp32-nncf", "openvino:int8-", ":int8"])
def test_bad_compare_target_specs(spec: str) -> None:
    with pytest.raises(UserError, match="target"):
        TargetSpec.parse(spec, "fp32")


def test_compare_refuses_a_quantizer_the_backend_lacks() -> None:
    with pytest.raises(UserError, match="openvino:int8-nncf"):
        TargetSpec.parse("openvino:int8-modelopt", "fp32").check(get_backend("openvino"))


def test_compare_times_nncf_next_to_qdq(tmp_path: Path) -> None:
    options = CompareOptions(
        models=["tinynets:tiny_net"],
        targets=["openvino", "openvino:int8", "openvino:int8-nncf"],
        threads=1,
        rounds=1,
        runs=3,
        min_seconds=0.01,
        input_size=(32, 32),
        out=str(tmp_path),
        calib_samples=4,
        pairs=[("openvino:int8", "openvino:int8-nncf")],
    )
    result = compare(options)
    rows = {row["spec"]: row for row in result["rows"]}
    (pair,) = result["paired"]
    assert (pair["model"], pair["a"], pair["b"]) == (
        "tiny_net",
        "openvino:int8",
        "openvino:int8-nncf",
    )
    assert pair["blocks"] == 2 and 0 < pair["low"] <= pair["ratio"] <= pair["high"]
    assert "| tiny_net | openvino:int8 | openvino:int8-nncf |" in to_markdown(result)
    assert rows["openvino"]["speedup_vs_fp32"] is None
    for spec, quantizer in (("openvino:int8", "deploykit"), ("openvino:int8-nncf", "nncf")):
        assert rows[spec]["precision"] == "int8" and rows[spec]["quantizer"] == quantizer
        assert rows[spec]["speedup_vs_fp32"] > 0
    assert (tmp_path / "tiny_net" / "openvino-nncf" / "model.int8.nncf.xml").is_file()


# shufflenet_v2_x1_0's Split ranges are also checked, faster, in tests/test_int8.py.
@pytest.mark.parametrize(
    "model", ["mobilenet_v2", pytest.param("shufflenet_v2_x1_0", marks=pytest.mark.slow)]
)
def test_openvino_compiles_deploykit_qdq_and_nncf_ir_into_the_same_runtime_graph(
    model: str, tmp_path: Path
) -> None:
    """Latency parity with NNCF by construction: the same layers, precisions, fusions, kernels.

    Any Q/DQ placement OpenVINO cannot fuse as it fuses NNCF's FakeQuantize placement
    (a quantizer after a Reshape, a requantization after a Split) shows up here as a
    standalone Subgraph or a layer in f32.
    """
    from deploykit.backends.openvino.nncf_quantizer import NncfOptions, quantize_to_ir
    from deploykit.harness.inputs import synthetic_images

    result = api.calibrate(
        model, "synthetic", tmp_path / "qdq", samples=4, encoding="mixed", input_size=(64, 64)
    )
    folder = Path(result["out"])
    inputs = synthetic_images(InputContract(height=64, width=64), 4, seed=0)
    xml, _ = quantize_to_ir(
        folder / "model.fused.onnx", inputs, tmp_path / "nncf", NncfOptions.from_dict({})
    )
    ours = openvino_runtime_layers(folder / "model.int8.qdq.onnx")
    theirs = openvino_runtime_layers(xml)
    assert len(ours) == len(theirs)
    differ = [(i, a, b) for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not differ, differ
