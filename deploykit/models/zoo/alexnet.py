"""AlexNet (Krizhevsky, Sutskever & Hinton, "ImageNet classification with deep convolutional
neural networks", NeurIPS 2012), with its original two-group convolutions.

Block structure: conv1 11x11/4 (96) - ReLU - LRN - max-pool 3/2 - conv2 5x5 (256, groups=2) -
ReLU - LRN - max-pool 3/2 - conv3 3x3 (384, both groups) - conv4 3x3 (384, groups=2) -
conv5 3x3 (256, groups=2) - max-pool 3/2 - FC 4096 - FC 4096 - FC 1000, dropout 0.5 before
the first two FC layers. The groups reproduce the paper's two-GPU split: conv2, conv4 and
conv5 only see the kernel maps on their own GPU. Local response normalisation (n=5, k=2,
alpha=1e-4, beta=0.75) is optional; PyTorch divides alpha by n, so ``alpha * n`` is passed
to reproduce the paper's formula. The paper counts 60 million parameters; with groups=2 this
layout has 60.97M (torchvision's single-group variant, without LRN, has 61.1M).
"""

from __future__ import annotations

import torch
from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.zoo._common import SMALL_CLASSES, entry, image_contract

LRN_SIZE = 5


def _out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class AlexNet(nn.Module):
    """AlexNet with configurable width, groups and LRN.

    Args:
        num_classes: Classifier outputs.
        image_size: Square input size (the classifier's input is computed from it).
        groups: Groups of conv2, conv4 and conv5 (2 in the paper, 1 in torchvision).
        lrn: Local response normalisation after conv1 and conv2.
        width: Channel multiplier (1.0: 96/256/384/384/256 maps).
        hidden: Units of the two hidden FC layers (4096 in the paper).
        dropout: Dropout before the hidden FC layers.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        image_size: int = 224,
        groups: int = 2,
        lrn: bool = True,
        width: float = 1.0,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (
            max(groups, round(c * width / groups) * groups) for c in (96, 256, 384, 384, 256)
        )

        def norm() -> nn.Module:
            if not lrn:
                return nn.Identity()
            return nn.LocalResponseNorm(LRN_SIZE, alpha=1e-4 * LRN_SIZE, beta=0.75, k=2.0)

        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 11, 4, 2),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c1, c2, 5, padding=2, groups=groups),
            nn.ReLU(inplace=True),
            norm(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1, groups=groups),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
        )
        size = _out(_out(_out(_out(image_size, 11, 4, 2), 3, 2), 3, 2), 3, 2)
        if size < 1:
            raise ValueError(f"AlexNet needs a larger input than {image_size}x{image_size}")
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(c5 * size * size, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for an (N, 3, H, W) batch."""
        return self.classifier(self.features(x).flatten(1))


def specs() -> list[ModelSpec]:
    """AlexNet at 224 with groups=2 and LRN, and a 1/8-width 64 px variant for CI."""
    return [
        entry("alexnet_grouped", "alexnet", lambda: AlexNet(), image_contract(224)),
        entry(
            "alexnet_grouped_small",
            "alexnet",
            lambda: AlexNet(SMALL_CLASSES, image_size=64, width=0.125, hidden=128),
            image_contract(64, SMALL_CLASSES),
        ),
    ]
