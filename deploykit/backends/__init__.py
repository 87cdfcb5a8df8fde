"""Backends: one subpackage per runtime behind the `Backend` interface."""

from deploykit.backends.base import (
    Availability,
    Backend,
    BatchRange,
    Capabilities,
    CompiledArtifact,
    CompileOptions,
    Runner,
)
from deploykit.backends.registry import backend_names, get_backend, require_backend

__all__ = [
    "Availability",
    "Backend",
    "BatchRange",
    "Capabilities",
    "CompileOptions",
    "CompiledArtifact",
    "Runner",
    "backend_names",
    "get_backend",
    "require_backend",
]
