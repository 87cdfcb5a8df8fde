"""SENet / SE-ResNet (Hu, Shen & Sun, "Squeeze-and-excitation networks", CVPR 2018).

Block structure: a ResNet bottleneck (1x1, 3x3, 1x1 convolutions with BN) whose output is
recalibrated before the residual addition by a squeeze-and-excitation module: global
average pooling -> FC (C/r) -> ReLU -> FC (C) -> sigmoid -> per-channel scale, with
reduction ratio r = 16. SE-ResNet-50 is torchvision's ResNet-50 layout with these blocks;
the paper gives 28.1M parameters (vs 25.6M for ResNet-50) and 3.87 GFLOPs at 224; with
torchvision's stride on the 3x3 convolution (ResNet v1.5) the count is 4.09G multiply-adds.
The FC layers are 1x1 convolutions on the pooled vector (as in the authors' Caffe models),
so the graph stays 4-D.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, entry, image_contract

REDUCTION = 16


class SqueezeExcite(nn.Module):
    """Global pool -> FC (C/r) -> ReLU -> FC (C) -> sigmoid -> channel scale."""

    def __init__(self, channels: int, reduction: int = REDUCTION) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scale each channel of `x` by its excitation."""
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class SEBottleneck(Bottleneck):
    """torchvision's bottleneck with squeeze-and-excitation before the residual addition."""

    def __init__(self, inplanes: int, planes: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(inplanes, planes, *args, **kwargs)
        self.se = SqueezeExcite(planes * self.expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return self.relu(out + identity)


def se_resnet50(num_classes: int = 1000) -> nn.Module:
    """SE-ResNet-50: ResNet-50 (3, 4, 6, 3 bottlenecks) with SE blocks, r = 16."""
    return ResNet(SEBottleneck, [3, 4, 6, 3], num_classes=num_classes)


def se_resnet_small() -> nn.Module:
    """SE bottlenecks in a small four-stage network (32 px)."""
    from deploykit.models.zoo.tv_small import CompactResNet

    return CompactResNet(SEBottleneck, (1, 1, 1, 1), widths=(8, 16, 32, 64))


def specs() -> list[ModelSpec]:
    """SE-ResNet-50 at 224 and a small SE-ResNet at 32 px."""
    return [
        entry("se_resnet50", "senet", se_resnet50, image_contract(224)),
        entry("se_resnet_small", "senet", se_resnet_small, image_contract(32, SMALL_CLASSES)),
    ]
