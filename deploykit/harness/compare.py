"""Compare backends on the same models in one run: latency and speedup over torch eager.

Each model is exported and fused once; every target compiles the same fused
graph. Targets are then timed in interleaved rounds (round 1: torch, ORT,
OpenVINO; round 2: the same, ...) so slow drifts of a noisy machine hit every
target alike, and each figure is the median over rounds of the per-round p50.
Optionally OpenVINO's own `benchmark_app` times the same IR with the same
threads and batch, to show deploykit's harness adds no overhead.

A target is ``backend``, ``backend:precision`` or ``backend:int8-QUANTIZER``:

* ``openvino`` runs at ``--precision`` (fp32 by default);
* ``openvino:int8`` runs deploykit's Q/DQ ONNX (one calibration per encoding);
* ``openvino:int8-nncf`` runs the backend's own quantizer's model (NNCF's INT8 IR);
* ``openvino:int8-exact`` runs deploykit's mixed Q/DQ ONNX written with exact residuals
  (`deploykit.stages.ovqdq.materialise_residual_inputs`), to price that option.

``--pair A,B`` then measures the ratio of two targets of each model precisely:
the two run alternately, inference by inference (`measure_alternating`), in two
phases that load them in opposite orders, because the model compiled first can run
slower for the whole process (the first of two OpenVINO compilations of one file
was 0.2-1.1% slower in four checks on a 2-core EPYC VM). The ratio A / B is the
geometric trimmed mean of the per-block ratios with a bootstrap 95% interval over
blocks (`deploykit.regress.verdict.paired_ratio_interval`, the statistic of the
latency regression check). Rounds of a second each resolve 3-10% at best on such
a VM; the paired measurement resolves about 1%: one file timed as two targets
(``openvino:int8`` and ``openvino:int8-exact`` of shufflenet_v2_x1_0, which has no
residual Add) came out at 0.990 (0.984-0.994) there, so read a ratio within 1% of
1 as level even when its interval excludes 1.

Every INT8 target of a model is calibrated on the same inputs with the minmax
method, so ``openvino:int8`` and ``openvino:int8-nncf`` differ only in the
quantizer, and each non-fp32 row has its speedup over the fp32 row of the same
backend.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.backends.base import Backend, CompiledArtifact, CompileOptions, Runner
from deploykit.backends.registry import require_backend
from deploykit.errors import UserError
from deploykit.harness.environment import cpu_info, usable_cores, versions
from deploykit.harness.inputs import synthetic_images
from deploykit.harness.latency import LatencyOptions, LatencyStats, measure, measure_alternating

Step = Callable[[str], None]
DEFAULT_QUANTIZER = "deploykit"
EXACT = "exact"  # deploykit's Q/DQ, mixed encoding with exact residuals


@dataclass(frozen=True)
class TargetSpec:
    """One ``--targets`` entry: ``backend[:precision[-quantizer]]``.

    Attributes:
        backend: Backend name.
        precision: Precision it runs at.
        quantizer: Who made the INT8 model: ``deploykit`` (Q/DQ ONNX) or the backend's
            own quantizer (``nncf`` for OpenVINO).
    """

    backend: str
    precision: str
    quantizer: str = DEFAULT_QUANTIZER

    @classmethod
    def parse(cls, spec: str, default_precision: str) -> TargetSpec:
        """Parse ``openvino``, ``openvino:int8`` or ``openvino:int8-nncf``.

        Raises:
            UserError: A quantizer on a precision other than int8, or an empty part.
        """
        name, _, rest = spec.partition(":")
        precision, _, quantizer = (rest or default_precision).partition("-")
        if not name or not precision or (rest and "-" in rest and not quantizer):
            raise UserError(f"bad target {spec!r}: expected BACKEND[:PRECISION[-QUANTIZER]]")
        if quantizer and precision != "int8":
            raise UserError(
                f"bad target {spec!r}: a quantizer applies to int8 only (e.g. {name}:int8-nncf)"
            )
        return cls(name, precision, quantizer or DEFAULT_QUANTIZER)

    def check(self, backend: Backend) -> None:
        """Refuse a quantizer the backend does not have here, saying how to get it.

        Raises:
            UserError: The backend has no such quantizer (or its package is missing).
        """
        if self.quantizer == DEFAULT_QUANTIZER:
            return
        if self.quantizer == EXACT:
            if backend.capabilities().int8_encoding != "mixed":
                raise UserError(
                    f"{backend.name} has no int8-exact target: exact residuals are an option "
                    f"of OpenVINO's mixed encoding; use {backend.name}:int8"
                )
            return
        native = backend.capabilities().native_quantizer
        if self.quantizer != native:
            use = [f"{backend.name}:int8-{native}"] if native else []
            use.append(f"{backend.name}:int8 (deploykit's Q/DQ model)")
            install = "" if native else f" (if it is not installed: `pip install {self.quantizer}`)"
            raise UserError(
                f"{backend.name} has no {self.quantizer!r} quantizer here{install}; "
                f"use {' or '.join(use)}"
            )


@dataclass
class CompareOptions:
    """What `deploykit compare` measures."""

    models: list[str]
    targets: list[str] = field(default_factory=lambda: ["torch", "onnxruntime", "openvino"])
    precision: str = "fp32"
    batch: int = 1
    threads: int | None = None
    rounds: int = 3
    runs: int = 50
    min_seconds: float = 1.0
    input_size: tuple[int, int] | None = None
    benchmark_app: bool = False
    out: str = "out/compare"
    calib: str = "synthetic"
    calib_samples: int = 32
    pairs: list[tuple[str, str]] = field(default_factory=list)


def compare(options: CompareOptions, on_step: Step = lambda _: None) -> dict[str, Any]:
    """Measure every model on every target; return rows with p50s and speedups over torch."""
    from deploykit.models.loaders import load_torch, resolve
    from deploykit.stages.export import ExportOptions, export_onnx
    from deploykit.stages.fuse import fuse_onnx

    if options.rounds < 1 or options.runs < 1:
        raise UserError("--rounds and --runs must be at least 1")
    threads = options.threads or usable_cores()
    for pair in options.pairs:
        missing = [t for t in pair if t not in options.targets]
        if missing or len(set(pair)) != 2:
            raise UserError(
                f"bad --pair {','.join(pair)}: name two different targets of --targets "
                f"({','.join(options.targets)})"
            )
    # A target is "backend", "backend:precision" or "backend:int8-quantizer".
    specs = {spec: TargetSpec.parse(spec, options.precision) for spec in options.targets}
    backends = {spec: require_backend(target.backend) for spec, target in specs.items()}
    for spec, target in specs.items():
        target.check(backends[spec])
    rows: list[dict[str, Any]] = []
    paired: list[dict[str, Any]] = []
    for model in options.models:
        source, contract = resolve(model, input_size=options.input_size)
        folder = Path(options.out) / source.name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        on_step(f"{model}: export and fuse")
        module = load_torch(source)
        exported = export_onnx(
            module, contract, folder / "model.onnx", ExportOptions(batch=options.batch)
        )
        fused, _ = fuse_onnx(exported, folder / "model.fused.onnx", contract, [options.batch])
        del module
        artifacts: dict[str, CompiledArtifact] = {}
        int8 = _Int8Models(fused.path, folder, contract, options, on_step)
        for name, backend in backends.items():
            target = specs[name]
            model_path = int8.get(backend, target) if target.precision == "int8" else fused.path
            on_step(f"{model}: compile for {name}")
            artifacts[name] = backend.compile(
                model_path,
                folder / name.replace(":", "-"),
                contract,
                CompileOptions(precision=target.precision, threads=threads, batch=options.batch),
                source=source,
            )
        batch = synthetic_images(contract, options.batch, seed=99)
        runners: dict[str, Runner] = {}
        for name, artifact in artifacts.items():
            runners[name] = backends[name].runner(artifact)
            runners[name].activate()
            runners[name].prepare(batch)
        per_round: dict[str, list[LatencyStats]] = {name: [] for name in runners}
        app_rounds: list[float] = []
        with_app = options.benchmark_app and "openvino" in artifacts and benchmark_app_available()
        lat_opts = LatencyOptions(runs=options.runs, min_seconds=options.min_seconds)
        for index in range(options.rounds):
            for name, runner in runners.items():
                on_step(f"{model}: round {index + 1}/{options.rounds} on {name}")
                time.sleep(0.2)  # let the previous runtime's worker threads go idle
                per_round[name].append(
                    measure(runner.run_prepared, options.batch, threads, lat_opts)
                )
            if with_app:
                # benchmark_app runs inside the same round, so it sees the same machine state.
                on_step(f"{model}: round {index + 1}/{options.rounds} on benchmark_app")
                app_rounds.append(
                    run_benchmark_app(
                        artifacts["openvino"],
                        options.batch,
                        threads,
                        per_round["openvino"][-1].runs,
                        options.precision,
                    )
                )
        for runner in runners.values():
            runner.deactivate()
        for a, b in options.pairs:
            on_step(f"{model}: paired {a} / {b}")
            timing = _paired(runners[a], runners[b], batch, options)
            paired.append({"model": source.name, "a": a, "b": b, **timing})
        ov_app = statistics.median(app_rounds) if app_rounds else None
        torch_p50 = (
            statistics.median(s.p50_ms for s in per_round["torch"])
            if "torch" in per_round
            else None
        )
        for name, stats in per_round.items():
            p50 = statistics.median(s.p50_ms for s in stats)
            fp32_key = _fp32_spec(specs, name)
            fp32_p50 = (
                statistics.median(s.p50_ms for s in per_round[fp32_key]) if fp32_key else None
            )
            rows.append(
                {
                    "model": source.name,
                    "target": specs[name].backend,
                    "spec": name,
                    "requested_precision": specs[name].precision,
                    "quantizer": specs[name].quantizer if specs[name].precision == "int8" else None,
                    "speedup_vs_fp32": (fp32_p50 / p50) if fp32_p50 else None,
                    "precision": artifacts[name].effective_precision,
                    "batch": options.batch,
                    "threads": threads,
                    "p50_ms": p50,
                    "p90_ms": statistics.median(s.p90_ms for s in stats),
                    "p99_ms": statistics.median(s.p99_ms for s in stats),
                    "round_p50s_ms": [round(s.p50_ms, 3) for s in stats],
                    "spread_pct": 100
                    * (max(s.p50_ms for s in stats) - min(s.p50_ms for s in stats))
                    / p50,
                    "speedup_vs_torch": (torch_p50 / p50) if torch_p50 else None,
                    "benchmark_app_median_ms": ov_app if name == "openvino" else None,
                    "benchmark_app_round_medians_ms": app_rounds if name == "openvino" else [],
                }
            )
    return {
        "schema_version": 1,
        "kind": "compare",
        "device": cpu_info(),
        "versions": versions(),
        "options": {
            "rounds": options.rounds,
            "runs": options.runs,
            "min_seconds": options.min_seconds,
            "batch": options.batch,
            "threads": threads,
            "precision": options.precision,
            "benchmark_app": options.benchmark_app and benchmark_app_available(),
            "pairs": [list(pair) for pair in options.pairs],
        },
        "rows": rows,
        "paired": paired,
    }


def _paired(a: Runner, b: Runner, batch: Any, options: CompareOptions) -> dict[str, Any]:
    """Ratio A / B from alternate runs, in two phases that load A and B in opposite orders."""
    from deploykit.regress.verdict import paired_ratio_interval

    a_ms: list[float] = []
    b_ms: list[float] = []
    for first, second in ((a, b), (b, a)):
        for runner in (first, second):
            runner.activate()
            runner.prepare(batch)
        time.sleep(0.2)
        x, y = measure_alternating(a.run_prepared, b.run_prepared, options.rounds, options.runs)
        a_ms += x
        b_ms += y
        for runner in (first, second):
            runner.deactivate()
    ratio, low, high = paired_ratio_interval(b_ms, a_ms)
    return {
        "ratio": ratio,
        "low": low,
        "high": high,
        "blocks": len(a_ms),
        "pairs_per_block": options.runs,
        "a_ms": statistics.median(a_ms),
        "b_ms": statistics.median(b_ms),
    }


def _fp32_spec(specs: dict[str, TargetSpec], name: str) -> str | None:
    """The fp32 target of the same backend that `name`'s speedup is measured against."""
    if specs[name].precision == "fp32":
        return None
    return next(
        (
            other
            for other, target in specs.items()
            if target.backend == specs[name].backend and target.precision == "fp32"
        ),
        None,
    )


class _Int8Models:
    """The INT8 models of one model, each made once and shared by the targets that run it.

    deploykit's Q/DQ ONNX is made once per encoding, a backend's own quantizer once per
    backend; all of them from the same calibration inputs and with the minmax method.
    """

    def __init__(
        self, fused: Path, folder: Path, contract: Any, options: CompareOptions, on_step: Step
    ) -> None:
        self.fused = fused
        self.folder = folder
        self.contract = contract
        self.options = options
        self.on_step = on_step
        self.made: dict[tuple[str, str], Path] = {}
        self._data: Any = None

    def get(self, backend: Backend, target: TargetSpec) -> Path:
        """The INT8 model file `target` compiles."""
        if target.quantizer in (DEFAULT_QUANTIZER, EXACT):
            encoding = backend.capabilities().int8_encoding or "s8s8"
            key = ("qdq", f"{encoding}-{EXACT}" if target.quantizer == EXACT else encoding)
        else:
            key = (target.quantizer, backend.name)
        if key not in self.made:
            self.on_step(f"{self.folder.name}: calibrate ({key[0]}, {key[1]})")
            self.made[key] = (
                self._qdq(key[1]) if key[0] == "qdq" else self._native(backend, target.quantizer)
            )
        return self.made[key]

    def data(self) -> Any:
        """The calibration inputs, loaded once."""
        from deploykit.harness.datasets import load_dataset

        if self._data is None:
            self._data = load_dataset(self.options.calib, self.contract, self.options.calib_samples)
        return self._data

    def _qdq(self, variant: str) -> Path:
        from deploykit.stages.calibrate import CalibrationOptions, calibrate_onnx

        encoding = variant.removesuffix(f"-{EXACT}")
        options = CalibrationOptions(encoding=encoding, exact_residuals=variant != encoding)
        out = self.folder / f"model.int8.{variant}.qdq.onnx"
        calibrate_onnx(self.fused, out, self.data(), options)
        return out

    def _native(self, backend: Backend, quantizer: str) -> Path:
        options = {"method": "minmax", "percentile": 99.999, "per_channel": True, "seed": 0}
        out = self.folder / f"{backend.name}-{quantizer}"
        path, _ = backend.quantize(self.fused, self.data().inputs, out, self.contract, options)
        return path


def benchmark_app_available() -> bool:
    """Whether OpenVINO's benchmark_app (shipped in the openvino wheel) can be imported."""
    try:
        return importlib.util.find_spec("openvino.tools.benchmark") is not None
    except ModuleNotFoundError:
        return False


def run_benchmark_app(
    artifact: CompiledArtifact, batch: int, threads: int, iterations: int, precision: str
) -> float:
    """Time the IR with OpenVINO's benchmark_app: one stream and request, same threads/precision.

    Returns:
        benchmark_app's median latency in ms.

    Raises:
        UserError: benchmark_app failed or printed no median.
    """
    hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}.get(precision, "f32")
    contract = artifact.contract
    shape = f"[{batch},{contract.channels},{contract.height},{contract.width}]"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from openvino.tools.benchmark.main import main; "
        "sys.argv[0] = 'benchmark_app'; sys.exit(main())",
        "-m",
        str(artifact.folder / "model.xml"),
        "-d",
        "CPU",
        "-hint",
        "none",
        "-nstreams",
        "1",
        "-nireq",
        "1",
        "-nthreads",
        str(threads),
        "-niter",
        str(max(iterations, 50)),
        "-infer_precision",
        hint,
        "-shape",
        shape,
        "-api",
        "sync",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    # benchmark_app prints the median in ms, or in us below one millisecond.
    match = re.search(r"Median:\s+([0-9.]+)\s+(ms|us)\b", done.stdout)
    if done.returncode != 0 or match is None:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"benchmark_app failed: {tail[0]}")
    value = float(match.group(1))
    return value / 1000.0 if match.group(2) == "us" else value


def to_markdown(result: dict[str, Any]) -> str:
    """Markdown table of a compare result, with the machine described."""
    dev = result["device"]
    ver = result["versions"]
    opts = result["options"]
    models = list(dict.fromkeys(row["model"] for row in result["rows"]))
    targets = list(dict.fromkeys(_spec(row) for row in result["rows"]))
    command = (
        f"deploykit compare {' '.join(models)} --targets {','.join(targets)} "
        f"--precision {opts['precision']} --batch {opts['batch']} --threads {opts['threads']} "
        f"--rounds {opts['rounds']} --runs {opts['runs']} --min-seconds {opts['min_seconds']}"
        + (" --benchmark-app" if opts.get("benchmark_app") else "")
        + "".join(f" --pair {a},{b}" for a, b in opts.get("pairs", []))
    )
    lines = [
        "# CPU latency: torch eager vs ONNX Runtime vs OpenVINO",
        "",
        f"Produced by `{command} --markdown <this file>`.",
        "",
        f"Machine: {dev['name']} ({dev['arch']}), {dev['cores']} cores usable, "
        f"CPU features: {', '.join(dev['features']) or 'none detected'}.",
        f"Versions: torch {ver['torch']}, onnxruntime {ver['onnxruntime']}, "
        f"openvino {ver['openvino']}, python {ver['python']}.",
        f"Batch {opts['batch']}, {opts['threads']} threads, precision {opts['precision']}; "
        f"{opts['rounds']} interleaved rounds of at least {opts['runs']} runs and "
        f"{opts['min_seconds']} s each; p50 = median over rounds of each round's p50.",
        "",
        "| model | target | runs in | p50 ms | p90 ms | p99 ms | round spread "
        "| speedup vs torch | speedup vs same target fp32 | benchmark_app median ms "
        "| deploykit / benchmark_app |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        speed = f"{row['speedup_vs_torch']:.2f}x" if row["speedup_vs_torch"] else ""
        app_ms = row["benchmark_app_median_ms"]
        app = f"{app_ms:.2f}" if app_ms else ""
        ratio = f"{row['p50_ms'] / app_ms:.3f}" if app_ms else ""
        vs_fp32 = f"{row['speedup_vs_fp32']:.2f}x" if row.get("speedup_vs_fp32") else ""
        lines.append(
            f"| {row['model']} | {_spec(row)} | {row['precision']} | {row['p50_ms']:.2f} | "
            f"{row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row['spread_pct']:.1f}% | "
            f"{speed} | {vs_fp32} | {app} | {ratio} |"
        )
    if result.get("paired"):
        lines += [
            "",
            f"Paired: the two targets alternately, run by run, {opts['rounds']} blocks of "
            f"{opts['runs']} pairs in each of two load orders; A ms and B ms are medians over "
            "the blocks; A / B is the geometric trimmed mean of the per-block ratios, with a "
            "bootstrap 95% interval.",
            "",
            "| model | A | B | A ms | B ms | A / B | 95% interval |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for pair in result["paired"]:
            lines.append(
                f"| {pair['model']} | {pair['a']} | {pair['b']} | {pair['a_ms']:.3f} | "
                f"{pair['b_ms']:.3f} | {pair['ratio']:.3f} | "
                f"{pair['low']:.3f}-{pair['high']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _spec(row: dict[str, Any]) -> str:
    """The target as given on the command line (``openvino:int8-nncf``)."""
    return str(row.get("spec", row["target"]))
