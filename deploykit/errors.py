"""Typed errors. Each carries the CLI exit code it maps to.

Exit codes (see DESIGN.md): 1 a gate failed (numbers given), 2 bad input or an
unavailable backend (one line with the fix). Anything else is a bug.
"""

from __future__ import annotations


class DeployKitError(Exception):
    """Base class of every error a user can act on."""

    exit_code = 2


class UserError(DeployKitError):
    """Bad input: wrong name, unreadable file, unsupported option."""


class ModelNotFoundError(UserError):
    """A model name or path that resolves to nothing."""


class WeightsError(UserError):
    """A weights file that is missing, unreadable or does not fit the model."""


class OnnxFileError(UserError):
    """An ONNX file that cannot be read or fails the checker."""


class ExportError(UserError):
    """torch.onnx could not export the model with any exporter."""


class BackendUnavailableError(UserError):
    """The requested backend is not installed or cannot run here."""


class GateError(DeployKitError):
    """A measured gate (numerics, accuracy, latency) failed; the message has the numbers."""

    exit_code = 1
    # Set when the failed run's folder was kept (marked failed in its report.json).
    run_dir: object = None


class NumericMismatchError(GateError):
    """An artifact disagrees with its reference beyond tolerance."""
