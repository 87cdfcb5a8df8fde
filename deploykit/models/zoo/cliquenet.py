"""CliqueNet (Yang, Zhong, Shen & Lin, "Convolutional neural networks with alternately updated
clique", CVPR 2018).

Block structure: a clique block of T layers (k feature maps each) in which every pair of
layers is connected both ways, with one weight W_ij per ordered pair shared by both stages.
Stage I initialises the layers in order from the block input X_0 and the layers already
initialised: X_i = g(W_0i * X_0 + sum_{l<i} W_li * X_l). Stage II then updates each layer
in order from the newest versions of all other layers - the already-updated ones (l < i) and
the stage-I ones (m > i) - reusing the same weights (the recurrent, alternately updated
clique): X_i' = g(sum_{l<i} W_li * X_l' + sum_{m>i} W_mi * X_m). Here g is BN + ReLU applied
to the summed 3x3 convolutions (one BN per layer and stage). The stage-II features go
through a transition (BN-ReLU-1x1 conv-2x2 average pool) to the next block; the block
features [X_0, stage-II] of every block are globally average-pooled and concatenated into
the multi-scale feature the classifier sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, conv_bn, entry, image_contract


class CliqueBlock(nn.Module):
    """An alternately updated clique of `layers` layers with `k` maps each.

    Args:
        cin: Channels of the block input X_0.
        k: Feature maps per layer.
        layers: T, the layers in the clique.
    """

    def __init__(self, cin: int, k: int, layers: int) -> None:
        super().__init__()
        if layers < 2:
            raise ValueError("a clique needs at least two layers")
        self.layers = layers
        self.init = nn.ModuleList(nn.Conv2d(cin, k, 3, 1, 1, bias=False) for _ in range(layers))
        # W_li for every ordered pair l != i, shared by stage I (l < i) and stage II.
        self.pairs = nn.ModuleDict(
            {
                f"{src}_{dst}": nn.Conv2d(k, k, 3, 1, 1, bias=False)
                for src in range(layers)
                for dst in range(layers)
                if src != dst
            }
        )
        self.norm1 = nn.ModuleList(self._bn_relu(k) for _ in range(layers))
        self.norm2 = nn.ModuleList(self._bn_relu(k) for _ in range(layers))
        self.out_channels = layers * k

    @staticmethod
    def _bn_relu(channels: int) -> nn.Sequential:
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The concatenated stage-II features."""
        stage1: list[torch.Tensor] = []
        for i in range(self.layers):
            total = self.init[i](x)
            for src in range(i):
                total = total + self.pairs[f"{src}_{i}"](stage1[src])
            stage1.append(self.norm1[i](total))
        stage2 = list(stage1)
        for i in range(self.layers):
            sources = [src for src in range(self.layers) if src != i]
            total = self.pairs[f"{sources[0]}_{i}"](stage2[sources[0]])
            for src in sources[1:]:
                total = total + self.pairs[f"{src}_{i}"](stage2[src])
            stage2[i] = self.norm2[i](total)
        return torch.cat(stage2, 1)


class CliqueNet(nn.Module):
    """CliqueNet: stem, clique blocks with transitions, multi-scale global pooling, FC.

    Args:
        stem_channels: Output channels of the 3x3 stem (64 on CIFAR).
        k: Feature maps per layer.
        layers_per_block: T of each block.
        num_classes: Classifier outputs.
    """

    def __init__(
        self,
        stem_channels: int = 64,
        k: int = 36,
        layers_per_block: Sequence[int] = (4, 4, 4),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem_channels, 3)
        blocks: list[nn.Module] = []
        transitions: list[nn.Module] = []
        cin = stem_channels
        pooled = 0
        for index, layers in enumerate(layers_per_block):
            block = CliqueBlock(cin, k, layers)
            blocks.append(block)
            pooled += cin + block.out_channels
            if index < len(layers_per_block) - 1:
                transitions.append(
                    nn.Sequential(
                        nn.BatchNorm2d(block.out_channels),
                        nn.ReLU(inplace=True),
                        nn.Conv2d(block.out_channels, block.out_channels, 1, bias=False),
                        nn.AvgPool2d(2),
                    )
                )
            cin = block.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(pooled, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        x = self.stem(x)
        features: list[torch.Tensor] = []
        for index, block in enumerate(self.blocks):
            stage2 = block(x)
            features.append(torch.flatten(self.pool(torch.cat((x, stage2), 1)), 1))
            if index < len(self.transitions):
                x = self.transitions[index](stage2)
        return self.fc(torch.cat(features, 1))


def specs() -> list[ModelSpec]:
    """CliqueNet (T = 12, k = 36; 3 blocks of 4 layers) on 32 px, and a small one for CI."""
    s32 = image_contract(32, SMALL_CLASSES)
    return [
        entry("cliquenet_t12_k36", "cliquenet", CliqueNet, s32),
        entry(
            "cliquenet_small",
            "cliquenet",
            lambda: CliqueNet(stem_channels=16, k=12, layers_per_block=(3, 3)),
            s32,
        ),
    ]
