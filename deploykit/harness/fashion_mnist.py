"""Fashion-MNIST (MIT licence) from Debian's ``dataset-fashion-mnist`` package.

The official gzip IDX files are parsed with numpy: magic numbers, dimensions and
element counts are checked, so a truncated or foreign file is a clear error rather
than a silently short data set. The folder defaults to Debian's install location
and can be moved with the ``DEPLOYKIT_FASHION_MNIST`` environment variable.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from deploykit.errors import UserError
from deploykit.fsutil import sha256_file

ENV_VAR = "DEPLOYKIT_FASHION_MNIST"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
# Official class names, in label order (zalandoresearch/fashion-mnist README).
CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 28
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_INSTALL_HINT = "apt-get install dataset-fashion-mnist (or run scripts/setup.sh)"
_REINSTALL = f"reinstall it ({_INSTALL_HINT}) or point ${ENV_VAR} at the official files"

Split = Literal["train", "test"]


def data_dir() -> Path:
    """The Fashion-MNIST folder: ``$DEPLOYKIT_FASHION_MNIST`` or Debian's location."""
    override = os.environ.get(ENV_VAR)
    return Path(override) if override else DEFAULT_DIR


# Resolved at import for display; the functions below re-read the environment variable.
FASHION_MNIST_DIR = data_dir()


def files(split: Split) -> tuple[Path, Path]:
    """The (images, labels) gzip IDX files of `split`.

    Raises:
        UserError: Unknown split name.
    """
    if split not in _PREFIX:
        raise UserError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    folder = data_dir()
    prefix = _PREFIX[split]
    return (
        folder / f"{prefix}-images-idx3-ubyte.gz",
        folder / f"{prefix}-labels-idx1-ubyte.gz",
    )


def is_available() -> bool:
    """True when the four official files are present (they are not parsed here)."""
    return all(path.is_file() for split in ("train", "test") for path in files(split))


def load(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Read one split.

    Args:
        split: ``train`` (60,000 images) or ``test`` (10,000 images).

    Returns:
        Images as a uint8 array (N, 28, 28) and labels as an int64 array (N,).

    Raises:
        UserError: Missing, truncated or malformed files.
    """
    images_path, labels_path = files(split)
    expected = SPLIT_SIZES[split]
    images = _read_idx(images_path, _IMAGES_MAGIC, (expected, IMAGE_SIZE, IMAGE_SIZE))
    labels = _read_idx(labels_path, _LABELS_MAGIC, (expected,)).astype(np.int64)
    if int(labels.max()) >= len(CLASSES):
        raise UserError(f"{labels_path} holds label {int(labels.max())}, outside 0-9; {_REINSTALL}")
    return images, labels


def sha256(split: Split) -> dict[str, str]:
    """sha256 of the raw gzip files of `split`, keyed by file name, for manifests.

    Raises:
        UserError: A file is missing.
    """
    result = {}
    for path in files(split):
        _require(path)
        result[path.name] = sha256_file(path)
    return result


def _require(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"Fashion-MNIST file {path} is missing; {_INSTALL_HINT}")


def _read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Parse a gzip IDX file whose header must announce `magic` and `shape`."""
    _require(path)
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read {path}: {exc}; {_REINSTALL}") from exc
    header_len = 4 * (1 + len(shape))
    if len(data) < header_len:
        raise UserError(f"{path} is truncated ({len(data)} bytes); {_REINSTALL}")
    header = np.frombuffer(data, dtype=">u4", count=1 + len(shape))
    if int(header[0]) != magic:
        raise UserError(
            f"{path} has magic number {int(header[0]):#010x}, expected {magic:#010x} "
            f"(not an IDX file of this kind); {_REINSTALL}"
        )
    dims = tuple(int(d) for d in header[1:])
    if dims != shape:
        raise UserError(f"{path} has shape {dims}, expected {shape}; {_REINSTALL}")
    count = int(np.prod(shape))
    if len(data) - header_len != count:
        raise UserError(
            f"{path} holds {len(data) - header_len} data bytes, expected {count}; {_REINSTALL}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape).copy()
