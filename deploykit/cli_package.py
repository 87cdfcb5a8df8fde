"""`deploykit package`, `verify` and `inspect`: edge bundles from run folders.

Thin click commands over :mod:`deploykit.package`; nothing heavy is imported at
module level.
"""

from __future__ import annotations

import json
from typing import Any

import click

from deploykit.cli_common import console as _console

FORMATS = ("onnx", "onnx-fp16", "ort-mobile", "openvino", "tensorrt")


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    help="Bundle format [default: the run's own: onnx for onnxruntime runs, openvino, tensorrt].",
)
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Bundle file (.dkb).")
@click.option(
    "--labels",
    type=click.Path(dir_okay=False),
    help="Class names, one per line [default: the model's own label set when it has one].",
)
@click.option(
    "--ort-platform",
    type=click.Choice(["arm", "amd64"]),
    default="arm",
    show_default=True,
    help="CPU the .ort model is optimised for (ort-mobile).",
)
@click.option(
    "--no-type-reduction",
    is_flag=True,
    help="ort-mobile: list operators without their types in the reduced-build config.",
)
@click.option("--min-runtime-version", help="Override the oldest runtime version accepted.")
@click.option(
    "--references",
    type=int,
    default=2,
    show_default=True,
    help="Reference images whose outputs the bundle carries (0: none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def package(
    run_dir: str,
    fmt: str | None,
    out: str | None,
    labels: str | None,
    ort_platform: str,
    no_type_reduction: bool,
    min_runtime_version: str | None,
    references: int,
    as_json: bool,
) -> None:
    """Package RUN_DIR into one verifiable bundle for a device."""
    from deploykit import api
    from deploykit.harness.display import human_size
    from deploykit.package.formats import PackageOptions

    options = PackageOptions(
        format=fmt,
        labels=labels,
        ort_platform=ort_platform,
        type_reduction=not no_type_reduction,
        min_runtime_version=min_runtime_version,
        references=references,
    )
    with _console(stderr=True).status(f"packaging {run_dir}") as status:
        result = api.package(run_dir, out, options, on_step=status.update)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    check = result["packaging_check"]
    click.echo(
        f"{result['bundle']}: {result['format']} {result['precision']}, "
        f"{human_size(result['bundle_bytes'])}, {len(result['files'])} files, runs on "
        f"{result['backend']['name']} >= {result['backend'].get('min_version') or 'any'}"
    )
    if check:
        click.echo(
            f"reproduces the run's outputs on {check['count']} reference images: max rel err "
            f"{check['max_rel_err']:.2g}, cosine {check['cosine']:.6f}"
        )
    for note in result["notes"]:
        click.echo(f"note: {note}")


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option(
    "--extract",
    type=click.Path(file_okay=False),
    help="After every check passes, extract the bundle into this folder.",
)
@click.option("--threads", type=int, help="Runtime threads for the smoke inference.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify(bundle: str, extract: str | None, threads: int | None, as_json: bool) -> None:
    """Check BUNDLE's hashes and manifest, load it and run it here (exit 1 if outputs differ)."""
    # deploykit.package.verify directly (not deploykit.api): on a device this command must
    # not pull in the workstation side of deploykit.
    from deploykit.package.verify import verify as verify_bundle

    result = verify_bundle(bundle, extract_to=extract, threads=threads)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for check in result["checks"]:
        click.echo(f"{'ok  ' if check['passed'] else 'FAIL'} {check['name']}: {check['detail']}")
    click.echo(
        f"{result['bundle']}: {result['model']} {result['format']} {result['precision']} "
        f"verified on {result['runtime']} in {result['seconds']:.2f} s"
    )
    if result.get("extracted_to"):
        click.echo(f"extracted to {result['extracted_to']}")


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def inspect(bundle: str, as_json: bool) -> None:
    """Show what BUNDLE holds: model, input contract, files and sizes, measured figures."""
    from deploykit.package.verify import inspect as inspect_bundle

    result = inspect_bundle(bundle)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    _render_inspect(_console(), result)


def _render_inspect(console: Any, result: dict[str, Any]) -> None:
    from rich.table import Table

    from deploykit.harness.display import human_size

    m = result["manifest"]
    inp, out, backend = m["input"], m["output"], m["backend"]
    console.print(
        f"[bold]{m['model']['name']}[/bold] · {m['format']} · {m['precision']} · "
        f"{human_size(result['bundle_bytes'])} · bundle id {result['bundle_id'][:16]}"
    )
    console.print(
        f"runtime: {backend['name']} >= {backend.get('min_version') or 'any'}"
        + (f" (exactly {backend['exact_version']})" if backend.get("exact_version") else "")
        + f", built with {backend.get('built_with')}"
    )
    if m.get("device"):
        d = m["device"]
        console.print(
            f"device: {d['gpu_name']} (compute capability {d['compute_capability']}), "
            f"TensorRT {d['tensorrt_version']}"
        )
    console.print(
        f"input: {inp['shape']} {inp['dtype']} {inp['layout']} {inp['color']}; resize shorter "
        f"side to {inp['resize']} ({inp['interpolation']}), centre crop {inp['crop']}; "
        f"x/255, mean {inp['mean']}, std {inp['std']}"
    )
    labels = f"labels {out['labels']} ({out['label_set']})" if out.get("labels") else "no labels"
    console.print(f"output: {out['kind']} {out['shape']}, {labels}")
    measured = m.get("measured") or {}
    lat, fid, acc = measured.get("latency"), measured.get("fidelity"), measured.get("accuracy")
    if lat:
        console.print(
            f"measured ({measured.get('target')} on {measured.get('device', {}).get('name')}): "
            f"p50 {lat['p50_ms']:.2f} ms · p99 {lat['p99_ms']:.2f} ms · batch {lat['batch']} · "
            f"{lat['threads']} threads"
        )
    if fid:
        console.print(
            f"fidelity vs {measured.get('fidelity_reference')}: cosine {fid['cosine']:.6f} · "
            f"top-1 agreement {fid['top1_agreement']:.1%} · {fid['samples']} inputs"
        )
    if acc:
        console.print(f"accuracy: {json.dumps(acc)[:200]}")
    calibration = m.get("calibration")
    if calibration:
        data = calibration.get("data", {})
        console.print(
            f"calibration: {calibration.get('method')} {calibration.get('encoding', '')} on "
            f"{data.get('count')} inputs from {data.get('source')} (sha256 "
            f"{str(data.get('sha256'))[:12]}…)"
        )
    ref = m.get("reference")
    if ref:
        console.print(
            f"reference: {len(ref['images'])} images, outputs by {ref['produced_by']}; "
            f"tolerance {ref['tolerance']}"
        )
    table = Table("file", "size", "sha256")
    for name, entry in result["files"].items():
        table.add_row(name, human_size(entry["size"]), entry["sha256"][:16] + "…")
    console.print(table)
    for note in m["model"].get("notes", []):
        console.print(f"note: {note}")
