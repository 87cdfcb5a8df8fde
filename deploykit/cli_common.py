"""What every click command module shares (kept light: `deploykit --help` imports it)."""

from __future__ import annotations

from typing import Any

import click


def console(stderr: bool = False) -> Any:
    """A rich console for command output (no syntax highlighting of numbers and paths)."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def parse_size(value: str | None) -> tuple[int, int] | None:
    """``--input-size`` H or HxW as (height, width); None when not given."""
    if value is None:
        return None
    parts = value.lower().replace("x", " ").split()
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        dims = []
    if len(dims) not in (1, 2) or min(dims) < 8:
        raise click.BadParameter("expected H or HxW, each at least 8 (e.g. 224 or 240x320)")
    return (dims[0], dims[-1])
