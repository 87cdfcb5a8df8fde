"""Bundle size per format and precision, and the device runtime's cold start.

For each model: export for ONNX Runtime and OpenVINO at FP32 and INT8, package
every format that applies (onnx, onnx-fp16, ort-mobile, openvino), and tabulate
the bundle sizes with INT8 as a share of FP32. Then time `deploykit.runtime` cold
starts (a fresh Python process each: import + load + first inference) for the
first model's INT8 bundles.

    .venv/bin/python scripts/bundle_sizes.py --out out/bundles --markdown sizes.md

Random weights are used (no download); weight values barely change the sizes
(gzip gains a few percent on float weights either way).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EMPHASIS = ["resnet50", "mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1"]
# (column, run, format)
COLUMNS = [
    ("ONNX FP32", "onnxruntime-fp32", "onnx"),
    ("ONNX FP16", "onnxruntime-fp32", "onnx-fp16"),
    ("ONNX INT8 (Q/DQ)", "onnxruntime-int8", "onnx"),
    (".ort FP32", "onnxruntime-fp32", "ort-mobile"),
    (".ort INT8", "onnxruntime-int8", "ort-mobile"),
    ("OpenVINO IR FP32", "openvino-fp32", "openvino"),
    ("OpenVINO IR INT8", "openvino-int8", "openvino"),
]
COLD_START = """
import time
t0 = time.perf_counter()
import numpy as np
from deploykit.runtime import load
t1 = time.perf_counter()
model = load({path!r})
t2 = time.perf_counter()
model.predict(np.full((375, 500, 3), 127, np.uint8))
t3 = time.perf_counter()
import json
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "first_inference_s": t3 - t2,
                  "total_s": t3 - t0}}))
"""


def export_runs(model: str, out: Path) -> dict[str, Path]:
    from deploykit import api

    # Sizes do not depend on weight values: keep the random initialisation as built (no
    # BatchNorm re-estimation), with which synthetic INT8 calibration passes the fidelity gate.
    fields = api.ExportRequest.__dataclass_fields__
    keep: dict[str, Any] = {"bn_recalibrate": False} if "bn_recalibrate" in fields else {}

    runs = {}
    for target in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8"):
            key = f"{target}-{precision}"
            run_dir = out / model / key
            report = run_dir / "report.json"
            if not report.is_file() or json.loads(report.read_text()).get("status") != "ok":
                request = api.ExportRequest(
                    model=model,
                    target=target,
                    precision=precision,
                    out=str(out),
                    calib="synthetic" if precision == "int8" else None,
                    calib_samples=128,
                    runs=10,
                    warmup=2,
                    min_seconds=0.2,
                    fidelity_samples=8,
                    eval_data=[],
                    **keep,
                )
                print(f"exporting {model} {key}", file=sys.stderr, flush=True)
                run_dir = api.export(request).run_dir
            runs[key] = run_dir
    return runs


def package_all(model: str, runs: dict[str, Path], out: Path) -> dict[str, int]:
    from deploykit.package.build import package
    from deploykit.package.formats import PackageOptions

    sizes = {}
    for column, run, fmt in COLUMNS:
        target = out / "bundles" / f"{model}-{run}-{fmt}.dkb"
        result = package(runs[run], target, PackageOptions(format=fmt))
        sizes[column] = int(result["bundle_bytes"])
        print(f"  {target.name}: {sizes[column]:,} bytes", file=sys.stderr, flush=True)
    return sizes


def cold_start(path: Path, repeats: int) -> dict[str, Any]:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", COLD_START.format(path=str(path))],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - started
        sample = json.loads(proc.stdout.strip())
        sample["process_wall_s"] = wall
        samples.append(sample)
    keys = ["import_s", "load_s", "first_inference_s", "total_s", "process_wall_s"]
    return {
        "bundle": str(path),
        "bundle_bytes": path.stat().st_size,
        "repeats": repeats,
        "median": {k: statistics.median(s[k] for s in samples) for k in keys},
        "max": {k: max(s[k] for s in samples) for k in keys},
    }


def _mb(num: int) -> str:
    return f"{num / 1e6:.2f} MB"


RATIOS = [
    ("INT8/FP32 ONNX", "ONNX INT8 (Q/DQ)", "ONNX FP32"),
    ("INT8/FP32 .ort", ".ort INT8", ".ort FP32"),
    ("INT8/FP32 OpenVINO", "OpenVINO IR INT8", "OpenVINO IR FP32"),
]


def to_markdown(sizes: dict[str, dict[str, int]], starts: list[dict[str, Any]]) -> str:
    head = "| model | " + " | ".join(c for c, _, _ in COLUMNS + RATIOS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + len(RATIOS) + 1)]
    for model, row in sizes.items():
        cells = [_mb(row[c]) for c, _, _ in COLUMNS]
        cells += [f"{row[a] / row[b]:.1%}" for _, a, b in RATIOS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| cold start (fresh process) | bundle | import | load | first inference | "
        "import+load+infer | process wall (incl. Python start) |",
        "|---|---|---|---|---|---|---|",
    ]
    for start in starts:
        med = start["median"]
        lines.append(
            f"| {Path(start['bundle']).name} (median of {start['repeats']}) | "
            f"{_mb(start['bundle_bytes'])} | {med['import_s']:.3f} s | {med['load_s']:.3f} s | "
            f"{med['first_inference_s']:.3f} s | {med['total_s']:.3f} s | "
            f"{med['process_wall_s']:.3f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/bundles", help="Work folder.")
    parser.add_argument("--models", nargs="+", default=EMPHASIS)
    parser.add_argument("--repeats", type=int, default=5, help="Cold starts per bundle.")
    parser.add_argument("--markdown", help="Write the tables here too.")
    parser.add_argument("--json", help="Write the raw figures here.")
    args = parser.parse_args()
    out = Path(args.out)
    sizes = {}
    for model in args.models:
        sizes[model] = package_all(model, export_runs(model, out), out)
    first = args.models[0] if "mobilenet_v2" not in args.models else "mobilenet_v2"
    starts = [
        cold_start(out / "bundles" / f"{first}-onnxruntime-int8-{fmt}.dkb", args.repeats)
        for fmt in ("onnx", "ort-mobile")
    ]
    text = to_markdown(sizes, starts)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "cold_start": starts}, indent=2))


if __name__ == "__main__":
    main()
