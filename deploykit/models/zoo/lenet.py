"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document
recognition", Proc. IEEE 1998).

Block structure on a 32x32 single-channel input: C1 conv 5x5 (6 maps, 28x28) - S2 2x2
subsampling - C3 conv 5x5 (16 maps, 10x10) - S4 2x2 subsampling - C5/F5 120 units -
F6 84 units - 10 outputs, with tanh squashing and average subsampling. C3 uses the paper's
connection table (Table I): maps 0-5 see three contiguous S2 maps, 6-11 four contiguous,
12-14 four discontinuous, 15 all six - 1,516 trainable parameters instead of 2,416. The
table is a fixed mask on the C3 kernel, applied in ``forward``; the exporters fold it into
the constant weight, so the ONNX graph holds one ordinary Conv. The output layer is linear
(the paper's Euclidean RBF units are fixed, not trained) and S2/S4 have no trainable
coefficients, so the trainable parameters are 60,806 against the paper's "about 60,000".
The rest is :class:`deploykit.models.seednets.LeNet5`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from deploykit.models.catalogue import ModelSpec
from deploykit.models.contract import InputContract
from deploykit.models.seednets import LeNet5
from deploykit.models.zoo._common import entry

# S2 maps each C3 map sees (LeCun et al. 1998, Table I).
C3_TABLE: tuple[tuple[int, ...], ...] = (
    *((i, (i + 1) % 6, (i + 2) % 6) for i in range(6)),
    *((i, (i + 1) % 6, (i + 2) % 6, (i + 3) % 6) for i in range(6)),
    (0, 1, 3, 4),
    (1, 2, 4, 5),
    (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)
# Digits in [0, 1] scaled to [-1, 1]; the paper normalised to mean 0, variance ~1.
LENET_CONTRACT = InputContract(
    channels=1,
    height=32,
    width=32,
    resize=32,
    mean=(0.5,),
    std=(0.5,),
    color="GRAY",
    num_classes=10,
)


class TableConv2d(nn.Conv2d):
    """A convolution whose output map j only sees the input maps listed in ``table[j]``."""

    mask: torch.Tensor

    def __init__(self, table: tuple[tuple[int, ...], ...], in_channels: int, kernel: int) -> None:
        super().__init__(in_channels, len(table), kernel)
        mask = torch.zeros(len(table), in_channels, 1, 1)
        for out, sources in enumerate(table):
            mask[out, list(sources)] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve with the masked kernel."""
        return F.conv2d(x, self.weight * self.mask, self.bias)

    def trainable(self) -> int:
        """Weights and biases that reach the output (the unmasked ones)."""
        kernel = self.weight.shape[2] * self.weight.shape[3]
        return int(self.mask.sum().item()) * kernel + self.out_channels


def lenet5(c3_table: bool = True) -> nn.Module:
    """The original LeNet-5: tanh, average-pool subsampling and (by default) the C3 table."""
    net = LeNet5(num_classes=10, in_channels=1, activation="tanh", pool="avg")
    if c3_table:
        net.features[3] = TableConv2d(C3_TABLE, 6, 5)
    return net


def trainable_params(model: nn.Module) -> int:
    """Parameters that reach the output: masked C3 weights are not counted."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, TableConv2d):
            total -= sum(p.numel() for p in module.parameters()) - module.trainable()
    return total


def specs() -> list[ModelSpec]:
    """LeNet-5 (already small: it is its own CI variant)."""
    return [entry("lenet5", "lenet", lenet5, LENET_CONTRACT)]
