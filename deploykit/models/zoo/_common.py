"""Helpers shared by the zoo modules: conv + BN blocks, input contracts and catalogue entries."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deploykit.models.catalogue import ModelSpec
from deploykit.models.contract import InputContract

# Classifier size of the small variants the CI coverage matrix runs.
SMALL_CLASSES = 10
KernelSize = int | tuple[int, int]


def _pair(value: KernelSize) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


def conv_bn(
    cin: int,
    cout: int,
    kernel: KernelSize,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    act: bool = True,
    padding: KernelSize | None = None,
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU), "same" padding for odd kernels unless given."""
    kh, kw = _pair(kernel)
    pad = padding if padding is not None else (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, (kh, kw), stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def image_contract(size: int, num_classes: int = 1000) -> InputContract:
    """RGB ImageNet-normalised contract at `size` (resize by the usual 256/224 ratio)."""
    return InputContract(
        height=size, width=size, resize=round(size * 256 / 224), num_classes=num_classes
    )


def entry(
    name: str,
    family: str,
    builder: Callable[[], nn.Module],
    contract: InputContract,
    *,
    source: str = "deploykit",
    emphasis: bool = False,
    num_params: int | None = None,
) -> ModelSpec:
    """A catalogue entry with random weights (the catalogue seeds the builder)."""
    return ModelSpec(
        name=name,
        family=family,
        source=source,
        contract=contract,
        builder=builder,
        num_params=num_params,
        emphasis=emphasis,
    )
