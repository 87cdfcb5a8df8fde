"""Convolution types as single-block test models.

Each model is a 3x3 stem (3 -> 16 channels, conv + BN + ReLU) on a 32x32 RGB input, one
block of the convolution type under test, global average pooling and a 10-way FC layer, so
a failure in the matrix points at the convolution type itself:

- Dilated (atrous) convolution (Yu & Koltun, ICLR 2016; Chen et al., DeepLab): three 3x3
  convolutions with dilation rates 2, 4 and 8 (padding = rate, size kept).
- Spatially separable convolution (Szegedy et al. 2016, Inception v3's factorisation): a
  3x1 convolution then a 1x3 convolution.
- Depthwise separable convolution (Sifre 2014; Howard et al. 2017): depthwise 3x3
  (groups = channels) + BN + ReLU, then pointwise 1x1 + BN + ReLU.
- Flattened convolution (Jin, Dundar & Culurciello, "Flattened convolutional neural
  networks for feedforward acceleration", 2015): a 3-D filter replaced by 1-D filters in
  sequence - lateral (across channels: a 1x1 convolution), vertical (3x1, per channel) and
  horizontal (1x3, per channel) - with no non-linearity inside the sequence.
- Grouped convolution (Krizhevsky et al. 2012; Xie et al. 2017): a 3x3 convolution with
  2, 4 or 8 groups.
- Shuffled grouped convolution (Zhang et al. 2018): grouped 1x1, channel shuffle (reshape,
  transpose, reshape), grouped 3x3, so every output group sees every input group.
- Pointwise grouped convolution (Zhang et al. 2018): a 1x1 convolution with 4 groups.
- Transposed convolution (Zeiler et al. 2010; Long et al., FCN 2015): a 4x4 stride-2
  transposed convolution upsampling 32x32 to 64x64, then a 3x3 convolution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.seednets import ChannelShuffle
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract

STEM = 16
GROUP_COUNTS = (2, 4, 8)


class SingleBlockNet(nn.Module):
    """Stem (3 -> 16), the block under test, global average pool, FC."""

    def __init__(self, block: nn.Module, channels: int, num_classes: int = SMALL_CLASSES) -> None:
        super().__init__()
        self.stem = conv_bn(3, STEM, 3)
        self.block = block
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, 32, 32) batch."""
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


def dilated() -> nn.Module:
    """3x3 convolutions with dilation 2, 4 and 8."""
    block = nn.Sequential(*(conv_bn(STEM, STEM, 3, dilation=rate) for rate in (2, 4, 8)))
    return SingleBlockNet(block, STEM)


def spatially_separable() -> nn.Module:
    """A 3x1 convolution then a 1x3 convolution."""
    return SingleBlockNet(nn.Sequential(conv_bn(STEM, 32, (3, 1)), conv_bn(32, 32, (1, 3))), 32)


def depthwise_separable() -> nn.Module:
    """Depthwise 3x3 (groups = 16) then pointwise 1x1."""
    block = nn.Sequential(conv_bn(STEM, STEM, 3, groups=STEM), conv_bn(STEM, 32, 1))
    return SingleBlockNet(block, 32)


def flattened() -> nn.Module:
    """Lateral 1x1, vertical 3x1 and horizontal 1x3 1-D filters in sequence, then BN + ReLU."""
    block = nn.Sequential(
        nn.Conv2d(STEM, 32, 1, bias=False),
        nn.Conv2d(32, 32, (3, 1), padding=(1, 0), groups=32, bias=False),
        nn.Conv2d(32, 32, (1, 3), padding=(0, 1), groups=32),
        nn.BatchNorm2d(32),
        nn.ReLU(inplace=True),
    )
    return SingleBlockNet(block, 32)


def grouped(groups: int) -> nn.Module:
    """A 3x3 convolution (32 -> 32 channels) with `groups` groups."""
    block = nn.Sequential(conv_bn(STEM, 32, 1), conv_bn(32, 32, 3, groups=groups))
    return SingleBlockNet(block, 32)


def shuffled_grouped() -> nn.Module:
    """Grouped 1x1 (g = 4), channel shuffle, grouped 3x3 (g = 4)."""
    block = nn.Sequential(
        conv_bn(STEM, 32, 1, groups=4), ChannelShuffle(32, 4), conv_bn(32, 32, 3, groups=4)
    )
    return SingleBlockNet(block, 32)


def pointwise_grouped() -> nn.Module:
    """A 1x1 convolution (16 -> 64 channels) with 4 groups."""
    return SingleBlockNet(conv_bn(STEM, 64, 1, groups=4), 64)


def transposed() -> nn.Module:
    """4x4 stride-2 transposed convolution (32 -> 64 px), BN, ReLU, then a 3x3 convolution."""
    block = nn.Sequential(
        nn.ConvTranspose2d(STEM, STEM, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(STEM),
        nn.ReLU(inplace=True),
        conv_bn(STEM, 32, 3),
    )
    return SingleBlockNet(block, 32)


# Catalogue name -> (row label, builder).
CONV_TYPES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "conv_dilated": ("Dilated convolution (rates 2, 4, 8)", dilated),
    "conv_spatial_separable": ("Spatially separable (3x1 then 1x3)", spatially_separable),
    "conv_depthwise_separable": ("Depthwise separable (dw 3x3 + pw 1x1)", depthwise_separable),
    "conv_flattened": ("Flattened (1x1, 3x1, 1x3 1-D filters)", flattened),
    **{
        f"conv_grouped_g{g}": (f"Grouped 3x3 (groups={g})", lambda g=g: grouped(g))  # type: ignore[misc]
        for g in GROUP_COUNTS
    },
    "conv_shuffled_grouped": ("Shuffled grouped (g=4, channel shuffle)", shuffled_grouped),
    "conv_pointwise_grouped": ("Pointwise grouped 1x1 (groups=4)", pointwise_grouped),
    "conv_transposed": ("Transposed 4x4/2 (upsampling)", transposed),
}


def specs() -> list[ModelSpec]:
    """One catalogue entry per convolution type (32 px, 10 classes)."""
    contract = image_contract(32, SMALL_CLASSES)
    return [
        entry(name, "conv-type", builder, contract, emphasis=True)
        for name, (_, builder) in CONV_TYPES.items()
    ]
