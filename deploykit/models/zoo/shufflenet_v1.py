"""ShuffleNet v1 (Zhang, Zhou, Lin & Sun, "ShuffleNet: An extremely efficient convolutional
neural network for mobile devices", CVPR 2018).

Block structure (paper Fig. 2 and Table 1): a 3x3/2 convolution (24) and a 3x3/2 max pool,
then stages 2-4 of 4, 8 and 4 ShuffleNet units. A unit is a grouped 1x1 convolution
(bottleneck = output/4) + BN + ReLU, a channel shuffle (reshape to (g, C/g), transpose,
flatten), a depthwise 3x3 convolution + BN, and a grouped 1x1 convolution + BN; stride-1
units add the identity, stride-2 units (the first of each stage) concatenate a 3x3/2
average-pooled shortcut. The first 1x1 of stage 2 is not grouped (its input has only 24
channels). Output channels for 1x: 240/480/960 (g=3) and 384/768/1536 (g=8). The paper
gives 137 MFLOPs (Table 1) / 140 MFLOPs (Table 2) for ShuffleNet 1x g=3 and 137 MFLOPs for
g=8 at 224x224 (FLOPs = multiply-adds). Units are those of
:class:`deploykit.models.seednets.ShuffleUnit`, whose channel shuffle exports as a single
Reshape-Transpose-Reshape chain with constant channel counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.seednets import shuffle_stages
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract

# Output channels of stages 2-4 for ShuffleNet 1x (paper Table 1).
STAGE_CHANNELS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}
STAGE_REPEATS = (4, 8, 4)


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 with the paper's stem (3x3/2 conv and 3x3/2 max pool).

    Args:
        groups: The paper's g (groups of the pointwise convolutions).
        scale: Channel scale factor s ("ShuffleNet s x").
        num_classes: Classifier outputs.
        stage_repeats: Units per stage (4, 8, 4 in the paper).
        stem_channels: Stem output channels (24).
    """

    def __init__(
        self,
        groups: int = 3,
        scale: float = 1.0,
        num_classes: int = 1000,
        stage_repeats: Sequence[int] = STAGE_REPEATS,
        stem_channels: int = 24,
    ) -> None:
        super().__init__()
        if groups not in STAGE_CHANNELS:
            raise ValueError(f"ShuffleNet v1 groups must be one of {sorted(STAGE_CHANNELS)}")
        # Channels stay divisible by 4 * groups (bottleneck = output / 4, grouped).
        step = 4 * groups
        channels = [max(step, round(c * scale / step) * step) for c in STAGE_CHANNELS[groups]]
        self.stem = nn.Sequential(conv_bn(3, stem_channels, 3, stride=2), nn.MaxPool2d(3, 2, 1))
        self.stages, cin = shuffle_stages(stem_channels, channels, stage_repeats, groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        x = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


def specs() -> list[ModelSpec]:
    """ShuffleNet 1x g=3 and g=8 at 224, and 0.25x variants with 1/2/1 units at 64 px."""
    out = []
    for groups in (3, 8):
        out.append(
            entry(
                f"shufflenet_v1_g{groups}",
                "shufflenet",
                lambda g=groups: ShuffleNetV1(g),  # type: ignore[misc]
                image_contract(224),
                emphasis=True,
            )
        )
        out.append(
            entry(
                f"shufflenet_v1_g{groups}_small",
                "shufflenet",
                lambda g=groups: ShuffleNetV1(  # type: ignore[misc]
                    g, scale=0.25, num_classes=SMALL_CLASSES, stage_repeats=(1, 2, 1)
                ),
                image_contract(64, SMALL_CLASSES),
                emphasis=True,
            )
        )
    return out
