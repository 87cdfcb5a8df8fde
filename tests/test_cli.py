"""End to end through the CLI: export on every CPU target, bench, models, backends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.fsutil import sha256_file

FAST = ["--runs", "20", "--warmup", "2", "--min-seconds", "0.2", "--fidelity-samples", "8"]


def _invoke(args: list[str]) -> Any:
    result = CliRunner().invoke(main, args, catch_exceptions=False, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + result.stderr
    return result


def _export_json(args: list[str]) -> dict[str, Any]:
    return json.loads(_invoke(["export", *args, *FAST, "--json"]).stdout)


def _check_run_folder(run_dir: Path, report: dict[str, Any], backend_files: list[str]) -> None:
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk == report
    assert (run_dir / "recipe.resolved.yaml").is_file()
    for rel in backend_files:
        assert (run_dir / rel).is_file(), rel
    assert set(backend_files) <= set(report["artifacts"])
    for rel, digest in report["artifacts"].items():
        assert sha256_file(run_dir / rel) == digest
    # Nothing left behind by the staging.
    assert not [p for p in run_dir.parent.iterdir() if p.name.startswith(".")]


def _check_report(report: dict[str, Any], target: str, model: str) -> None:
    assert report["schema_version"] == 1
    assert report["status"] == "ok"
    assert report["model"] == model and report["target"] == target
    assert report["precision"] == report["effective_precision"] == "fp32"
    assert report["weights"] == "random"
    assert "random weights: fidelity only, not accuracy" in report["notes"]
    fid = report["fidelity"]
    assert fid["cosine"] >= 0.9999 and fid["top1_agreement"] == 1.0 and fid["samples"] == 8
    lat = report["latency"]
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
    assert lat["runs"] >= 20 and lat["threads"] >= 1 and lat["throughput_ips"] > 0
    assert {"python", "torch", "onnx", "deploykit"} <= set(report["versions"])
    assert all(g["passed"] for g in report["gates"])
    assert report["device"]["kind"] == "cpu" and "features" in report["device"]


@pytest.mark.onnxruntime
def test_export_onnxruntime_dynamic_batch(tmp_path: Path) -> None:
    report = _export_json(
        [
            "mobilenet_v3_small",
            "--target",
            "onnxruntime",
            "--input-size",
            "64",
            "--dynamic-batch",
            "1:2:4",
            "--out",
            str(tmp_path),
        ]
    )
    _check_report(report, "onnxruntime", "mobilenet_v3_small")
    assert report["input"]["batch"] == 2 and report["input"]["dynamic_batch"] == "1:2:4"
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["export", "fuse", "compile", "fidelity", "latency"]
    assert [c["batch"] for c in stages["export"]["details"]["checks"]] == [1, 2, 4]
    assert stages["fuse"]["details"]["nodes_after"] <= stages["fuse"]["details"]["nodes_before"]
    run_dir = tmp_path / "mobilenet_v3_small" / "onnxruntime-fp32"
    _check_run_folder(
        run_dir,
        report,
        ["model.onnx", "model.fused.onnx", "onnxruntime/model.onnx", "onnxruntime/backend.json"],
    )

    bench = json.loads(
        _invoke(
            [
                "bench",
                str(run_dir),
                "--runs",
                "10",
                "--min-seconds",
                "0.1",
                "--batch",
                "4",
                "--json",
            ]
        ).stdout
    )
    assert bench["model"] == "mobilenet_v3_small" and bench["latency"]["batch"] == 4
    assert bench["latency"]["runs"] >= 10 and bench["latency"]["p50_ms"] > 0


@pytest.mark.openvino
def test_export_openvino_prints_one_table(tmp_path: Path) -> None:
    result = _invoke(
        [
            "export",
            "squeezenet1_1",
            "--target",
            "openvino",
            "--input-size",
            "64",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
            *FAST,
        ]
    )
    out = result.stdout
    for text in ("export", "fuse", "compile", "p50", "p99", "cosine", "top-1", "random weights"):
        assert text in out, text
    run_dir = tmp_path / "squeezenet1_1" / "openvino-fp32"
    report = json.loads((run_dir / "report.json").read_text())
    _check_report(report, "openvino", "squeezenet1_1")
    assert report["latency"]["threads"] == 1
    assert report["backend"]["settings"]["INFERENCE_PRECISION_HINT"] == "f32"
    _check_run_folder(run_dir, report, ["openvino/model.xml", "openvino/model.bin"])
    bench = _invoke(["bench", str(run_dir), "--runs", "10", "--min-seconds", "0.1"]).stdout
    assert "p50" in bench


def test_export_torch_baseline(tmp_path: Path) -> None:
    report = _export_json(
        ["shufflenet_v2_x0_5", "-t", "torch", "--input-size", "64", "--out", str(tmp_path)]
    )
    _check_report(report, "torch", "shufflenet_v2_x0_5")
    assert [s["name"] for s in report["stages"]] == ["compile", "fidelity", "latency"]


@pytest.mark.openvino
def test_export_from_an_onnx_file(tmp_path: Path) -> None:
    import torch
    from tinynets import tiny_net

    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        tiny_net(),
        (torch.randn(1, 3, 40, 40),),
        str(onnx_path),
        dynamo=False,
        input_names=["input"],
        dynamic_axes={"input": {0: "n"}},
    )
    report = _export_json([str(onnx_path), "--target", "openvino", "--out", str(tmp_path / "o")])
    assert report["status"] == "ok" and report["weights"] == "in-file"
    assert report["input"]["height"] == 40 and report["input"]["width"] == 40
    assert report["fidelity_reference"] == "onnxruntime fp32 on the input ONNX file"
    assert report["stages"][0]["details"]["exporter"] == "none (ONNX input)"
    assert report["fidelity"]["cosine"] >= 0.9999


def test_models_lists_the_catalogue_with_contracts() -> None:
    rows = json.loads(_invoke(["models", "--json"]).stdout)
    names = [r["name"] for r in rows]
    assert len(names) >= 80 and names[0].startswith(("mobilenet", "shufflenet", "squeezenet"))
    resnet = rows[names.index("resnet50")]
    assert resnet["input"]["height"] == 224 and resnet["input"]["num_classes"] == 1000
    table = _invoke(["models"]).stdout
    assert "squeezenet1_1" in table and "inception_v3" in table and "299" in table


def test_backends_reports_availability_and_reasons() -> None:
    rows = {r["name"]: r for r in json.loads(_invoke(["backends", "--json"]).stdout)}
    assert set(rows) == {"torch", "onnxruntime", "openvino", "tensorrt"}
    assert rows["torch"]["available"] and rows["torch"]["version"]
    for row in rows.values():
        assert row["available"] or row["reason"]
    table = _invoke(["backends"]).stdout
    assert "tensorrt" in table.lower()


@pytest.mark.onnxruntime
def test_console_script_with_a_factory_model(tmp_path: Path, cli_env: dict[str, str]) -> None:
    script = Path(sys.executable).with_name("deploykit")
    proc = subprocess.run(
        [
            str(script),
            "export",
            "tinynets:tiny_net",
            "--target",
            "onnxruntime",
            "--input-size",
            "32",
            "--out",
            str(tmp_path),
            *FAST,
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        cwd=os.getcwd(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["model"] == "tiny_net" and report["model_source"]["kind"] == "factory"
    assert report["fidelity"]["cosine"] >= 0.9999


@pytest.mark.onnxruntime
@pytest.mark.openvino
def test_compare_writes_speedups_and_benchmark_app(tmp_path: Path) -> None:
    from deploykit.harness.compare import benchmark_app_available

    md = tmp_path / "bench.md"
    result = json.loads(
        _invoke(
            ["compare", "squeezenet1_1", "--input-size", "64", "--rounds", "2", "--runs", "5"]
            + ["--min-seconds", "0.05", "--benchmark-app", "--markdown", str(md)]
            + ["--out", str(tmp_path / "work"), "--json"]
        ).stdout
    )
    rows = {r["target"]: r for r in result["rows"]}
    assert set(rows) == {"torch", "onnxruntime", "openvino"}
    assert rows["torch"]["speedup_vs_torch"] == pytest.approx(1.0)
    for row in rows.values():
        assert row["p50_ms"] > 0 and len(row["round_p50s_ms"]) == 2
        assert row["precision"] == "fp32"
    assert result["options"]["benchmark_app"] == benchmark_app_available()
    if benchmark_app_available():
        assert len(rows["openvino"]["benchmark_app_round_medians_ms"]) == 2
        assert rows["openvino"]["benchmark_app_median_ms"] > 0
    text = md.read_text()
    assert "| squeezenet1_1 | openvino | fp32 |" in text and "CPU features" in text


@pytest.mark.onnxruntime
def test_compare_int8_targets(tmp_path: Path) -> None:
    result = json.loads(
        _invoke(
            ["compare", "squeezenet1_1", "--input-size", "64", "--rounds", "1", "--runs", "5"]
            + ["--min-seconds", "0.05", "--targets", "onnxruntime,onnxruntime:int8"]
            + ["--calib-samples", "4", "--out", str(tmp_path), "--json"]
        ).stdout
    )
    rows = {r["spec"]: r for r in result["rows"]}
    assert rows["onnxruntime:int8"]["precision"] == "int8"
    assert rows["onnxruntime:int8"]["speedup_vs_fp32"] > 0
    assert rows["onnxruntime"]["speedup_vs_fp32"] is None
