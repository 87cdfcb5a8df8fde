"""The coverage matrix, BatchNorm re-estimation, and the grouped/depthwise guarantees.

A representative subset of the small matrix (depthwise, grouped + channel
shuffle, fire modules, a trained net) runs through the `coverage` command itself
in every test run; the whole small matrix (every row, 2-7 minutes on 2 cores) runs
through the library with -m slow or DEPLOYKIT_SLOW=1; both are compared with the
recorded run in tests/golden/coverage.json. docs/coverage.md must be the rendering
of that recorded run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deploykit.harness import coverage as cov
from deploykit.harness import coverage_cell
from deploykit.harness.coverage_report import bounded_weights_xfail
from deploykit.models.contract import InputContract
from deploykit.stages import bnrecal

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "coverage.json"
DOC = ROOT / "docs" / "coverage.md"
# Depthwise + BN re-estimation, grouped + channel shuffle, fire modules, trained weights.
SUBSET = [
    "mobilenet_v2_small",
    "conv_shuffled_grouped",
    "squeezenet1_1_small",
    "fmnist_mobilenet_v1",
]
CPU_BACKENDS = ("onnxruntime", "openvino")


def _golden() -> dict[str, Any]:
    return cov.load_coverage(GOLDEN)


def _options(models: list[str] | None, keep: str | None = None) -> cov.CoverageOptions:
    golden = _golden()["options"]
    return cov.CoverageOptions(
        models=models,
        fidelity_samples=golden["fidelity_samples"],
        eval_samples=golden["eval_samples"],
        calib_samples=golden["calib_samples"],
        bn_samples=golden["bn_samples"],
        latency_runs=2,
        jobs=2,
        threads=golden["threads"],
        seed=golden["seed"],
        keep=keep,
    )


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Any], Path]:
    """The subset through the command itself: (click result, its JSON, its folder)."""
    from click.testing import CliRunner

    from deploykit.cli import main

    folder = tmp_path_factory.mktemp("coverage")
    golden = _golden()["options"]
    args = ["coverage", *SUBSET, "--latency-runs", "2", "--keep", str(folder / "keep")]
    for name in ("fidelity_samples", "eval_samples", "calib_samples", "bn_samples", "seed"):
        args += [f"--{name.replace('_', '-')}", str(golden[name])]
    args += ["--output", str(folder / "c.json"), "--markdown", str(folder / "c.md")]
    result = CliRunner().invoke(main, args)
    doc = json.loads((folder / "c.json").read_text())
    doc["subset"] = True
    return result, doc, folder


@pytest.fixture(scope="module")
def subset_doc(subset_run: tuple[Any, dict[str, Any], Path]) -> dict[str, Any]:
    return subset_run[1]


def _row(doc: dict[str, Any], model: str) -> dict[str, Any]:
    return next(r for r in doc["rows"] if r["model"] == model)


# -- BatchNorm re-estimation -----------------------------------------------------------------


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(y.mean(dim=(2, 3)))


def test_bn_recalibration_is_the_cumulative_average_over_all_inputs() -> None:
    torch.manual_seed(0)
    model = _ConvBn().eval()
    contract = InputContract(height=16, width=16, resize=16)
    data, choice = bnrecal.recalibration_data(None, contract, 20)
    assert choice == "natural images"
    layers, count = bnrecal.recalibrate_batchnorm(model, data.inputs, batch=8)
    assert (layers, count) == (1, 20)
    with torch.no_grad():
        conv = model.conv(torch.from_numpy(data.inputs)).double()
    # Batches of 8 and 12 (the remainder joins the last batch): average of the batch means.
    chunks = [conv[0:8], conv[8:20]]
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    variances = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    assert torch.allclose(model.bn.running_mean.double(), means, rtol=1e-4, atol=1e-5)
    assert torch.allclose(model.bn.running_var.double(), variances, rtol=1e-4, atol=1e-5)
    assert not model.training and not model.bn.training
    assert model.bn.momentum == 0.1  # restored
    assert int(model.bn.num_batches_tracked) == 2


def test_bn_recalibration_gives_vanishing_random_models_a_realistic_scale() -> None:
    from deploykit.models.loaders import load_torch, resolve

    source, contract = resolve("mobilenet_v2", input_size=(32, 32))
    model = load_torch(source)
    x = torch.from_numpy(bnrecal.recalibration_data(None, contract, 4)[0].inputs)
    with torch.no_grad():
        before = float(model(x).abs().max())
    report = bnrecal.recalibrate_model(model, "mobilenet_v2", contract, samples=32)
    with torch.no_grad():
        after = float(model(x).abs().max())
    assert before < 1e-6 < 0.05 < after < 100  # measured: ~1e-9 before, ~1 after
    assert report.applied and report.layers == 52 and report.weights_label == bnrecal.WEIGHTS_LABEL
    assert report.data["source"] == "natural-images-calib"


def test_bn_recalibration_data_falls_back_to_synthetic_with_the_reason() -> None:
    contract = InputContract(
        channels=4, height=8, width=8, resize=8, mean=(0.5,) * 4, std=(0.5,) * 4
    )
    data, choice = bnrecal.recalibration_data(None, contract, 4)
    assert data.source == "synthetic" and "4-channel" in choice
    model = nn.Sequential(nn.Conv2d(3, 4, 1))
    report = bnrecal.recalibrate_model(model, None, InputContract(height=8, width=8), samples=4)
    assert not report.applied and report.note == "no BatchNorm layers"
    assert report.weights_label == "random"


def test_export_records_bn_recalibration_in_the_report(tmp_path: Path) -> None:
    from deploykit import api

    common = dict(
        model="tinynets:tiny_net",
        target="onnxruntime",
        runs=2,
        warmup=1,
        min_seconds=0.0,
        fidelity_samples=4,
        input_size=(32, 32),
    )
    result = api.export(
        api.ExportRequest(**common, out=str(tmp_path / "a"), bn_recalibrate=True)  # type: ignore[arg-type]
    )
    report = result.report
    assert report.weights == "random, bn-recalibrated"
    stage = next(s for s in report.stages if s.name == "bn-recalibration")
    assert stage.details["layers"] == 3 and stage.details["data_choice"] == "natural images"
    assert report.status == "ok"
    off = api.export(api.ExportRequest(**common, out=str(tmp_path / "b")))  # type: ignore[arg-type]  # off by default
    assert off.report.weights == "random"
    assert not any(s.name == "bn-recalibration" for s in off.report.stages)


# -- the matrix: representative subset -------------------------------------------------------


def test_subset_matches_the_recorded_run(subset_doc: dict[str, Any]) -> None:
    assert cov.check_against_golden(subset_doc, _golden()) == []


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp32_cells_pass_against_pytorch(subset_doc: dict[str, Any], backend: str) -> None:
    for row in subset_doc["rows"]:
        cell = row["cells"][f"{backend}/fp32"]
        assert cell["status"] == "pass", (row["model"], cell)
        assert cell["fidelity"]["cosine"] >= cov.FP32_MIN_COSINE
    torch_cells = [row["cells"]["torch/fp32"] for row in subset_doc["rows"]]
    assert all(c["status"] == "pass" for c in torch_cells)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_cells_run_in_int8(subset_doc: dict[str, Any], backend: str) -> None:
    for row in subset_doc["rows"]:
        cell = row["cells"][f"{backend}/int8"]
        assert cell["effective_precision"] == "int8", (row["model"], cell)
        assert cell["finite"]
        if row["weights"] == "trained":
            assert cell["status"] == "pass" and cell["accuracy_drop"] <= cell["accuracy_budget"]
        elif cell["status"] == "pass":
            assert cell["vs_fp32"]["cosine"] >= cov.INT8_MIN_COSINE
        else:  # explained: a chaotic random network, or a recorded known issue
            assert cell["status"] == "xfail"
            assert row["noise_gain"] > cov.CHAOTIC_GAIN or "known_issue" in cell


def test_noise_gain_separates_trained_from_chaotic_random_networks(
    subset_doc: dict[str, Any],
) -> None:
    gains = {row["model"]: row["noise_gain"] for row in subset_doc["rows"]}
    assert gains["fmnist_mobilenet_v1"] < cov.CHAOTIC_GAIN / 2  # trained
    assert gains["conv_shuffled_grouped"] < 1.0  # one random block does not amplify
    assert gains["mobilenet_v2_small"] > 10 * cov.CHAOTIC_GAIN  # 52 random BN layers: ~60x


@pytest.mark.xfail(
    strict=True,
    reason="random-weight MobileNet v2 amplifies input perturbations ~60x (trained networks "
    "<= 1.85x): its INT8 logits cannot follow FP32 (cosine ~0.6); not a backend bug",
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_cosine_of_random_weight_mobilenet_v2(
    subset_doc: dict[str, Any], backend: str
) -> None:
    cell = _row(subset_doc, "mobilenet_v2_small")["cells"][f"{backend}/int8"]
    assert cell["vs_fp32"]["cosine"] >= cov.INT8_MIN_COSINE


def test_depthwise_convs_stay_single_nodes_with_per_channel_int8_scales(
    subset_doc: dict[str, Any],
) -> None:
    row = _row(subset_doc, "mobilenet_v2_small")
    structure = row["fuse"]["structure"]
    # MobileNet v2: one depthwise 3x3 per inverted residual block (17), none split.
    assert structure["depthwise_convs"] == row["structure_torch"]["depthwise"] == 17
    assert structure["convs"] == row["structure_torch"]["convs"]
    assert structure["depthwise_group_ok"] and row["fuse"]["structure_ok"]
    for scales in row["int8"]["encodings"].values():  # one Q/DQ model per encoding
        assert scales["depthwise_per_channel"] == 17 and scales["depthwise_per_tensor"] == 0
    assert row["weights"] == "random, bn-recalibrated"


def test_channel_shuffle_is_one_reshape_transpose_reshape_chain(
    subset_doc: dict[str, Any],
) -> None:
    row = _row(subset_doc, "conv_shuffled_grouped")
    structure = row["fuse"]["structure"]
    assert structure["channel_shuffles"] == 1
    # The one Transpose is the shuffle's; no Gather/Slice/Split decomposition of it.
    ops = row["fuse"]["ops"]
    assert ops.get("Transpose") == 1 and not {"Gather", "Slice", "Split"} & set(ops)
    assert structure["grouped_convs"] == row["structure_torch"]["grouped"] >= 1


def test_graph_structure_counts_a_depthwise_conv_split_into_per_channel_convs() -> None:
    import onnx
    from onnx import TensorProto, helper

    def conv(name: str, inp: str, out: str, cin: int, cout: int, group: int) -> Any:
        weight = helper.make_tensor(
            f"{name}.w",
            TensorProto.FLOAT,
            [cout, cin // group, 3, 3],
            [0.0] * (cout * cin // group * 9),
        )
        node = helper.make_node("Conv", [inp, f"{name}.w"], [out], group=group, pads=[1] * 4)
        return node, weight

    whole, w = conv("dw", "x", "y", 4, 4, 4)
    graph = helper.make_graph(
        [whole],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [w],
    )
    st = cov.graph_structure(onnx.helper.make_model(graph))
    assert (st["convs"], st["depthwise_convs"], st["depthwise_group_ok"]) == (1, 1, True)
    # The same depthwise conv as four single-channel convs: no longer depthwise at all.
    nodes, weights = [], []
    for c in range(4):
        node, weight = conv(f"c{c}", f"x{c}", f"y{c}", 1, 1, 1)
        nodes.append(node)
        weights.append(weight)
    split = helper.make_graph(nodes, "s", [], [], weights)
    st = cov.graph_structure(onnx.helper.make_model(split))
    assert (st["convs"], st["depthwise_convs"]) == (4, 0)


def _per_tensor_vs_per_channel(keep: Path, model: str) -> dict[str, float]:
    """INT8 (u8s8) logits cosine against FP32 with per-channel and per-tensor weight scales.

    The scales alone: no bias correction, and nearest rounding (GPTQ compensates much of
    what per-tensor scales cost: on random-weight mobilenet_v2_small it lifted per-tensor
    to 0.8625 against per-channel's 0.8574).
    """
    from deploykit.harness.fidelity import compare_outputs
    from deploykit.models.loaders import resolve
    from deploykit.stages.calibrate import CalibrationOptions, calibrate_onnx
    from deploykit.stages.onnxcheck import OrtSession

    folder = next(keep.glob(f"*-{model}"))
    fused = folder / "model.fused.onnx"
    source, contract = resolve(model)
    data, _ = bnrecal.recalibration_data(model, contract, 32)
    options = cov.CoverageOptions(eval_samples=300, fidelity_samples=16)
    inputs = coverage_cell._eval_inputs(model, contract, options, not source.random_weights)[0]
    reference = OrtSession(fused).run
    ref = np.concatenate([reference(inputs[i : i + 1]) for i in range(len(inputs))])
    result = {}
    for per_channel in (True, False):
        path = folder / f"model.int8.pc{int(per_channel)}.onnx"
        calibrate_onnx(
            fused,
            path,
            data,
            CalibrationOptions(
                encoding="u8s8",
                per_channel=per_channel,
                bias_correction=False,
                weight_rounding="nearest",
            ),
        )
        run = OrtSession(path).run
        out = np.concatenate([run(inputs[i : i + 1]) for i in range(len(inputs))])
        result["per-channel" if per_channel else "per-tensor"] = compare_outputs(
            ref, out
        ).cosine_mean
    return result


@pytest.mark.parametrize("model", ["fmnist_mobilenet_v1", "mobilenet_v2_small"])
def test_per_channel_depthwise_scales_agree_at_least_as_well_as_per_tensor(
    subset_doc: dict[str, Any], model: str
) -> None:
    found = _per_tensor_vs_per_channel(Path(subset_doc["options"]["keep"]), model)
    print(model, found)
    assert found["per-channel"] >= found["per-tensor"] - 1e-3, found


# -- the recorded run, the document, the command ----------------------------------------------


def test_docs_coverage_md_is_the_rendering_of_the_recorded_run() -> None:
    golden = _golden()
    assert DOC.read_text() == cov.render_markdown(golden, golden["command"])
    assert "--output tests/golden/coverage.json" in golden["command"]
    assert "--markdown docs/coverage.md" in golden["command"]


def test_recorded_run_meets_the_acceptance() -> None:
    golden = _golden()
    assert golden["variant"] == "small"
    from deploykit.models.zoo import coverage_rows

    assert [r["model"] for r in golden["rows"]] == [r.small for r in coverage_rows()]
    for row in golden["rows"]:
        for backend in CPU_BACKENDS:
            fp32 = row["cells"][f"{backend}/fp32"]
            assert fp32["status"] == "pass", (row["model"], backend, fp32)
            int8 = row["cells"][f"{backend}/int8"]
            assert int8["status"] in ("pass", "xfail"), (row["model"], backend, int8)
            assert int8.get("effective_precision") == "int8"


def test_command_exits_0_and_writes_the_json_and_the_matrix(
    subset_run: tuple[Any, dict[str, Any], Path],
) -> None:
    result, doc, folder = subset_run
    assert result.exit_code == 0, result.output
    assert doc["variant"] == "named" and [r["model"] for r in doc["rows"]] == SUBSET
    text = (folder / "c.md").read_text()
    assert text == cov.render_markdown(doc, doc["command"])
    assert "Generated by `deploykit coverage mobilenet_v2_small" in text
    for row in doc["rows"]:
        assert row["cells"]["tensorrt/fp32"]["status"] == "unavailable"
        assert row["cells"]["tensorrt/fp32"]["error"].startswith("unavailable: ")
        assert "torch/int8" not in row["cells"]  # the eager baseline runs fp32 only
    assert (folder / "keep" / "001-mobilenet_v2_small" / "model.fused.onnx").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["conv_grouped_g2", "--precisions", "fp16"], "unknown precision"),
        (["conv_grouped_g2", "--backends", "tensorrtt"], "unknown target"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, cli_env: dict[str, str]
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "deploykit", "coverage", *args],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_full_matrix_selects_the_full_size_models() -> None:
    from deploykit.models.catalogue import get_model_spec
    from deploykit.models.zoo import coverage_rows

    rows = cov.select_rows(cov.CoverageOptions(full=True))
    assert [r.model for r in rows] == [r.full for r in coverage_rows() if r.full]
    assert {"mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1"} <= {r.model for r in rows}
    for row in rows:
        get_model_spec(row.model)


# -- the whole small matrix ------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_small_doc() -> dict[str, Any]:
    return cov.run_coverage(_options(None))


@pytest.mark.slow
def test_small_matrix_matches_the_recorded_run(full_small_doc: dict[str, Any]) -> None:
    assert cov.check_against_golden(full_small_doc, _golden()) == []


def _int8_xfail_params() -> list[Any]:
    if not GOLDEN.is_file():  # test_docs_coverage_md_... fails with the reason
        return []
    params = []
    for row in _golden()["rows"]:
        for backend in CPU_BACKENDS:
            cell = row["cells"][f"{backend}/int8"]
            if row["weights"] == "trained":
                continue
            marks = []
            if cell["status"] == "xfail":
                reason = cell.get("known_issue") or cell["error"]
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(
                pytest.param(row["model"], backend, marks=marks, id=f"{row['model']}-{backend}")
            )
    return params


@pytest.mark.slow
@pytest.mark.parametrize(("model", "backend"), _int8_xfail_params())
def test_int8_cosine_on_random_weight_rows(
    full_small_doc: dict[str, Any], model: str, backend: str
) -> None:
    cell = _row(full_small_doc, model)["cells"][f"{backend}/int8"]
    golden = _golden()
    expected = _row(golden, model)["cells"][f"{backend}/int8"]["status"]
    if bounded_weights_xfail(cell, expected, full_small_doc, golden):
        pytest.xfail(f"bounded INT8 weights on a CPU without VNNI: {cell['error']}")
    assert cell["vs_fp32"]["cosine"] >= cov.INT8_MIN_COSINE, cell
