"""Xception (Chollet, "Xception: Deep learning with depthwise separable convolutions",
CVPR 2017).

Block structure (paper Fig. 5): entry flow - 3x3/2 conv (32), 3x3 conv (64), then three
modules of two [ReLU - separable 3x3 conv - BN] layers and a 3x3/2 max pool, with a 1x1/2
conv + BN shortcut (128, 256, 728 channels; the first module starts without ReLU); middle
flow - eight residual modules of three [ReLU - separable 3x3 conv (728) - BN] with identity
shortcuts; exit flow - a module of separable convs to 728 and 1024 with a max pool and a 1x1/2
shortcut, then separable 3x3 convs to 1536 and 2048 (each BN-ReLU), global average pooling and
a FC layer. A separable convolution is a depthwise 3x3 (groups = channels) followed by a
pointwise 1x1, with no non-linearity between them. Input 299x299; the paper gives
22,855,952 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.contract import InputContract
from deploykit.models.zoo._common import SMALL_CLASSES, entry, image_contract


class SeparableConv2d(nn.Sequential):
    """Depthwise kxk convolution then pointwise 1x1, no activation in between."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, kernel, 1, kernel // 2, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
        )


class XceptionModule(nn.Module):
    """`reps` [ReLU - separable conv - BN] layers, optional 3x3/2 max pool, and a shortcut.

    Args:
        cin: Input channels.
        cout: Output channels.
        reps: Separable conv layers.
        stride: 2 adds the max pool and a 1x1/2 conv shortcut.
        start_with_relu: False for the first entry-flow module.
        grow_first: Change the width in the first layer (True) or the last (exit flow).
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        reps: int,
        stride: int = 1,
        start_with_relu: bool = True,
        grow_first: bool = True,
    ) -> None:
        super().__init__()
        widths = [cin] + [cout if grow_first else cin] * (reps - 1) + [cout]
        layers: list[nn.Module] = []
        for index in range(reps):
            if index > 0 or start_with_relu:
                layers.append(nn.ReLU(inplace=index > 0))
            layers += [
                SeparableConv2d(widths[index], widths[index + 1]),
                nn.BatchNorm2d(widths[index + 1]),
            ]
        if stride != 1:
            layers.append(nn.MaxPool2d(3, stride, 1))
        self.body = nn.Sequential(*layers)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the module."""
        return self.body(x) + self.skip(x)


class Xception(nn.Module):
    """Xception with configurable widths and middle-flow depth.

    Args:
        stem: Channels of the two stem convolutions (32, 64).
        entry: Channels of the three entry-flow modules (128, 256, 728).
        middle_blocks: Middle-flow modules (8).
        exit: Channels of the exit module and the two last separable convs (1024, 1536, 2048).
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        stem: tuple[int, int] = (32, 64),
        entry: Sequence[int] = (128, 256, 728),
        middle_blocks: int = 8,
        exit: tuple[int, int, int] = (1024, 1536, 2048),
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem[0], 3, 2, 0, bias=False),
            nn.BatchNorm2d(stem[0]),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem[0], stem[1], 3, 1, 0, bias=False),
            nn.BatchNorm2d(stem[1]),
            nn.ReLU(inplace=True),
        )
        modules: list[nn.Module] = []
        cin = stem[1]
        for index, cout in enumerate(entry):
            modules.append(XceptionModule(cin, cout, 2, 2, start_with_relu=index > 0))
            cin = cout
        modules += [XceptionModule(cin, cin, 3) for _ in range(middle_blocks)]
        modules.append(XceptionModule(cin, exit[0], 2, 2, grow_first=False))
        self.flow = nn.Sequential(*modules)
        self.head = nn.Sequential(
            SeparableConv2d(exit[0], exit[1]),
            nn.BatchNorm2d(exit[1]),
            nn.ReLU(inplace=True),
            SeparableConv2d(exit[1], exit[2]),
            nn.BatchNorm2d(exit[2]),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(exit[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        x = self.head(self.flow(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def specs() -> list[ModelSpec]:
    """Xception at 299 and a narrow Xception (two middle modules) at 64 px for CI."""
    return [
        entry(
            "xception",
            "xception",
            Xception,
            InputContract(
                height=299,
                width=299,
                resize=333,
                mean=(0.5,) * 3,
                std=(0.5,) * 3,
                interpolation="bicubic",
            ),
            emphasis=True,
        ),
        entry(
            "xception_small",
            "xception",
            lambda: Xception((8, 16), (16, 32, 48), 2, (64, 96, 128), SMALL_CLASSES),
            image_contract(64, SMALL_CLASSES),
            emphasis=True,
        ),
    ]
