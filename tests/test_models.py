"""Model catalogue, input contracts and loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deploykit.errors import ModelNotFoundError, WeightsError
from deploykit.models.catalogue import get_model_spec, list_models
from deploykit.models.contract import IMAGENET_MEAN, IMAGENET_STD, InputContract
from deploykit.models.loaders import RANDOM_WEIGHTS_NOTE, load_torch, resolve


def test_catalogue_holds_every_torchvision_classifier() -> None:
    import torchvision

    names = {spec.name for spec in list_models()}
    expected = set(torchvision.models.list_models(module=torchvision.models))
    assert expected <= names
    assert len(expected) >= 80


def test_emphasis_models_come_first() -> None:
    names = [spec.name for spec in list_models()]
    emphasis = ["mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_1"]
    last_emphasis = max(names.index(n) for n in emphasis)
    for classic in ("resnet50", "vgg16", "alexnet", "densenet121", "inception_v3"):
        assert names.index(classic) > last_emphasis
    assert names.index("resnext50_32x4d") < names.index("vit_b_16")


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet50", 224), ("inception_v3", 299), ("mobilenet_v2", 224), ("efficientnet_b3", 300)],
)
def test_contract_comes_from_the_weights_metadata(name: str, size: int) -> None:
    contract = get_model_spec(name).contract
    assert contract.shape(2) == (2, 3, size, size)
    assert contract.mean == pytest.approx(IMAGENET_MEAN)
    assert contract.std == pytest.approx(IMAGENET_STD)
    assert contract.num_classes == 1000
    assert contract.layout == "NCHW"


def test_contract_round_trip_and_resize() -> None:
    contract = get_model_spec("squeezenet1_1").contract.with_size(96, 128)
    again = InputContract.from_dict(contract.to_dict())
    assert again == contract
    assert again.shape(1) == (1, 3, 96, 128)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelNotFoundError, match="did you mean resnet50"):
        resolve("resnet05")


def test_catalogue_model_is_seeded_and_marked_random() -> None:
    source, _ = resolve("squeezenet1_1", seed=3)
    assert source.random_weights
    assert RANDOM_WEIGHTS_NOTE == "random weights: fidelity only, not accuracy"
    a = load_torch(source)
    b = load_torch(source)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not a.training


def test_weights_file_is_loaded_strictly(tmp_path: Path) -> None:
    source, _ = resolve("tinynets:tiny_net")
    model = load_torch(source)
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    good = tmp_path / "tiny.pt"
    torch.save(state, good)
    loaded_source, _ = resolve("tinynets:tiny_net", weights=good)
    assert not loaded_source.random_weights
    assert loaded_source.weights_sha256 and len(loaded_source.weights_sha256) == 64
    loaded = load_torch(loaded_source)
    assert torch.equal(loaded.classifier.weight, state["classifier.weight"])

    bad = tmp_path / "bad.pt"
    torch.save({"classifier.weight": torch.zeros(3, 3)}, bad)
    wrong, _ = resolve("tinynets:tiny_net", weights=bad)
    with pytest.raises(WeightsError, match="tiny_net"):
        load_torch(wrong)


def test_missing_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        resolve("resnet18", weights=tmp_path / "nope.pt")


def test_torchscript_and_exported_program_files(tmp_path: Path) -> None:
    from tinynets import tiny_net

    model = tiny_net()
    example = torch.randn(1, 3, 64, 48)
    ts = tmp_path / "tiny.ts"
    torch.jit.trace(model, example).save(str(ts))
    pt2 = tmp_path / "tiny.pt2"
    torch.export.save(torch.export.export(model, (example,)), str(pt2))

    ts_source, _ = resolve(str(ts), input_size=(64, 48))
    assert ts_source.kind == "torchscript" and not ts_source.random_weights
    pt2_source, pt2_contract = resolve(str(pt2))
    assert pt2_source.kind == "exported_program"
    assert pt2_contract.shape(1) == (1, 3, 64, 48)
    expected = model(example)
    with torch.inference_mode():
        assert torch.allclose(load_torch(ts_source)(example), expected, atol=1e-5)
        assert torch.allclose(load_torch(pt2_source)(example), expected, atol=1e-5)


def test_weights_with_a_self_contained_file_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "m.onnx"
    f.write_bytes(b"x")
    w = tmp_path / "w.pt"
    w.write_bytes(b"x")
    with pytest.raises(WeightsError, match="already holds its weights"):
        resolve(str(f), weights=w)
