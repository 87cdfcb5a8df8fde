"""The shared backend suite: every installed CPU backend compiles small emphasis models,
runs them, and matches the FP32 PyTorch model; artifacts reload from their folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.backends.base import BatchRange, CompiledArtifact, CompileOptions
from deploykit.backends.registry import get_backend
from deploykit.harness.evaluate import run_batched
from deploykit.harness.fidelity import PRECISION_TOLERANCE, compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource, load_torch, resolve
from deploykit.stages.export import ExportOptions, export_onnx
from deploykit.stages.fuse import fuse_onnx

# Small emphasis models at a small input size: depthwise/grouped convs, channel shuffle,
# squeeze-excite and fire modules, all in a few seconds each.
MODELS = [("squeezenet1_1", 64), ("mobilenet_v3_small", 64), ("shufflenet_v2_x0_5", 64)]
BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("onnxruntime", id="onnxruntime", marks=pytest.mark.onnxruntime),
    pytest.param("openvino", id="openvino", marks=pytest.mark.openvino),
]


@dataclass
class Prepared:
    source: ModelSource
    contract: InputContract
    module: torch.nn.Module
    fused_onnx: Path


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Prepared]:
    return {}


def _prepare(
    cache: dict[tuple[str, bool], Prepared],
    name: str,
    size: int,
    dynamic: bool,
    root: Path,
) -> Prepared:
    key = (name, dynamic)
    if key not in cache:
        source, contract = resolve(name, input_size=(size, size))
        module = load_torch(source)
        folder = root / f"{name}-{'dyn' if dynamic else 'static'}"
        folder.mkdir()
        options = ExportOptions(
            batch=2, dynamic_batch=BatchRange.parse("1:2:4") if dynamic else None
        )
        onnx_art = export_onnx(module, contract, folder / "model.onnx", options)
        fused, report = fuse_onnx(
            onnx_art, folder / "model.fused.onnx", contract, options.check_batches()
        )
        assert report.applied, report.note
        cache[key] = Prepared(source, contract, module, fused.path)
    return cache[key]


def _reference(prep: Prepared, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return prep.module(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize(("model", "size"), MODELS)
def test_backend_matches_pytorch(
    backend_name: str,
    model: str,
    size: int,
    prepared: dict[tuple[str, bool], Prepared],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    prep = _prepare(prepared, model, size, False, tmp_path_factory.getbasetemp())
    backend = get_backend(backend_name)
    options = CompileOptions(precision="fp32", threads=2, batch=2)
    artifact = backend.compile(prep.fused_onnx, tmp_path, prep.contract, options, prep.source)
    artifact.save()
    assert artifact.effective_precision == "fp32"
    assert artifact.threads == 2
    x = synthetic_images(prep.contract, 8, seed=5)
    ref = np.concatenate([_reference(prep, x[i : i + 2]) for i in range(0, 8, 2)])
    with backend.runner(artifact) as runner:
        got = np.concatenate([runner.infer(x[i : i + 2]) for i in range(0, 8, 2)])
        runner.prepare(x[:2])
        runner.run_prepared()
    fid = compare_outputs(ref, got)
    assert not PRECISION_TOLERANCE["fp32"].violations(fid), fid
    assert fid.top1_agreement == 1.0

    # The artifact folder alone is enough to run it again (what `deploykit bench` does).
    reloaded = CompiledArtifact.load(artifact.folder)
    assert reloaded.contract == prep.contract
    with backend.runner(reloaded) as runner:
        again = runner.infer(x[:2])
    np.testing.assert_allclose(again, got[:2], rtol=1e-4, atol=1e-5 * float(np.abs(got).max()))


@pytest.mark.parametrize(
    "backend_name",
    [
        pytest.param("onnxruntime", marks=pytest.mark.onnxruntime),
        pytest.param("openvino", marks=pytest.mark.openvino),
    ],
)
def test_dynamic_batch_runs_every_batch_in_range(
    backend_name: str,
    prepared: dict[tuple[str, bool], Prepared],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    prep = _prepare(prepared, "shufflenet_v2_x0_5", 64, True, tmp_path_factory.getbasetemp())
    backend = get_backend(backend_name)
    options = CompileOptions(threads=2, batch=2, dynamic_batch=BatchRange.parse("1:2:4"))
    artifact = backend.compile(prep.fused_onnx, tmp_path, prep.contract, options, prep.source)
    with backend.runner(artifact) as runner:
        for batch in (1, 3, 4):
            x = synthetic_images(prep.contract, batch, seed=batch)
            fid = compare_outputs(_reference(prep, x), runner.infer(x))
            assert not PRECISION_TOLERANCE["fp32"].violations(fid), (batch, fid)


@pytest.mark.openvino
def test_openvino_pins_fp32_and_records_settings(
    prepared: dict[tuple[str, bool], Prepared],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    prep = _prepare(prepared, "squeezenet1_1", 64, False, tmp_path_factory.getbasetemp())
    artifact = get_backend("openvino").compile(
        prep.fused_onnx, tmp_path, prep.contract, CompileOptions(threads=1), prep.source
    )
    assert artifact.settings["INFERENCE_PRECISION_HINT"] == "f32"
    assert artifact.settings["INFERENCE_NUM_THREADS"] == 1
    assert artifact.info["inference_precision_hint"] == "f32"
    assert set(artifact.info["compute_layer_precisions"]) == {"f32"}
    # The IR keeps FP32 weights (save_model would compress them to FP16 by default).
    import openvino as ov

    ir = ov.Core().read_model(str(artifact.folder / "model.xml"))
    const_types = {
        op.get_output_element_type(0).get_type_name()
        for op in ir.get_ops()
        if op.get_type_name() == "Constant" and op.get_output_element_type(0).is_real()
    }
    assert const_types == {"f32"}


@pytest.mark.openvino
def test_openvino_bf16_is_its_own_precision(
    prepared: dict[tuple[str, bool], Prepared],
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    backend = get_backend("openvino")
    if "bf16" not in backend.capabilities().precisions:
        pytest.skip("this CPU has no bf16 support in OpenVINO")
    prep = _prepare(prepared, "squeezenet1_1", 64, False, tmp_path_factory.getbasetemp())
    artifact = backend.compile(
        prep.fused_onnx,
        tmp_path,
        prep.contract,
        CompileOptions(precision="bf16", batch=2),
        prep.source,
    )
    assert artifact.effective_precision == "bf16"
    x = synthetic_images(prep.contract, 4, seed=1)
    with backend.runner(artifact) as runner:
        fid = compare_outputs(_reference(prep, x), run_batched(runner.infer, x, 2))
    assert not PRECISION_TOLERANCE["bf16"].violations(fid), fid
    assert fid.rel_err > 1e-6  # really computed in a lower precision


def test_tensorrt_is_unavailable_with_a_reason() -> None:
    availability = get_backend("tensorrt").is_available()
    if availability.ok:
        pytest.skip("TensorRT is installed here")
    assert availability.reason and availability.fix
