"""MobileNet v1 (Howard et al., "MobileNets: Efficient convolutional neural networks for
mobile vision applications", 2017).

Block structure (paper Table 1): a 3x3/2 convolution (32) then 13 depthwise separable
blocks, each a depthwise 3x3 convolution (groups = channels) + BN + ReLU followed by a
pointwise 1x1 convolution + BN + ReLU, with channels 64, 128x2, 256x2, 512x6, 1024x2 and
stride 2 at the first 128, 256, 512 and 1024 block; global average pooling and one FC
layer. The width multiplier alpha scales every layer's channels. The paper gives 4.2M
parameters and 569M mult-adds for 1.0 MobileNet-224. The implementation is
:class:`deploykit.models.seednets.MobileNetV1` with the full block list.
"""

from __future__ import annotations

from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.seednets import MobileNetV1
from deploykit.models.zoo._common import SMALL_CLASSES, entry, image_contract

# (output channels, stride) of the 13 depthwise separable blocks (paper Table 1).
FULL_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """The paper's MobileNet at width multiplier `width_mult`."""
    return MobileNetV1(
        num_classes=num_classes,
        in_channels=3,
        width_mult=width_mult,
        blocks=FULL_BLOCKS,
        stem_channels=32,
        stem_stride=2,
    )


def specs() -> list[ModelSpec]:
    """1.0 MobileNet-224, 0.5 MobileNet-224 and a 0.25-width 64 px variant for CI."""
    return [
        entry("mobilenet_v1", "mobilenet", mobilenet_v1, image_contract(224), emphasis=True),
        entry(
            "mobilenet_v1_050",
            "mobilenet",
            lambda: mobilenet_v1(0.5),
            image_contract(224),
            emphasis=True,
        ),
        entry(
            "mobilenet_v1_small",
            "mobilenet",
            lambda: mobilenet_v1(0.25, SMALL_CLASSES),
            image_contract(64, SMALL_CLASSES),
            emphasis=True,
        ),
    ]
