"""The input contract of a model: everything needed to feed it correctly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputContract:
    """How a model's input tensor is laid out and made from an image.

    Attributes:
        channels: Number of input channels.
        height: Input height in pixels (the crop size).
        width: Input width in pixels.
        resize: Shorter side the image is resized to before the centre crop.
        mean: Per-channel mean subtracted after scaling pixels to [0, 1].
        std: Per-channel standard deviation divided by after the mean.
        interpolation: Resize interpolation (bilinear, bicubic, nearest).
        layout: Tensor layout; deploykit models take NCHW.
        color: Channel order of the image (RGB, BGR or GRAY).
        dtype: Element type of the input tensor.
        num_classes: Size of the classification output.
    """

    channels: int = 3
    height: int = 224
    width: int = 224
    resize: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    color: str = "RGB"
    dtype: str = "float32"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"mean/std need one value per channel ({self.channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if min(self.channels, self.height, self.width) < 1:
            raise ValueError(f"bad input shape {self.shape()}")

    def shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """Return the NCHW input shape at `batch`."""
        return (batch, self.channels, self.height, self.width)

    def with_size(self, height: int, width: int | None = None) -> InputContract:
        """Return the same contract at another input size (resize scaled alike)."""
        width = width or height
        ratio = self.resize / max(self.height, 1)
        return replace(self, height=height, width=width, resize=round(height * ratio))

    def describe(self) -> str:
        """Short human description, e.g. ``3x224x224 RGB mean/std imagenet``."""
        norm = (
            "imagenet"
            if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD)
            else (f"mean={list(self.mean)} std={list(self.std)}")
        )
        return f"{self.channels}x{self.height}x{self.width} {self.color} {norm}"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        data = asdict(self)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputContract:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["mean"] = tuple(values.get("mean", IMAGENET_MEAN))
        values["std"] = tuple(values.get("std", IMAGENET_STD))
        return cls(**values)
