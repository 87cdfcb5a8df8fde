"""Accuracy-aware per-layer fallback: ranking, schedule, and real recovery on both backends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deploykit import api
from deploykit.errors import GateError
from deploykit.stages import overflow
from deploykit.stages.fallback import LayerSensitivity, run_fallback, schedule

SIZE = ["--input-size", "32"]
# Plain INT8 keeps 84.3% of outlier_net's top-5 on the eval set (ONNX Runtime, measured).
TOP5_TARGET = 90.0


def test_schedule_grows_one_step_at_a_time_up_to_the_limit() -> None:
    assert schedule(50, 12) == [1, 2, 3, 4, 6, 9, 12]
    assert schedule(3, 10) == [1, 2, 3]
    assert schedule(0, 4) == []


def test_run_fallback_stops_at_the_first_step_that_meets_the_budget() -> None:
    ranking = [LayerSensitivity(f"t{i}", (f"n{i}",), 40.0, 40.0 - i, float(i)) for i in range(8)]
    tried: list[list[str]] = []

    def attempt(excluded: list[str]) -> tuple[float, dict[str, object]]:
        tried.append(excluded)
        return (0.5 if len(excluded) >= 3 else 5.0), {}

    result = run_fallback(ranking, attempt, budget=1.0, initial_drop=9.0, max_layers=8)
    assert result.met and result.excluded == ["n0", "n1", "n2"]
    assert [len(t) for t in tried] == [1, 2, 3]
    missed = run_fallback(ranking, lambda e: (5.0, {}), budget=1.0, initial_drop=9.0, max_layers=2)
    assert not missed.met and len(missed.steps) == 2


def test_run_fallback_may_keep_every_ranked_layer_when_others_stay_int8() -> None:
    """The stem reads the graph input and is never ranked; it keeps the model INT8."""
    ranking = [LayerSensitivity("t0", ("n0", "n1"), 40.0, 1.0, 39.0)]
    tried: list[list[str]] = []

    def attempt(excluded: list[str]) -> tuple[float, dict[str, object]]:
        tried.append(excluded)
        return 0.5, {}

    alone = run_fallback(ranking, attempt, budget=1.0, initial_drop=9.0, max_layers=4)
    assert not alone.steps  # n0 and n1 may be the whole model
    result = run_fallback(ranking, attempt, 1.0, 9.0, 4, quantized={"stem", "n0", "n1"})
    assert result.met and result.excluded == ["n0", "n1"] and tried == [["n0", "n1"]]


def test_ranking_finds_the_gemm_behind_a_reshape(tmp_path: Path) -> None:
    """Mixed files quantize a classifier's input before its Reshape; the Gemm owns that pair."""
    from deploykit.harness.inputs import synthetic_images
    from deploykit.models.contract import InputContract
    from deploykit.stages.fallback import rank_layers

    result = api.calibrate(
        "tinynets:outlier_net",
        "synthetic",
        tmp_path,
        samples=8,
        encoding="mixed",
        input_size=(32, 32),
    )
    out = Path(result["out"])
    x = synthetic_images(InputContract(height=32, width=32, resize=32), 8, seed=1)
    ranking = rank_layers(out / "model.fused.onnx", out / "model.int8.qdq.onnx", x, 1)
    owners = {r.tensor: r.nodes for r in ranking}
    assert owners.get("avg_pool2d") == ("node_Gemm_4",), owners


def _eval_set(tmp_path: Path) -> Path:
    from tinynets import outlier_eval_set

    return outlier_eval_set(tmp_path / "eval.npz")


def _outlier_run(target: str, eval_path: Path, **options: Any) -> dict[str, Any]:
    """ExportRequest fields of a quick INT8 run of outlier_net evaluated on `eval_path`."""
    return {
        "model": "tinynets:outlier_net",
        "target": target,
        "precision": "int8",
        "input_size": (32, 32),
        "calib": "synthetic",
        "calib_samples": 32,
        "eval_data": [str(eval_path)],
        "runs": 5,
        "warmup": 1,
        "min_seconds": 0.0,
        "fidelity_samples": 8,
        **options,
    }


@pytest.mark.parametrize(
    ("target", "batch"), [("onnxruntime", 1), ("openvino", 1), ("onnxruntime", 2)]
)
def test_fallback_recovers_accuracy_on_a_sensitive_model(
    tmp_path: Path, target: str, batch: int
) -> None:
    if target == "openvino":
        pytest.importorskip("openvino")
    eval_path = _eval_set(tmp_path)
    common = _outlier_run(target, eval_path, batch=batch, max_accuracy_drop=3.0)
    # Without the fallback the budget is missed by far: the gate fails, the run is kept.
    with pytest.raises(GateError, match="accuracy"):
        api.export(api.ExportRequest(**common, out=str(tmp_path / "plain"), fallback=False))
    plain = api.load_report(tmp_path / "plain" / "outlier_net" / f"{target}-int8")
    before = plain.accuracy[str(eval_path)]
    assert plain.status.startswith("failed") and before["drop"] > 10.0
    print(f"{target}: INT8 without fallback top-1 {before['top1']:.1f}% (drop {before['drop']})")

    result = api.export(api.ExportRequest(**common, out=str(tmp_path / "fb")))
    report = result.report
    after = report.accuracy[str(eval_path)]
    assert report.status == "ok"
    assert report.fallback is not None and report.fallback["met"]
    assert after["drop"] <= 3.0 and after["top1"] >= before["top1"] + 50.0
    excluded = report.fallback["excluded"]
    # The outlier activation (the output of `mid`) ranks first, and keeping its two
    # layers in float is enough: the stem and the head stay INT8. Without VNNI the
    # stem's weight scales are bounded against 16-bit overflow (deploykit.stages.overflow)
    # and one more image is lost (drop 3.5 on 200 images after the first step, measured
    # on an AVX2-only EPYC), so the stem falls back in a second step.
    assert report.fallback["ranking"][0]["nodes"] == ["node_conv2d_1", "node_conv2d_2"]
    assert report.fallback["steps"][0]["excluded"] == ["node_conv2d_1", "node_conv2d_2"]
    if overflow.cpu_saturates():
        assert excluded in (
            ["node_conv2d_1", "node_conv2d_2"],
            ["node_conv2d", "node_conv2d_1", "node_conv2d_2"],
        )
    else:
        assert excluded == ["node_conv2d_1", "node_conv2d_2"]
        assert len(report.fallback["steps"]) == 1
    # The kept artifact still runs integer kernels for the layers left in INT8.
    gate = next(g for g in report.gates if g.name == "precision")
    assert gate.passed and gate.detail.startswith("mixed:")
    assert "mixed: 0 compute layers" not in gate.detail
    print(
        f"{target}: fallback kept {excluded} in float: top-1 {after['top1']:.1f}% "
        f"(drop {after['drop']:.1f})"
    )


def test_run_fallback_judges_every_target_it_is_given() -> None:
    """A step meets the targets only when `accept` says so, whatever its drop."""
    ranking = [LayerSensitivity(f"t{i}", (f"n{i}",), 40.0, 40.0 - i, float(i)) for i in range(8)]

    def attempt(excluded: list[str]) -> tuple[float, dict[str, object]]:
        # The drop is within budget from the start; the overlap rises one point per layer.
        return 0.0, {"set": {"top5_overlap": 94.0 + len(excluded)}}

    def accept(drop: float, details: dict[str, object]) -> bool:
        overlap = details["set"]["top5_overlap"]  # type: ignore[index]
        return drop <= 1.0 and overlap >= 97.0

    result = run_fallback(ranking, attempt, 1.0, None, 8, accept=accept, min_top5_overlap=97.0)
    assert result.met and result.excluded == ["n0", "n1", "n2"]
    assert result.to_dict()["min_top5_overlap"] == 97.0 and result.initial_drop is None


def test_accuracy_check_gates_the_top5_overlap_of_every_set() -> None:
    from deploykit.harness.accuracy import AccuracyCheck

    results = {
        "photos": {
            "samples": 640,
            "drop": 0.3,
            "top1": 80.9,
            "fp32_top1": 81.2,
            "top5_overlap": 97.5,
        },
        "views": {"samples": 256, "drop": None, "top5_overlap": 96.25},
    }
    plain = AccuracyCheck(sets=[], reference_label="fp32", batch=1, budget=1.0)
    assert plain.overlap_shortfall(results) is None and plain.met(results)
    assert [g.name for g in plain.gates()] == []
    gated = AccuracyCheck(
        sets=[], reference_label="fp32", batch=1, budget=1.0, min_top5_overlap=97.0
    )
    assert gated.overlap_shortfall(results) == pytest.approx(0.75)
    assert not gated.met(results)
    gated.results = results
    gates = {g.name: g for g in gated.gates()}
    assert gates["top5_overlap:photos"].passed
    assert not gates["top5_overlap:views"].passed
    assert "96.25% (at least 97%)" in gates["top5_overlap:views"].detail
    assert gates["accuracy:photos"].passed and "accuracy:views" not in gates
    results["views"]["top5_overlap"] = 97.0
    assert gated.met(results)
    results["photos"]["drop"] = 1.5  # the drop budget still counts
    assert not gated.met(results)


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_top5_overlap_target_starts_the_fallback_and_is_met(tmp_path: Path, target: str) -> None:
    if target == "openvino":
        pytest.importorskip("openvino")
    eval_path = _eval_set(tmp_path)
    # A drop budget of 100 points: only the overlap target can start the fallback.
    common = _outlier_run(target, eval_path, max_accuracy_drop=100.0, min_top5_overlap=TOP5_TARGET)
    with pytest.raises(GateError, match="top5_overlap"):
        api.export(api.ExportRequest(**common, out=str(tmp_path / "plain"), fallback=False))
    plain = api.load_report(tmp_path / "plain" / "outlier_net" / f"{target}-int8")
    before = plain.accuracy[str(eval_path)]["top5_overlap"]
    assert plain.status.startswith("failed") and before < TOP5_TARGET
    report = api.export(api.ExportRequest(**common, out=str(tmp_path / "fb"))).report
    after = report.accuracy[str(eval_path)]["top5_overlap"]
    assert report.status == "ok" and after >= TOP5_TARGET
    assert report.fallback is not None and report.fallback["met"]
    assert report.fallback["min_top5_overlap"] == TOP5_TARGET
    gate = next(g for g in report.gates if g.name == f"top5_overlap:{eval_path}")
    assert gate.passed
    print(
        f"{target}: top-5 overlap {before:.1f}% -> {after:.1f}% with {report.fallback['excluded']}"
    )


def test_one_backends_fallback_carries_to_the_others(tmp_path: Path) -> None:
    """--keep-float RUN: ONNX Runtime's fallback layers make OpenVINO's and the portable
    file meet the same budget from the same calibration, with no fallback of their own."""
    pytest.importorskip("openvino")
    from click.testing import CliRunner

    from deploykit.cli import main
    from deploykit.stages.fallback import quantized_layers
    from deploykit.stages.onnxcheck import load_onnx

    eval_path = _eval_set(tmp_path)
    ort = api.export(
        api.ExportRequest(
            **_outlier_run("onnxruntime", eval_path, max_accuracy_drop=3.0), out=str(tmp_path)
        )
    )
    assert ort.report.fallback is not None and ort.report.fallback["met"]
    fallen = ort.report.fallback["excluded"]
    assert fallen

    common = _outlier_run("openvino", eval_path, max_accuracy_drop=3.0, fallback=False)
    report = api.export(
        api.ExportRequest(**common, keep_float=[str(ort.run_dir)], out=str(tmp_path / "ov"))
    ).report
    calibrate = next(s for s in report.stages if s.name == "calibrate")
    assert calibrate.details["nodes_excluded"] == fallen
    assert report.status == "ok" and report.fallback is None
    drop = report.accuracy[str(eval_path)]["drop"]
    assert drop <= 3.0
    # The same layers by name do the same; the run folder's report.json too.
    by_name = api.export(
        api.ExportRequest(**common, keep_float=[",".join(fallen)], out=str(tmp_path / "n"))
    ).report
    assert by_name.accuracy[str(eval_path)]["drop"] == drop

    out = tmp_path / "portable"
    result = CliRunner().invoke(
        main,
        ["calibrate", "tinynets:outlier_net", "--calib", "synthetic", "--calib-samples", "32"]
        + SIZE
        + ["-o", str(out), "--keep-float", str(ort.run_dir / "report.json")],
    )
    assert result.exit_code == 0, result.output
    assert f"{len(fallen)} layer(s) in float" in result.output
    qdq = load_onnx(out / "model.int8.qdq.onnx", check=False)
    quantized = {node.name for node in quantized_layers(qdq)}
    assert quantized and not quantized & set(fallen)
    # TensorRT's explicit-quantization rules hold, with those layers left in float.
    check = json.loads((out / "calibration.json").read_text())["tensorrt"]["qdq_check"]
    assert check["ok"] and set(fallen) <= set(check["float_layers"]), check
    print(f"openvino with onnxruntime's float layers {fallen}: drop {drop}")


def test_keep_float_refuses_what_it_cannot_keep(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from deploykit.cli import main

    def export(*extra: str) -> Any:
        return CliRunner().invoke(
            main,
            ["export", "tinynets:outlier_net", "-t", "onnxruntime", "--runs", "2"]
            + ["--min-seconds", "0", "--warmup", "0", "--fidelity-samples", "2"]
            + SIZE
            + ["-o", str(tmp_path), *extra],
        )

    int8 = ["-p", "int8", "--calib", "synthetic", "--calib-samples", "8", "--no-eval"]
    for extra, message in (
        (["--keep-float", "nope"], "--keep-float names layers the fused graph lacks: nope"),
        (["--keep-float", "node_conv2d", "--quantizer", "nncf"], "--keep-float edits"),
    ):
        result = export(*int8, *extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert not (tmp_path / "outlier_net" / "onnxruntime-int8" / "report.json").exists()
    assert export().exit_code == 0
    fp32 = tmp_path / "outlier_net" / "onnxruntime-fp32"
    result = export(*int8, "--keep-float", str(fp32))
    assert result.exit_code == 2 and "is not a deploykit INT8 run" in result.output
    other = CliRunner().invoke(
        main,
        ["export", "tinynets:tiny_net", "-t", "onnxruntime", *int8, "--keep-float", str(fp32)]
        + ["-o", str(tmp_path)],
    )
    assert other.exit_code == 2, other.output
    assert "is a run of outlier_net, not tiny_net" in other.output
    # Float on purpose is not a failed INT8 build: the precision gate counts the
    # integer kernels left (ONNX Runtime: 2 of outlier_net's 4 layers in float).
    kept = export(*int8, "--keep-float", "node_conv2d_1,node_conv2d_2")
    assert kept.exit_code == 0, kept.output
    report = api.load_report(tmp_path / "outlier_net" / "onnxruntime-int8")
    gate = next(g for g in report.gates if g.name == "precision")
    assert gate.passed and "(2 kept in float by --keep-float)" in gate.detail, gate.detail
