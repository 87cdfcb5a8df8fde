"""Small, configurable variants of the families torchvision implements, for the CI matrix.

The full-size models (vgg16/19, resnet18/50, resnext50_32x4d, densenet121, googlenet,
inception_v3, mobilenet_v2/v3, shufflenet_v2, squeezenet1_0/1_1) are torchvision catalogue
entries; these variants build the same torchvision block classes at small widths and input
sizes, so the whole coverage matrix runs in minutes:

- VGG (Simonyan & Zisserman, ICLR 2015): torchvision's ``make_layers`` with the VGG-16 (D)
  and VGG-19 (E) layer counts at 1/8 width, a 256-256 classifier, 32 px.
- ResNet (He et al., CVPR 2016): torchvision's ``BasicBlock`` / ``Bottleneck`` in a
  four-stage network of configurable widths; each stage opens with a projection shortcut
  (1x1 conv + BN, where stride or width changes) followed by identity shortcuts.
- ResNeXt (Xie et al., CVPR 2017): torchvision's ``Bottleneck`` with cardinality 32
  (grouped 3x3) at a small bottleneck width.
- DenseNet (Huang et al., CVPR 2017): torchvision's ``DenseNet`` with growth rate 8, two
  dense blocks of two layers and one transition (BN-ReLU-1x1 conv-2x2 avg pool).
- MobileNet v2 (Sandler et al., CVPR 2018) at width 0.25; MobileNet v3 small and large
  (Howard et al., ICCV 2019) at width 0.25 / 0.35; ShuffleNet v2 (Ma et al., ECCV 2018)
  with small stage widths; SqueezeNet 1.0 and 1.1 (Iandola et al., 2016) at 64 px.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract


def _vgg_cfg(layers: str) -> list[str | int]:
    """torchvision's VGG cfg list from "8 8 M 16 ..." (numbers: 3x3 conv widths; M: max pool)."""
    return [item if item == "M" else int(item) for item in layers.split()]


# VGG-16 (configuration D) and VGG-19 (E) layer counts at 1/8 width.
VGG16_SMALL_CFG = _vgg_cfg("8 8 M 16 16 M 32 32 32 M 64 64 64 M 64 64 64 M")
VGG19_SMALL_CFG = _vgg_cfg("8 8 M 16 16 M 32 32 32 32 M 64 64 64 64 M 64 64 64 64 M")


class SmallVGG(nn.Module):
    """VGG features from torchvision's ``make_layers`` and a small FC classifier (32 px input)."""

    def __init__(
        self, cfg: list[str | int], num_classes: int = SMALL_CLASSES, hidden: int = 256
    ) -> None:
        super().__init__()
        from torchvision.models.vgg import make_layers

        self.features = make_layers(cfg, batch_norm=False)
        channels = [c for c in cfg if isinstance(c, int)][-1]
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, 32, 32) batch (five 2x2 pools leave 1x1)."""
        return self.classifier(torch.flatten(self.features(x), 1))


class CompactResNet(nn.Module):
    """Four-stage ResNet of torchvision blocks with configurable widths (small inputs).

    Args:
        block: ``torchvision.models.resnet.BasicBlock`` or ``Bottleneck`` (or a subclass).
        layers: Blocks per stage.
        widths: ``planes`` per stage (output = planes * block.expansion).
        groups: Cardinality of the bottleneck's 3x3 convolution (ResNeXt).
        width_per_group: Bottleneck width per group at planes=64 (torchvision's base_width).
        stem_channels: Output channels of the 3x3 stem.
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        block: Any,
        layers: Sequence[int],
        widths: Sequence[int] = (16, 32, 64, 128),
        groups: int = 1,
        width_per_group: int = 64,
        stem_channels: int = 16,
        num_classes: int = SMALL_CLASSES,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem_channels, 3)
        blocks: list[nn.Module] = []
        cin = stem_channels
        for index, (planes, count) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if index == 0 else 2
            cout = planes * block.expansion
            downsample = None
            if stride != 1 or cin != cout:
                downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            blocks.append(block(cin, planes, stride, downsample, groups, width_per_group))
            blocks += [
                block(cout, planes, groups=groups, base_width=width_per_group)
                for _ in range(count - 1)
            ]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def resnet_basic_small() -> nn.Module:
    """Basic blocks (3x3-3x3), two per stage: identity and projection shortcuts."""
    from torchvision.models.resnet import BasicBlock

    return CompactResNet(BasicBlock, (2, 2, 2, 2), widths=(16, 32, 64, 128))


def resnet_bottleneck_small() -> nn.Module:
    """Bottleneck blocks (1x1-3x3-1x1, expansion 4), two per stage."""
    from torchvision.models.resnet import Bottleneck

    return CompactResNet(Bottleneck, (2, 2, 2, 2), widths=(8, 16, 32, 64))


def resnext_small() -> nn.Module:
    """ResNeXt bottlenecks with cardinality 32 and 2 channels per group at planes=32."""
    from torchvision.models.resnet import Bottleneck

    return CompactResNet(
        Bottleneck, (1, 1, 1, 1), widths=(32, 64, 128, 256), groups=32, width_per_group=2
    )


def densenet_small() -> nn.Module:
    """DenseNet-BC with growth rate 8, two dense blocks of two layers, one transition."""
    from torchvision.models.densenet import DenseNet

    return DenseNet(
        growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=SMALL_CLASSES
    )


def mobilenet_v2_small() -> nn.Module:
    """MobileNet v2 (inverted residuals, linear bottlenecks) at width 0.25."""
    from torchvision.models import MobileNetV2

    return MobileNetV2(num_classes=SMALL_CLASSES, width_mult=0.25)


def mobilenet_v3_small_small() -> nn.Module:
    """MobileNet v3-Small (SE, hard-swish) at width 0.25."""
    return _mobilenet_v3("mobilenet_v3_small", 0.25)


def mobilenet_v3_large_small() -> nn.Module:
    """MobileNet v3-Large (SE, hard-swish) at width 0.35."""
    return _mobilenet_v3("mobilenet_v3_large", 0.35)


def _mobilenet_v3(arch: str, width: float) -> nn.Module:
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, last_channel = _mobilenet_v3_conf(arch, width_mult=width)
    return MobileNetV3(setting, last_channel, num_classes=SMALL_CLASSES)


def shufflenet_v2_small() -> nn.Module:
    """ShuffleNet v2 (channel split, shuffle, concat) with stages of 2 units, 24/48/96 wide."""
    from torchvision.models import ShuffleNetV2

    return ShuffleNetV2([2, 2, 2], [16, 24, 48, 96, 256], num_classes=SMALL_CLASSES)


def squeezenet_small(version: str) -> nn.Module:
    """SqueezeNet 1.0 or 1.1 (fire modules, conv classifier) with a 10-class classifier."""
    from torchvision.models import SqueezeNet

    return SqueezeNet(version=version, num_classes=SMALL_CLASSES)


def specs() -> list[ModelSpec]:
    """The small torchvision-block variants of the CI coverage matrix."""
    s32, s64 = image_contract(32, SMALL_CLASSES), image_contract(64, SMALL_CLASSES)

    def tv(name: str, family: str, builder: Any, contract: Any, emphasis: bool = False) -> Any:
        return entry(name, family, builder, contract, source="torchvision", emphasis=emphasis)

    return [
        tv("vgg16_small", "vgg", lambda: SmallVGG(VGG16_SMALL_CFG), s32),
        tv("vgg19_small", "vgg", lambda: SmallVGG(VGG19_SMALL_CFG), s32),
        tv("resnet_basic_small", "resnet", resnet_basic_small, s32),
        tv("resnet_bottleneck_small", "resnet", resnet_bottleneck_small, s32),
        tv("resnext_small", "resnext", resnext_small, s32, emphasis=True),
        tv("densenet_small", "densenet", densenet_small, s64),
        tv("mobilenet_v2_small", "mobilenet", mobilenet_v2_small, s64, emphasis=True),
        tv("mobilenet_v3_small_small", "mobilenet", mobilenet_v3_small_small, s64, True),
        tv("mobilenet_v3_large_small", "mobilenet", mobilenet_v3_large_small, s64, True),
        tv("shufflenet_v2_small", "shufflenet", shufflenet_v2_small, s64, emphasis=True),
        tv("squeezenet1_0_small", "squeezenet", lambda: squeezenet_small("1_0"), s64, True),
        tv("squeezenet1_1_small", "squeezenet", lambda: squeezenet_small("1_1"), s64, True),
    ]
