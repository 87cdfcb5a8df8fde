"""Catalogue entries (filled in by the model module)."""

from __future__ import annotations

from deploykit.models.catalogue import ModelSpec


def specs() -> list[ModelSpec]:
    """This module's catalogue entries."""
    return []
