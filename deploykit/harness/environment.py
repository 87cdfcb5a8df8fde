"""What machine and software a measurement ran on."""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib import metadata
from typing import Any

# CPU features that decide which kernels runtimes pick; recorded in every report.
CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimddp",
)


@cache
def cpu_info() -> dict[str, Any]:
    """CPU model, logical cores usable by this process, and the relevant feature flags."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "kind": "cpu",
        "name": name,
        "arch": platform.machine(),
        "cores": usable_cores(),
        "features": [f for f in CPU_FEATURES if f in flags],
    }


def usable_cores() -> int:
    """Logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def package_version(name: str) -> str | None:
    """Installed distribution version, or None (never imports the package)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of Python and the packages deploykit drives."""
    from deploykit import __version__

    ort = package_version("onnxruntime") or package_version("onnxruntime-gpu")
    return {
        "python": platform.python_version(),
        "deploykit": __version__,
        "torch": package_version("torch"),
        "torchvision": package_version("torchvision"),
        "onnx": package_version("onnx"),
        "onnxslim": package_version("onnxslim"),
        "onnxruntime": ort,
        "openvino": package_version("openvino"),
        "tensorrt": package_version("tensorrt"),
    }
