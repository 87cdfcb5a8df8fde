"""The sweep summary as a terminal table (rich) and as Markdown."""

from __future__ import annotations

from typing import Any

COLUMNS = ("recipe", "status", "latency p50", "speedup vs torch", "accuracy vs FP32", "size")


def _size(value: int | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} B"


def _accuracy(row: dict[str, Any]) -> str:
    if row.get("top1_drop_pt") is not None:
        return f"top-1 {-row['top1_drop_pt']:+.2f} pt"
    if row.get("top1_agreement") is not None:
        return f"top-1 agree {100 * row['top1_agreement']:.1f}%, cos {row['cosine']:.4f}"
    return ""


def cells(row: dict[str, Any]) -> list[str]:
    """The printed cells of one row (blank where the run has no such figure)."""
    status = row["status"]
    p50 = row.get("latency_p50_ms")
    speedup = row.get("speedup_vs_torch")
    return [
        str(row["recipe"]),
        status,
        f"{p50:.3f} ms" if p50 is not None else "",
        f"{speedup:.2f}x" if speedup is not None else "",
        _accuracy(row),
        _size(row.get("artifact_bytes")),
    ]


def reasons(summary: dict[str, Any]) -> list[str]:
    """One line per row that did not pass: the recipe and why."""
    return [
        f"{row['recipe']}: {row['status']}: {row['reason']}"
        for row in summary["rows"]
        if row["status"] != "ok" and row.get("reason")
    ]


def _caption(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    how = summary["executor"] + (
        f", {summary['workers']} worker{'s' if summary['workers'] > 1 else ''}"
        if summary.get("workers")
        else ""
    )
    return f"{len(summary['rows'])} recipes ({counts}) in {summary['wall_seconds']:.1f} s, {how}"


def to_markdown(summary: dict[str, Any]) -> str:
    """A Markdown table of the sweep."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in summary["rows"]:
        text = [c.replace("|", "\\|").replace("\n", " ") for c in cells(row)]
        lines.append("| " + " | ".join(text) + " |")
    notes = "".join(f"- {line}\n" for line in reasons(summary))
    return "\n".join(lines) + f"\n\n{_caption(summary)}\n" + (f"\n{notes}" if notes else "")


def render(console: Any, summary: dict[str, Any]) -> None:
    """Print the sweep table with rich."""
    from rich.table import Table

    table = Table(title="deploykit sweep", caption=_caption(summary))
    for name in COLUMNS:
        table.add_column(name, overflow="fold", justify="right" if name == "size" else "left")
    styles = {"ok": "green", "failed": "red", "error": "red", "interrupted": "yellow"}
    for row in summary["rows"]:
        table.add_row(*cells(row), style=styles.get(row["status"], "dim"))
    console.print(table)
    for line in reasons(summary):
        console.print(line, highlight=False, markup=False)
