"""`deploykit verify` and `deploykit inspect`: prove a bundle is intact and runs here.

verify: every file's sha256, the manifest against its schema, the runtime version
(and for TensorRT the GPU), loading the artifact, a smoke inference, and — where
the bundle carries reference outputs — the same outputs within tolerance. A bad or
foreign bundle is a :class:`BundleError` (exit 2); outputs out of tolerance are a
:class:`GateError` with the numbers (exit 1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.errors import NumericMismatchError
from deploykit.package.archive import (
    MANIFEST_NAME,
    MAX_MEMBER_BYTES,
    BundleError,
    extract_bundle,
    read_bundle,
)
from deploykit.package.manifest import validate_manifest


def verify(
    path: str | Path,
    extract_to: str | Path | None = None,
    threads: int | None = None,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> dict[str, Any]:
    """Verify a bundle on this machine.

    Args:
        path: The ``.dkb`` bundle.
        extract_to: After every check passes, extract the bundle into this folder.
        threads: Runtime threads for the smoke inference.
        max_member_bytes: Largest member accepted.

    Returns:
        The checks that ran, with timings and the reference comparison.

    Raises:
        BundleError: Corrupt, tampered, unsafe or incompatible bundle (exit 2).
        GateError: The outputs differ from the reference beyond tolerance (exit 1).
    """
    from deploykit.runtime.compat import gpu_fingerprint, installed_version
    from deploykit.runtime.model import from_bundle

    checks: list[dict[str, Any]] = []
    started = time.perf_counter()
    bundle = read_bundle(path, max_member_bytes)
    checks.append(
        {"name": "hashes", "passed": True, "detail": f"{len(bundle.files)} files match sha256"}
    )
    manifest = validate_manifest(bundle.manifest)
    checks.append(
        {"name": "manifest", "passed": True, "detail": f"schema {manifest.schema_version} valid"}
    )
    loaded = time.perf_counter()
    model = from_bundle(bundle, threads=threads)
    load_seconds = time.perf_counter() - loaded
    runtime = f"{manifest.backend.name} {installed_version(manifest.backend.name)}"
    checks.append(
        {
            "name": "compatibility",
            "passed": True,
            "detail": f"{runtime} meets >= {manifest.backend.min_version or 'any'}"
            + (f"; GPU {gpu_fingerprint()}" if manifest.format == "tensorrt" else ""),
        }
    )
    smoke = np.zeros((1, *model.spec.chw()), dtype=np.float32)
    out = model.run(smoke)
    expected = (1, manifest.output.num_classes)
    if out.reshape(1, -1).shape != expected or not np.isfinite(out).all():
        raise BundleError(
            f"smoke inference gave {out.shape} outputs (finite: {bool(np.isfinite(out).all())}), "
            f"expected {expected}; the artifact is broken, package the run again"
        )
    checks.append({"name": "smoke", "passed": True, "detail": f"1 input -> {expected} finite"})
    reference = model.reference_check()
    if reference is not None:
        checks.append(
            {
                "name": "reference",
                "passed": reference["passed"],
                "detail": "; ".join(reference["failures"])
                or (
                    f"{reference['count']} images: max rel err {reference['max_rel_err']:.2g}, "
                    f"cosine {reference['cosine']:.6f}, top-1 {reference['top1_agreement']:.0%}"
                ),
            }
        )
    result = {
        "schema_version": 1,
        "kind": "verify",
        "bundle": str(bundle.path),
        "bundle_id": bundle.manifest_sha256,
        "model": manifest.model.name,
        "format": manifest.format,
        "precision": manifest.precision,
        "runtime": runtime,
        "load_seconds": round(load_seconds, 4),
        "seconds": round(time.perf_counter() - started, 4),
        "checks": checks,
        "reference": reference,
        "passed": all(c["passed"] for c in checks),
    }
    if reference is not None and not reference["passed"]:
        error = NumericMismatchError(
            f"{bundle.path}: outputs differ from the bundle's reference on this machine: "
            + "; ".join(reference["failures"])
        )
        raise error
    if extract_to is not None:
        extract_bundle(path, extract_to, max_member_bytes)
        result["extracted_to"] = str(extract_to)
    return result


def inspect(path: str | Path, max_member_bytes: int = MAX_MEMBER_BYTES) -> dict[str, Any]:
    """What is inside a bundle: manifest, input contract, files and sizes, measured figures.

    Hashes and the manifest schema are checked; nothing is run.

    Raises:
        BundleError: Corrupt, tampered or unsafe bundle.
    """
    bundle = read_bundle(path, max_member_bytes)
    manifest = validate_manifest(bundle.manifest)
    return {
        "schema_version": 1,
        "kind": "inspect",
        "bundle": str(bundle.path),
        "bundle_id": bundle.manifest_sha256,
        "bundle_bytes": bundle.archive_bytes,
        "files": {
            MANIFEST_NAME: {"size": None, "sha256": bundle.manifest_sha256},
            **{name: entry.model_dump() for name, entry in manifest.files.items()},
        },
        "manifest": manifest.model_dump(mode="json"),
    }
