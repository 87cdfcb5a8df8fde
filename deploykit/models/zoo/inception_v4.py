"""Inception-v4 at full size (Szegedy, Ioffe, Vanhoucke & Alemi, "Inception-v4,
Inception-ResNet and the impact of residual connections on learning", AAAI 2017).

Block structure (paper Fig. 9): the stem of Fig. 3 (three 3x3 convolutions, then three
split-and-concatenate stages: max pool || 3x3/2 conv; 1x1 -> 3x3 || 1x1 -> 1x7 -> 7x1 -> 3x3;
3x3/2 conv || max pool) to 35x35x384, 4 x Inception-A (Fig. 4), Reduction-A (Fig. 7 with
k/l/m/n = 192/224/256/384), 7 x Inception-B (Fig. 5, 1x7/7x1 factorised), Reduction-B
(Fig. 8), 3 x Inception-C (Fig. 6, 1x3/3x1 expanded), average pooling, dropout (keep 0.8)
and a 1000-way FC layer, for 299x299 inputs. "V" (valid) convolutions have no padding.
The paper gives no parameter count; the reference implementations of this layout have
42.68M parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.contract import InputContract
from deploykit.models.zoo._common import conv_bn, entry
from deploykit.models.zoo.inception import InceptionV4A


def _valid(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return conv_bn(cin, cout, kernel, stride=stride, padding=0)


class _Concat(nn.Module):
    """Run branches on the same input and concatenate them on channels."""

    def __init__(self, *branches: nn.Module) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated branch outputs."""
        return torch.cat([branch(x) for branch in self.branches], 1)


def stem() -> nn.Sequential:
    """Inception-v4 stem (Fig. 3): 299x299x3 -> 35x35x384."""
    return nn.Sequential(
        _valid(3, 32, 3, 2),
        _valid(32, 32, 3),
        conv_bn(32, 64, 3),
        _Concat(nn.MaxPool2d(3, 2), _valid(64, 96, 3, 2)),
        _Concat(
            nn.Sequential(conv_bn(160, 64, 1), _valid(64, 96, 3)),
            nn.Sequential(
                conv_bn(160, 64, 1),
                conv_bn(64, 64, (1, 7)),
                conv_bn(64, 64, (7, 1)),
                _valid(64, 96, 3),
            ),
        ),
        _Concat(_valid(192, 192, 3, 2), nn.MaxPool2d(3, 2)),
    )


def inception_b(cin: int = 1024) -> _Concat:
    """Inception-B (Fig. 5): 1x7/7x1 factorised branches, 1024 channels out."""
    return _Concat(
        conv_bn(cin, 384, 1),
        nn.Sequential(conv_bn(cin, 192, 1), conv_bn(192, 224, (1, 7)), conv_bn(224, 256, (7, 1))),
        nn.Sequential(
            conv_bn(cin, 192, 1),
            conv_bn(192, 192, (7, 1)),
            conv_bn(192, 224, (1, 7)),
            conv_bn(224, 224, (7, 1)),
            conv_bn(224, 256, (1, 7)),
        ),
        nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv_bn(cin, 128, 1)),
    )


def reduction_b(cin: int = 1024) -> _Concat:
    """Reduction-B (Fig. 8): 17x17x1024 -> 8x8x1536."""
    return _Concat(
        nn.Sequential(conv_bn(cin, 192, 1), _valid(192, 192, 3, 2)),
        nn.Sequential(
            conv_bn(cin, 256, 1),
            conv_bn(256, 256, (1, 7)),
            conv_bn(256, 320, (7, 1)),
            _valid(320, 320, 3, 2),
        ),
        nn.MaxPool2d(3, 2),
    )


class InceptionC(nn.Module):
    """Inception-C (Fig. 6): 1x3/3x1 expanded branches, 1536 channels out."""

    def __init__(self, cin: int = 1536) -> None:
        super().__init__()
        self.b1 = conv_bn(cin, 256, 1)
        self.b3 = conv_bn(cin, 384, 1)
        self.b3_a, self.b3_b = conv_bn(384, 256, (1, 3)), conv_bn(384, 256, (3, 1))
        self.b33 = nn.Sequential(
            conv_bn(cin, 384, 1), conv_bn(384, 448, (3, 1)), conv_bn(448, 512, (1, 3))
        )
        self.b33_a, self.b33_b = conv_bn(512, 256, (1, 3)), conv_bn(512, 256, (3, 1))
        self.bp = nn.Sequential(
            nn.AvgPool2d(3, 1, 1, count_include_pad=False), conv_bn(cin, 256, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the six outputs."""
        b3, b33 = self.b3(x), self.b33(x)
        parts = [self.b1(x), self.b3_a(b3), self.b3_b(b3), self.b33_a(b33), self.b33_b(b33)]
        return torch.cat([*parts, self.bp(x)], 1)


class _ValidReductionA(nn.Module):
    """Reduction-A with the paper's valid 3x3/2 convolutions and max pool (35 -> 17).

    Args:
        cin: Input channels (384).
        widths: The paper's k, l, m, n (192, 224, 256, 384 for Inception-v4).
    """

    def __init__(
        self, cin: int = 384, widths: tuple[int, int, int, int] = (192, 224, 256, 384)
    ) -> None:
        super().__init__()
        k, l_, m, n = widths
        self.pool = nn.MaxPool2d(3, 2)
        self.conv = _valid(cin, n, 3, 2)
        self.tower = nn.Sequential(conv_bn(cin, k, 1), conv_bn(k, l_, 3), _valid(l_, m, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate the three branches (cin + n + m channels)."""
        return torch.cat((self.pool(x), self.conv(x), self.tower(x)), 1)


class InceptionV4(nn.Module):
    """Inception-v4 for 299x299 inputs (see the module docstring)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            stem(),
            *(InceptionV4A(384) for _ in range(4)),
            _ValidReductionA(),
            *(inception_b() for _ in range(7)),
            reduction_b(),
            *(InceptionC() for _ in range(3)),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1536, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, 299, 299) batch."""
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.dropout(x))


INCEPTION_V4_CONTRACT = InputContract(
    height=299,
    width=299,
    resize=342,
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    interpolation="bicubic",
)


def specs() -> list[ModelSpec]:
    """Inception-v4 at 299 (its CI variant is ``inception_v4_small``)."""
    return [entry("inception_v4", "inception", InceptionV4, INCEPTION_V4_CONTRACT)]
