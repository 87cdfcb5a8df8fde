"""Parameter and multiply-add counts, measured the way the papers count them.

Multiply-adds (the "FLOPs" of ShuffleNet and MobileNet, the "mult-adds" of the
MobileNet paper) are counted for convolutions (transposed included) and fully
connected layers only, at batch 1; BatchNorm, activations, pooling and additions
are not counted, as in the papers. The count runs the model on the ``meta`` device:
shapes only, no arithmetic, so full-size networks are counted in milliseconds.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable and frozen), shared ones counted once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass of `model` on an input of `input_shape` (batch 1).

    Args:
        model: The network (left untouched: a copy is moved to the meta device).
        input_shape: ``(1, C, H, W)``.

    Returns:
        Multiply-adds of the convolution and linear layers.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    total = 0

    def conv_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Conv1d)
        per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
        if isinstance(module, nn.ConvTranspose2d):
            # Each input pixel scatters into out_channels / groups outputs per kernel tap.
            total += (
                inputs[0].numel()
                * module.out_channels
                // module.groups
                * math.prod(module.kernel_size)
            )
        else:
            total += out.numel() * per_output

    def linear_hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += out.numel() * module.in_features

    handles = []
    for module in meta.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Conv1d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            meta(torch.empty(input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return total
