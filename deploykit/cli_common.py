"""What every click command module shares (kept light: `deploykit --help` imports it)."""

from __future__ import annotations

from typing import Any


def console(stderr: bool = False) -> Any:
    """A rich console for command output (no syntax highlighting of numbers and paths)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)
