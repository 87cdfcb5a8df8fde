"""Dual Path Networks (Chen, Li, Xiao, Jin, Yan & Feng, "Dual path networks", NeurIPS 2017).

Block structure: the input is a residual path (width ``bw``) and a densely connected path
(growing by ``inc`` per block), concatenated. A block applies pre-activated (BN-ReLU-conv)
1x1 -> grouped 3x3 (cardinality G, ResNeXt-style) -> 1x1 to ``bw + inc`` channels, splits
the result: the first ``bw`` channels are added to the residual path, the last ``inc`` are
concatenated to the dense path. The first block of a stage projects the input with a 1x1
convolution (stride 2 from stage 3) to ``bw + 2 * inc`` channels, split into the two paths.
After the last block: BN-ReLU, global average pooling and a 1x1-conv classifier.
DPN-92: stem 64 (7x7/2 + 3x3/2 max pool), k_R = 96, G = 32, blocks (3, 4, 20, 3), dense
increments (16, 32, 24, 128); the paper gives 145 MB of weights (37.7M parameters in
the authors' code) and 6.5 GFLOPs at 224.
DPN-68 ("small"): stem 10 (3x3), k_R = 128, blocks (3, 4, 12, 3), increments (16, 32, 32, 64),
bottleneck widths 64/128/256/512 (no x4 factor).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract

DualTensor = tuple[torch.Tensor, torch.Tensor]


def _bn_relu_conv(
    cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(cin),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
    )


class DualPathBlock(nn.Module):
    """One dual path block (see the module docstring).

    Args:
        cin: Channels of the concatenated input (residual + dense).
        mid: Width of the 1x1 and grouped 3x3 convolutions.
        bw: Residual path width.
        inc: Dense path increment.
        groups: Cardinality of the 3x3 convolution.
        kind: ``proj`` (first block of stage 2), ``down`` (first block, stride 2) or ``normal``.
    """

    def __init__(self, cin: int, mid: int, bw: int, inc: int, groups: int, kind: str) -> None:
        super().__init__()
        if kind not in ("proj", "down", "normal"):
            raise ValueError(f"unknown dual path block kind {kind!r}")
        stride = 2 if kind == "down" else 1
        self.bw = bw
        self.proj = _bn_relu_conv(cin, bw + 2 * inc, 1, stride) if kind != "normal" else None
        self.conv1 = _bn_relu_conv(cin, mid, 1)
        self.conv2 = _bn_relu_conv(mid, mid, 3, stride, groups)
        self.conv3 = _bn_relu_conv(mid, bw + inc, 1)

    def forward(self, x: DualTensor | torch.Tensor) -> DualTensor:
        """(residual, dense), or the stem output for the first block -> (residual, dense)."""
        joined = torch.cat(x, 1) if isinstance(x, tuple) else x
        if self.proj is not None:
            projected = self.proj(joined)
            residual, dense = projected[:, : self.bw], projected[:, self.bw :]
        elif isinstance(x, tuple):
            residual, dense = x
        else:
            raise ValueError("a dual path block without projection needs (residual, dense)")
        out = self.conv3(self.conv2(self.conv1(joined)))
        return residual + out[:, : self.bw], torch.cat((dense, out[:, self.bw :]), 1)


class DPN(nn.Module):
    """Dual path network.

    Args:
        stem_channels: Output channels of the stem.
        k_r: Bottleneck width factor (mid = k_r * bw / (64 * bw_factor)).
        groups: Cardinality G.
        blocks: Blocks per stage.
        increments: Dense increment per stage.
        small: DPN-68 layout (3x3/2 stem, residual widths 64..512 instead of 256..2048).
        num_classes: Classifier outputs.
        max_pool_stem: Max pool after the stem (the ImageNet layout).
    """

    def __init__(
        self,
        stem_channels: int = 64,
        k_r: int = 96,
        groups: int = 32,
        blocks: Sequence[int] = (3, 4, 20, 3),
        increments: Sequence[int] = (16, 32, 24, 128),
        small: bool = False,
        num_classes: int = 1000,
        max_pool_stem: bool = True,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        factor = 1 if small else 4
        stem: list[nn.Module] = [conv_bn(3, stem_channels, 3 if small else 7, stride=2)]
        if max_pool_stem:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        cin = stem_channels
        for index, (count, inc) in enumerate(zip(blocks, increments, strict=True)):
            bw = base_width * 2**index * factor
            mid = k_r * bw // (64 * factor)
            layers.append(
                DualPathBlock(cin, mid, bw, inc, groups, "proj" if index == 0 else "down")
            )
            cin = bw + 3 * inc
            for _ in range(count - 1):
                layers.append(DualPathBlock(cin, mid, bw, inc, groups, "normal"))
                cin += inc
        self.blocks = nn.ModuleList(layers)
        self.post = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        state: DualTensor | torch.Tensor = self.stem(x)
        for block in self.blocks:
            state = block(state)
        assert isinstance(state, tuple)
        x = self.post(torch.cat(state, 1))
        return torch.flatten(self.classifier(self.pool(x)), 1)


def specs() -> list[ModelSpec]:
    """DPN-92 and DPN-68 at 224, and a small DPN (G = 8) at 32 px for CI."""
    return [
        entry("dpn92", "dpn", DPN, image_contract(224)),
        entry(
            "dpn68",
            "dpn",
            lambda: DPN(10, 128, 32, (3, 4, 12, 3), (16, 32, 32, 64), small=True),
            image_contract(224),
        ),
        entry(
            "dpn_small",
            "dpn",
            lambda: DPN(
                16,
                64,
                8,
                (2, 2, 2),
                (8, 16, 32),
                small=True,
                num_classes=SMALL_CLASSES,
                max_pool_stem=False,
                base_width=16,
            ),
            image_contract(32, SMALL_CLASSES),
            emphasis=True,
        ),
    ]
