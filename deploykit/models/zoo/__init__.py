"""Architecture zoo: faithful, configurable implementations of the classic CNN families and
single-block convolution-type models, and the rows of the coverage matrix.

Each family lives in its own module with a ``specs()`` function returning catalogue entries;
:func:`coverage_rows` lists what the coverage matrix takes through every stage and backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deploykit.models.catalogue import ModelSpec

# The family modules, each with ``specs() -> list[ModelSpec]`` (imported lazily: they import
# torch, and ``deploykit --help`` must not).
MODULES: tuple[str, ...] = (
    "lenet",
    "alexnet",
    "tv_small",
    "inception",
    "inception_v4",
    "resnet_variants",
    "cliquenet",
    "dpn",
    "senet",
    "mobilenet_v1",
    "xception",
    "shufflenet_v1",
    "convtypes",
)


@dataclass(frozen=True)
class CoverageRow:
    """One row of the coverage matrix.

    Attributes:
        name: Row label a user reads, e.g. ``AlexNet (groups=2, LRN)``.
        family: Architecture family or ``conv-type``.
        kind: ``architecture`` or ``conv-type``.
        small: Catalogue name of the small variant the CI matrix runs.
        full: Catalogue name of the full-size model the benchmark matrix runs, if any.
    """

    name: str
    family: str
    kind: str
    small: str
    full: str | None = None


def specs() -> list[ModelSpec]:
    """Every catalogue entry of the zoo's family modules."""
    entries: list[ModelSpec] = []
    for name in MODULES:
        entries += import_module(f"{__name__}.{name}").specs()
    return entries


# (row label, family, small variant, full-size model) of the architecture rows, in display order.
_ARCHITECTURES: tuple[tuple[str, str, str, str | None], ...] = (
    ("LeNet-5", "lenet", "lenet5", "lenet5"),
    ("AlexNet (groups=2, LRN)", "alexnet", "alexnet_grouped_small", "alexnet_grouped"),
    ("VGG-16", "vgg", "vgg16_small", "vgg16"),
    ("VGG-19", "vgg", "vgg19_small", "vgg19"),
    ("GoogLeNet / Inception v1", "inception", "googlenet_small", "googlenet"),
    ("Inception v3 (1x7/7x1, 1x3/3x1)", "inception", "inception_v3_small", "inception_v3"),
    ("Inception-v4 (Inception-A, Reduction-A)", "inception", "inception_v4_small", "inception_v4"),
    ("Inception-ResNet-A", "inception", "inception_resnet_small", None),
    ("ResNet basic block", "resnet", "resnet_basic_small", "resnet18"),
    ("ResNet bottleneck block", "resnet", "resnet_bottleneck_small", "resnet50"),
    ("Pre-activation ResNet (basic)", "resnet", "preact_resnet_small", "preact_resnet18"),
    (
        "Pre-activation ResNet (bottleneck)",
        "resnet",
        "preact_resnet_bottleneck_small",
        "preact_resnet164",
    ),
    ("ResNeXt (cardinality 32)", "resnext", "resnext_small", "resnext50_32x4d"),
    (
        "Stochastic depth ResNet",
        "resnet",
        "resnet_stochastic_depth_small",
        "resnet110_stochastic_depth",
    ),
    ("DenseNet (dense block + transition)", "densenet", "densenet_small", "densenet121"),
    ("CliqueNet", "cliquenet", "cliquenet_small", "cliquenet_t12_k36"),
    ("DPN (dual path)", "dpn", "dpn_small", "dpn92"),
    ("SE-ResNet", "senet", "se_resnet_small", "se_resnet50"),
    ("MobileNet v1", "mobilenet", "mobilenet_v1_small", "mobilenet_v1"),
    ("MobileNet v2", "mobilenet", "mobilenet_v2_small", "mobilenet_v2"),
    ("MobileNet v3 Small", "mobilenet", "mobilenet_v3_small_small", "mobilenet_v3_small"),
    ("MobileNet v3 Large", "mobilenet", "mobilenet_v3_large_small", "mobilenet_v3_large"),
    ("Xception", "xception", "xception_small", "xception"),
    ("ShuffleNet v1 (g=3)", "shufflenet", "shufflenet_v1_g3_small", "shufflenet_v1_g3"),
    ("ShuffleNet v1 (g=8)", "shufflenet", "shufflenet_v1_g8_small", "shufflenet_v1_g8"),
    ("ShuffleNet v2", "shufflenet", "shufflenet_v2_small", "shufflenet_v2_x1_0"),
    ("SqueezeNet 1.0", "squeezenet", "squeezenet1_0_small", "squeezenet1_0"),
    ("SqueezeNet 1.1", "squeezenet", "squeezenet1_1_small", "squeezenet1_1"),
    ("EfficientNet-Lite0 (trained)", "efficientnet", "efficientnet_lite0", "efficientnet_lite0"),
    ("LeNet-5 (Fashion-MNIST, trained)", "lenet", "fmnist_lenet5", "fmnist_lenet5"),
    (
        "MobileNet v1 (Fashion-MNIST, trained)",
        "mobilenet",
        "fmnist_mobilenet_v1",
        "fmnist_mobilenet_v1",
    ),
    (
        "ShuffleNet v1 (Fashion-MNIST, trained)",
        "shufflenet",
        "fmnist_shufflenet_v1",
        "fmnist_shufflenet_v1",
    ),
    (
        "SqueezeNet (Fashion-MNIST, trained)",
        "squeezenet",
        "fmnist_squeezenet",
        "fmnist_squeezenet",
    ),
    ("ResNet (Fashion-MNIST, trained)", "resnet", "fmnist_resnet", "fmnist_resnet"),
)


def coverage_rows() -> list[CoverageRow]:
    """Every architecture and convolution type the coverage matrix covers, in display order.

    Architecture rows come first (random-weight families, then the trained-weights rows),
    then one row per convolution type.
    """
    from deploykit.models.zoo.convtypes import CONV_TYPES

    rows = [
        CoverageRow(name, family, "architecture", small, full)
        for name, family, small, full in _ARCHITECTURES
    ]
    rows += [
        CoverageRow(label, "conv-type", "conv-type", name, None)
        for name, (label, _) in CONV_TYPES.items()
    ]
    return rows
