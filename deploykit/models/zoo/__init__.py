"""Architecture zoo: faithful, configurable implementations of the classic CNN families and
single-block convolution-type models, and the rows of the coverage matrix.

Each family lives in its own module with a ``specs()`` function returning catalogue entries;
:func:`coverage_rows` lists what the coverage matrix takes through every stage and backend.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoverageRow:
    """One row of the coverage matrix.

    Attributes:
        name: Row label a user reads, e.g. ``AlexNet (groups=2, LRN)``.
        family: Architecture family or ``conv-type``.
        kind: ``architecture`` or ``conv-type``.
        small: Catalogue name of the small variant the CI matrix runs.
        full: Catalogue name of the full-size model the benchmark matrix runs, if any.
    """

    name: str
    family: str
    kind: str
    small: str
    full: str | None = None


def coverage_rows() -> list[CoverageRow]:
    """Every architecture and convolution type the coverage matrix covers, in display order."""
    return []
