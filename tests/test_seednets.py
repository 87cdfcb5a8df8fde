"""The seed family: Fashion-MNIST networks shipped with trained weights.

Checks that each catalogue entry loads its shipped weights strictly and by
digest, that the weights still reach their logged accuracy on official test
images preprocessed by deploykit itself, that each architecture really belongs
to its family, and that the Fashion-MNIST reader refuses damaged files.
"""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from deploykit.errors import UserError, WeightsError
from deploykit.fsutil import sha256_file
from deploykit.harness import fashion_mnist
from deploykit.harness.datasets import preprocess
from deploykit.models import get_model_spec, list_models, load_torch, resolve, seednets

NAMES = list(seednets.SEEDNETS)
EVAL_COUNT = 2_000
# The accuracy on the first 2,000 test images may sit a little below the full-set figure.
TOLERANCE_POINTS = 1.5
needs_data = pytest.mark.skipif(
    not fashion_mnist.is_available(),
    reason=f"Fashion-MNIST not found in {fashion_mnist.data_dir()}: "
    "apt-get install dataset-fashion-mnist (or run scripts/setup.sh)",
)


def _log(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(seednets.log_path(name).read_text())
    return data


def _modules(model: nn.Module, kind: type[nn.Module]) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.fixture(scope="module")
def test_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first official test images, preprocessed by deploykit as decoded RGB images."""
    images, labels = fashion_mnist.load("test")
    contract = seednets.FASHION_MNIST_CONTRACT
    inputs = np.stack(
        [preprocess(np.repeat(img[:, :, None], 3, axis=2), contract) for img in images[:EVAL_COUNT]]
    )
    return torch.from_numpy(inputs), torch.from_numpy(labels[:EVAL_COUNT])


def test_entries_are_in_the_catalogue() -> None:
    listed = {spec.name: spec for spec in list_models()}
    families = {
        "fmnist_lenet5": "lenet",
        "fmnist_mobilenet_v1": "mobilenet",
        "fmnist_shufflenet_v1": "shufflenet",
        "fmnist_squeezenet": "squeezenet",
        "fmnist_resnet": "resnet",
    }
    for name, family in families.items():
        spec = listed[name]
        assert spec.family == family and spec.source == "deploykit"
        assert spec.emphasis == (family in ("mobilenet", "shufflenet", "squeezenet"))
        assert spec.contract.shape() == (1, 1, 32, 32)
        assert spec.contract.color == "GRAY" and spec.contract.num_classes == 10
        assert spec.pretrained is not None and spec.pretrained.labels == "fashion-mnist"
        assert spec.pretrained.eval_sets == ("fashion-mnist-test",)
        assert spec.pretrained.calib_set == "fashion-mnist-train"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_weights_load_strictly_and_match_the_log(name: str) -> None:
    spec = get_model_spec(name)
    assert spec.pretrained is not None
    source, contract = resolve(name)
    assert contract == seednets.FASHION_MNIST_CONTRACT
    assert source.weights is not None and not source.random_weights
    path = Path(source.weights)
    assert path == seednets.weights_path(name).resolve()
    assert path.stat().st_size < 1_000_000
    log = _log(name)
    assert sha256_file(path) == spec.pretrained.sha256 == source.weights_sha256
    assert log["weights_sha256"] == spec.pretrained.sha256
    assert spec.reference_top1 == log["test_accuracy"]
    model = load_torch(source)  # strict: any missing/unexpected key or shape raises
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == spec.num_params == log["num_params"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_a_swapped_weights_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "fmnist_lenet5.pt"
    torch.save(seednets.LeNet5().state_dict(), fake)
    monkeypatch.setattr(seednets, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(WeightsError, match="sha256"):
        resolve("fmnist_lenet5")


@needs_data
@pytest.mark.parametrize("name", NAMES)
def test_accuracy_on_official_test_images(
    name: str, test_images: tuple[torch.Tensor, torch.Tensor]
) -> None:
    inputs, labels = test_images
    model = load_torch(resolve(name)[0])
    with torch.no_grad():
        predicted = torch.cat(
            [model(inputs[i : i + 500]).argmax(1) for i in range(0, EVAL_COUNT, 500)]
        )
    accuracy = 100.0 * float((predicted == labels).float().mean())
    logged = _log(name)["test_accuracy"]
    assert accuracy >= logged - TOLERANCE_POINTS, (
        f"{name}: {accuracy:.2f}% on the first {EVAL_COUNT} test images, "
        f"logged {logged:.2f}% on all 10,000"
    )


def test_lenet5_is_the_original_topology() -> None:
    model = seednets.LeNet5()
    convs = _modules(model, nn.Conv2d)
    linears = _modules(model, nn.Linear)
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 6, (5, 5)),
        (6, 16, (5, 5)),
    ]
    assert [(f.in_features, f.out_features) for f in linears] == [(400, 120), (120, 84), (84, 10)]
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_mobilenet_v1_is_depthwise_separable() -> None:
    model = seednets.SEEDNETS["fmnist_mobilenet_v1"].build()
    blocks = _modules(model, seednets.DepthwiseSeparable)
    assert len(blocks) >= 5
    for block in blocks:
        dw, pw = block.depthwise, block.pointwise
        assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
        assert pw.kernel_size == (1, 1) and pw.groups == 1
    # Every conv but the stem is depthwise or pointwise.
    convs = _modules(model, nn.Conv2d)
    assert all(c.groups == c.in_channels or c.kernel_size == (1, 1) for c in convs[1:])


def test_shufflenet_v1_has_grouped_pointwise_shuffle_and_pooled_shortcuts() -> None:
    model = seednets.SEEDNETS["fmnist_shufflenet_v1"].build()
    grouped = [c for c in _modules(model, nn.Conv2d) if c.kernel_size == (1, 1) and c.groups > 1]
    assert len(grouped) >= 8
    assert _modules(model, seednets.ChannelShuffle)
    units = _modules(model, seednets.ShuffleUnit)
    down = [u for u in units if u.stride == 2]
    assert len(down) == 3 and all(isinstance(u.shortcut, nn.AvgPool2d) for u in down)
    depthwise = [c for c in _modules(model, nn.Conv2d) if c.groups == c.in_channels > 1]
    assert len(depthwise) == len(units)
    # Stride-2 units concatenate the pooled input with the branch.
    unit = down[1]
    x = torch.randn(1, unit.branch[0][0].in_channels, 8, 8)
    assert unit.eval()(x).shape[1] == unit.branch[-1][0].out_channels + x.shape[1]


def test_channel_shuffle_interleaves_the_groups() -> None:
    shuffle = seednets.ChannelShuffle(6, 3)
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert shuffle(x).flatten().tolist() == [0, 2, 4, 1, 3, 5]


def test_squeezenet_is_built_of_fire_modules() -> None:
    model = seednets.SEEDNETS["fmnist_squeezenet"].build()
    fires = _modules(model, seednets.Fire)
    assert len(fires) >= 4
    for fire in fires:
        squeeze, e1, e3 = fire.squeeze[0], fire.expand1x1[0], fire.expand3x3[0]
        assert squeeze.kernel_size == e1.kernel_size == (1, 1) and e3.kernel_size == (3, 3)
        assert squeeze.out_channels < e1.out_channels + e3.out_channels
    assert not _modules(model, nn.Linear)  # the classifier is a 1x1 convolution


def test_resnet_has_basic_blocks_with_residuals() -> None:
    model = seednets.SEEDNETS["fmnist_resnet"].build()
    blocks = _modules(model, seednets.BasicBlock)
    assert len(blocks) >= 3
    assert any(isinstance(b.downsample, nn.Sequential) for b in blocks)
    assert any(isinstance(b.downsample, nn.Identity) for b in blocks)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


# --- the Fashion-MNIST reader -------------------------------------------------------------


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return gzip.compress(struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload)


def _fake_dir(tmp_path: Path, images: bytes, labels: bytes) -> Path:
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(images)
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(labels)
    return tmp_path


GOOD_LABELS = _idx(0x801, (10_000,), bytes(10_000))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (_idx(0x803, (10_000, 28, 28), bytes(1000)), "data bytes"),  # truncated data
        (_idx(0x801, (10_000, 28, 28), bytes(1000)), "magic number"),  # wrong kind of file
        (_idx(0x803, (9_999, 28, 28), bytes(9_999 * 784)), "shape"),  # wrong count
        (_idx(0x803, (10_000, 28, 28), bytes(10_000 * 784))[:5000], "cannot read"),  # cut gzip
        (b"not a gzip file at all", "cannot read"),
        (gzip.compress(b"\x00\x00"), "truncated"),
    ],
)
def test_a_damaged_file_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, images: bytes, message: str
) -> None:
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(_fake_dir(tmp_path, images, GOOD_LABELS)))
    assert fashion_mnist.is_available()
    with pytest.raises(UserError, match=message):
        fashion_mnist.load("test")


def test_a_valid_file_set_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pixels = np.arange(10_000 * 784, dtype=np.uint64).astype(np.uint8).tobytes()
    labels = bytes(i % 10 for i in range(10_000))
    images = _idx(0x803, (10_000, 28, 28), pixels)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(_fake_dir(tmp_path, images, GOOD_LABELS)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(_idx(0x801, (10_000,), labels))
    x, y = fashion_mnist.load("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert set(fashion_mnist.sha256("test")) == {
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }


def test_out_of_range_labels_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _idx(0x803, (10_000, 28, 28), bytes(10_000 * 784))
    labels = _idx(0x801, (10_000,), bytes([10]) * 10_000)
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(_fake_dir(tmp_path, images, labels)))
    with pytest.raises(UserError, match="label 10"):
        fashion_mnist.load("test")


def test_a_missing_file_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(tmp_path))
    assert not fashion_mnist.is_available()
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as info:
        fashion_mnist.load("train")
    assert "\n" not in str(info.value)


@needs_data
def test_official_files_load() -> None:
    x, y = fashion_mnist.load("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8
    assert y.shape == (10_000,) and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10
    assert len(fashion_mnist.CLASSES) == 10 and fashion_mnist.CLASSES[9] == "Ankle boot"
