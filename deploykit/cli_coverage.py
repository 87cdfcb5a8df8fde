"""`deploykit coverage`: the architecture x backend x precision coverage matrix.

A thin command over :mod:`deploykit.harness.coverage`; nothing heavy is imported
until the command runs.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click

from deploykit.errors import GateError
from deploykit.stages import CALIBRATION_METHODS

DEFAULT_BACKENDS = "onnxruntime,openvino,torch,tensorrt"


def _split(value: str, label: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise click.BadParameter(f"expected a comma-separated list, e.g. {label}")
    return items


@click.command("coverage")
@click.argument("models", nargs=-1)
@click.option(
    "--full",
    is_flag=True,
    help="Run the rows' full-size models at their own input size (the benchmark matrix).",
)
@click.option("--input-size", help="Input size of every row: H or HxW [default: each model's].")
@click.option(
    "--backends",
    default=DEFAULT_BACKENDS,
    show_default=True,
    help="Comma-separated target backends; unavailable ones get an 'unavailable' column.",
)
@click.option("--precisions", default="fp32,int8", show_default=True, help="fp32 and/or int8.")
@click.option("--fidelity-samples", type=int, default=16, show_default=True)
@click.option(
    "--eval-samples",
    type=int,
    default=500,
    show_default=True,
    help="Labelled inputs for top-1 on rows with trained weights.",
)
@click.option("--calib-samples", type=int, default=256, show_default=True)
@click.option(
    "--calib-method",
    type=click.Choice(CALIBRATION_METHODS),
    default="minmax",
    show_default=True,
    help="INT8 calibration statistics.",
)
@click.option("--bn-samples", type=int, default=64, show_default=True)
@click.option(
    "--no-bn-recalibration",
    is_flag=True,
    help="Keep random-weight rows' BatchNorm statistics as initialised.",
)
@click.option("--latency-runs", type=int, default=5, show_default=True)
@click.option(
    "--jobs", "-j", type=int, default=1, show_default=True, help="Rows run at once (processes)."
)
@click.option(
    "--threads",
    type=int,
    default=1,
    show_default=True,
    help="Threads of every runtime and of PyTorch (0 = all usable cores).",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Largest INT8 top-1 drop (points) on rows with trained weights.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), help="Write the coverage JSON to this file."
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False),
    help="Write the matrix as Markdown (e.g. docs/coverage.md).",
)
@click.option(
    "--check",
    type=click.Path(dir_okay=False),
    help="Compare with a recorded coverage JSON (e.g. tests/golden/coverage.json).",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False),
    help="Keep every row's artifacts (ONNX, fused, Q/DQ, builds) under this folder.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the coverage JSON.")
def coverage(
    models: tuple[str, ...],
    full: bool,
    input_size: str | None,
    backends: str,
    precisions: str,
    fidelity_samples: int,
    eval_samples: int,
    calib_samples: int,
    calib_method: str,
    bn_samples: int,
    no_bn_recalibration: bool,
    latency_runs: int,
    jobs: int,
    threads: int,
    max_accuracy_drop: float,
    seed: int,
    output: str | None,
    markdown: str | None,
    check: str | None,
    keep: str | None,
    as_json: bool,
) -> None:
    """Take every coverage row (or the named MODELS) through export, fuse, INT8 and each backend.

    Without MODELS the rows are the model zoo's architectures and convolution types
    (their small variants; --full for the full-size ones). Exits 1 when a cell fails.
    """
    from deploykit.cli_common import console as _console
    from deploykit.cli_common import parse_size
    from deploykit.harness import coverage as cov

    options = cov.CoverageOptions(
        models=list(models) or None,
        full=full,
        backends=_split(backends, DEFAULT_BACKENDS),
        precisions=_split(precisions, "fp32,int8"),
        input_size=parse_size(input_size),
        fidelity_samples=fidelity_samples,
        eval_samples=eval_samples,
        calib_samples=calib_samples,
        calib_method=calib_method,
        bn_samples=bn_samples,
        bn_recalibrate=not no_bn_recalibration,
        latency_runs=latency_runs,
        jobs=jobs,
        threads=threads or None,
        max_accuracy_drop=max_accuracy_drop,
        seed=seed,
        keep=keep,
    )
    golden = cov.load_coverage(Path(check)) if check else None
    command = _command_line(click.get_current_context())
    with _console(stderr=True).status("coverage") as status:
        doc = cov.run_coverage(options, on_step=lambda text: status.update(f"coverage: {text}"))
    doc["command"] = command
    cov.write_outputs(doc, Path(output) if output else None, Path(markdown) if markdown else None)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _render(_console(), doc)
    problems = cov.check_against_golden(doc, golden) if golden is not None else []
    for line in problems:
        click.echo(f"differs from {check}: {line}", err=True)
    failing = doc["summary"]["failing_rows"]
    if failing or problems:
        what = f"{len(failing)} row(s) with failed cells ({', '.join(failing)})" if failing else ""
        if problems:
            what = ", ".join(filter(None, [what, f"{len(problems)} difference(s) from {check}"]))
        raise GateError(f"coverage: {what}")


def _command_line(ctx: click.Context) -> str:
    """The command as typed, reduced to the options that differ from their defaults."""
    parts = ["deploykit coverage", *(shlex.quote(m) for m in ctx.params["models"])]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        value = ctx.params[param.name]
        if value == param.default or value is None or value is False:
            continue
        flag = max(param.opts, key=len)
        parts.append(flag if param.is_flag else f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def _render(console: Any, doc: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from deploykit.harness.coverage import cell_text

    keys = [t["key"] for t in doc["targets"] if t["available"]]
    table = Table(title=f"coverage ({doc['variant']}, {doc['seconds']:.0f} s)")
    table.add_column("row")
    table.add_column("weights")
    for key in keys:
        table.add_column(key)
    for row in doc["rows"]:
        table.add_row(
            escape(f"{row['name']} ({row['model']})"),
            row.get("weights", "?"),
            *[escape(cell_text(row["cells"][k], k.split("/")[1])) for k in keys],
        )
    console.print(table)
    for name, reason in doc.get("unavailable", {}).items():
        console.print(escape(f"{name}: unavailable: {reason}"))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(doc["summary"]["cells"].items()))
    console.print(f"cells: {counts}")
