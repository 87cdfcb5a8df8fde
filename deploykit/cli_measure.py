"""`deploykit bench`, `compare` and `regress`: latency measurement and the CI regression check.

Thin click commands over :mod:`deploykit.api` and :mod:`deploykit.harness.compare`;
nothing heavy is imported at module level.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from deploykit.cli_common import console as _console
from deploykit.cli_common import parse_size


@click.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--runs", type=int, default=100, show_default=True, help="Minimum timed runs.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Warm-up runs.")
@click.option("--min-seconds", type=float, default=2.0, show_default=True, help="Minimum timing.")
@click.option("--threads", type=int, help="Override the run's thread count.")
@click.option("--batch", type=int, help="Override the run's batch (dynamic-batch artifacts).")
@click.option(
    "--rounds",
    type=int,
    default=5,
    show_default=True,
    help="Independent rounds the runs are spread over (noise estimate for regress).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def bench(
    run_dirs: tuple[str, ...],
    runs: int,
    warmup: int,
    min_seconds: float,
    threads: int | None,
    batch: int | None,
    rounds: int,
    as_json: bool,
) -> None:
    """Measure the latency of a run folder's compiled artifact again.

    `--json` output can be given to `deploykit regress --current`. With several run
    folders, they are measured in one process, in interleaved rounds, each as a ratio to
    the first (e.g. a fallback model against plain INT8, or INT8 against FP32 and bf16).
    """
    from deploykit import api
    from deploykit.harness.display import render_bench, render_bench_several

    def measure(folders: Any, **options: Any) -> dict[str, Any]:
        if len(folders) == 1:
            return api.bench(folders[0], **options)
        return api.bench_several(list(folders), **options)

    with _console(stderr=True).status(f"benchmarking {', '.join(run_dirs)}") as status:
        result = measure(
            run_dirs,
            runs=runs,
            warmup=warmup,
            min_seconds=min_seconds,
            threads=threads,
            batch=batch,
            rounds=rounds,
            on_step=status.update,
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif len(run_dirs) == 1:
        render_bench(_console(), result)
    else:
        render_bench_several(_console(), result)


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option(
    "--targets",
    default="torch,onnxruntime,openvino",
    show_default=True,
    help="Comma-separated targets, each optionally :precision or :int8-QUANTIZER (e.g. "
    "openvino:int8, openvino:bf16, openvino:int8-nncf); torch is the baseline of the speedups.",
)
@click.option(
    "--calib",
    default="synthetic",
    show_default=True,
    help="Calibration data for :int8 targets (latency does not depend on it).",
)
@click.option("--calib-samples", type=int, default=32, show_default=True)
@click.option("--precision", "-p", default="fp32", show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--threads", type=int, help="Runtime threads [default: all usable cores].")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds.")
@click.option("--runs", type=int, default=50, show_default=True, help="Minimum runs per round.")
@click.option(
    "--min-seconds", type=float, default=1.0, show_default=True, help="Minimum per round."
)
@click.option("--input-size", help="Override the input size: H or HxW.")
@click.option("--benchmark-app", is_flag=True, help="Also time the OpenVINO IR with benchmark_app.")
@click.option(
    "--pair",
    "pairs",
    multiple=True,
    metavar="A,B",
    help="Also time two of the targets alternately, run by run, for a precise ratio A / B "
    "with a 95% interval (e.g. openvino:int8,openvino:int8-nncf); repeatable.",
)
@click.option("--markdown", type=click.Path(dir_okay=False), help="Write a Markdown table here.")
@click.option("--out", "-o", default="out/compare", show_default=True, help="Work folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def compare(
    models: tuple[str, ...],
    targets: str,
    calib: str,
    calib_samples: int,
    precision: str,
    batch: int,
    threads: int | None,
    rounds: int,
    runs: int,
    min_seconds: float,
    input_size: str | None,
    benchmark_app: bool,
    pairs: tuple[str, ...],
    markdown: str | None,
    out: str,
    as_json: bool,
) -> None:
    """Measure MODELS on several targets in one run, with speedups over torch eager."""
    from pathlib import Path

    from deploykit.fsutil import write_text_atomic
    from deploykit.harness.compare import CompareOptions, to_markdown
    from deploykit.harness.compare import compare as run_compare
    from deploykit.harness.display import render_compare

    options = CompareOptions(
        models=list(models),
        targets=[t.strip() for t in targets.split(",") if t.strip()],
        precision=precision,
        batch=batch,
        threads=threads,
        rounds=rounds,
        runs=runs,
        min_seconds=min_seconds,
        input_size=parse_size(input_size),
        benchmark_app=benchmark_app,
        out=out,
        calib=calib,
        calib_samples=calib_samples,
        pairs=[_parse_pair(p) for p in pairs],
    )
    with _console(stderr=True).status("comparing") as status:
        result = run_compare(options, on_step=status.update)
    if markdown:
        write_text_atomic(Path(markdown), to_markdown(result))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render_compare(_console(), result)


def _parse_pair(value: str) -> tuple[str, str]:
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise click.BadParameter(f"expected two targets, A,B; got {value!r}", param_hint="--pair")
    return parts[0], parts[1]


def _parse_tolerance(value: str) -> float:
    text = value.strip()
    try:
        number = float(text.rstrip("%"))
    except ValueError:
        raise click.BadParameter(f"expected a percentage such as 10%, got {value!r}") from None
    return number / 100 if text.endswith("%") or number >= 1 else number


@click.command()
@click.option(
    "--baseline",
    "-b",
    required=True,
    type=click.Path(dir_okay=False),
    help="Baseline JSON file (created with --update-baseline).",
)
@click.option(
    "--current",
    "-c",
    multiple=True,
    type=click.Path(dir_okay=False),
    help="Measurements to check: `deploykit bench --json` output (repeatable).",
)
@click.option(
    "--run",
    "run_dirs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="Run folder to measure now (repeatable; measured in interleaved rounds).",
)
@click.option("--tolerance", default="10%", show_default=True, help="Allowed latency change.")
@click.option(
    "--accuracy-tolerance",
    type=float,
    default=1.0,
    show_default=True,
    help="Allowed drop of top-1 or top-1 agreement, in points.",
)
@click.option(
    "--normalise",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="Divide latencies by the reference workload's (auto: when the CPU differs).",
)
@click.option("--rounds", type=int, default=20, show_default=True, help="Rounds for --run.")
@click.option("--runs", type=int, default=10, show_default=True, help="Runs per round (--run).")
@click.option(
    "--min-seconds", type=float, default=0.3, show_default=True, help="Seconds per round (--run)."
)
@click.option("--threads", type=int, help="Override the run folders' thread counts (--run).")
@click.option(
    "--pair/--no-pair",
    default=True,
    show_default=True,
    help="Re-measure the baseline's own artifact in the same rounds when it is still on disk.",
)
@click.option("--update-baseline", is_flag=True, help="Record the measurements as the baseline.")
@click.option(
    "--store-artifacts",
    is_flag=True,
    help="With --update-baseline: copy the run folders beside the baseline for --pair.",
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False),
    help="Write a Markdown summary here [default: $GITHUB_STEP_SUMMARY when set].",
)
@click.option("--junit", type=click.Path(dir_okay=False), help="Write JUnit XML here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def regress(
    baseline: str,
    current: tuple[str, ...],
    run_dirs: tuple[str, ...],
    tolerance: str,
    accuracy_tolerance: float,
    normalise: str,
    rounds: int,
    runs: int,
    min_seconds: float,
    threads: int | None,
    pair: bool,
    update_baseline: bool,
    store_artifacts: bool,
    markdown: str | None,
    junit: str | None,
    as_json: bool,
) -> None:
    """Check latency and accuracy against a stored baseline (exit 1 on a regression).

    A slowdown counts only when it exceeds both --tolerance and the noise measured
    from the spread of the rounds; otherwise the entry is reported as noisy.
    """
    import os
    from pathlib import Path

    from deploykit import api
    from deploykit.fsutil import write_text_atomic
    from deploykit.harness.display import render_regress
    from deploykit.regress.measure import MeasureOptions
    from deploykit.regress.outputs import to_junit, to_markdown
    from deploykit.regress.verdict import CheckOptions

    check = CheckOptions(
        tolerance=_parse_tolerance(tolerance),
        accuracy_tolerance=accuracy_tolerance,
        normalise=normalise,
        pair=pair,
    )
    options = MeasureOptions(rounds=rounds, runs=runs, min_seconds=min_seconds, threads=threads)
    with _console(stderr=True).status("measuring") as status:
        result = api.regress(
            baseline,
            current=list(current),
            run_dirs=list(run_dirs),
            check=check,
            measure_options=options,
            update_baseline=update_baseline,
            store_artifacts=store_artifacts,
            on_step=status.update,
        )
    if result["kind"] == "regress":
        summary_path = markdown or os.environ.get("GITHUB_STEP_SUMMARY")
        if summary_path:
            text = to_markdown(result)
            if markdown:
                write_text_atomic(Path(markdown), text)
            else:
                with open(summary_path, "a", encoding="utf-8") as handle:
                    handle.write(text)
        if junit:
            write_text_atomic(Path(junit), to_junit(result))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render_regress(_console(), result)
    if result["regressions"]:
        sys.exit(1)
