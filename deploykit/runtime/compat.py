"""Is this machine able to run a bundle? Runtime versions and the GPU a TensorRT engine needs.

Nothing here imports a runtime: versions come from the installed distributions'
metadata and the GPU from ``nvidia-smi``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import metadata
from typing import Any

from deploykit.package.archive import BundleError

# Distributions that provide each runtime's Python module.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-directml",
        "onnxruntime-openvino",
        "onnxruntime-qnn",
        "onnxruntime-training",
    ),
    "openvino": ("openvino",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt-cu11"),
}
INSTALL_HINT = {
    "onnxruntime": "pip install onnxruntime",
    "openvino": "pip install openvino",
    "tensorrt": "pip install tensorrt (on an NVIDIA GPU machine)",
}


def parse_version(text: str) -> tuple[int, ...]:
    """Leading numeric parts of a version: ``1.20.1+cu12`` -> (1, 20, 1)."""
    parts = []
    for piece in re.split(r"[.+-]", str(text)):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def installed_version(backend: str) -> str | None:
    """Version of the installed runtime for `backend`, or None when none is installed."""
    for dist in DISTRIBUTIONS.get(backend, (backend,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_backend(backend: dict[str, Any]) -> str:
    """Check the runtime a bundle needs against this machine's.

    Args:
        backend: The manifest's ``backend`` section (``name``, ``min_version``,
            optional ``exact_version``).

    Returns:
        The installed version.

    Raises:
        BundleError: The runtime is missing, too old, or not the exact version required.
    """
    name = str(backend["name"])
    here = installed_version(name)
    if here is None:
        raise BundleError(
            f"this bundle runs on {name}, which is not installed here; "
            f"{INSTALL_HINT.get(name, 'install it')}"
        )
    wanted = backend.get("min_version")
    if wanted and parse_version(here) < parse_version(str(wanted)):
        raise BundleError(
            f"this bundle needs {name} >= {wanted}, this machine has {here}; upgrade {name} "
            "or package the run with an older one"
        )
    exact = backend.get("exact_version")
    if exact and parse_version(here)[:3] != parse_version(str(exact))[:3]:
        raise BundleError(
            f"this bundle was built for {name} {exact}, this machine has {here}; rebuild the "
            f"artifact on this machine (deploykit export --target {name}) and package it again"
        )
    return here


def gpu_fingerprint() -> dict[str, Any] | None:
    """The first NVIDIA GPU's name and compute capability, with the TensorRT version.

    Returns:
        ``{"gpu_name", "compute_capability", "tensorrt_version"}``, or None without a GPU.
    """
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    if not lines or "," not in lines[0]:
        return None
    name, _, capability = lines[0].rpartition(",")
    return {
        "gpu_name": name.strip(),
        "compute_capability": capability.strip(),
        "tensorrt_version": installed_version("tensorrt"),
    }


def check_device(required: dict[str, Any], here: dict[str, Any] | None) -> None:
    """Check that this machine is the GPU and TensorRT a TensorRT engine was built for.

    TensorRT's rules: the same TensorRT major.minor, and the same patch release unless
    the engine was built version-compatible; the same compute capability (any >= 8.0
    with hardware compatibility ``AMPERE_PLUS``); and, with hardware compatibility
    ``NONE`` (TensorRT's default), the same GPU model.

    Args:
        required: The manifest's ``device`` section (``gpu_name``, ``compute_capability``,
            ``tensorrt_version``).
        here: This machine's :func:`gpu_fingerprint` (None: no NVIDIA GPU).

    Raises:
        BundleError: One line naming what differs and the fix (rebuild the engine here).
    """
    built = (
        f"{required.get('gpu_name')} (compute capability {required.get('compute_capability')}) "
        f"with TensorRT {required.get('tensorrt_version')}"
    )
    fix = (
        "rebuild the engine on this machine (deploykit export MODEL --target tensorrt) "
        "and package it again"
    )
    if here is None:
        raise BundleError(f"TensorRT engine built for {built}; this machine has no NVIDIA GPU")
    differs = []
    level = str(required.get("hardware_compatibility") or "NONE").upper()
    have_cc = parse_version(str(here.get("compute_capability")))
    want_cc = parse_version(str(required.get("compute_capability")))
    if level == "AMPERE_PLUS":
        if not have_cc or have_cc < (8, 0):
            differs.append(f"compute capability {here.get('compute_capability')} (needs >= 8.0)")
    elif have_cc != want_cc:
        differs.append(f"compute capability {here.get('compute_capability')}")
    if level == "NONE" and str(here.get("gpu_name")) != str(required.get("gpu_name")):
        differs.append(f"GPU {here.get('gpu_name')}")
    have_trt = parse_version(str(here.get("tensorrt_version") or ""))
    want_trt = parse_version(str(required.get("tensorrt_version")))
    same = have_trt[:2] == want_trt[:2] and (
        have_trt[:3] == want_trt[:3] or bool(required.get("version_compatible"))
    )
    if not have_trt or not same:
        differs.append(f"TensorRT {here.get('tensorrt_version') or 'not installed'}")
    if differs:
        raise BundleError(
            f"TensorRT engine built for {built}; this machine has {', '.join(differs)}; {fix}"
        )
