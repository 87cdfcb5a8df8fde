"""Real-data accuracy of every model with real weights: FP32 vs INT8, per backend and method.

    .venv/bin/python scripts/accuracy_matrix.py --markdown docs/accuracy.md
    .venv/bin/python scripts/accuracy_matrix.py --models fmnist_lenet5 --methods minmax

Each configuration is a full `deploykit export` (export, fuse, calibrate on the
model's own calibration set, compile, evaluate on its own evaluation sets) with
the fallback off, so the table shows what plain INT8 does.

    .venv/bin/python scripts/accuracy_matrix.py --models efficientnet_lite0 --cross-backend

`--cross-backend` also scores the two backends against each other: for each INT8
configuration, OpenVINO's run against ONNX Runtime's (`deploykit eval RUN --data SET
--against OTHER_RUN`) on every evaluation set, both built from one calibration.
`--exact-residuals` writes OpenVINO's file with that option; `--weight-rounding`
chooses the INT8 weight rounding of every configuration (default: auto, as
`deploykit export`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deploykit import api
from deploykit.errors import GateError, UserError
from deploykit.harness.environment import cpu_info, versions
from deploykit.models.catalogue import list_models


def _run(
    model: str,
    target: str,
    precision: str,
    method: str,
    per_channel: bool,
    out: str,
    quantizer: str = "deploykit",
    exact_residuals: bool = False,
    weight_rounding: str = "auto",
) -> tuple[Any, Path]:
    request = api.ExportRequest(
        model=model,
        target=target,
        precision=precision,
        quantizer=quantizer,
        calib_method=method,
        per_channel=per_channel,
        exact_residuals=exact_residuals,
        weight_rounding=weight_rounding,
        out=out,
        runs=20,
        warmup=2,
        min_seconds=0.3,
        fidelity_samples=8,
        fallback=False,
        max_accuracy_drop=100.0,
    )
    try:
        result = api.export(request)
        return result.report, result.run_dir
    except GateError as exc:
        assert exc.run_dir is not None
        run_dir = Path(str(exc.run_dir))
        return api.load_report(run_dir), run_dir


def main() -> int:
    """Run the matrix and print (or write) the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="*", help="default: every model with real weights")
    parser.add_argument("--targets", nargs="*", default=["onnxruntime", "openvino"])
    parser.add_argument("--methods", nargs="*", default=["minmax", "entropy", "percentile"])
    parser.add_argument(
        "--weights", choices=["per-channel", "per-tensor", "both"], default="per-channel"
    )
    parser.add_argument(
        "--quantizer",
        default="deploykit",
        help="INT8 quantizer: deploykit, or the backend's own (nncf for openvino)",
    )
    parser.add_argument("--no-fp32", action="store_true", help="skip the FP32 rows")
    parser.add_argument(
        "--cross-backend",
        action="store_true",
        help="also score OpenVINO's INT8 run against ONNX Runtime's (needs both targets)",
    )
    parser.add_argument(
        "--exact-residuals", action="store_true", help="OpenVINO's file with --exact-residuals"
    )
    parser.add_argument(
        "--weight-rounding",
        choices=["auto", "nearest", "gptq"],
        default="auto",
        help="INT8 weight rounding of every configuration (as deploykit export)",
    )
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument(
        "--from-json", type=Path, nargs="*", help="tabulate earlier --json outputs, run nothing"
    )
    args = parser.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
        pairs = [row for row in rows if row.get("kind") == "cross-backend"]
        text = _markdown([row for row in rows if row.get("kind") != "cross-backend"])
        if pairs:
            text += "\n" + _cross_markdown(pairs)
        if args.markdown:
            args.markdown.write_text(text)
        print(text)
        return 0
    models = args.models or [s.name for s in list_models() if s.pretrained is not None]
    weights = {"per-channel": [True], "per-tensor": [False], "both": [True, False]}[args.weights]
    if args.cross_backend and not {"onnxruntime", "openvino"} <= set(args.targets):
        parser.error("--cross-backend needs --targets onnxruntime openvino")
    rows = []
    cross: list[dict[str, Any]] = []
    runs: dict[RunKey, Path] = {}
    with tempfile.TemporaryDirectory() as out:
        for model in models:
            for target in args.targets:
                configs = [] if args.no_fp32 else [("fp32", "-", True)]
                configs += [("int8", m, pc) for m in args.methods for pc in weights]
                for precision, method, per_channel in configs:
                    started = time.perf_counter()
                    # A native quantizer's rows are labelled by it: "nncf" is its default
                    # ranging (what --calib-method minmax asks of it), "nncf percentile" not.
                    native = precision == "int8" and args.quantizer != "deploykit"
                    label = method
                    if native:
                        label = args.quantizer
                        label += "" if method == "minmax" else f" {method}"
                    # One folder per configuration: the runs of one model and target
                    # would replace each other, and --cross-backend reads them later.
                    folder = f"{precision}-{label.replace(' ', '-')}-{int(per_channel)}"
                    report, run_dir = _run(
                        model,
                        target,
                        precision,
                        method if method != "-" else "minmax",
                        per_channel,
                        str(Path(out) / folder),
                        args.quantizer if native else "deploykit",
                        args.exact_residuals and target == "openvino" and precision == "int8",
                        args.weight_rounding,
                    )
                    if precision == "int8":
                        runs[(model, label, per_channel, target)] = run_dir
                    for name, acc in (report.accuracy or {}).items():
                        rows.append(
                            {
                                "model": model,
                                "target": target,
                                "precision": precision,
                                "method": label,
                                "weights": "per-channel" if per_channel else "per-tensor",
                                "set": name,
                                **{
                                    k: acc[k]
                                    for k in (
                                        "samples",
                                        "top1",
                                        "top5",
                                        "fp32_top1",
                                        "drop",
                                        "top1_agreement",
                                        "top5_overlap",
                                    )
                                },
                                "intervals": acc.get("intervals"),
                                "interval_groups": acc.get("interval_groups"),
                                "p50_ms": report.latency["p50_ms"] if report.latency else None,
                                "seconds": round(time.perf_counter() - started, 1),
                            }
                        )
                    print(
                        f"{model} {target} {precision} {method} {per_channel}: done",
                        file=sys.stderr,
                    )
            if args.cross_backend:
                cross += _cross_backend(runs, args.exact_residuals)
            runs.clear()
    text = _markdown(rows)
    if cross:
        text += "\n" + _cross_markdown(cross)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows + cross, indent=2) + "\n")
    print(text)
    return 0


RunKey = tuple[str, str, bool, str]  # model, method label, per-channel, target


def _cross_backend(runs: dict[RunKey, Path], exact: bool) -> list[dict[str, Any]]:
    """OpenVINO's INT8 run scored against ONNX Runtime's, per configuration and set."""
    from deploykit.pipeline.evaluate import evaluate

    rows = []
    for (model, label, per_channel, target), ov_dir in runs.items():
        ort_dir = runs.get((model, label, per_channel, "onnxruntime"))
        if target != "openvino" or ort_dir is None:
            continue
        for name in api.load_report(ov_dir).accuracy or {}:
            ev = evaluate(ov_dir, name, against=ort_dir)["evaluation"]
            rows.append(
                {
                    "kind": "cross-backend",
                    "model": model,
                    "method": label,
                    "weights": "per-channel" if per_channel else "per-tensor",
                    "exact_residuals": exact,
                    "weight_rounding": _weight_rounding(api.load_report(ort_dir)),
                    "set": name,
                    "run": str(ov_dir),
                    "reference": ev.get("reference"),
                    **{
                        k: ev.get(k)
                        for k in (
                            "samples",
                            "top1_agreement",
                            "decisive_samples",
                            "decisive_agreement",
                            "top5_overlap",
                            "cosine_mean",
                            "cosine_min",
                            "intervals",
                            "interval_groups",
                        )
                    },
                }
            )
            print(f"{model} {label} {name}: openvino against onnxruntime", file=sys.stderr)
    return rows


def _weight_rounding(report: Any) -> str:
    """How the run's INT8 weights were rounded, read from its calibrate stage."""
    for stage in report.stages:
        if stage.name == "calibrate":
            done = stage.details.get("weight_rounding", {})
            if done.get("applied"):
                return str(done.get("mode"))
            return "nearest (gptq reverted)" if done.get("reverted") else "nearest"
    return "-"


def _cross_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "OpenVINO INT8 against ONNX Runtime INT8, one calibration (`deploykit eval RUN "
        "--against OTHER_RUN`); decisive: the inputs where ONNX Runtime's best class leads "
        "its second by at least 0.05 in probability.",
        "",
        "| model | set | method | weights | weight rounding | OpenVINO file | inputs "
        "| top-1 agreement "
        "| decisive inputs | agreement on them | top-5 overlap | cosine mean | cosine min |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['set']} | {r['method']} | {r['weights']} | "
            f"{r.get('weight_rounding', 'auto')} | "
            f"{'exact residuals' if r['exact_residuals'] else 'default'} | {r['samples']} | "
            f"{_fmt(r['top1_agreement'])} | {r['decisive_samples'] or '-'} | "
            f"{_fmt(r['decisive_agreement'])} | {_fmt(r['top5_overlap'])} | "
            f"{_fmt(r['cosine_mean'], 5)} | {_fmt(r['cosine_min'], 5)} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(rows: list[dict[str, Any]]) -> str:
    cpu = cpu_info()
    ver = versions()
    lines = [
        "# Real-data accuracy: FP32 vs INT8",
        "",
        "Generated by `.venv/bin/python scripts/accuracy_matrix.py` (see its --help; this "
        "file combines runs with `--from-json`). Every row is a full `deploykit export` "
        "with the fallback off, calibrated on the model's own calibration set.",
        f"Machine: {cpu.get('name')}, {cpu.get('cores')} cores, features "
        f"{', '.join(cpu.get('features', []))}; torch {ver.get('torch')}, onnxruntime "
        f"{ver.get('onnxruntime')}, openvino {ver.get('openvino')}.",
        "",
        "Top-1/top-5 are against the labels (percent); agreement is top-1 agreement with the "
        "FP32 PyTorch model; drop = FP32 top-1 − top-1 (points).",
        "",
        "| model | set | backend | precision | method | weights | inputs | top-1 | top-5 "
        "| FP32 top-1 | drop | agreement | top-5 overlap |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['set']} | {r['target']} | {r['precision']} | {r['method']} | "
            f"{r['weights']} | {r['samples']} | {_fmt(r['top1'])} | {_fmt(r['top5'])} | "
            f"{_fmt(r['fp32_top1'])} | {_fmt(r['drop'])} | {_fmt(r['top1_agreement'])} | "
            f"{_fmt(r['top5_overlap'])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
