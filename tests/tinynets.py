"""Small models for fast tests, importable as ``tinynets:<factory>`` (tests/ is on sys.path).

They exercise what the product is about — grouped and depthwise convolutions,
Conv+BN pairs for the fuse stage, and a ShuffleNet channel shuffle — at a size
that exports in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class _Shuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class TinyNet(nn.Module):
    """Conv-BN-ReLU, a grouped conv, channel shuffle, a depthwise conv, pool and classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 1, groups=4, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            _Shuffle(4),
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def tiny_net() -> nn.Module:
    """A TinyNet whose BatchNorm statistics are not the identity (so folding them matters)."""
    torch.manual_seed(0)
    model = TinyNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def tiny_net_reseeded() -> nn.Module:
    """TinyNet with other random weights: tiny_net's input contract, another model."""
    torch.manual_seed(1)
    return TinyNet().eval()


class _BakedBatch(nn.Module):
    """The classic channel-shuffle bug: the batch size is read as a Python int and baked in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        # `.data.size()` hides the batch from the tracer: it becomes a constant (vision#3158).
        n, c, h, w = y.data.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return y.mean(dim=(2, 3))


def baked_batch_net() -> nn.Module:
    """Right at batch 1, broken at any other batch."""
    torch.manual_seed(0)
    return _BakedBatch().eval()


class _DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export refuses it, tracing records one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        if bool(x.mean() > -100.0):
            return y * 2.0
        return y


def data_dependent_net() -> nn.Module:
    """Exports only with the TorchScript exporter (the fallback path)."""
    torch.manual_seed(0)
    return _DataDependent().eval()


def not_a_module() -> int:
    """A factory that returns something that is not a model."""
    return 3


class OutlierNet(nn.Module):
    """A net built to be INT8-sensitive: one activation channel is 1000x the others.

    Per-tensor activation quantization of `mid` spends its whole range on the
    outlier channel and rounds the other channels to almost nothing, so the
    INT8 model's classes differ from FP32's. `mix` divides the outlier back down,
    so in float the net behaves normally.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 16, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(16 * 16, 10)
        with torch.no_grad():
            self.mid.weight[0] *= 1000.0
            self.mid.bias[0] = 0.0
            self.mix.weight[:, 0] /= 1000.0
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.mix(self.mid(x))
        return self.head(torch.flatten(self.pool(torch.relu(x)), 1))


def outlier_net() -> nn.Module:
    """The INT8-sensitive net, seeded."""
    torch.manual_seed(3)
    return OutlierNet().eval()


def outlier_eval_set(path: Path) -> Path:
    """200 32x32 inputs labelled with outlier_net's own classes (FP32 top-1 = 100%), as .npz."""
    import numpy as np

    from deploykit.harness.inputs import synthetic_images
    from deploykit.models.contract import InputContract

    inputs = synthetic_images(InputContract(height=32, width=32, resize=32), 200, seed=5)
    with torch.inference_mode():
        labels = outlier_net()(torch.from_numpy(inputs)).argmax(dim=1).numpy()
    assert len(set(labels.tolist())) >= 3  # a real classification, not one class
    np.savez(path, inputs=inputs, labels=labels)
    return path


class SaturatingNet(nn.Module):
    """A 1x1 convolution whose neighbouring weights are all large, fed by saturated ReLU6s.

    Every pair of products reaches ~2 x 127 x 255 in INT8: far past the 16-bit sums of
    CPUs without VNNI unless the weight scales are bounded (`deploykit.stages.overflow`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.mix = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 10)
        with torch.no_grad():
            self.stem.bias.fill_(4.0)
            self.mix.weight.copy_(0.5 + 0.5 * torch.rand_like(self.mix.weight))
            self.mix.bias.fill_(-100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(torch.clamp(self.stem(x), 0.0, 6.0))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def saturating_net() -> nn.Module:
    """SaturatingNet, seeded."""
    torch.manual_seed(5)
    return SaturatingNet().eval()
