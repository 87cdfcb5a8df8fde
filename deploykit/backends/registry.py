"""Backend registry: names to lazily imported backend classes."""

from __future__ import annotations

import difflib
import importlib

from deploykit.backends.base import Backend
from deploykit.errors import BackendUnavailableError, UserError

# name -> "module:Class"; the modules import their runtime only when used.
_BACKENDS: dict[str, str] = {
    "torch": "deploykit.backends.torch.backend:TorchBackend",
    "onnxruntime": "deploykit.backends.onnxruntime.backend:OnnxRuntimeBackend",
    "openvino": "deploykit.backends.openvino.backend:OpenVinoBackend",
    "tensorrt": "deploykit.backends.tensorrt.backend:TensorRtBackend",
}
ALIASES = {"ort": "onnxruntime", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch"}


def backend_names() -> list[str]:
    """All known backend names."""
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Return the backend called `name` (availability is not checked here).

    Raises:
        UserError: Unknown backend name.
    """
    key = ALIASES.get(name, name)
    if key not in _BACKENDS:
        close = difflib.get_close_matches(name, backend_names(), n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"unknown target {name!r}: {hint}choose one of {', '.join(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[key].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    backend: Backend = cls()
    return backend


def require_backend(name: str) -> Backend:
    """Return the backend, raising BackendUnavailableError with its reason when it cannot run."""
    backend = get_backend(name)
    availability = backend.is_available()
    if not availability.ok:
        raise BackendUnavailableError(
            f"target {backend.name} unavailable: {availability.message()}"
        )
    return backend
