"""Regression results for CI: Markdown job summary and JUnit XML (one test case per entry)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

_ICON = {"ok": "✅", "faster": "🚀", "slower": "❌", "noisy": "⚠️", "accuracy": "❌"}


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def to_markdown(result: dict[str, Any]) -> str:
    """A Markdown summary suitable for $GITHUB_STEP_SUMMARY."""
    regressions = [v for v in result["verdicts"] if v["regression"]]
    head = f"**{len(regressions)} regression(s)**" if regressions else "**no regression**"
    lines = [
        "## deploykit regress",
        "",
        f"{head} · tolerance {100 * result['options']['tolerance']:g}% · "
        f"{result['rounds']} rounds · "
        f"{'normalised by the reference workload' if result['normalised'] else 'raw latencies'}",
        "",
        "| entry | verdict | baseline p50 ms | current p50 ms | ratio | 90% interval | notes |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for v in result["verdicts"]:
        interval = f"{v['ci_low']:.3f}–{v['ci_high']:.3f}" if v["ci_low"] is not None else ""
        notes = "; ".join(v["accuracy"] + v["notes"]).replace("|", "\\|")
        lines.append(
            f"| `{v['key']}` | {_ICON.get(v['verdict'], '')} {v['verdict']} | "
            f"{_fmt(v['baseline_p50_ms'], '.2f')} | {_fmt(v['current_p50_ms'], '.2f')} | "
            f"{_fmt(v['ratio'], '.3f')} | {interval} | {notes} |"
        )
    if result["environment_differences"]:
        lines += ["", "Environment differs from the baseline:", ""]
        lines += [f"- {d}" for d in result["environment_differences"]]
    return "\n".join(lines) + "\n"


def to_junit(result: dict[str, Any]) -> str:
    """JUnit XML: a test suite with one test case per entry; regressions are failures."""
    verdicts = result["verdicts"]
    suite = ET.Element(
        "testsuite",
        name="deploykit.regress",
        tests=str(len(verdicts)),
        failures=str(sum(v["regression"] for v in verdicts)),
        skipped=str(sum(v["verdict"] == "noisy" for v in verdicts)),
        errors="0",
    )
    for v in verdicts:
        target = v["key"].split("/", 1)[1].split("-", 1)[0] if "/" in v["key"] else "entry"
        case = ET.SubElement(
            suite, "testcase", classname=f"deploykit.regress.{target}", name=v["key"], time="0"
        )
        summary = (
            f"{v['verdict']}: p50 {_fmt(v['current_p50_ms'], '.3f')} ms vs baseline "
            f"{_fmt(v['baseline_p50_ms'], '.3f')} ms, ratio {_fmt(v['ratio'], '.3f')} "
            f"(90% interval {_fmt(v['ci_low'], '.3f')}–{_fmt(v['ci_high'], '.3f')})"
        )
        if v["regression"]:
            failure = ET.SubElement(case, "failure", message=summary, type=v["verdict"])
            failure.text = "\n".join([summary, *v["accuracy"], *v["notes"]])
        elif v["verdict"] == "noisy":
            ET.SubElement(case, "skipped", message="inconclusive: " + summary)
        out = ET.SubElement(case, "system-out")
        out.text = "\n".join([summary, *v["notes"]])
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
