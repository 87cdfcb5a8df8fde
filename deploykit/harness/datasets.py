"""Calibration and evaluation inputs: image folders and arrays, preprocessed by the input contract.

A dataset is a list of items plus a transform derived from the model's input
contract (resize the shorter side, centre crop, scale to [0, 1], normalise,
NCHW), in the spirit of ``nncf.Dataset(items, transform_fn)``. Sources:

- a set described by a manifest under ``calibration/`` (a name such as
  ``imagenet-photos20`` or a manifest path; see :mod:`deploykit.harness.evalsets`);
- a folder of images (jpg/jpeg/png/bmp/webp, searched recursively; labels from a
  ``labels.csv``/``labels.txt`` file of ``relative/path,class-index`` lines, or from
  sub-folder names when every image sits in one: numeric folder names are class
  indices, other names are numbered in sorted order);
- a ``.npy`` file or ``.npz`` archive of preprocessed NCHW float32 inputs (an
  ``.npz`` may hold ``inputs`` and ``labels`` arrays);
- ``synthetic``: deterministic image-like inputs (fidelity only — say so).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deploykit.errors import UserError
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC = "synthetic"


@dataclass
class Dataset:
    """Preprocessed inputs and what they came from.

    Attributes:
        inputs: NCHW float32 array, preprocessed for the model.
        source: Folder, file or ``synthetic``.
        sha256: Digest of the raw content (files in sorted order), for the report and cache.
        labels: Class index per input where known.
        classes: Class names (sub-folder names) where known.
        manifest: What the set's manifest says of it, for sets from ``calibration/``.
        groups: Source photo of each input for sets of augmented views (inputs of one
            group are correlated draws); None where every input is its own source.
    """

    inputs: np.ndarray
    source: str
    sha256: str
    labels: list[int] | None = None
    classes: list[str] = field(default_factory=list)
    manifest: dict[str, object] | None = None
    groups: np.ndarray | None = None

    def describe(self) -> dict[str, object]:
        """What a report records about the data."""
        return {
            "source": self.source,
            "count": int(self.inputs.shape[0]),
            "sha256": self.sha256,
            "labelled": self.labels is not None,
            **(self.manifest or {}),
        }


def load_eval_data(spec: str, contract: InputContract, count: int | None = None) -> Dataset:
    """Load an evaluation set: a manifest name/path or a labelled image folder.

    Args:
        spec: Set name (``deploykit datasets``), manifest path, image folder or .npy/.npz.
        contract: The model's input contract.
        count: Inputs wanted; None for all of them.
    """
    from deploykit.harness import evalsets

    if evalsets.is_manifest_spec(spec):
        return _from_manifest(spec, contract, count, seed=0)
    path = Path(spec)
    if path.is_file() and path.suffix in (".npy", ".npz"):
        return _from_array(path, contract, count)
    if path.is_dir() and count is None:
        count = len(_image_files(path)) or 1
    return load_dataset(spec, contract, count or 1)


def _from_manifest(spec: str, contract: InputContract, count: int | None, seed: int) -> Dataset:
    from deploykit.harness import evalsets

    manifest = evalsets.find_manifest(spec)
    inputs, labels = evalsets.materialise(manifest, contract, count, seed)
    return Dataset(
        inputs=inputs,
        source=manifest.name,
        sha256=manifest.sha256,
        labels=labels,
        manifest=manifest.describe(),
        groups=evalsets.source_groups(manifest, count, seed),
    )


def load_dataset(spec: str, contract: InputContract, count: int, seed: int = 0) -> Dataset:
    """Load `count` inputs from `spec` (folder, .npy/.npz, or ``synthetic``).

    Raises:
        UserError: Missing or empty source, unreadable images, wrong shapes, too few samples.
    """
    if count < 1:
        raise UserError(f"--calib-samples must be at least 1, got {count}")
    if spec == SYNTHETIC:
        inputs = synthetic_images(contract, count, seed=20_000 + seed)
        digest = hashlib.sha256(f"synthetic:{seed}:{contract.shape(count)}".encode()).hexdigest()
        return Dataset(inputs=inputs, source=SYNTHETIC, sha256=digest)
    from deploykit.harness import evalsets

    if evalsets.is_manifest_spec(spec):
        return _from_manifest(spec, contract, count, seed)
    path = Path(spec)
    if not path.exists():
        raise UserError(
            f"data {spec} does not exist; pass a folder of images, a .npy/.npz "
            "file, a set from `deploykit datasets`, or 'synthetic'"
        )
    if path.is_dir():
        return _from_folder(path, contract, count, seed)
    if path.suffix in (".npy", ".npz"):
        return _from_array(path, contract, count)
    raise UserError(f"{spec} is neither a folder of images nor a .npy/.npz file")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _from_folder(folder: Path, contract: InputContract, count: int, seed: int) -> Dataset:
    files = _image_files(folder)
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(files) < count:
        raise UserError(
            f"{folder} holds {len(files)} images, fewer than the {count} asked for; "
            f"pass --calib-samples {len(files)} or add images"
        )
    # A deterministic subset, spread over the whole folder rather than its first files.
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=count, replace=False).tolist())
    picked = [files[i] for i in chosen]
    digest = hashlib.sha256()
    arrays = []
    for path in picked:
        data = path.read_bytes()
        digest.update(data)
        arrays.append(preprocess(_decode(path, data), contract))
    labels, classes = _folder_labels(folder, files, picked)
    return Dataset(
        inputs=np.stack(arrays).astype(np.float32),
        source=str(folder),
        sha256=digest.hexdigest(),
        labels=labels,
        classes=classes,
    )


def _folder_labels(
    folder: Path, files: list[Path], picked: list[Path]
) -> tuple[list[int] | None, list[str]]:
    """Labels from a labels file, or from sub-folder names."""
    for name in ("labels.csv", "labels.txt"):
        labels_file = folder / name
        if labels_file.is_file():
            table = _read_labels_file(labels_file)
            missing = [p for p in picked if str(p.relative_to(folder)) not in table]
            if missing:
                raise UserError(
                    f"{labels_file} has no label for {missing[0].relative_to(folder)}; add a "
                    "'relative/path,class-index' line for every image"
                )
            return [table[str(p.relative_to(folder))] for p in picked], []
    parents = {p.parent for p in files}
    if len(parents) > 1 and all(p.parent.parent == folder for p in files):
        names = sorted(p.name for p in parents)
        if all(n.isdigit() for n in names):
            return [int(p.parent.name) for p in picked], names
        return [names.index(p.parent.name) for p in picked], names
    return None, []


def _read_labels_file(path: Path) -> dict[str, int]:
    table: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = [part.strip() for part in text.replace("\t", ",").split(",")]
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise UserError(
                f"{path}:{number}: expected 'relative/path,class-index', got {text[:60]!r}"
            )
        table[parts[0]] = int(parts[1])
    return table


def decode_image(path: Path) -> np.ndarray:
    """Read an image file as HWC uint8 RGB.

    Raises:
        UserError: Unreadable or not an image.
    """
    return _decode(path, path.read_bytes())


def _decode(path: Path, data: bytes) -> np.ndarray:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {exc}; remove or replace it") from exc


def preprocess(image: np.ndarray, contract: InputContract) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32: resize the shorter side, centre crop, normalise.

    One implementation for the workstation and the device: the torch-free runtime's.
    """
    from deploykit.runtime.preprocess import preprocess as runtime_preprocess

    return runtime_preprocess(image, contract)


def _from_array(path: Path, contract: InputContract, count: int | None) -> Dataset:
    labels_array = None
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            key = "inputs" if "inputs" in loaded.files else loaded.files[0]
            array = loaded[key]
            if "labels" in loaded.files:
                labels_array = loaded["labels"]
        else:
            array = loaded
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    if labels_array is not None and labels_array.shape != (array.shape[0],):
        raise UserError(
            f"{path}: 'labels' has shape {labels_array.shape}; expected one class index per input"
        )
    expected = contract.shape(1)[1:]
    if array.ndim != 4 or tuple(array.shape[1:]) != expected:
        raise UserError(
            f"{path} holds an array of shape {tuple(array.shape)}; expected (N, "
            f"{', '.join(map(str, expected))}) preprocessed inputs"
        )
    count = array.shape[0] if count is None else count
    if array.shape[0] < count:
        raise UserError(
            f"{path} holds {array.shape[0]} inputs, fewer than the {count} asked for; "
            f"pass --calib-samples {array.shape[0]}"
        )
    inputs = np.ascontiguousarray(array[:count], dtype=np.float32)
    digest = hashlib.sha256(inputs.tobytes())
    labels = None
    if labels_array is not None:
        labels = [int(v) for v in labels_array[:count]]
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    return Dataset(inputs=inputs, source=str(path), sha256=digest.hexdigest(), labels=labels)
