"""GPU benchmark: the CNN emphasis models at batch 1 and 32 on every CUDA target present.

    python scripts/bench_gpu.py [--models resnet50,mobilenet_v2,...] [--batches 1,32]
                                [--runs 200] [--cuda-graph] [--markdown FILE] [--json FILE]

Targets: torch eager and torch.compile on CUDA always (the baseline is torch eager);
TensorRT FP32/FP16/INT8 when TensorRT is installed; ONNX Runtime's CUDA execution
provider when onnxruntime-gpu is installed. Each target is built once (TensorRT and
ONNX Runtime with a dynamic batch range covering every batch) and timed by the GPU
harness (CUDA events around each enqueue, after warm-up), at every batch, in one run.
Ratios are torch eager's p50 divided by the target's p50 (higher is faster).

Without a CUDA GPU it prints the reason and exits 2. Models use their catalogue
weights (random for torchvision names unless the catalogue ships real ones);
latency does not depend on the weights, and INT8 is calibrated on synthetic inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODELS = ("resnet50", "mobilenet_v2", "shufflenet_v2_x1_0", "squeezenet1_1")
BASELINE = "torch-eager"


def available_targets() -> tuple[list[str], dict[str, str]]:
    """The CUDA targets that can run here, and why the others cannot."""
    from deploykit.backends.registry import get_backend

    targets = [BASELINE, "torch-compile"]
    skipped: dict[str, str] = {}
    trt = get_backend("tensorrt").is_available()
    if trt.ok:
        targets += ["tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"]
    else:
        skipped["tensorrt"] = trt.reason
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            targets.append("onnxruntime-cuda")
        else:
            skipped["onnxruntime-cuda"] = "onnxruntime has no CUDAExecutionProvider"
    except ImportError:
        skipped["onnxruntime-cuda"] = "onnxruntime-gpu is not installed"
    return targets, skipped


def make_runner(
    model: str, target: str, max_batch: int, out: Path, gate_failures: dict[str, str]
) -> Any:
    """Build `target` for `model` and return a runner (not yet activated).

    A build whose fidelity gate fails is still timed; the failure goes to `gate_failures`.
    """
    from deploykit import api
    from deploykit.backends.base import CompiledArtifact
    from deploykit.backends.registry import require_backend
    from deploykit.backends.torch.backend import TorchRunner
    from deploykit.errors import GateError
    from deploykit.harness.report import load_report
    from deploykit.models.loaders import resolve

    if target.startswith("torch"):
        source, _ = resolve(model)
        return TorchRunner(source, threads=1, device="cuda", compile=target == "torch-compile")
    backend, _, precision = target.partition("-")
    request = api.ExportRequest(
        model=model,
        target=backend,
        precision="fp32" if backend == "onnxruntime" else precision,
        device="cuda",
        dynamic_batch=f"1:{max_batch}:{max_batch}",
        batch=1,
        calib="synthetic" if precision == "int8" else None,
        calib_samples=32,
        runs=20,
        warmup=5,
        min_seconds=0.1,
        fidelity_samples=16,
        eval_data=[],
        out=str(out),
    )
    try:
        run_dir = api.export(request).run_dir
    except GateError as exc:  # timed anyway; the failed gate is reported beside the row
        if exc.run_dir is None:
            raise
        run_dir = Path(str(exc.run_dir))
        gate_failures[f"{model}/{target}"] = str(exc)
    report = load_report(run_dir)
    artifact = CompiledArtifact.load(run_dir / report.backend_folder())
    return require_backend(backend).runner(artifact)


def run(
    models: list[str],
    batches: list[int],
    runs: int,
    warmup: int,
    cuda_graph: bool,
    out: Path,
    on_step: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every model x target x batch; return rows, ratios and the environment."""
    from deploykit.harness.environment import versions
    from deploykit.harness.gpu import GpuOptions, gpu_info, measure_gpu
    from deploykit.harness.inputs import synthetic_images
    from deploykit.harness.latency import LatencyOptions, measure
    from deploykit.models.loaders import resolve

    targets, skipped = available_targets()
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    gate_failures: dict[str, str] = {}
    for model in models:
        _, contract = resolve(model)
        for target in targets:
            on_step(f"{model}: building {target}")
            try:
                runner = make_runner(model, target, max(batches), out, gate_failures)
                runner.activate()
            except Exception as exc:  # one failed build must not sink the table
                errors[f"{model}/{target}"] = f"{type(exc).__name__}: {exc}"
                continue
            try:
                for batch in batches:
                    on_step(f"{model}: {target} batch {batch}")
                    x = synthetic_images(contract, batch, seed=99)
                    options = GpuOptions(
                        warmup_runs=warmup, runs=runs, throughput_runs=runs, cuda_graph=cuda_graph
                    )
                    if hasattr(runner, "enqueue"):
                        result = measure_gpu(runner, x, options)
                        lat, throughput, timing = result.latency, result.throughput_ips, "events"
                    else:  # ONNX Runtime: synchronous runs incl. host<->device copies
                        runner.prepare(x)
                        lat = measure(
                            runner.run_prepared,
                            batch,
                            threads=1,
                            options=LatencyOptions(warmup_runs=warmup, runs=runs, min_seconds=0.5),
                        )
                        throughput, timing = lat.throughput_ips, "wall clock, with copies"
                    rows.append(
                        {
                            "model": model,
                            "target": target,
                            "batch": batch,
                            "p50_ms": lat.p50_ms,
                            "p90_ms": lat.p90_ms,
                            "p99_ms": lat.p99_ms,
                            "mean_ms": lat.mean_ms,
                            "runs": lat.runs,
                            "throughput_ips": throughput,
                            "timing": timing,
                        }
                    )
            finally:
                runner.deactivate()
    base = {(r["model"], r["batch"]): r["p50_ms"] for r in rows if r["target"] == BASELINE}
    for row in rows:
        ref = base.get((row["model"], row["batch"]))
        row["speedup_vs_torch_eager"] = ref / row["p50_ms"] if ref and row["p50_ms"] else None
    return {
        "schema_version": 1,
        "kind": "bench-gpu",
        "gpu": gpu_info(),
        "versions": versions(),
        "cuda_graph": cuda_graph,
        "runs": runs,
        "warmup": warmup,
        "targets": targets,
        "skipped_targets": skipped,
        "errors": errors,
        "gate_failures": gate_failures,
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The result as a Markdown table, with the GPU named."""
    gpu = result["gpu"]
    lines = [
        f"GPU: {gpu['name']} (compute capability {gpu['compute_capability']}, CUDA "
        f"{gpu['cuda_runtime']}, driver {gpu['driver']}); torch {result['versions']['torch']}; "
        f"{result['runs']} timed runs after {result['warmup']} warm-up, CUDA events, "
        f"CUDA graph {'on' if result['cuda_graph'] else 'off'}.",
        "",
        "| model | target | batch | p50 ms | p99 ms | images/s | speedup vs torch eager |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ratio = f"{r['speedup_vs_torch_eager']:.2f}x" if r["speedup_vs_torch_eager"] else "-"
        lines.append(
            f"| {r['model']} | {r['target']} | {r['batch']} | {r['p50_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['throughput_ips']:.0f} | {ratio} |"
        )
    for name, reason in result["skipped_targets"].items():
        lines.append(f"\nNot measured: {name} ({reason}).")
    for key, reason in result["errors"].items():
        lines.append(f"\nFailed: {key}: {reason}")
    for key, reason in result["gate_failures"].items():
        lines.append(f"\nTimed, but its gate failed: {key}: {reason}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--cuda-graph", action="store_true", help="Replay a captured CUDA graph.")
    parser.add_argument("--out", default="out/bench_gpu", help="Work folder for built targets.")
    parser.add_argument("--markdown", help="Write the Markdown table here.")
    parser.add_argument("--json", dest="json_path", help="Write the full result here.")
    args = parser.parse_args(argv)
    from deploykit.harness.gpu import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        print(f"bench_gpu: {reason}; run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        batches = []
    if not batches or min(batches) < 1 or args.runs < 1:
        print("bench_gpu: --batches needs positive integers, --runs >= 1", file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    result = run(models, batches, args.runs, args.warmup, args.cuda_graph, Path(args.out))
    text = to_markdown(result)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text, encoding="utf-8")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
