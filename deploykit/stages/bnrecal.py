"""BatchNorm re-estimation: give a random-weight model realistic activation scales.

A randomly initialised network carries the identity BatchNorm statistics (mean 0,
variance 1), which do not describe its own activations: measured with torch 2.14,
random-init torchvision efficientnet_b0 outputs logits of ~1e-20 and mobilenet_v2
~1e-15 (activations vanish through the blocks), inception_v3 ~1e12 (they explode).
Fidelity and INT8 numbers on such models mean little, and INT8 calibration can
even return NaN.

Re-estimating the running statistics on calibration images fixes that, as for
"precise BN" after training: every BatchNorm layer's statistics are reset, the
layers run in train mode with ``momentum=None`` (a cumulative average over all
batches) while the rest of the network stays in eval mode (dropout and stochastic
depth keep their inference form), the images are forwarded under
``torch.no_grad()``, and the model is returned in eval mode. No weight changes.

The images are the model's own calibration set when the catalogue names one,
else the shipped ``natural-images-calib`` set resized to the model's contract,
else synthetic image-like inputs; the report records which.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.errors import UserError
from deploykit.harness.datasets import SYNTHETIC, Dataset, load_dataset
from deploykit.models.contract import InputContract

if TYPE_CHECKING:
    import torch

# The shipped unlabelled calibration photos (see calibration/natural-images-calib.json).
NATURAL_CALIB_SET = "natural-images-calib"
DEFAULT_SAMPLES = 64
DEFAULT_BATCH = 16
WEIGHTS_LABEL = "random, bn-recalibrated"


@dataclass
class BnRecalibration:
    """What BatchNorm re-estimation did.

    Attributes:
        applied: True when at least one BatchNorm layer was re-estimated.
        layers: Number of BatchNorm layers re-estimated.
        samples: Images forwarded.
        batch: Images per forward pass.
        data: What the images were (source, count, sha256, manifest facts).
        data_choice: Why that source: ``model calibration set``, ``natural images`` or
            ``synthetic (<reason>)``.
        seconds: Time taken.
        note: Why nothing was done, when nothing was.
    """

    applied: bool
    layers: int
    samples: int
    batch: int
    data: dict[str, Any] = field(default_factory=dict)
    data_choice: str = ""
    seconds: float = 0.0
    note: str = ""

    @property
    def weights_label(self) -> str:
        """The report's ``weights`` value of a random-weight model after this step."""
        return WEIGHTS_LABEL if self.applied else "random"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "applied": self.applied,
            "layers": self.layers,
            "samples": self.samples,
            "batch": self.batch,
            "data": self.data,
            "data_choice": self.data_choice,
            "seconds": round(self.seconds, 3),
            "note": self.note,
        }


def recalibration_data(
    model: str | None, contract: InputContract, count: int = DEFAULT_SAMPLES, seed: int = 0
) -> tuple[Dataset, str]:
    """Calibration images for `model`, preprocessed by `contract`.

    Args:
        model: Catalogue name (its calibration set is used when it names one), or None.
        contract: Input contract the images are resized and normalised to.
        count: Number of images.
        seed: Seed of the subset (and of synthetic inputs).

    Returns:
        The images and which source was chosen (and why, for synthetic data).
    """
    calib_set = _catalogue_calib_set(model)
    if calib_set is not None:
        try:
            return load_dataset(calib_set, contract, count, seed=seed), "model calibration set"
        except UserError as exc:
            reason = f"{calib_set} unavailable: {exc}"
    elif contract.channels in (1, 3):
        try:
            return load_dataset(NATURAL_CALIB_SET, contract, count, seed=seed), "natural images"
        except UserError as exc:
            reason = f"{NATURAL_CALIB_SET} unavailable: {exc}"
    else:
        reason = f"no image set fits {contract.channels}-channel inputs"
    return load_dataset(SYNTHETIC, contract, count, seed=seed), f"synthetic ({reason})"


def _catalogue_calib_set(model: str | None) -> str | None:
    if model is None:
        return None
    from deploykit.models.catalogue import get_model_spec

    try:
        spec = get_model_spec(model)
    except UserError:
        return None
    return spec.pretrained.calib_set if spec.pretrained is not None else None


def batchnorm_layers(module: torch.nn.Module) -> list[Any]:
    """The BatchNorm layers of `module` (any dimensionality) that track running statistics."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(
    module: torch.nn.Module,
    inputs: np.ndarray,
    batch: int = DEFAULT_BATCH,
) -> tuple[int, int]:
    """Re-estimate every BatchNorm layer's running statistics of `module` on `inputs`.

    The statistics are reset, the BatchNorm layers (only) run in train mode with
    ``momentum=None`` (cumulative average), the inputs are forwarded under
    ``torch.no_grad()``; afterwards the layers' momentum is restored and the
    whole module is left in eval mode.

    Args:
        module: The model; changed in place.
        inputs: NCHW float32 inputs preprocessed for the model.
        batch: Inputs per forward pass (at least 2: train-mode BatchNorm needs two values).

    Returns:
        (BatchNorm layers re-estimated, inputs forwarded).

    Raises:
        UserError: Fewer than two inputs, or a forward pass that fails.
    """
    import torch

    layers = batchnorm_layers(module)
    if not layers:
        module.eval()
        return 0, 0
    if inputs.shape[0] < 2:
        raise UserError("BatchNorm re-estimation needs at least 2 calibration inputs")
    batch = max(2, batch)
    momenta: list[Any] = [layer.momentum for layer in layers]
    module.eval()
    try:
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over every batch
            layer.train()
        # The last chunk joins its predecessor rather than running as a batch of one.
        starts = list(range(0, inputs.shape[0] - batch + 1, batch)) or [0]
        with torch.no_grad():
            for i, start in enumerate(starts):
                end = inputs.shape[0] if i == len(starts) - 1 else start + batch
                chunk = torch.from_numpy(np.ascontiguousarray(inputs[start:end]))
                try:
                    module(chunk)
                except Exception as exc:  # the model's own failure on its contract
                    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                    raise UserError(
                        f"BatchNorm re-estimation failed on input {tuple(chunk.shape)}: "
                        f"{type(exc).__name__}: {first}; check --input-size"
                    ) from exc
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        module.eval()
    return len(layers), int(inputs.shape[0])


def recalibrate_model(
    module: torch.nn.Module,
    model: str | None,
    contract: InputContract,
    samples: int = DEFAULT_SAMPLES,
    batch: int = DEFAULT_BATCH,
    seed: int = 0,
) -> BnRecalibration:
    """Re-estimate `module`'s BatchNorm statistics on calibration images chosen for `model`.

    Args:
        module: The random-weight model; changed in place and left in eval mode.
        model: Catalogue name (for its calibration set), or None.
        contract: The model's input contract.
        samples: Images to forward.
        batch: Images per forward pass.
        seed: Seed of the image subset.

    Returns:
        What was done, for the report.
    """
    started = time.perf_counter()
    if not batchnorm_layers(module):
        module.eval()
        return BnRecalibration(
            applied=False, layers=0, samples=0, batch=batch, note="no BatchNorm layers"
        )
    data, choice = recalibration_data(model, contract, samples, seed)
    layers, count = recalibrate_batchnorm(module, data.inputs, batch)
    return BnRecalibration(
        applied=layers > 0,
        layers=layers,
        samples=count,
        batch=batch,
        data=data.describe(),
        data_choice=choice,
        seconds=time.perf_counter() - started,
    )
