"""The `deploykit` command line: each command parses options and calls one api function.

Nothing heavy is imported at module level: `deploykit --help` imports neither
torch nor any runtime.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from deploykit import __version__
from deploykit.cli_common import console as _console
from deploykit.cli_common import parse_size
from deploykit.errors import DeployKitError
from deploykit.stages import CALIBRATION_METHODS


class _Group(click.Group):
    """Turns deploykit's typed errors into one line on stderr and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except DeployKitError as exc:
            click.echo(f"error: {exc}", err=True)
            run_dir = getattr(exc, "run_dir", None)
            if run_dir is not None:
                click.echo(f"the failed run is kept in {run_dir} (status in report.json)", err=True)
            ctx.exit(exc.exit_code)


def _rows_out(rows: list[dict[str, Any]], as_json: bool, render: Any) -> None:
    """Print listing rows as JSON or with their table renderer."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        render(_console(), rows)


def _calibration_options(func: Any) -> Any:
    """The INT8 calibration options shared by `export` and `calibrate`."""
    options = [
        click.option(
            "--calib-method",
            type=click.Choice(CALIBRATION_METHODS),
            default="minmax",
            show_default=True,
            help="Calibration statistics.",
        ),
        click.option("--calib-samples", type=int, default=256, show_default=True),
        click.option("--calib-percentile", type=float, default=99.999, show_default=True),
        click.option(
            "--per-tensor",
            is_flag=True,
            help="Per-tensor INT8 weight scales (default per-channel).",
        ),
        click.option(
            "--bias-correction/--no-bias-correction",
            default=None,
            help="Per-channel bias correction after quantization [default: on for "
            "depthwise-heavy nets].",
        ),
        click.option(
            "--weight-rounding",
            type=click.Choice(["auto", "nearest", "gptq"]),
            default="auto",
            show_default=True,
            help="INT8 weight rounding: nearest, or gptq (each layer's rounding errors "
            "cancel on its calibration inputs); auto: gptq for depthwise-heavy nets.",
        ),
        click.option(
            "--no-calib-cache",
            is_flag=True,
            help="Recompute the calibration statistics and GPTQ weight codes instead of "
            "reusing the cache ($DEPLOYKIT_CACHE_DIR or ~/.cache/deploykit).",
        ),
        click.option(
            "--exact-residuals",
            is_flag=True,
            help="mixed encoding (OpenVINO): round each Conv output that enters a residual "
            "Add, as the Q/DQ file and ONNX Runtime do (OpenVINO's Conv+Add fusion skips "
            "it); the two backends then agree, at some OpenVINO latency.",
        ),
        click.option(
            "--overflow-fix",
            type=click.Choice(["auto", "on", "off"]),
            default="auto",
            show_default=True,
            help="Bound INT8 weight scales so CPUs without VNNI cannot saturate their "
            "16-bit sums; auto: for the CPU encodings on such a CPU.",
        ),
        click.option(
            "--keep-float",
            multiple=True,
            metavar="LAYERS|RUN",
            help="Keep these layers in float (fused-graph node names, comma-separated; "
            "repeatable), or the float layers of an INT8 run folder: another backend's "
            "accuracy fallback carries over.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deploykit")
def main() -> None:
    """Export PyTorch CNNs, compile them for a runtime, and prove them fast and accurate."""


@main.command()
@click.argument("model")
@click.option("--target", "-t", required=True, help="torch, onnxruntime, openvino or tensorrt.")
@click.option(
    "--precision",
    "-p",
    help="fp32, fp16, bf16 or int8 [default: fp16 for tensorrt, fp32 otherwise].",
)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state_dict file.")
@click.option("--input-size", help="Override the input size: H or HxW.")
@click.option("--batch", type=int, help="Batch to export and measure at [default: 1, or OPT].")
@click.option("--dynamic-batch", help="Dynamic batch range MIN:OPT:MAX, e.g. 1:4:16.")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option(
    "--exporter",
    type=click.Choice(["auto", "dynamo", "torchscript"]),
    default="auto",
    show_default=True,
    help="torch.onnx exporter; auto tries dynamo, then TorchScript.",
)
@click.option("--threads", type=int, help="Runtime threads [default: all usable cores].")
@click.option("--runs", type=int, default=100, show_default=True, help="Minimum timed runs.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Warm-up runs.")
@click.option("--min-seconds", type=float, default=2.0, show_default=True, help="Minimum timing.")
@click.option(
    "--fidelity-samples",
    type=int,
    default=100,
    show_default=True,
    help="Inputs compared against the FP32 PyTorch model.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of random weights and inputs."
)
@click.option("--out", "-o", default="out", show_default=True, help="Output root folder.")
@click.option(
    "--calib",
    help="INT8 calibration data: a set from `deploykit datasets`, image folder, .npy/.npz, or "
    "'synthetic' [default: the model's own calibration set when it has real weights].",
)
@_calibration_options
@click.option(
    "--quantizer",
    default="deploykit",
    show_default=True,
    help="INT8 quantizer: deploykit (one Q/DQ ONNX for every backend) or the backend's own "
    "(nncf for openvino).",
)
@click.option(
    "--bn-recalibrate",
    is_flag=True,
    help="Random weights: re-estimate BatchNorm statistics on calibration images first.",
)
@click.option(
    "--int8-encoding",
    type=click.Choice(["s8s8", "u8s8", "mixed"]),
    help="Q/DQ activation encoding [default: the target's fastest: u8s8 for onnxruntime, "
    "mixed for openvino, s8s8 for tensorrt].",
)
@click.option(
    "--eval-data",
    multiple=True,
    help="Evaluation set (repeatable): a set name, manifest, or labelled image folder "
    "[default: the model's own sets when it has real weights].",
)
@click.option("--no-eval", is_flag=True, help="Skip the evaluation on real data.")
@click.option("--eval-samples", type=int, help="Inputs per evaluation set [default: all].")
@click.option(
    "--max-accuracy-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Largest top-1 drop against FP32 (points) on a labelled set.",
)
@click.option(
    "--min-top5-overlap",
    type=float,
    help="Smallest top-5 overlap with FP32 (percent) on every evaluation set; INT8 that "
    "misses it keeps sensitive layers in float like a missed drop budget [default: not "
    "gated].",
)
@click.option(
    "--no-fallback",
    is_flag=True,
    help="Do not keep sensitive layers in float when INT8 misses --max-accuracy-drop "
    "or --min-top5-overlap.",
)
@click.option(
    "--max-fallback-layers",
    type=int,
    help="Most ranked activations whose layers the fallback may keep in float.",
)
@click.option(
    "--compile", "torch_compile", is_flag=True, help="torch target: run under torch.compile."
)
@click.option(
    "--ort-tensorrt",
    is_flag=True,
    help="onnxruntime --device cuda: TensorRT execution provider first, CUDA for the rest.",
)
@click.option(
    "--workspace", help="TensorRT workspace limit, e.g. 512M or 4G [default: TensorRT's]."
)
@click.option(
    "--builder-opt-level",
    type=click.IntRange(0, 5),
    help="TensorRT builder optimisation level 0-5 [default: 3].",
)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False),
    help="TensorRT timing cache to start from [default: the previous build's in the run folder].",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Export, fuse (and calibrate), write the ONNX the backend would build from, print the "
    "build plan, and stop (folder <target>-<precision>.dry-run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def export(
    model: str,
    target: str,
    precision: str | None,
    device: str,
    weights: str | None,
    input_size: str | None,
    batch: int | None,
    dynamic_batch: str | None,
    opset: int,
    exporter: str,
    threads: int | None,
    runs: int,
    warmup: int,
    min_seconds: float,
    fidelity_samples: int,
    seed: int,
    out: str,
    calib: str | None,
    calib_method: str,
    calib_samples: int,
    calib_percentile: float,
    per_tensor: bool,
    bias_correction: bool | None,
    weight_rounding: str,
    no_calib_cache: bool,
    exact_residuals: bool,
    overflow_fix: str,
    keep_float: tuple[str, ...],
    quantizer: str,
    bn_recalibrate: bool,
    int8_encoding: str | None,
    eval_data: tuple[str, ...],
    no_eval: bool,
    eval_samples: int | None,
    max_accuracy_drop: float,
    min_top5_overlap: float | None,
    no_fallback: bool,
    max_fallback_layers: int | None,
    torch_compile: bool,
    ort_tensorrt: bool,
    workspace: str | None,
    builder_opt_level: int | None,
    timing_cache: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Export MODEL, fuse, compile for --target, and measure latency and fidelity.

    MODEL is a catalogue name (see `deploykit models`), package.module:factory,
    or a .onnx, .pt2 or TorchScript file; or a `deploykit calibrate` folder, whose
    Q/DQ file is compiled as written (INT8, no calibration data needed).
    """
    from deploykit import api
    from deploykit.harness.display import render_report

    request = api.ExportRequest(
        model=model,
        target=target,
        precision=precision or api.default_precision(target, model),
        device=device,
        weights=weights,
        seed=seed,
        input_size=parse_size(input_size),
        batch=batch,
        dynamic_batch=dynamic_batch,
        opset=opset,
        exporter=exporter,
        threads=threads,
        runs=runs,
        warmup=warmup,
        min_seconds=min_seconds,
        fidelity_samples=fidelity_samples,
        out=out,
        calib=calib,
        calib_method=calib_method,
        calib_samples=calib_samples,
        calib_percentile=calib_percentile,
        per_channel=not per_tensor,
        bias_correction=bias_correction,
        weight_rounding=weight_rounding,
        calib_cache=not no_calib_cache,
        quantizer=quantizer,
        bn_recalibrate=bn_recalibrate,
        int8_encoding=int8_encoding,
        exact_residuals=exact_residuals,
        overflow_fix=overflow_fix,
        keep_float=list(keep_float) or None,
        eval_data=[] if no_eval else (list(eval_data) or None),
        eval_samples=eval_samples,
        max_accuracy_drop=max_accuracy_drop,
        min_top5_overlap=min_top5_overlap,
        fallback=not no_fallback,
        max_fallback_layers=max_fallback_layers,
        extra={
            key: value
            for key, value in (
                ("compile", torch_compile or None),
                ("ort_tensorrt", ort_tensorrt or None),
                ("workspace", workspace),
                ("builder_opt_level", builder_opt_level),
                ("timing_cache", timing_cache),
            )
            if value is not None
        },
        dry_run=dry_run,
    )
    err = _console(stderr=True)
    with err.status(f"{model} → {target}") as status:
        result = api.export(
            request, on_step=lambda text: status.update(f"{model} → {target}: {text}")
        )
    if as_json:
        click.echo(json.dumps(result.report.model_dump(mode="json"), indent=2))
    elif dry_run:
        backend = result.report.backend
        click.echo(f"dry run: {backend.get('name')} build plan ({result.run_dir})")
        for line in backend.get("plan", {}).get("summary", []):
            click.echo(f"  {line}")
        if backend.get("reason"):
            click.echo(f"  not buildable here: {backend['reason']}")
    else:
        render_report(_console(), result.report, str(result.run_dir))


@main.command()
@click.argument("model")
@click.option("--calib", required=True, help="Image folder, .npy/.npz, or 'synthetic'.")
@click.option("--out", "-o", required=True, help="Output folder for model.int8.qdq.onnx.")
@_calibration_options
@click.option(
    "--encoding",
    type=click.Choice(["s8s8", "u8s8", "mixed"]),
    default="s8s8",
    show_default=True,
    help="s8s8: portable, symmetric (TensorRT); u8s8: ONNX Runtime on x86; mixed: OpenVINO.",
)
@click.option("--weights", type=click.Path(dir_okay=False), help="Local state_dict file.")
@click.option("--input-size", help="Override the input size: H or HxW.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def calibrate(
    model: str,
    calib: str,
    out: str,
    calib_method: str,
    calib_samples: int,
    calib_percentile: float,
    encoding: str,
    per_tensor: bool,
    bias_correction: bool | None,
    weight_rounding: str,
    no_calib_cache: bool,
    exact_residuals: bool,
    overflow_fix: str,
    keep_float: tuple[str, ...],
    weights: str | None,
    input_size: str | None,
    as_json: bool,
) -> None:
    """Write MODEL's INT8 Q/DQ ONNX, for any backend or a TensorRT machine elsewhere."""
    from deploykit import api

    with _console(stderr=True).status(f"calibrating {model}") as status:
        result = api.calibrate(
            model,
            calib,
            out,
            method=calib_method,
            samples=calib_samples,
            percentile=calib_percentile,
            encoding=encoding,
            per_channel=not per_tensor,
            bias_correction=bias_correction,
            weight_rounding=weight_rounding,
            calib_cache=not no_calib_cache,
            weights=weights,
            input_size=parse_size(input_size),
            exact_residuals=exact_residuals,
            overflow_fix=overflow_fix,
            keep_float=keep_float,
            on_step=status.update,
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        cal = result["calibration"]
        click.echo(
            f"{result['out']}/model.int8.qdq.onnx: {cal['method']} {cal['encoding']} "
            f"{'per-channel' if cal['per_channel'] else 'per-tensor'}, "
            f"{cal['quantize_nodes']} QuantizeLinear nodes, {cal['data']['count']} inputs "
            f"from {cal['data']['source']}"
            + (f", {len(cal['nodes_excluded'])} layer(s) in float" if cal["nodes_excluded"] else "")
        )
        from deploykit.backends.registry import backend_names, get_backend

        target = next(
            (
                name
                for name in backend_names()
                if get_backend(name).capabilities().int8_encoding == cal["encoding"]
            ),
            None,
        )
        if target is not None:
            click.echo(f"compile it as written: deploykit export {result['out']} --target {target}")


@main.command(name="eval")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--data",
    required=True,
    help="A set from `deploykit datasets`, a manifest .json, or an image folder with labels "
    "(sub-folder names, or a labels.csv of 'relative/path,class-index' lines).",
)
@click.option("--samples", type=int, help="Inputs to use [default: the whole set].")
@click.option("--no-save", is_flag=True, help="Do not record the result in report.json.")
@click.option(
    "--against",
    type=click.Path(exists=True, file_okay=False),
    help="Another run folder whose artifact is the reference instead of the FP32 model.",
)
@click.option(
    "--stability",
    type=int,
    default=0,
    show_default=True,
    help="Also run N copies of the set with each input moved by one grey level in one "
    "value, and compare the artifact with itself: the floor for any agreement figure "
    "(an INT8 model can change its answer on such a change; 0 = off).",
)
@click.option(
    "--min-agreement",
    type=float,
    help="Gate: smallest top-1 agreement with the reference, percent (exit 1 below it).",
)
@click.option(
    "--min-top5-overlap",
    type=float,
    help="Gate: smallest top-5 overlap with the reference, percent.",
)
@click.option(
    "--min-cosine", type=float, help="Gate: smallest mean cosine similarity with the reference."
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    help="Gate: largest top-1 drop against the reference on the set's labels, points.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(
    run_dir: str,
    data: str,
    samples: int | None,
    no_save: bool,
    against: str | None,
    stability: int,
    min_agreement: float | None,
    min_top5_overlap: float | None,
    min_cosine: float | None,
    max_accuracy_drop: float | None,
    as_json: bool,
) -> None:
    """Evaluate a run folder's compiled artifact on a set, next to the FP32 model.

    With --against, compare it with another run's artifact (e.g. OpenVINO INT8 against
    ONNX Runtime INT8 built from the same statistics). The --min-*/--max-* gates hold
    the comparison to numbers for CI: exit 1, with the numbers, when one fails.
    """
    from deploykit import api
    from deploykit.errors import GateError
    from deploykit.harness.display import render_eval
    from deploykit.harness.report import Gate, gate_failures

    gates = api.EvalGates(
        min_agreement=min_agreement,
        min_top5_overlap=min_top5_overlap,
        min_cosine=min_cosine,
        max_accuracy_drop=max_accuracy_drop,
    )

    with _console(stderr=True).status(f"evaluating {run_dir}") as status:
        result = api.evaluate(
            run_dir,
            data,
            samples=samples,
            save=not no_save,
            against=against,
            stability=stability,
            gates=gates,
            on_step=status.update,
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render_eval(_console(), result)
    failures = gate_failures([Gate(**g) for g in result["gates"]])
    if failures:
        raise GateError(f"{result['model']} {result['target']} {result['precision']}: {failures}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the sets as JSON.")
def datasets(as_json: bool) -> None:
    """List the calibration and evaluation sets that ship with deploykit."""
    from deploykit import api
    from deploykit.harness.display import render_datasets

    _rows_out(api.list_datasets(), as_json, render_datasets)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalogue as JSON.")
def models(as_json: bool) -> None:
    """List the model catalogue with each model's input contract."""
    from deploykit import api
    from deploykit.harness.display import render_models

    _rows_out([spec.to_dict() for spec in api.list_catalogue()], as_json, render_models)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def backends(as_json: bool) -> None:
    """Show which backends are installed, their versions, and why one is unavailable."""
    from deploykit import api
    from deploykit.harness.display import render_backends

    _rows_out(api.list_backends(), as_json, render_backends)


# Commands defined in their own modules (each keeps heavy imports inside its functions).
# -- registered commands --
from deploykit.cli_coverage import coverage as _coverage_command  # noqa: E402
from deploykit.cli_measure import bench as _bench_command  # noqa: E402
from deploykit.cli_measure import compare as _compare_command  # noqa: E402
from deploykit.cli_measure import regress as _regress_command  # noqa: E402
from deploykit.cli_package import inspect as _inspect_command  # noqa: E402
from deploykit.cli_package import package as _package_command  # noqa: E402
from deploykit.cli_package import verify as _verify_command  # noqa: E402
from deploykit.cli_recipes import run as _run_command  # noqa: E402
from deploykit.cli_recipes import sweep as _sweep_command  # noqa: E402

for _command in (
    _bench_command,
    _compare_command,
    _regress_command,
    _coverage_command,
    _run_command,
    _sweep_command,
    _package_command,
    _verify_command,
    _inspect_command,
):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
