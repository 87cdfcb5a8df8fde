"""Fuse stage: onnxslim folds Conv+BN and constants, and the result is proven equivalent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from deploykit.harness.fidelity import compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.stages.export import ExportOptions, OnnxArtifact, export_onnx
from deploykit.stages.fuse import fuse_onnx
from deploykit.stages.onnxcheck import OrtSession, op_counts

pytestmark = pytest.mark.onnxruntime

CONTRACT = InputContract(height=32, width=32, num_classes=10)


def _conv_bn_model(path: Path) -> OnnxArtifact:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool, as a non-PyTorch tool writes it.

    (Both torch.onnx exporters fold BatchNorm themselves in eval mode; ONNX files from
    other tools often keep it.)
    """
    import onnx.helper as h
    from onnx import numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, array: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(array.astype(np.float32), name)

    nodes = [
        h.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
        h.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
        h.make_node("Relu", ["bn"], ["r"]),
        h.make_node("GlobalAveragePool", ["r"], ["g"]),
        h.make_node("Flatten", ["g"], ["output"]),
    ]
    inits = [
        init("w", rng.normal(0, 0.2, (8, 3, 3, 3))),
        init("s", rng.uniform(0.5, 1.5, 8)),
        init("b", rng.uniform(-0.2, 0.2, 8)),
        init("m", rng.uniform(-0.5, 0.5, 8)),
        init("v", rng.uniform(0.5, 2.0, 8)),
    ]
    graph = h.make_graph(
        nodes,
        "conv_bn",
        [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 32, 32])],
        [h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return OnnxArtifact(path=path, opset=18, input_name="input", op_counts=op_counts(model))


def test_conv_bn_folded_and_counts_reported(tmp_path: Path) -> None:
    source = _conv_bn_model(tmp_path / "model.onnx")
    fused, report = fuse_onnx(source, tmp_path / "fused.onnx", CONTRACT, [1, 4])
    assert report.applied, report.note
    assert report.ops_before["BatchNormalization"] == 1
    assert "BatchNormalization" not in report.ops_after
    assert report.ops_after["Conv"] == 1
    data = report.to_dict()
    assert data["nodes_after"] < data["nodes_before"]
    assert [c["batch"] for c in report.checks] == [1, 4]
    assert all(c["cosine"] > 0.99999 for c in report.checks)
    assert fused.path.is_file() and fused.op_counts == report.ops_after
    onnx.checker.check_model(onnx.load(str(fused.path)))
    # Independently of the stage's own check: same outputs on fresh inputs.
    x = synthetic_images(CONTRACT, 3, seed=42)
    fid = compare_outputs(OrtSession(source.path).run(x), OrtSession(fused.path).run(x))
    assert fid.cosine > 0.99999 and fid.rel_err < 1e-4


def test_pytorch_export_then_fuse(tmp_path: Path) -> None:
    from tinynets import tiny_net

    exported = export_onnx(
        tiny_net(), CONTRACT, tmp_path / "model.onnx", ExportOptions(exporter="torchscript")
    )
    _fused, report = fuse_onnx(exported, tmp_path / "fused.onnx", CONTRACT, [1])
    assert report.applied, report.note
    assert sum(report.ops_after.values()) <= sum(report.ops_before.values())
    assert "Constant" not in report.ops_after  # constants folded into initializers


def _relu_model(op: str) -> onnx.ModelProto:
    import onnx.helper as h

    graph = h.make_graph(
        [h.make_node(op, ["input"], ["output"])],
        "g",
        [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 32, 32])],
        [h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", 3, 32, 32])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])


@pytest.mark.parametrize("failure", ["raises", "changes numerics"])
def test_a_bad_fusion_is_never_used(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the simplifier fails or changes the numbers, the source graph is kept, with a note."""
    import onnxslim

    def broken_slim(model: onnx.ModelProto, *args: object, **kwargs: object) -> onnx.ModelProto:
        if failure == "raises":
            raise RuntimeError("cannot simplify")
        return _relu_model("Sigmoid")

    monkeypatch.setattr(onnxslim, "slim", broken_slim)
    src = tmp_path / "relu.onnx"
    onnx.save(_relu_model("Relu"), str(src))
    art = OnnxArtifact(path=src, opset=18, input_name="input")
    fused, report = fuse_onnx(art, tmp_path / "fused.onnx", CONTRACT, [2])
    assert not report.applied
    assert ("onnxslim failed" if failure == "raises" else "differs from its source") in report.note
    assert report.ops_after == {"Relu": 1}
    assert fused.path.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused.onnx", "relu.onnx"]
