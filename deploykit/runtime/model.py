"""Load a bundle and run it: numpy, Pillow and the bundle's runtime only (no PyTorch).

from deploykit.runtime import load
model = load("mobilenet_v2.dkb")
scores = model.predict("cat.jpg")          # class scores, as the exported model outputs
best = model.top_k("cat.jpg", k=5)         # [Prediction(index, label, probability)]
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import UserError
from deploykit.package.archive import MAX_MEMBER_BYTES, Bundle, BundleError, read_bundle
from deploykit.runtime import compat
from deploykit.runtime.preprocess import ImageSpec, as_rgb_array, preprocess
from deploykit.runtime.sessions import OpenVinoSession, OrtSession, Session, TensorRtSession

# Bundle format -> the runtime that runs it.
FORMAT_BACKENDS = {
    "onnx": "onnxruntime",
    "onnx-fp16": "onnxruntime",
    "ort-mobile": "onnxruntime",
    "openvino": "openvino",
    "tensorrt": "tensorrt",
}


@dataclass(frozen=True)
class Prediction:
    """One of the top-k classes: index, label (when the bundle has labels) and probability."""

    index: int
    label: str | None
    score: float


def _section(manifest: dict[str, Any], key: str) -> dict[str, Any]:
    value = manifest.get(key)
    if not isinstance(value, dict):
        raise BundleError(f"bundle manifest has no valid {key!r} section; package it again")
    return value


def _field(section: dict[str, Any], where: str, key: str, kind: type | tuple[type, ...]) -> Any:
    value = section.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BundleError(f"bundle manifest field {where}.{key} is missing or invalid")
    return value


def compare_outputs(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """How close two (N, classes) output arrays are.

    Returns:
        ``max_rel_err`` (largest absolute difference over the reference's largest
        magnitude), ``cosine`` (lowest per-input cosine similarity) and
        ``top1_agreement`` (fraction of inputs with the same best class).
    """
    a = np.asarray(actual, dtype=np.float64).reshape(len(expected), -1)
    b = np.asarray(expected, dtype=np.float64).reshape(len(expected), -1)
    scale = max(float(np.abs(b).max()), 1e-30)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosines = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    return {
        "max_rel_err": float(np.abs(a - b).max() / scale),
        "cosine": float(cosines.min()),
        "top1_agreement": float((a.argmax(axis=1) == b.argmax(axis=1)).mean()),
    }


def softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise softmax of 2-D scores, shifted by each row's maximum so it cannot overflow."""
    shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def run_in_batches(
    infer: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, size: int | None
) -> np.ndarray:
    """Run `batch` through `infer` in chunks of a static batch `size` (the last one padded).

    Args:
        infer: Runs one NCHW float32 batch.
        batch: Inputs of any count.
        size: The model's static batch, or None when any batch size runs.
    """
    if size is None or size == len(batch):
        return np.asarray(infer(np.ascontiguousarray(batch, dtype=np.float32)))
    outputs = []
    for start in range(0, len(batch), size):
        chunk = batch[start : start + size]
        count = len(chunk)
        if count < size:
            pad = np.zeros((size - count, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        outputs.append(np.asarray(infer(np.ascontiguousarray(chunk, dtype=np.float32)))[:count])
    return np.concatenate(outputs)


class Model:
    """A loaded bundle: preprocessing from its manifest plus an inference session."""

    def __init__(
        self, bundle: Bundle, session: Session, spec: ImageSpec, labels: list[str] | None
    ) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.session = session
        self.spec = spec
        self.labels = labels
        self.name = str(self.manifest.get("model", {}).get("name", "model"))
        self.format = str(self.manifest["format"])
        self.precision = str(self.manifest.get("precision", ""))

    def __repr__(self) -> str:
        c, h, w = self.spec.chw()
        return f"<deploykit.runtime.Model {self.name} {self.format} {self.precision} {c}x{h}x{w}>"

    def preprocess(self, image: Any) -> np.ndarray:
        """An image (path, Pillow image or uint8 HxWx3 array) as the CHW float32 model input."""
        return preprocess(as_rgb_array(image), self.spec)

    def tensor(self, inputs: Any) -> tuple[np.ndarray, bool]:
        """Turn images or preprocessed arrays into one NCHW float32 batch.

        Returns:
            The batch, and whether `inputs` was a single input.
        """
        chw = self.spec.chw()
        if isinstance(inputs, np.ndarray) and inputs.dtype != np.uint8:
            array = np.asarray(inputs, dtype=np.float32)
            if array.shape == chw:
                return np.ascontiguousarray(array[None]), True
            if array.ndim == 4 and array.shape[1:] == chw:
                return np.ascontiguousarray(array), False
            raise UserError(
                f"a preprocessed input must have shape {chw} or (N, {', '.join(map(str, chw))}), "
                f"got {array.shape}; pass an image (path, Pillow image or uint8 array) instead"
            )
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise UserError("no inputs given")
            parts = [self.tensor(item)[0] for item in inputs]
            return np.ascontiguousarray(np.concatenate(parts)), False
        return self.preprocess(inputs)[None], True

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run an NCHW float32 batch of any size (split and padded to a static batch)."""
        return run_in_batches(self.session.run, batch, self.session.batch)

    def predict(self, inputs: Any) -> np.ndarray:
        """Class scores as the model outputs them (logits).

        Returns (classes,) for one input, else (N, classes).

        Args:
            inputs: An image path, Pillow image, uint8 HxWx3 array, a preprocessed CHW or
                NCHW float32 array, or a list of these.
        """
        batch, single = self.tensor(inputs)
        scores = self.run(batch).reshape(len(batch), -1)
        return scores[0] if single else scores

    def top_k(self, inputs: Any, k: int = 5) -> Any:
        """The `k` most likely classes with softmax probabilities.

        Returns:
            A list of :class:`Prediction` for one input, or one such list per input.
        """
        scores = self.predict(inputs)
        probs = softmax(scores[None] if scores.ndim == 1 else scores)
        result = []
        for row in probs:
            order = np.argsort(-row, kind="stable")[: max(1, k)]
            result.append(
                [
                    Prediction(int(i), self.labels[i] if self.labels else None, float(row[i]))
                    for i in order
                ]
            )
        return result[0] if scores.ndim == 1 else result

    def reference_check(self) -> dict[str, Any] | None:
        """Run the bundle's reference images and compare with the outputs stored at packaging.

        Returns:
            The comparison, the tolerance and ``passed``; None when the bundle has no references.
        """
        reference = self.manifest.get("reference")
        if not reference:
            return None
        names = _field(reference, "reference", "images", list)
        outputs = _field(reference, "reference", "outputs", str)
        tolerance = _field(reference, "reference", "tolerance", dict)
        try:
            images = [_png(self.bundle.files[name]) for name in names]
            expected = np.load(io.BytesIO(self.bundle.files[outputs]), allow_pickle=False)
        except (KeyError, ValueError, OSError) as exc:
            raise BundleError(f"bundle reference files are unreadable ({exc})") from exc
        actual = self.predict(images)
        result: dict[str, Any] = compare_outputs(actual, expected)
        failures = []
        if result["max_rel_err"] > float(tolerance.get("max_rel_err", 0.0)):
            failures.append(f"max rel err {result['max_rel_err']:.3g} > {tolerance['max_rel_err']}")
        if result["cosine"] < float(tolerance.get("min_cosine", 1.0)):
            failures.append(f"cosine {result['cosine']:.6f} < {tolerance['min_cosine']}")
        if result["top1_agreement"] < float(tolerance.get("min_top1_agreement", 1.0)):
            failures.append(
                f"top-1 agreement {result['top1_agreement']:.2f} < "
                f"{tolerance['min_top1_agreement']}"
            )
        result.update(count=len(images), tolerance=tolerance, failures=failures)
        result["passed"] = not failures
        return result


def load(
    path: str | Path,
    threads: int | None = None,
    providers: list[str] | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> Model:
    """Read, check and load a bundle.

    Every file's sha256 is checked, the manifest's schema version and the runtime's
    version (and, for TensorRT engines, the GPU) must fit this machine.

    Args:
        path: The ``.dkb`` bundle.
        threads: Intra-op threads (default: the runtime's own choice).
        providers: ONNX Runtime execution providers (default: CPU).
        max_member_bytes: Largest bundle member accepted.

    Raises:
        BundleError: Tampered, corrupt or unsafe bundle, or one this machine cannot run.
    """
    return from_bundle(read_bundle(path, max_member_bytes), threads, providers)


def from_bundle(
    bundle: Bundle, threads: int | None = None, providers: list[str] | None = None
) -> Model:
    """Load a bundle already read and hash-checked by :func:`read_bundle`.

    Raises:
        BundleError: A manifest this runtime cannot use, or a machine that cannot run it.
    """
    manifest = bundle.manifest
    fmt = manifest.get("format")
    if fmt not in FORMAT_BACKENDS:
        raise BundleError(
            f"bundle format {fmt!r} is not one this deploykit runs ({', '.join(FORMAT_BACKENDS)})"
        )
    backend = _section(manifest, "backend")
    if backend.get("name") != FORMAT_BACKENDS[fmt]:
        raise BundleError(f"bundle format {fmt} cannot run on backend {backend.get('name')!r}")
    if fmt == "tensorrt":
        compat.check_device(_section(manifest, "device"), compat.gpu_fingerprint())
    compat.check_backend(backend)
    spec = _image_spec(_section(manifest, "input"))
    artifact = _section(manifest, "artifact")
    files = _field(artifact, "artifact", "files", list)
    for name in files:
        if name not in bundle.files:
            raise BundleError(f"bundle artifact file {name!r} is not in the bundle")
    session = _open_session(fmt, bundle, files, backend, threads, providers)
    output = _section(manifest, "output")
    labels = None
    if output.get("labels"):
        label_file = _field(output, "output", "labels", str)
        if label_file not in bundle.files:
            raise BundleError(f"bundle labels file {label_file!r} is not in the bundle")
        labels = bundle.files[label_file].decode("utf-8").splitlines()
    return Model(bundle, session, spec, labels)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _image_spec(section: dict[str, Any]) -> ImageSpec:
    for key in ("channels", "height", "width", "resize"):
        if _field(section, "input", key, int) < 1:
            raise BundleError(f"bundle manifest field input.{key} must be positive")
    for key in ("mean", "std"):
        values = _field(section, "input", key, list)
        if len(values) != section["channels"] or not all(
            isinstance(v, (int, float)) for v in values
        ):
            raise BundleError(f"bundle manifest field input.{key} needs one number per channel")
    if section.get("layout", "NCHW") != "NCHW" or section.get("dtype", "float32") != "float32":
        raise BundleError("this runtime feeds NCHW float32 inputs; the bundle asks for another")
    return ImageSpec.from_manifest(section)


def _open_session(
    fmt: str,
    bundle: Bundle,
    files: list[str],
    backend: dict[str, Any],
    threads: int | None,
    providers: list[str] | None,
) -> Session:
    first = bundle.files[files[0]]
    if fmt in ("onnx", "onnx-fp16", "ort-mobile"):
        return OrtSession(first, fmt == "ort-mobile", threads, providers)
    if fmt == "openvino":
        if len(files) < 2:
            raise BundleError("an OpenVINO bundle needs model.xml and model.bin")
        hint = str(backend.get("settings", {}).get("INFERENCE_PRECISION_HINT", "f32"))
        return OpenVinoSession(first, bundle.files[files[1]], hint, threads)
    return TensorRtSession(first)
