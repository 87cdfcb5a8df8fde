"""`deploykit run` and `deploykit sweep`: recipes from the command line.

Thin: each command parses options and calls deploykit.recipes. Nothing heavy is
imported at module level.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from deploykit.cli_common import console as _console

_SET_HELP = "Override a recipe key: section.key=value (repeatable), e.g. measure.runs=20."


@click.command(name="run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option(
    "--dry-run", is_flag=True, help="Print the resolved recipe and the plan; run nothing."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report (or the plan) as JSON.")
def run(recipe: str, overrides: tuple[str, ...], dry_run: bool, as_json: bool) -> None:
    """Run a RECIPE (YAML): export, compile, measure, check its gates.

    A run folder's recipe.resolved.yaml is a recipe too: running it replays the run.
    """
    from deploykit.recipes import load_recipe, plan, recipe_yaml, run_recipe
    from deploykit.recipes.resolve import as_dict

    resolved = load_recipe(recipe, list(overrides))
    if dry_run:
        steps = plan(resolved)
        if as_json:
            click.echo(json.dumps({"recipe": as_dict(resolved), "plan": steps}, indent=2))
        else:
            click.echo(recipe_yaml(resolved), nl=False)
            click.echo("\n# plan")
            for number, step in enumerate(steps, 1):
                click.echo(f"#  {number:2d}. {step}")
        return
    from deploykit.harness.display import render_report

    label = f"{resolved.model.ref} → {resolved.target.backend} {resolved.precision}"
    with _console(stderr=True).status(label) as status:
        result = run_recipe(resolved, on_step=lambda text: status.update(f"{label}: {text}"))
    if as_json:
        click.echo(json.dumps(result.report.model_dump(mode="json"), indent=2))
    else:
        render_report(_console(), result.report, str(result.run_dir))


@click.command(name="sweep")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("--workers", "-w", type=int, default=1, show_default=True, help="Runs at once.")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: a process pool on this machine; ray: one Ray task per recipe.",
)
@click.option("--address", help="Ray cluster address (--executor ray) [default: local Ray].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=_SET_HELP)
@click.option("--match", multiple=True, help="Only recipes whose key matches this glob.")
@click.option("--out", "-o", help="Output root of every run [default: each recipe's own].")
@click.option(
    "--threads", type=int, help="Threads per run when a recipe sets none [default: cores/workers]."
)
@click.option("--markdown", type=click.Path(dir_okay=False), help="Write a Markdown table here.")
@click.option("--dry-run", is_flag=True, help="Validate and list the recipes; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def sweep(
    ctx: click.Context,
    paths: tuple[str, ...],
    workers: int,
    executor: str,
    address: str | None,
    overrides: tuple[str, ...],
    match: tuple[str, ...],
    out: str | None,
    threads: int | None,
    markdown: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Run every recipe under PATHS (files or folders) and print one summary table.

    Exit 0 when every recipe passed or could not run here (unavailable, with
    the reason); 1 when a gate failed; 2 when a recipe is invalid; 130 on Ctrl-C.
    """
    from pathlib import Path

    from deploykit.fsutil import write_text_atomic
    from deploykit.recipes.summary import render, to_markdown
    from deploykit.recipes.sweep import (
        SweepInterrupted,
        SweepOptions,
        exit_code,
        planned_run_dirs,
        prepare,
        summarise,
    )
    from deploykit.recipes.sweep import sweep as run_sweep

    options = SweepOptions(
        workers=workers,
        executor=executor,
        address=address,
        overrides=list(overrides),
        out=out,
        threads=threads,
        match=list(match),
    )
    if dry_run:
        items = prepare(list(paths), options)
        dirs = planned_run_dirs(items)
        listing: list[dict[str, Any]] = [
            {
                "recipe": i.key,
                "valid": i.recipe is not None,
                "error": i.error,
                "run_dir": dirs.get(i.key),
            }
            for i in items
        ]
        if as_json:
            click.echo(json.dumps(listing, indent=2))
        else:
            for entry in listing:
                where = entry["run_dir"] or f"INVALID: {entry['error']}"
                click.echo(f"{entry['recipe']}: {where}")
        ctx.exit(2 if any(not e["valid"] for e in listing) else 0)
    err = _console(stderr=True)

    def progress(row: dict[str, Any], done: int, total: int) -> None:
        seconds = f" ({row['seconds']:.1f} s)" if row.get("seconds") is not None else ""
        err.print(f"[{done}/{total}] {row['recipe']}: {row['status']}{seconds}")

    interrupted = False
    try:
        summary = run_sweep(list(paths), options, progress)
    except SweepInterrupted as exc:
        interrupted = True
        summary = summarise(exc.rows, options, 0.0)
        err.print("interrupted: unfinished runs were removed; no run folder is half-written")
    if markdown:
        write_text_atomic(Path(markdown), to_markdown(summary))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        render(_console(), summary)
    sys.stdout.flush()
    ctx.exit(130 if interrupted else exit_code(summary))
