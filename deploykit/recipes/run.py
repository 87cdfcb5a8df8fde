"""Running one recipe: validate its references, export, then the recipe-only gates."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from deploykit.errors import GateError
from deploykit.fsutil import sha256_file, write_text_atomic
from deploykit.recipes.resolve import as_dict, check_references, recipe_yaml, to_request
from deploykit.recipes.schema import Recipe

if TYPE_CHECKING:
    from deploykit.api import ExportResult

RESOLVED_FILE = "recipe.resolved.yaml"


def _quiet(_: str) -> None:
    return None


def run_recipe(recipe: Recipe, on_step: Callable[[str], None] = _quiet) -> ExportResult:
    """Run a validated recipe through :func:`deploykit.api.export`.

    Besides what export checks, the recipe's ``gates.latency_budget_ms`` is checked on
    the measured p50, and the run folder's ``recipe.resolved.yaml`` records the whole
    recipe (keys that ExportRequest has no field for included).

    Raises:
        RecipeError: A missing calibration set or file (nothing is written).
        UserError: Bad input or unavailable backend, from export (nothing is written).
        GateError: A gate failed; the run folder is kept with status failed.
    """
    from deploykit import api

    check_references(recipe)
    request = to_request(recipe)
    try:
        result = api.export(request, on_step=on_step)
    except GateError as exc:
        if isinstance(exc.run_dir, Path):
            _finish(exc.run_dir, recipe)
        raise
    failure = _finish(result.run_dir, recipe)
    if failure is not None:
        raise failure
    from deploykit.harness.report import load_report

    return dataclasses.replace(result, report=load_report(result.run_dir))


def _finish(run_dir: Path, recipe: Recipe) -> GateError | None:
    """Record the full recipe and the latency gate in the run folder.

    Returns:
        The latency gate's error when it failed (the report already says so).
    """
    from deploykit.harness.report import Gate, load_report

    budget = recipe.gates.latency_budget_ms
    if budget is None and recipe.description is None:
        return None  # export's own recipe.resolved.yaml already says everything
    report = load_report(run_dir)
    resolved = run_dir / RESOLVED_FILE
    data = as_dict(recipe)
    data["input"]["batch"] = int(report.input.get("batch") or 1)
    if report.latency:
        data["target"]["threads"] = int(report.latency.get("threads") or 0) or None
    write_text_atomic(resolved, recipe_yaml(data))
    report.artifacts[RESOLVED_FILE] = sha256_file(resolved)
    failure = None
    if budget is not None and report.latency:
        p50 = float(report.latency["p50_ms"])
        passed = p50 <= budget
        report.gates.append(
            Gate(name="latency", passed=passed, detail=f"p50 {p50:.3f} ms, budget {budget:g} ms")
        )
        if not passed:
            report.status = (
                "failed: latency"
                if report.status == "ok"
                else f"{report.status}; latency over budget"
            )
            failure = GateError(
                f"{report.model} on {report.target}: latency gate failed "
                f"(p50 {p50:.3f} ms > budget {budget:g} ms)"
            )
            failure.run_dir = run_dir
    report.save(run_dir)
    return failure
