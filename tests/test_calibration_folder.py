"""`deploykit export FOLDER`: a `deploykit calibrate` folder compiled as written, on any backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tinynets import outlier_eval_set

from deploykit import api
from deploykit.cli import main
from deploykit.errors import GateError
from deploykit.fsutil import sha256_file

SIZE = (32, 32)
FAST = ["--runs", "5", "--warmup", "1", "--min-seconds", "0", "--fidelity-samples", "8"]
# What ONNX Runtime's accuracy fallback keeps in float on outlier_net (tests/test_fallback.py).
SENSITIVE = ["node_conv2d_1", "node_conv2d_2"]


def _calibrate(
    out: Path, encoding: str, keep_float: tuple[str, ...] = (), model: str = "outlier_net"
) -> Path:
    api.calibrate(
        f"tinynets:{model}",
        "synthetic",
        out,
        samples=32,
        encoding=encoding,
        input_size=SIZE,
        keep_float=keep_float,
    )
    return out


@pytest.mark.parametrize(
    ("target", "encoding"),
    [("onnxruntime", "u8s8"), pytest.param("openvino", "mixed", marks=pytest.mark.openvino)],
)
def test_export_compiles_the_folders_qdq_file_as_written(
    tmp_path: Path, target: str, encoding: str
) -> None:
    if target == "openvino":
        pytest.importorskip("openvino")
    eval_path = outlier_eval_set(tmp_path / "eval.npz")
    common = {
        "target": target,
        "precision": "int8",
        "eval_data": [str(eval_path)],
        "max_accuracy_drop": 3.0,
        "runs": 5,
        "warmup": 1,
        "min_seconds": 0.0,
        "fidelity_samples": 8,
    }
    # The sensitive layers kept in float at calibration: the budget holds on this backend.
    kept = _calibrate(tmp_path / "kept", encoding, tuple(SENSITIVE))
    result = api.export(api.ExportRequest(model=str(kept), out=str(tmp_path / "a"), **common))
    report = result.report
    assert report.status == "ok"
    # The float layers are the folder's, and the layers left in INT8 run integer kernels.
    gate = next(g for g in report.gates if g.name == "precision")
    assert gate.passed and gate.detail.startswith("mixed:") and "2 kept in float" in gate.detail
    assert [s.name for s in report.stages] == [
        "calibrate",
        "compile",
        "accuracy",
        "fidelity",
        "latency",
    ]
    calibrate = report.stages[0].details
    assert calibrate["from"] == str(kept.resolve()) and calibrate["encoding"] == encoding
    assert calibrate["nodes_excluded"] == SENSITIVE
    for name in ("model.onnx", "model.fused.onnx", "model.int8.qdq.onnx"):
        assert sha256_file(result.run_dir / name) == sha256_file(kept / name), name
    assert report.accuracy[str(eval_path)]["drop"] <= 3.0
    assert report.fidelity_reference.startswith("onnxruntime fp32")
    assert not any("runs" in note and "fastest" in note for note in report.notes)

    # Without them the budget is missed by far, and nothing recalibrates: the run fails.
    plain = _calibrate(tmp_path / "plain", encoding)
    with pytest.raises(GateError, match="accuracy"):
        api.export(api.ExportRequest(model=str(plain), out=str(tmp_path / "b"), **common))
    failed = api.load_report(tmp_path / "b" / "outlier_net" / f"{target}-int8")
    assert failed.status.startswith("failed") and failed.fallback is None
    assert failed.accuracy[str(eval_path)]["drop"] > 10.0


def test_cli_defaults_to_int8_and_names_a_slower_encoding(tmp_path: Path) -> None:
    folder = tmp_path / "qdq"
    calibrated = CliRunner().invoke(
        main,
        ["calibrate", "tinynets:tiny_net", "--calib", "synthetic", "--calib-samples", "32"]
        + ["--input-size", "32", "--encoding", "mixed", "-o", str(folder)],
    )
    assert calibrated.exit_code == 0, calibrated.output
    assert f"deploykit export {folder} --target openvino" in calibrated.output
    result = CliRunner().invoke(
        main,
        ["export", str(folder / "model.int8.qdq.onnx"), "-t", "onnxruntime", "--no-eval"]
        + ["-o", str(tmp_path / "out"), *FAST, "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["precision"] == report["effective_precision"] == "int8"
    assert any("onnxruntime runs u8s8 fastest" in note for note in report["notes"])


def test_tensorrt_plans_the_portable_folder(tmp_path: Path) -> None:
    folder = _calibrate(tmp_path / "qdq", "s8s8")
    result = CliRunner().invoke(
        main, ["export", str(folder), "-t", "tensorrt", "--dry-run", "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "symmetric INT8" in result.output
    plan = tmp_path / "out" / "outlier_net" / "tensorrt-int8.dry-run"
    assert sha256_file(plan / "model.int8.qdq.onnx") == sha256_file(folder / "model.int8.qdq.onnx")


def test_what_a_calibration_folder_cannot_give(tmp_path: Path) -> None:
    folder = _calibrate(tmp_path / "qdq", "u8s8")
    out = tmp_path / "out"

    def refused(model: Path, *options: str) -> str:
        result = CliRunner().invoke(
            main, ["export", str(model), "-t", "onnxruntime", "-o", str(out), *FAST, *options]
        )
        assert result.exit_code == 2, result.output
        assert not out.exists(), "nothing may be written"
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        return lines[0]

    assert "use --precision int8" in refused(folder, "-p", "fp32")
    assert "--calib-method is fixed by the calibration" in refused(folder, "--calib-method", "mse")
    assert "--keep-float is fixed" in refused(folder, "--keep-float", SENSITIVE[0])
    assert "exported at batch 1" in refused(folder, "--batch", "2")
    trt = CliRunner().invoke(
        main, ["export", str(folder), "-t", "tensorrt", "--dry-run", "-o", str(out)]
    )
    assert trt.exit_code == 2 and "--encoding s8s8" in trt.output, trt.output

    bare = tmp_path / "bare.onnx"
    bare.write_bytes((folder / "model.int8.qdq.onnx").read_bytes())
    assert "is already quantized" in refused(bare)
    assert "is already quantized" in refused(bare, "-p", "int8", "--calib", "synthetic")

    qdq = folder / "model.int8.qdq.onnx"
    qdq.write_bytes(qdq.read_bytes() + b"\0")
    assert "changed after calibration" in refused(folder)
    (folder / "model.fused.onnx").unlink()
    assert "model.fused.onnx is missing" in refused(folder)
    (folder / "calibration.json").write_text("{")
    assert "cannot be read" in refused(folder)
