"""The input contract applied to an image, with numpy and Pillow only.

:func:`preprocess` is the same computation as the harness's
``deploykit.harness.datasets.preprocess`` (resize the shorter side, centre crop,
scale to [0, 1], normalise, CHW); tests check that both give identical arrays, so
what a bundle is fed on the device is what it was calibrated and measured with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from deploykit.errors import UserError


class ImageContract(Protocol):
    """What preprocessing reads from an input contract (InputContract or ImageSpec)."""

    @property
    def channels(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def resize(self) -> int: ...
    @property
    def mean(self) -> tuple[float, ...]: ...
    @property
    def std(self) -> tuple[float, ...]: ...
    @property
    def interpolation(self) -> str: ...


@dataclass(frozen=True)
class ImageSpec:
    """A bundle's input contract, as the runtime reads it from the manifest.

    Attributes mirror :class:`deploykit.models.contract.InputContract`.
    """

    channels: int
    height: int
    width: int
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    color: str = "RGB"
    dtype: str = "float32"

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> ImageSpec:
        """Build from the manifest's ``input`` section (already checked by the caller)."""
        return cls(
            channels=int(data["channels"]),
            height=int(data["height"]),
            width=int(data["width"]),
            resize=int(data["resize"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bilinear")),
            layout=str(data.get("layout", "NCHW")),
            color=str(data.get("color", "RGB")),
            dtype=str(data.get("dtype", "float32")),
        )

    def chw(self) -> tuple[int, int, int]:
        """The per-image tensor shape."""
        return (self.channels, self.height, self.width)


def preprocess(image: np.ndarray, contract: ImageContract) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32: resize the shorter side, centre crop, normalise."""
    from PIL import Image

    if contract.channels not in (1, 3):
        raise UserError(f"image inputs need 1 or 3 channels; this model takes {contract.channels}")
    resample = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
    }.get(contract.interpolation, Image.Resampling.BILINEAR)
    pil = Image.fromarray(image)
    if contract.channels == 1:
        pil = pil.convert("L")
    h, w = image.shape[:2]
    short = max(contract.resize, contract.height, contract.width)
    scale = short / min(h, w)
    pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    left = (pil.width - contract.width) // 2
    top = (pil.height - contract.height) // 2
    pil = pil.crop((left, top, left + contract.width, top + contract.height))
    arr = np.asarray(pil, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    mean = np.asarray(contract.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(contract.std, dtype=np.float32).reshape(-1, 1, 1)
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def as_rgb_array(image: Any) -> np.ndarray:
    """An image file path, Pillow image or uint8 array as an HWC uint8 RGB array.

    Raises:
        UserError: Unreadable file or an array that is not an 8-bit image.
    """
    if isinstance(image, (str, Path)):
        return _decode(Path(image))
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a Pillow image
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise UserError(
            f"an image array must be uint8 HWC (got {array.dtype} {array.shape}); pass "
            "preprocessed float32 CHW/NCHW tensors as they are"
        )
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        return array[:, :, :3] if array.shape[2] != 1 else np.repeat(array, 3, axis=2)
    raise UserError(f"an image array must be HxW or HxWx3 uint8, got shape {array.shape}")


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise UserError(f"image {path} does not exist") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc
