"""The library API. The CLI is a thin layer over these functions.

Each command is one function here. The runs behind them live beside the stages they
compose and are re-exported here: `export` (`deploykit.pipeline.export`), `calibrate`
(`deploykit.pipeline.int8`), `evaluate` (`deploykit.pipeline.evaluate`), `bench` and
`regress` (`deploykit.regress.run`); bundles in :mod:`deploykit.package`. Importing this
module imports no runtime: torch, onnxruntime, openvino and tensorrt load inside the
functions that use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.registry import backend_names, get_backend
from deploykit.errors import UserError
from deploykit.harness.accuracy import EvalGates
from deploykit.harness.report import load_report
from deploykit.models.catalogue import ModelSpec, list_models
from deploykit.pipeline.evaluate import evaluate
from deploykit.pipeline.export import export
from deploykit.pipeline.int8 import calibrate
from deploykit.pipeline.request import ExportRequest, ExportResult, Step, quiet
from deploykit.regress.run import bench, bench_several, regress

__all__ = [
    "EvalGates",
    "ExportRequest",
    "ExportResult",
    "Step",
    "bench",
    "bench_several",
    "calibrate",
    "default_precision",
    "evaluate",
    "export",
    "inspect_bundle",
    "list_backends",
    "list_catalogue",
    "list_datasets",
    "load_report",
    "package",
    "regress",
    "verify_bundle",
]


def default_precision(target: str, model: str | None = None) -> str:
    """The precision `export` uses when none is given: INT8 for a `deploykit calibrate`
    folder (its Q/DQ file), FP16 engines for TensorRT, else FP32."""
    from deploykit.pipeline.calibrated import folder_of

    if model is not None and folder_of(model) is not None:
        return "int8"
    return "fp16" if target in ("tensorrt", "trt") else "fp32"


def list_catalogue() -> list[ModelSpec]:
    """The model catalogue, emphasis families first."""
    return list_models()


def list_datasets() -> list[dict[str, Any]]:
    """The shipped calibration/evaluation sets, with whether their files are installed."""
    from deploykit.harness.evalsets import list_manifests, origin_root

    rows = []
    for manifest in list_manifests():
        reason = ""
        try:
            for origin in sorted({f.origin for f in manifest.files}):
                origin_root(origin)
        except UserError as exc:
            reason = str(exc)
        rows.append(
            {
                **manifest.to_json(),
                "available": not reason,
                "reason": reason,
                "path": str(manifest.path),
            }
        )
    return rows


def list_backends() -> list[dict[str, Any]]:
    """Every backend: availability (with the reason), version and capabilities."""
    rows = []
    for name in backend_names():
        backend = get_backend(name)
        availability = backend.is_available()
        row: dict[str, Any] = {
            "name": name,
            "display_name": backend.display_name,
            "available": availability.ok,
            "reason": "" if availability.ok else availability.message(),
            "version": backend.version(),
        }
        if availability.ok:
            caps = backend.capabilities()
            row.update(precisions=list(caps.precisions), devices=list(caps.devices))
        rows.append(row)
    return rows


def package(
    run_dir: str | Path,
    out: str | Path | None = None,
    options: Any = None,
    on_step: Step = quiet,
) -> dict[str, Any]:
    """Package a run folder into a verifiable edge bundle (see :mod:`deploykit.package.build`).

    Args:
        run_dir: A run folder written by `export`.
        out: The ``.dkb`` file to write.
        options: :class:`deploykit.package.formats.PackageOptions` (format, labels, ...).
        on_step: Progress callback.
    """
    from deploykit.package.build import package as build_package

    return build_package(run_dir, out, options, on_step)


def verify_bundle(
    bundle: str | Path, extract_to: str | Path | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Verify a bundle here: hashes, manifest, compatibility, smoke and reference inference."""
    from deploykit.package.verify import verify

    return verify(bundle, extract_to=extract_to, threads=threads)


def inspect_bundle(bundle: str | Path) -> dict[str, Any]:
    """What a bundle holds (hashes and manifest checked, nothing run)."""
    from deploykit.package.verify import inspect

    return inspect(bundle)
