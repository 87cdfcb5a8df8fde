"""ResNet variants torchvision does not have: pre-activation ResNet and stochastic depth.

- Pre-activation ResNet (He, Zhang, Ren & Sun, "Identity mappings in deep residual
  networks", ECCV 2016): every residual unit is BN-ReLU-conv (basic: 3x3, 3x3; bottleneck:
  1x1, 3x3, 1x1 with expansion 4) and the shortcut is a pure identity, or a 1x1 projection
  of the pre-activated input where the shape changes; a final BN-ReLU precedes pooling.
  The paper gives 1.7M parameters for the CIFAR ResNet-164 (bottleneck, 18 units per stage,
  16/32/64 planes); the ImageNet ResNet-18 layout has the 11.7M of the original ResNet-18.
- Stochastic depth (Huang, Sun, Liu, Sedra & Weinberger, "Deep networks with stochastic
  depth", ECCV 2016): a CIFAR ResNet of basic blocks whose residual branch is dropped in
  training with probability 1 - p_l, p_l decaying linearly from 1 to p_L = 0.5 at the last
  block; at inference the branch is kept and scaled by p_l, so the exported graph is the
  deterministic ``x + p_l * f(x)`` with no random operator. Shortcuts are the paper's
  parameter-free ones (identity; 2x subsampling plus zero-padded channels at a stage
  change). ResNet-110 has 1.7M parameters (He et al. 2016, Table 6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class PreActBlock(nn.Module):
    """Pre-activation basic unit: BN-ReLU-conv3x3 (stride) - BN-ReLU-conv3x3, plus shortcut."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.preact = _bn_relu(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.conv2 = nn.Sequential(_bn_relu(planes), nn.Conv2d(planes, cout, 3, 1, 1, bias=False))
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit (the projection, if any, sees the pre-activated input)."""
        out = self.preact(x)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        return self.conv2(self.conv1(out)) + shortcut


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck unit: BN-ReLU-1x1, BN-ReLU-3x3 (stride), BN-ReLU-1x1 (x4)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.preact = _bn_relu(cin)
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.conv2 = nn.Sequential(
            _bn_relu(planes), nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        )
        self.conv3 = nn.Sequential(_bn_relu(planes), nn.Conv2d(planes, cout, 1, bias=False))
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the unit."""
        out = self.preact(x)
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        return self.conv3(self.conv2(self.conv1(out))) + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet.

    Args:
        block: :class:`PreActBlock` or :class:`PreActBottleneck`.
        layers: Units per stage.
        widths: Planes per stage.
        imagenet_stem: 7x7/2 conv + BN-ReLU + 3x3/2 max pool (ImageNet) instead of a 3x3 conv
            (CIFAR).
        stem_channels: Stem output channels.
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        block: type[PreActBlock] | type[PreActBottleneck],
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        imagenet_stem: bool = True,
        stem_channels: int = 64,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            self.stem: nn.Module = nn.Sequential(
                conv_bn(3, stem_channels, 7, stride=2), nn.MaxPool2d(3, 2, 1)
            )
        else:
            self.stem = nn.Conv2d(3, stem_channels, 3, 1, 1, bias=False)
        units: list[nn.Module] = []
        cin = stem_channels
        for index, (planes, count) in enumerate(zip(widths, layers, strict=True)):
            for unit in range(count):
                stride = 2 if index > 0 and unit == 0 else 1
                units.append(block(cin, planes, stride))
                cin = planes * block.expansion
        self.units = nn.Sequential(*units)
        self.post = _bn_relu(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        x = self.post(self.units(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class StochasticDepthBlock(nn.Module):
    """Basic residual block whose branch survives with probability `survival` in training.

    Training: ``relu(shortcut(x) + b * f(x))`` with ``b ~ Bernoulli(survival)`` drawn once
    per mini-batch (the paper's rule). Inference: ``relu(shortcut(x) + survival * f(x))``.
    """

    def __init__(self, cin: int, cout: int, stride: int, survival: float) -> None:
        super().__init__()
        if not 0.0 < survival <= 1.0:
            raise ValueError(f"survival probability must be in (0, 1], got {survival}")
        self.survival = survival
        self.branch = nn.Sequential(
            conv_bn(cin, cout, 3, stride=stride), conv_bn(cout, cout, 3, act=False)
        )
        self.stride = stride
        self.pad = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Identity, or 2x subsampling with the new channels zero-padded (parameter-free)."""
        if self.stride > 1:
            x = F.avg_pool2d(x, 1, self.stride)
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block (random only in training mode)."""
        identity = self.shortcut(x)
        if self.training:
            if float(torch.rand(())) < self.survival:
                return F.relu(identity + self.branch(x))
            return F.relu(identity)
        return F.relu(identity + self.survival * self.branch(x))


class StochasticDepthResNet(nn.Module):
    """CIFAR ResNet (6n + 2 layers, 16/32/64 channels) with linearly decaying survival.

    Args:
        blocks_per_stage: n (18 for ResNet-110).
        widths: Channels per stage.
        last_survival: p_L, the survival probability of the last block (0.5 in the paper).
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        blocks_per_stage: int = 18,
        widths: Sequence[int] = (16, 32, 64),
        last_survival: float = 0.5,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, widths[0], 3)
        total = blocks_per_stage * len(widths)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for index, cout in enumerate(widths):
            for block in range(blocks_per_stage):
                depth = len(blocks) + 1
                survival = 1.0 - depth / total * (1.0 - last_survival)
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(StochasticDepthBlock(cin, cout, stride, survival))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, 32, 32) batch."""
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def specs() -> list[ModelSpec]:
    """Pre-activation ResNet-18 (ImageNet) and -164 (CIFAR), stochastic-depth ResNet-110,
    and small variants of both for CI."""
    s32 = image_contract(32, SMALL_CLASSES)
    return [
        entry(
            "preact_resnet18",
            "resnet",
            lambda: PreActResNet(PreActBlock, (2, 2, 2, 2)),
            image_contract(224),
        ),
        entry(
            "preact_resnet164",
            "resnet",
            lambda: PreActResNet(
                PreActBottleneck, (18, 18, 18), (16, 32, 64), False, 16, SMALL_CLASSES
            ),
            s32,
        ),
        entry(
            "preact_resnet_small",
            "resnet",
            lambda: PreActResNet(PreActBlock, (1, 1, 1), (16, 32, 64), False, 16, SMALL_CLASSES),
            s32,
        ),
        entry(
            "preact_resnet_bottleneck_small",
            "resnet",
            lambda: PreActResNet(
                PreActBottleneck, (1, 1, 1), (8, 16, 32), False, 16, SMALL_CLASSES
            ),
            s32,
        ),
        entry("resnet110_stochastic_depth", "resnet", StochasticDepthResNet, s32),
        entry(
            "resnet_stochastic_depth_small",
            "resnet",
            lambda: StochasticDepthResNet(blocks_per_stage=2),
            s32,
        ),
    ]
