"""Calibration and evaluation sets described by manifests under ``calibration/``.

A manifest (JSON, schema ``deploykit-dataset``) names where every source file
comes from (a PyPI package, a Debian package, or this repository), its licence,
its sha256 and, where known, its label; a run records the manifest's digest so
it says exactly what it calibrated or evaluated on. Files are checked against
their sha256 before use: a changed file is an error, never silently used.

Kinds:

- ``files``: labelled images, one input per file (e.g. foolbox's 20 ImageNet photos);
- ``augmented``: photos expanded deterministically with realistic augmentation
  (random resized crop, flip, colour jitter); the calibration and evaluation pools
  hold different source photos (``disjoint_from``). A view keeps its photo's label
  where the photos have labels;
- ``idx``: an IDX image/label pair (Fashion-MNIST's official train or test split).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.fsutil import sha256_file
from deploykit.models.contract import InputContract

SCHEMA = "deploykit-dataset"
SCHEMA_VERSION = 1
KINDS = ("files", "augmented", "idx")
_DEBIAN_DIRS = {"dataset-fashion-mnist": "/usr/share/datasets/fashion-mnist"}


@dataclass(frozen=True)
class SourceFile:
    """One file a set is made from.

    Attributes:
        origin: ``pypi:<package>``, ``debian:<package>`` or ``repo``.
        path: Path inside the package folder, the Debian data folder or the repository.
        sha256: Expected digest of the file.
        label: Class index, for labelled image files.
    """

    origin: str
    path: str
    sha256: str
    label: int | None = None


@dataclass(frozen=True)
class Manifest:
    """A calibration or evaluation set.

    Attributes:
        name: Set name, e.g. ``imagenet-photos20``.
        description: One line on what the set is.
        role: ``calib`` or ``eval``.
        kind: ``files``, ``augmented`` or ``idx``.
        labels: Label set of the file labels (``imagenet1k``, ``fashion-mnist``) or "".
        licence: Licence of the data.
        files: The source files.
        params: Kind-specific parameters (augmentation, split).
        disjoint_from: Sets that must share no source file with this one.
        path: The manifest file.
    """

    name: str
    description: str
    role: str
    kind: str
    labels: str
    licence: str
    files: tuple[SourceFile, ...]
    params: dict[str, Any] = field(default_factory=dict)
    disjoint_from: tuple[str, ...] = ()
    path: Path | None = None

    @property
    def sha256(self) -> str:
        """Digest of the set: its kind, parameters and every file's digest and label."""
        digest = hashlib.sha256(f"{self.kind}\n{json.dumps(self.params, sort_keys=True)}".encode())
        for f in self.files:
            digest.update(f"\n{f.origin}:{f.path}:{f.sha256}:{f.label}".encode())
        return digest.hexdigest()

    def size(self) -> int:
        """Number of inputs the set yields."""
        if self.kind == "augmented":
            return len(self.files) * int(self.params["per_image"])
        if self.kind == "idx":
            return int(self.params["count"])
        return len(self.files)

    def describe(self) -> dict[str, Any]:
        """What a report records about the set."""
        return {
            "manifest": self.name,
            "role": self.role,
            "kind": self.kind,
            "licence": self.licence,
            "manifest_sha256": self.sha256,
            "sources": sorted({f.origin for f in self.files}),
        }

    def to_json(self) -> dict[str, Any]:
        """The manifest file's content."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "name": self.name,
            "description": self.description,
            "role": self.role,
            "kind": self.kind,
            "labels": self.labels,
            "licence": self.licence,
            "count": self.size(),
            "params": self.params,
            "disjoint_from": list(self.disjoint_from),
            "files": [
                {k: v for k, v in vars(f).items() if v is not None or k != "label"}
                for f in self.files
            ],
            "sha256": self.sha256,
        }


def manifest_dir() -> Path:
    """Where the shipped manifests live: ``$DEPLOYKIT_CALIBRATION_DIR`` or ``calibration/``."""
    env = os.environ.get("DEPLOYKIT_CALIBRATION_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "calibration"


def list_manifests() -> list[Manifest]:
    """Every manifest in :func:`manifest_dir`, by name."""
    folder = manifest_dir()
    if not folder.is_dir():
        return []
    return sorted(
        (read_manifest(p) for p in folder.glob("*.json")),
        key=lambda m: m.name,
    )


def is_manifest_spec(spec: str) -> bool:
    """True when `spec` names a shipped manifest or a manifest file."""
    return spec.endswith(".json") or (manifest_dir() / f"{spec}.json").is_file()


def find_manifest(spec: str) -> Manifest:
    """Read a manifest by set name or path.

    Raises:
        UserError: Unknown name, or an invalid manifest.
    """
    path = Path(spec) if spec.endswith(".json") else manifest_dir() / f"{spec}.json"
    if not path.is_file():
        known = ", ".join(m.name for m in list_manifests()) or "none found"
        raise UserError(f"no dataset manifest {spec!r} (shipped sets: {known})")
    return read_manifest(path)


@cache
def _read_cached(path: Path, mtime: float) -> Manifest:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read dataset manifest {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a deploykit dataset manifest (schema {SCHEMA})")
    if data.get("version") != SCHEMA_VERSION:
        raise UserError(f"{path} has manifest version {data.get('version')}, expected 1")
    try:
        manifest = Manifest(
            name=str(data["name"]),
            description=str(data.get("description", "")),
            role=str(data["role"]),
            kind=str(data["kind"]),
            labels=str(data.get("labels", "")),
            licence=str(data["licence"]),
            files=tuple(SourceFile(**f) for f in data["files"]),
            params=dict(data.get("params", {})),
            disjoint_from=tuple(data.get("disjoint_from", ())),
            path=path,
        )
    except (KeyError, TypeError) as exc:
        raise UserError(f"dataset manifest {path} is missing or has a bad field: {exc}") from exc
    if manifest.kind not in KINDS or manifest.role not in ("calib", "eval"):
        raise UserError(f"{path}: unknown kind {manifest.kind!r} or role {manifest.role!r}")
    if data.get("sha256") != manifest.sha256:
        raise UserError(
            f"{path}: the recorded sha256 does not match its content; the manifest was edited "
            "by hand — regenerate it with scripts/make_manifests.py"
        )
    return manifest


def read_manifest(path: Path) -> Manifest:
    """Read and validate one manifest file.

    Raises:
        UserError: Unreadable, wrong schema, or a digest that does not match the content.
    """
    return _read_cached(path.resolve(), path.stat().st_mtime)


def origin_root(origin: str) -> Path:
    """The folder an origin's paths are relative to.

    Raises:
        UserError: The package is not installed.
    """
    kind, _, name = origin.partition(":")
    if kind == "pypi":
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"the dataset needs the Python package {name}; pip install 'deploykit[data]' "
                "or run scripts/setup.sh"
            )
        return Path(next(iter(spec.submodule_search_locations)))
    if kind == "debian":
        env = os.environ.get("DEPLOYKIT_FASHION_MNIST") if name == "dataset-fashion-mnist" else None
        folder = Path(env or _DEBIAN_DIRS.get(name, f"/usr/share/datasets/{name}"))
        if not folder.is_dir():
            raise UserError(
                f"the dataset needs Debian's {name}: apt-get install {name}, or run "
                "scripts/setup.sh"
            )
        return folder
    if kind == "repo":
        return Path(__file__).resolve().parents[2]
    raise UserError(f"unknown dataset origin {origin!r}")


def verified_path(source: SourceFile) -> Path:
    """The local file of `source`, after checking its sha256.

    Raises:
        UserError: Missing file, or a file that is not the one the manifest names.
    """
    path = origin_root(source.origin) / source.path
    if not path.is_file():
        raise UserError(f"dataset file {path} is missing; reinstall {source.origin}")
    digest = sha256_file(path)
    if digest != source.sha256:
        raise UserError(
            f"dataset file {path} has sha256 {digest[:12]}…, the manifest says "
            f"{source.sha256[:12]}…; reinstall {source.origin}"
        )
    return path


def materialise(
    manifest: Manifest, contract: InputContract, count: int | None = None, seed: int = 0
) -> tuple[np.ndarray, list[int] | None]:
    """Preprocessed NCHW inputs (and labels) of a set for a model's contract.

    Args:
        manifest: The set.
        contract: The model's input contract (resize, crop, normalisation, channels).
        count: Inputs wanted; None for the whole set. A smaller count takes a
            deterministic subset spread over the set.
        seed: Seed of that subset.

    Raises:
        UserError: Missing or changed files, too few inputs.
    """
    total = manifest.size()
    if count is not None and count > total:
        raise UserError(
            f"dataset {manifest.name} holds {total} inputs, fewer than the {count} asked for; "
            f"ask for at most {total}"
        )
    chosen = _chosen(manifest, count, seed)
    if manifest.kind == "idx":
        return _idx(manifest, contract, chosen)
    if manifest.kind == "augmented":
        return _augmented(manifest, contract, chosen)
    return _files(manifest, contract, chosen)


def _chosen(manifest: Manifest, count: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of the inputs a `count`-input subset takes, or None for all of them."""
    total = manifest.size()
    if count is None or count >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def source_groups(manifest: Manifest, count: int | None = None, seed: int = 0) -> np.ndarray | None:
    """For an augmented set, the source photo (its index in the manifest) of each input.

    Views of one photo are correlated draws, not independent ones, so intervals
    resample the photos (`deploykit.harness.intervals`). None for the other kinds,
    whose inputs are distinct files or images. Matches :func:`materialise` for the
    same `count` and `seed`.
    """
    if manifest.kind != "augmented":
        return None
    chosen = _chosen(manifest, count, seed)
    indices = np.arange(manifest.size()) if chosen is None else chosen
    return (indices // int(manifest.params["per_image"])).astype(np.int64)


def _files(
    manifest: Manifest, contract: InputContract, chosen: np.ndarray | None
) -> tuple[np.ndarray, list[int] | None]:
    from deploykit.harness.datasets import decode_image, preprocess

    indices = range(len(manifest.files)) if chosen is None else chosen.tolist()
    picked = [manifest.files[i] for i in indices]
    arrays = [preprocess(decode_image(verified_path(f)), contract) for f in picked]
    return np.stack(arrays).astype(np.float32), _all_labels([f.label for f in picked])


def _all_labels(labels: list[int | None]) -> list[int] | None:
    """The labels as class indices when every input has one, else None (unlabelled)."""
    known = [int(v) for v in labels if v is not None]
    return known if len(known) == len(labels) else None


def _augmented(
    manifest: Manifest, contract: InputContract, chosen: np.ndarray | None
) -> tuple[np.ndarray, list[int] | None]:
    from deploykit.harness.datasets import decode_image, preprocess

    per_image = int(manifest.params["per_image"])
    wanted = set(range(manifest.size()) if chosen is None else chosen.tolist())
    arrays = []
    labels = []
    for index, source in enumerate(manifest.files):
        indices = [index * per_image + k for k in range(per_image)]
        if not wanted.intersection(indices):
            continue
        image = decode_image(verified_path(source))
        for k, view in enumerate(augment(image, per_image, manifest.params, index)):
            if index * per_image + k in wanted:
                arrays.append(preprocess(view, contract))
                labels.append(source.label)
    # A view keeps its photo's label (as ImageNet training's random resized crops do),
    # when every photo has one.
    return np.stack(arrays).astype(np.float32), _all_labels(labels)


def augment(image: np.ndarray, count: int, params: dict[str, Any], stream: int) -> list[np.ndarray]:
    """Deterministic realistic views of one photo: random resized crop, flip, colour jitter.

    The random stream depends only on ``params["seed"]`` and `stream` (the photo's
    index), so the same manifest always yields the same inputs.
    """
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng([int(params.get("seed", 0)), stream])
    lo, hi = params.get("crop_scale", (0.25, 1.0))
    jitter = float(params.get("jitter", 0.3))
    flip = float(params.get("flip", 0.5))
    pil = Image.fromarray(image)
    width, height = pil.size
    views = []
    for _ in range(count):
        for _attempt in range(10):
            area = rng.uniform(lo, hi) * width * height
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w = round(np.sqrt(area * ratio))
            h = round(np.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                break
        else:
            w, h = width, height
        left = int(rng.integers(0, width - w + 1))
        top = int(rng.integers(0, height - h + 1))
        view = pil.crop((left, top, left + w, top + h))
        if rng.random() < flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            view = enhancer(view).enhance(float(rng.uniform(1 - jitter, 1 + jitter)))
        views.append(np.asarray(view.convert("RGB"), dtype=np.uint8))
    return views


def _idx(
    manifest: Manifest, contract: InputContract, chosen: np.ndarray | None
) -> tuple[np.ndarray, list[int] | None]:
    from deploykit.harness import fashion_mnist
    from deploykit.harness.datasets import preprocess

    for source in manifest.files:
        verified_path(source)
    split = manifest.params.get("split")
    if split not in ("train", "test"):
        raise UserError(f"{manifest.name}: split must be train or test, not {split!r}")
    images, labels = fashion_mnist.load("train" if split == "train" else "test")
    if images.shape[0] != manifest.size():
        raise UserError(
            f"{manifest.name}: found {images.shape[0]} images, the manifest says {manifest.size()}"
        )
    if chosen is not None:
        images, labels = images[chosen], labels[chosen]
    arrays = np.stack([preprocess(img, contract) for img in images]).astype(np.float32)
    return arrays, [int(v) for v in labels]
