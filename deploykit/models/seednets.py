"""The seed family: small, trained instances of the classic CNN families on Fashion-MNIST.

Each network is a faithful, scaled-down member of its family, sized for 32x32
single-channel inputs (Fashion-MNIST resized from 28x28, as LeNet-5 was fed
32x32 digits):

- `LeNet5`: conv5-pool-conv5-pool-fc120-fc84-fc10 (LeCun et al., 1998).
- `MobileNetV1`: depthwise-separable 3x3 blocks (Howard et al., 2017); trained at
  width 0.5 with the first seven blocks.
- `ShuffleNetV1`: grouped 1x1 convolutions, channel shuffle, depthwise 3x3, and
  stride-2 units whose shortcut is a 3x3 average pool concatenated with the
  branch (Zhang et al., 2018); trained with g=3 at 0.25x, 2/4/2 units.
- `SqueezeNet`: fire modules, squeeze 1x1 then expand 1x1 + 3x3 concatenated,
  and a 1x1 convolution classifier with global average pooling (Iandola et al.,
  2016); trained in the v1.1 layout at half width, with BatchNorm.
- `ResNet`: basic residual blocks with projection shortcuts (He et al., 2016);
  trained as an 8-layer (16/32/64) network with a stride-2 stem.

The trained configurations (`SEEDNETS`) keep the papers' stride-2 stems, so the
feature maps are 16x16 after the stem; they were sized to train in a few minutes
each on one CPU thread. They use only export-friendly operators (Conv2d,
BatchNorm2d, ReLU, pooling, Linear, flatten, concat, and reshape/transpose with
static channel counts for the shuffle). The weights in ``weights/`` were trained by
``scripts/train_seednets.py``; next to each ``<name>.pt`` lies ``<name>.log.json``
with the seed, hyper-parameters, per-epoch curve and measured test accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec, PretrainedWeights
from deploykit.models.contract import InputContract

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Mean and standard deviation of the 60,000 Fashion-MNIST training images in [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CONTRACT = InputContract(
    channels=1,
    height=32,
    width=32,
    resize=32,
    mean=(FASHION_MNIST_MEAN,),
    std=(FASHION_MNIST_STD,),
    interpolation="bilinear",
    color="GRAY",
    num_classes=10,
)
WEIGHTS_LICENCE = "Apache-2.0 (weights); data MIT (Fashion-MNIST)"


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LeNet5(nn.Module):
    """LeNet-5: C1 conv5 (6) - S2 pool - C3 conv5 (16) - S4 pool - F5 120 - F6 84 - output.

    The topology and sizes are the original ones for a 32x32 single-channel input.
    As in most modern re-implementations, C3 connects to all six S2 maps (not the
    original sparse table) and the output is a linear layer rather than RBF units.

    Args:
        num_classes: Size of the output layer.
        in_channels: Input channels.
        activation: ``relu`` (default) or ``tanh`` (the original squashing function).
        pool: ``max`` (default) or ``avg`` (the original subsampling).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        activation: str = "relu",
        pool: str = "max",
    ) -> None:
        super().__init__()
        act: type[nn.Module] = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
        pooling: type[nn.Module] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5),  # C1: 32 -> 28
            act(),
            pooling(2),  # S2: 28 -> 14
            nn.Conv2d(6, 16, 5),  # C3: 14 -> 10
            act(),
            pooling(2),  # S4: 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),  # F5 (C5 in the paper: a 5x5 conv to 1x1)
            act(),
            nn.Linear(120, 84),  # F6
            act(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, C, 32, 32) batch."""
        return self.classifier(torch.flatten(self.features(x), 1))


class DepthwiseSeparable(nn.Module):
    """MobileNet-v1 block: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))


# (output channels, stride) of the depthwise-separable blocks, before the width multiplier.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
)


class MobileNetV1(nn.Module):
    """MobileNet-v1: a 3x3 stem, depthwise-separable blocks, global pool, linear classifier.

    The full network has 13 blocks for 224x224 inputs; the default here keeps the
    paper's stride-2 stem and its channel/stride pattern up to the first 512-channel
    block (seven blocks, ending at 2x2 on a 32x32 input), and scales channels by
    `width_mult`.

    Args:
        num_classes: Classifier outputs.
        in_channels: Input channels.
        width_mult: The paper's width multiplier alpha.
        blocks: (channels, stride) per depthwise-separable block.
        stem_channels: Stem output channels before the multiplier.
        stem_stride: Stride of the stem (2 in the paper, for 224x224 inputs).
        dropout: Dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width_mult: float = 0.5,
        blocks: Sequence[tuple[int, int]] = MOBILENET_V1_BLOCKS,
        stem_channels: int = 32,
        stem_stride: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()

        def width(channels: int) -> int:
            return max(8, int(channels * width_mult))

        cin = width(stem_channels)
        layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, stem_stride)]
        for channels, stride in blocks:
            layers.append(DepthwiseSeparable(cin, width(channels), stride))
            cin = width(channels)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, C, H, W) batch."""
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(self.dropout(x))


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: reshape (g, C/g), transpose, flatten back.

    The channel counts are fixed at construction, so the exported graph reshapes
    with constant channel dimensions.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels cannot be shuffled in {groups} groups")
        self.channels = channels
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Interleave the channels of the groups."""
        height, width = x.shape[2], x.shape[3]
        x = x.reshape(-1, self.groups, self.channels // self.groups, height, width)
        return x.transpose(1, 2).reshape(-1, self.channels, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNet-v1 unit (paper Fig. 2b/2c).

    Branch: grouped 1x1 + BN + ReLU, channel shuffle, depthwise 3x3 (stride) + BN,
    grouped 1x1 + BN. Stride 1: identity shortcut added. Stride 2: the shortcut is
    a 3x3 average pool (stride 2) concatenated with the branch, so the branch makes
    ``cout - cin`` channels. ReLU after the merge.

    Args:
        cin: Input channels.
        cout: Output channels.
        groups: Groups of the 1x1 convolutions.
        stride: 1 or 2.
        first_groups: Groups of the first 1x1 conv (1 for the first unit of stage 2).
    """

    def __init__(
        self, cin: int, cout: int, groups: int, stride: int, first_groups: int | None = None
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if stride == 1 and cin != cout:
            raise ValueError("a stride-1 ShuffleNet unit keeps its channel count")
        self.stride = stride
        branch_out = cout - cin if stride == 2 else cout
        mid = cout // 4
        g1 = groups if first_groups is None else first_groups
        self.branch = nn.Sequential(
            _conv_bn(cin, mid, 1, groups=g1),
            ChannelShuffle(mid, g1) if g1 > 1 else nn.Identity(),
            _conv_bn(mid, mid, 3, stride, groups=mid, act=False),
            _conv_bn(mid, branch_out, 1, groups=groups, act=False),
        )
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit."""
        if self.stride == 2:
            return self.relu(torch.cat((self.shortcut(x), self.branch(x)), 1))
        return self.relu(x + self.branch(x))


def shuffle_stages(
    cin: int, stage_channels: Sequence[int], stage_repeats: Sequence[int], groups: int
) -> tuple[nn.Sequential, int]:
    """ShuffleNet v1 stages: each opens with a stride-2 unit (the first one's 1x1 is not
    grouped: its input has too few channels), then stride-1 units; returns (stages, width).
    """
    stages: list[nn.Module] = []
    for index, (cout, repeats) in enumerate(zip(stage_channels, stage_repeats, strict=True)):
        units: list[nn.Module] = [
            ShuffleUnit(cin, cout, groups, 2, first_groups=1 if index == 0 else None)
        ]
        units += [ShuffleUnit(cout, cout, groups, 1) for _ in range(repeats - 1)]
        stages.append(nn.Sequential(*units))
        cin = cout
    return nn.Sequential(*stages), cin


class ShuffleNetV1(nn.Module):
    """ShuffleNet-v1: stem, three stages of shuffle units, global pool, linear classifier.

    The stem is the paper's stride-2 3x3 convolution without its max pool (the
    paper's stem divides 224x224 by 4, too much for 32x32), so stages 2-4 work at 8,
    4 and 2 pixels. The default channels are the paper's g=3 widths (240/480/960)
    at 0.25x, with half the paper's 4/8/4 units per stage.

    Args:
        num_classes: Classifier outputs.
        in_channels: Input channels.
        groups: Groups of the 1x1 convolutions (the paper's g).
        stage_channels: Output channels of stages 2, 3 and 4.
        stage_repeats: Units per stage (the paper uses 4, 8, 4).
        stem_channels: Stem output channels (24 in the paper).
        stem_stride: Stride of the 3x3 stem convolution.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        groups: int = 3,
        stage_channels: Sequence[int] = (60, 120, 240),
        stage_repeats: Sequence[int] = (2, 4, 2),
        stem_channels: int = 24,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, stem_channels, 3, stem_stride)
        self.stages, cin = shuffle_stages(stem_channels, stage_channels, stage_repeats, groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, C, H, W) batch."""
        x = self.stages(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


class Fire(nn.Module):
    """SqueezeNet fire module: squeeze 1x1, then expand 1x1 and 3x3, concatenated.

    Args:
        cin: Input channels.
        squeeze: Squeeze (1x1) channels.
        expand1x1: Channels of the 1x1 expand path.
        expand3x3: Channels of the 3x3 expand path.
        batch_norm: BatchNorm after each convolution (not in the original paper).
    """

    def __init__(
        self, cin: int, squeeze: int, expand1x1: int, expand3x3: int, batch_norm: bool = True
    ) -> None:
        super().__init__()
        self.squeeze = self._conv(cin, squeeze, 1, batch_norm)
        self.expand1x1 = self._conv(squeeze, expand1x1, 1, batch_norm)
        self.expand3x3 = self._conv(squeeze, expand3x3, 3, batch_norm)

    @staticmethod
    def _conv(cin: int, cout: int, kernel: int, batch_norm: bool) -> nn.Sequential:
        if batch_norm:
            return _conv_bn(cin, cout, kernel)
        return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module."""
        x = self.squeeze(x)
        return torch.cat((self.expand1x1(x), self.expand3x3(x)), 1)


# Fire modules per stage as (squeeze, expand1x1, expand3x3), each stage after a 3x3/2 max
# pool: SqueezeNet v1.1's fire2-fire9 (16/64, 16/64 | 32/128, 32/128 | 48/192, 48/192,
# 64/256, 64/256) at half width.
SQUEEZENET_STAGES: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((8, 32, 32), (8, 32, 32)),
    ((16, 64, 64), (16, 64, 64)),
    ((24, 96, 96), (24, 96, 96), (32, 128, 128), (32, 128, 128)),
)


class SqueezeNet(nn.Module):
    """SqueezeNet (v1.1 layout): conv stem, pooled stages of fire modules, conv classifier.

    As in v1.1, a stride-2 3x3 stem is followed by a 3x3/2 max pool before each
    stage of fire modules (at 8, 4 and 2 pixels for a 32x32 input). The default
    stages are v1.1's fire2-fire9 at half width (and the stem's 64 channels halved).

    The classifier is the paper's: dropout, a 1x1 convolution to `num_classes`
    maps, ReLU and global average pooling (no fully connected layer).

    Args:
        num_classes: Classifier outputs.
        in_channels: Input channels.
        stem_channels: Output channels of the 3x3 stem convolution.
        stem_stride: Stride of the stem convolution (2 in SqueezeNet v1.1).
        stages: Fire modules per stage as (squeeze, expand1x1, expand3x3).
        batch_norm: BatchNorm after each convolution (a common modern addition).
        dropout: Dropout before the classifier convolution (0.5 in the paper).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_channels: int = 32,
        stem_stride: int = 2,
        stages: Sequence[Sequence[tuple[int, int, int]]] = SQUEEZENET_STAGES,
        batch_norm: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        stem: nn.Module = (
            _conv_bn(in_channels, stem_channels, 3, stem_stride)
            if batch_norm
            else nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 3, stem_stride, 1), nn.ReLU(inplace=True)
            )
        )
        layers: list[nn.Module] = [stem]
        cin = stem_channels
        for stage in stages:
            layers.append(nn.MaxPool2d(3, 2, 1))
            for squeeze, e1, e3 in stage:
                layers.append(Fire(cin, squeeze, e1, e3, batch_norm))
                cin = e1 + e3
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Conv2d(cin, num_classes, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, C, H, W) batch."""
        return torch.flatten(self.classifier(self.features(x)), 1)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class ResNet(nn.Module):
    """A small ResNet of basic blocks (the CIFAR layout of He et al., section 4.2).

    Args:
        num_classes: Classifier outputs.
        in_channels: Input channels.
        stage_channels: Channels per stage; every stage after the first halves the size.
        blocks_per_stage: Basic blocks per stage (n; the network has 6n + 2 layers).
        stem_stride: Stride of the 3x3 stem convolution (1 in the CIFAR layout, 2 in the
            ImageNet one).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        stage_channels: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 1,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, stage_channels[0], 3, stem_stride)
        layers: list[nn.Module] = []
        cin = stage_channels[0]
        for index, cout in enumerate(stage_channels):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                layers.append(BasicBlock(cin, cout, stride))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, C, H, W) batch."""
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass(frozen=True)
class SeedNet:
    """A trained configuration of one architecture.

    Attributes:
        family: Catalogue family.
        emphasis: True for the depthwise/grouped/fire-module families.
        cls: The architecture.
        kwargs: Constructor arguments of the trained configuration.
    """

    family: str
    emphasis: bool
    cls: type[nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        """A randomly initialised instance of the trained configuration."""
        return self.cls(**self.kwargs)


SEEDNETS: dict[str, SeedNet] = {
    "fmnist_lenet5": SeedNet("lenet", False, LeNet5, {"activation": "relu", "pool": "max"}),
    "fmnist_mobilenet_v1": SeedNet(
        "mobilenet", True, MobileNetV1, {"width_mult": 0.5, "stem_stride": 2}
    ),
    "fmnist_shufflenet_v1": SeedNet(
        "shufflenet",
        True,
        ShuffleNetV1,
        {
            "groups": 3,
            "stage_channels": (60, 120, 240),
            "stage_repeats": (2, 4, 2),
            "stem_stride": 2,
        },
    ),
    "fmnist_squeezenet": SeedNet(
        "squeezenet",
        True,
        SqueezeNet,
        {"stem_channels": 32, "stem_stride": 2, "stages": SQUEEZENET_STAGES, "batch_norm": True},
    ),
    "fmnist_resnet": SeedNet(
        "resnet",
        False,
        ResNet,
        {"stage_channels": (16, 32, 64), "blocks_per_stage": 1, "stem_stride": 2},
    ),
}


@dataclass(frozen=True)
class TrainedWeights:
    """What training measured and wrote for one network (see ``<name>.log.json``).

    Attributes:
        test_top1: Top-1 accuracy (percent) on the 10,000 official test images.
        num_params: Parameter count.
        sha256: Digest of ``weights/<name>.pt``.
    """

    test_top1: float
    num_params: int
    sha256: str


# Pinned from the training logs written by scripts/train_seednets.py.
TRAINED: dict[str, TrainedWeights] = {
    "fmnist_lenet5": TrainedWeights(
        90.55, 61_706, "e377474149a71ed4b767bbfe639587215b5dec926c326f894880e8ed341ae5d8"
    ),
    "fmnist_mobilenet_v1": TrainedWeights(
        90.88, 141_706, "88b787a6076918c78644d8f4704f307d13e001fb1334b8450ffcee721e32e66c"
    ),
    "fmnist_shufflenet_v1": TrainedWeights(
        89.82, 31_876, "79dcb26c1fd11097e0cdb864722895833a5738910a2eeb8529105817536f05b1"
    ),
    "fmnist_squeezenet": TrainedWeights(
        90.28, 185_258, "f4a048a2300ce72ecb662bdd0a558398a238485aed4abd3ad30bb377ff690179"
    ),
    "fmnist_resnet": TrainedWeights(
        92.05, 77_754, "b7bda1285342013a30191a7c15c79efd8b2082372c9fc7777d8abfa14f6b02c5"
    ),
}


def weights_path(name: str) -> Path:
    """The shipped weights file of seed network `name`."""
    return WEIGHTS_DIR / f"{name}.pt"


def log_path(name: str) -> Path:
    """The training log of seed network `name`."""
    return WEIGHTS_DIR / f"{name}.log.json"


def _locator(name: str) -> Callable[[], Path]:
    return lambda: weights_path(name)


def specs() -> list[ModelSpec]:
    """The seed networks' catalogue entries, with their shipped Fashion-MNIST weights."""
    entries = []
    for name, net in SEEDNETS.items():
        trained = TRAINED[name]
        entries.append(
            ModelSpec(
                name=name,
                family=net.family,
                source="deploykit",
                contract=FASHION_MNIST_CONTRACT,
                builder=net.build,
                reference_top1=trained.test_top1,
                num_params=trained.num_params,
                emphasis=net.emphasis,
                pretrained=PretrainedWeights(
                    locate=_locator(name),
                    origin=f"repo:deploykit/models/weights/{name}.pt",
                    licence=WEIGHTS_LICENCE,
                    sha256=trained.sha256,
                    eval_sets=("fashion-mnist-test",),
                    calib_set="fashion-mnist-train",
                    labels="fashion-mnist",
                ),
            )
        )
    return entries
