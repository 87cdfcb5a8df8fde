"""Real-data accuracy of every model with real weights: FP32 vs INT8, per backend and method.

    .venv/bin/python scripts/accuracy_matrix.py --markdown docs/accuracy.md
    .venv/bin/python scripts/accuracy_matrix.py --models fmnist_lenet5 --methods minmax

Each configuration is a full `deploykit export` (export, fuse, calibrate on the
model's own calibration set, compile, evaluate on its own evaluation sets) with
the fallback off, so the table shows what plain INT8 does.
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
from deploykit.errors import GateError
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
) -> Any:
    request = api.ExportRequest(
        model=model,
        target=target,
        precision=precision,
        quantizer=quantizer,
        calib_method=method,
        per_channel=per_channel,
        out=out,
        runs=20,
        warmup=2,
        min_seconds=0.3,
        fidelity_samples=8,
        fallback=False,
        max_accuracy_drop=100.0,
    )
    try:
        return api.export(request).report
    except GateError as exc:
        assert exc.run_dir is not None
        return api.load_report(exc.run_dir)


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
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path, help="write the rows as JSON")
    parser.add_argument(
        "--from-json", type=Path, nargs="*", help="tabulate earlier --json outputs, run nothing"
    )
    args = parser.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in json.loads(path.read_text())]
        text = _markdown(rows)
        if args.markdown:
            args.markdown.write_text(text)
        print(text)
        return 0
    models = args.models or [s.name for s in list_models() if s.pretrained is not None]
    weights = {"per-channel": [True], "per-tensor": [False], "both": [True, False]}[args.weights]
    rows = []
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
                    report = _run(
                        model,
                        target,
                        precision,
                        method if method != "-" else "minmax",
                        per_channel,
                        out,
                        args.quantizer if native else "deploykit",
                    )
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
    text = _markdown(rows)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(text)
    return 0


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
    sys.exit(main())
