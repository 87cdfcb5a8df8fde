"""Export stage: both exporters, fallback, dynamic batch, numeric checks and opset errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.backends.base import BatchRange
from deploykit.errors import DeployKitError, UserError
from deploykit.harness.fidelity import compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.stages.export import ExportOptions, export_onnx
from deploykit.stages.onnxcheck import OrtSession, load_onnx

pytestmark = pytest.mark.onnxruntime

CONTRACT = InputContract(height=32, width=32, num_classes=10)


def _torch_out(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_each_exporter_matches_pytorch(exporter: str, tmp_path: Path) -> None:
    from tinynets import tiny_net

    model = tiny_net()
    out = tmp_path / "model.onnx"
    art = export_onnx(model, CONTRACT, out, ExportOptions(exporter=exporter, batch=2))
    assert art.exporter == exporter and art.path == out and out.is_file()
    assert art.opset == 18
    assert [a["ok"] for a in art.attempts] == [True]
    assert art.checks and art.checks[0]["batch"] == 2 and art.checks[0]["cosine"] > 0.99999
    assert "Conv" in art.op_counts
    # No temporary files left beside the result.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    # Independent check: ORT on the file vs PyTorch on fresh inputs.
    x = synthetic_images(CONTRACT, 2, seed=123)
    fid = compare_outputs(_torch_out(model, x), OrtSession(out).run(x))
    assert fid.cosine > 0.99999


def test_dynamic_batch_is_checked_at_min_opt_max(tmp_path: Path) -> None:
    from tinynets import tiny_net

    rng = BatchRange.parse("1:4:16")
    art = export_onnx(
        tiny_net(), CONTRACT, tmp_path / "m.onnx", ExportOptions(batch=1, dynamic_batch=rng)
    )
    assert [c["batch"] for c in art.checks] == [1, 4, 16]
    session = OrtSession(art.path)
    for batch in (1, 3, 16):
        assert session.run(synthetic_images(CONTRACT, batch)).shape == (batch, 10)
    graph_input = load_onnx(art.path).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # symbolic batch


def test_baked_batch_graph_is_rejected_with_numbers(tmp_path: Path) -> None:
    from tinynets import baked_batch_net

    options = ExportOptions(exporter="torchscript", dynamic_batch=BatchRange.parse("1:2:8"))
    with pytest.raises(DeployKitError, match="batch 8") as info:
        export_onnx(baked_batch_net(), CONTRACT, tmp_path / "m.onnx", options)
    assert "torchscript" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_baked_batch_model_exports_with_dynamo(tmp_path: Path) -> None:
    from tinynets import baked_batch_net

    options = ExportOptions(dynamic_batch=BatchRange.parse("1:2:8"))
    art = export_onnx(baked_batch_net(), CONTRACT, tmp_path / "m.onnx", options)
    assert art.exporter == "dynamo"
    assert [c["batch"] for c in art.checks] == [1, 2, 8]


def test_falls_back_to_torchscript_and_records_why(tmp_path: Path) -> None:
    from tinynets import data_dependent_net

    art = export_onnx(data_dependent_net(), CONTRACT, tmp_path / "m.onnx", ExportOptions())
    assert art.exporter == "torchscript"
    assert [a["exporter"] for a in art.attempts] == ["dynamo", "torchscript"]
    assert not art.attempts[0]["ok"] and art.attempts[0]["error"]
    assert art.attempts[1]["ok"]


@pytest.mark.parametrize(
    ("exporter", "opset", "usable"),
    [
        ("auto", 18, ["dynamo", "torchscript"]),
        ("auto", 13, ["torchscript"]),
        ("auto", 22, ["dynamo"]),
        ("dynamo", 17, None),
        ("auto", 5, None),
        ("auto", 99, None),
        ("onnx2", 18, None),
    ],
)
def test_opset_and_exporter_choice(exporter: str, opset: int, usable: list[str] | None) -> None:
    options = ExportOptions(opset=opset, exporter=exporter)
    if usable is None:
        with pytest.raises(UserError):
            options.order()
    else:
        assert options.order() == usable


def test_older_opset_with_torchscript(tmp_path: Path) -> None:
    from tinynets import tiny_net

    art = export_onnx(tiny_net(), CONTRACT, tmp_path / "m.onnx", ExportOptions(opset=13))
    assert art.exporter == "torchscript" and art.opset == 13
    assert load_onnx(art.path).opset_import[0].version == 13


def test_model_that_fails_on_its_contract_is_a_user_error(tmp_path: Path) -> None:
    from tinynets import tiny_net

    wrong = InputContract(channels=1, height=32, width=32, mean=(0.5,), std=(0.5,))
    with pytest.raises(UserError, match="fails on input"):
        export_onnx(tiny_net(), wrong, tmp_path / "m.onnx", ExportOptions())
