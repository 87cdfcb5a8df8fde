"""Inception blocks: GoogLeNet / Inception v1, Inception v3, Inception-v4 and Inception-ResNet.

The full-size GoogLeNet and Inception v3 are torchvision catalogue entries (``googlenet``,
``inception_v3``); these are deploykit's configurable blocks and small networks built from
them for the CI matrix. All convolutions are conv + BN + ReLU, as in Inception v2 onwards
(and torchvision's GoogLeNet).

- :class:`InceptionV1Block` (Szegedy et al., "Going deeper with convolutions", CVPR 2015,
  Fig. 2b): four branches concatenated - 1x1; 1x1 reduction -> 3x3; 1x1 reduction -> 5x5;
  3x3/1 max pool -> 1x1 projection.
- :class:`InceptionV3Factorized` (Szegedy et al., "Rethinking the Inception architecture",
  CVPR 2016, Fig. 6): n x n convolutions factorised into 1 x n then n x 1 (n = 7): 1x1;
  1x1 -> 1x7 -> 7x1; 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7; avg pool -> 1x1.
- :class:`InceptionV3Expanded` (same paper, Fig. 7): the coarsest grid's expanded filter bank,
  whose 3x3 outputs split into parallel 1x3 and 3x1 convolutions.
- :class:`InceptionV4A` (Szegedy et al., "Inception-v4, Inception-ResNet and the impact of
  residual connections on learning", AAAI 2017, Fig. 4): avg pool -> 1x1 (96); 1x1 (96);
  1x1 (64) -> 3x3 (96); 1x1 (64) -> 3x3 (96) -> 3x3 (96); and Reduction-A (Fig. 7, k/l/m/n =
  192/224/256/384): 3x3/2 max pool; 3x3/2 conv (n); 1x1 (k) -> 3x3 (l) -> 3x3/2 (m).
- :class:`InceptionResNetA` (same paper, Fig. 16, Inception-ResNet-v2): 1x1 (32); 1x1 (32)
  -> 3x3 (32); 1x1 (32) -> 3x3 (48) -> 3x3 (64); concatenated, a linear 1x1 back to the
  input width, scaled by 0.1-0.3 (section 3.3) and added to the input, then ReLU.

Widths are given in the papers' units and multiplied by ``width`` in the small networks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract


def _w(channels: int, width: float) -> int:
    return max(4, round(channels * width))


class InceptionV1Block(nn.Module):
    """GoogLeNet Inception module with 1x1 reductions (see the module docstring)."""

    def __init__(
        self, cin: int, c1: int, r3: int, c3: int, r5: int, c5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = nn.Sequential(conv_bn(cin, r3, 1), conv_bn(r3, c3, 3))
        self.b5 = nn.Sequential(conv_bn(cin, r5, 1), conv_bn(r5, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, pool_proj, 1))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches."""
        return torch.cat((self.b1(x), self.b3(x), self.b5(x), self.bp(x)), 1)


class InceptionV3Factorized(nn.Module):
    """Inception v3 module with n x n convolutions factorised into 1 x n and n x 1."""

    def __init__(self, cin: int, mid: int, out: int = 192, n: int = 7) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, out, 1)
        self.b7 = nn.Sequential(
            conv_bn(cin, mid, 1), conv_bn(mid, mid, (1, n)), conv_bn(mid, out, (n, 1))
        )
        self.b77 = nn.Sequential(
            conv_bn(cin, mid, 1),
            conv_bn(mid, mid, (n, 1)),
            conv_bn(mid, mid, (1, n)),
            conv_bn(mid, mid, (n, 1)),
            conv_bn(mid, out, (1, n)),
        )
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(cin, out, 1))
        self.out_channels = 4 * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches."""
        return torch.cat((self.b1(x), self.b7(x), self.b77(x), self.bp(x)), 1)


class InceptionV3Expanded(nn.Module):
    """Inception v3 module with the 3x3 outputs expanded into parallel 1x3 and 3x1 convolutions."""

    def __init__(
        self, cin: int, c1: int = 320, c3: int = 384, r33: int = 448, cp: int = 192
    ) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b3 = conv_bn(cin, c3, 1)
        self.b3_a, self.b3_b = conv_bn(c3, c3, (1, 3)), conv_bn(c3, c3, (3, 1))
        self.b33 = nn.Sequential(conv_bn(cin, r33, 1), conv_bn(r33, c3, 3))
        self.b33_a, self.b33_b = conv_bn(c3, c3, (1, 3)), conv_bn(c3, c3, (3, 1))
        self.bp = nn.Sequential(nn.AvgPool2d(3, 1, 1), conv_bn(cin, cp, 1))
        self.out_channels = c1 + 4 * c3 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the six outputs."""
        b3, b33 = self.b3(x), self.b33(x)
        parts = (
            self.b1(x),
            self.b3_a(b3),
            self.b3_b(b3),
            self.b33_a(b33),
            self.b33_b(b33),
            self.bp(x),
        )
        return torch.cat(parts, 1)


class GridReduction(nn.Module):
    """Grid-size reduction: 3x3/2 max pool; 3x3/2 conv; 1x1 -> 3x3 -> 3x3/2 (Inception v3/v4
    Reduction-A with k/l/m/n)."""

    def __init__(self, cin: int, k: int, l: int, m: int, n: int) -> None:  # noqa: E741
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.conv = conv_bn(cin, n, 3, stride=2)
        self.tower = nn.Sequential(conv_bn(cin, k, 1), conv_bn(k, l, 3), conv_bn(l, m, 3, stride=2))
        self.out_channels = cin + n + m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the three branches at half resolution."""
        return torch.cat((self.pool(x), self.conv(x), self.tower(x)), 1)


class InceptionV4A(nn.Module):
    """Inception-v4 Inception-A module (four 96-wide branches at width 1)."""

    def __init__(self, cin: int, width: float = 1.0) -> None:
        super().__init__()
        c96, c64 = _w(96, width), _w(64, width)
        self.bp = nn.Sequential(
            nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv_bn(cin, c96, 1)
        )
        self.b1 = conv_bn(cin, c96, 1)
        self.b3 = nn.Sequential(conv_bn(cin, c64, 1), conv_bn(c64, c96, 3))
        self.b33 = nn.Sequential(conv_bn(cin, c64, 1), conv_bn(c64, c96, 3), conv_bn(c96, c96, 3))
        self.out_channels = 4 * c96

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the four branches."""
        return torch.cat((self.bp(x), self.b1(x), self.b3(x), self.b33(x)), 1)


class InceptionResNetA(nn.Module):
    """Inception-ResNet-v2 Inception-ResNet-A module with scaled residual (see module docstring)."""

    def __init__(self, channels: int, width: float = 1.0, scale: float = 0.17) -> None:
        super().__init__()
        c32, c48, c64 = _w(32, width), _w(48, width), _w(64, width)
        self.b1 = conv_bn(channels, c32, 1)
        self.b3 = nn.Sequential(conv_bn(channels, c32, 1), conv_bn(c32, c32, 3))
        self.b33 = nn.Sequential(
            conv_bn(channels, c32, 1), conv_bn(c32, c48, 3), conv_bn(c48, c64, 3)
        )
        self.up = nn.Conv2d(2 * c32 + c64, channels, 1)  # linear, with bias (no BN)
        self.scale = scale
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + scale * up(concat(branches)), then ReLU."""
        mixed = torch.cat((self.b1(x), self.b3(x), self.b33(x)), 1)
        return self.relu(x + self.scale * self.up(mixed))


class InceptionNet(nn.Module):
    """A small network: 3x3 stem, the given modules, global average pool, dropout, FC."""

    def __init__(
        self, stem: int, modules: Sequence[nn.Module], channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem, 3)
        self.body = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        x = self.pool(self.body(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def googlenet_small(num_classes: int = SMALL_CLASSES) -> nn.Module:
    """GoogLeNet's inception (3a), (3b), a 3x3/2 max pool and (4a) at 1/4 width."""
    a = InceptionV1Block(16, 16, 24, 32, 4, 8, 8)  # (3a) 64/96/128/16/32/32 at 1/4
    b = InceptionV1Block(a.out_channels, 32, 32, 48, 8, 24, 16)  # (3b)
    c = InceptionV1Block(b.out_channels, 48, 24, 52, 4, 12, 16)  # (4a)
    return InceptionNet(16, [a, b, nn.MaxPool2d(3, 2, 1), c], c.out_channels, num_classes)


def inception_v3_small(num_classes: int = SMALL_CLASSES) -> nn.Module:
    """Inception v3's 17x17 factorised (n = 7) module, a grid reduction and the expanded
    8x8 module, at 1/8 width."""
    a = InceptionV3Factorized(32, 16, 24)
    red = GridReduction(a.out_channels, 16, 24, 24, 48)
    b = InceptionV3Expanded(red.out_channels, 40, 48, 56, 24)
    return InceptionNet(32, [nn.MaxPool2d(3, 2, 1), a, red, b], b.out_channels, num_classes)


def inception_v4_small(num_classes: int = SMALL_CLASSES) -> nn.Module:
    """Two Inception-v4 Inception-A modules and Reduction-A at 1/8 width."""
    width = 0.125
    a1 = InceptionV4A(32, width)
    a2 = InceptionV4A(a1.out_channels, width)
    red = GridReduction(
        a2.out_channels, _w(192, width), _w(224, width), _w(256, width), _w(384, width)
    )
    return InceptionNet(32, [a1, a2, red], red.out_channels, num_classes)


def inception_resnet_small(num_classes: int = SMALL_CLASSES) -> nn.Module:
    """Two Inception-ResNet-A modules (residual scale 0.17), Reduction-A, at 1/4 width."""
    width = 0.25
    blocks = [InceptionResNetA(32, width), InceptionResNetA(32, width)]
    red = GridReduction(32, _w(64, width), _w(64, width), _w(96, width), _w(96, width))
    return InceptionNet(32, [*blocks, red], red.out_channels, num_classes)


def specs() -> list[ModelSpec]:
    """Small Inception v1, v3, v4 and Inception-ResNet networks at 32 px for CI."""
    s32 = image_contract(32, SMALL_CLASSES)
    return [
        entry("googlenet_small", "inception", googlenet_small, s32),
        entry("inception_v3_small", "inception", inception_v3_small, s32),
        entry("inception_v4_small", "inception", inception_v4_small, s32),
        entry("inception_resnet_small", "inception", inception_resnet_small, s32),
    ]
