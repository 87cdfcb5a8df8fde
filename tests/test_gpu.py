"""CUDA targets and the GPU harness.

Tests marked ``gpu`` need a CUDA GPU and skip with the reason elsewhere; the rest
check what a machine without a GPU must do (clear reasons, exit code 2) and the
CPU side of the torch target's new options.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from deploykit.backends.base import CompileOptions
from deploykit.backends.torch.backend import TorchBackend, TorchRunner
from deploykit.cli import main
from deploykit.harness.gpu import GpuOptions, gpu_unavailable_reason, measure_gpu
from deploykit.harness.inputs import synthetic_images
from deploykit.models.loaders import load_torch, resolve

TINY = "tinynets:tiny_net"
ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
no_gpu_here = pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the no-GPU paths do not apply")


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, args, catch_exceptions=False, env={"COLUMNS": "200"})


# ---------------------------------------------------------------- without a GPU


@no_gpu_here
def test_reason_names_the_missing_gpu() -> None:
    reason = gpu_unavailable_reason()
    assert reason is not None and "CUDA" in reason


@no_gpu_here
@pytest.mark.parametrize("target", ["torch", "onnxruntime"])
def test_device_cuda_without_gpu_exits_2_with_reason(tmp_path: Path, target: str) -> None:
    args = ["export", TINY, "-t", target, "--device", "cuda", "--input-size", "32"]
    result = _cli([*args, "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert "no cuda device here" in result.stderr and "no CUDA GPU is visible" in result.stderr
    assert not any(tmp_path.iterdir())


@no_gpu_here
def test_torch_runner_on_cuda_refuses_without_gpu() -> None:
    source, _ = resolve(TINY, input_size=(32, 32))
    with pytest.raises(Exception, match="no CUDA GPU"):
        TorchRunner(source, threads=1, device="cuda").activate()


@no_gpu_here
def test_bench_gpu_script_exits_2_with_reason() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_gpu.py"), "--models", "squeezenet1_1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and proc.stdout == ""


def test_torch_cpu_target_still_measures_and_records_eager(tmp_path: Path) -> None:
    fast = ["--runs", "10", "--warmup", "2", "--min-seconds", "0.1", "--fidelity-samples", "4"]
    args = ["export", TINY, "-t", "torch", "--input-size", "32", "-o", str(tmp_path), "--json"]
    result = _cli([*args, *fast])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "ok" and report["device"]["kind"] == "cpu"
    assert report["backend"]["settings"]["mode"] == "eager"


def test_compile_option_is_recorded_for_the_runner(tmp_path: Path) -> None:
    source, contract = resolve(TINY, input_size=(32, 32))
    art = TorchBackend().compile(
        None, tmp_path, contract, CompileOptions(extra={"compile": True}), source=source
    )
    assert art.settings["mode"] == "compile"
    runner = TorchBackend().runner(art)
    assert isinstance(runner, TorchRunner) and runner.compile and runner.device == "cpu"


@pytest.mark.slow
def test_torch_compile_on_cpu_matches_eager() -> None:
    source, contract = resolve(TINY, input_size=(32, 32))
    x = synthetic_images(contract, 2)
    eager = TorchRunner(source, threads=1)
    compiled = TorchRunner(source, threads=1, compile=True)
    with eager, compiled:
        np.testing.assert_allclose(compiled.infer(x), eager.infer(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
def test_torch_cuda_matches_cpu(compile_: bool) -> None:
    source, contract = resolve(TINY, input_size=(32, 32))
    x = synthetic_images(contract, 4)
    with torch.inference_mode():
        ref = load_torch(source)(torch.from_numpy(x)).numpy()
    with TorchRunner(source, threads=1, device="cuda", compile=compile_) as runner:
        out = runner.infer(x)
    cos = float((ref * out).sum() / (np.linalg.norm(ref) * np.linalg.norm(out)))
    assert cos > 0.9999


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["stream", "cuda-graph"])
def test_gpu_harness_times_with_events_at_two_batches(cuda_graph: bool) -> None:
    source, contract = resolve(TINY, input_size=(32, 32))
    with TorchRunner(source, threads=1, device="cuda") as runner:
        results = {
            batch: measure_gpu(
                runner,
                synthetic_images(contract, batch),
                GpuOptions(warmup_runs=5, runs=30, throughput_runs=30, cuda_graph=cuda_graph),
            )
            for batch in (1, 16)
        }
    for batch, result in results.items():
        lat = result.latency
        assert lat.runs == 30 and lat.batch == batch
        assert 0 < lat.min_ms <= lat.p50_ms <= lat.p99_ms
        assert result.throughput_ips > 0 and result.cuda_graph == cuda_graph
        assert result.gpu["name"] == torch.cuda.get_device_name(0)
        assert result.gpu["compute_capability"] and "clocks" in result.gpu


@pytest.mark.gpu
def test_export_torch_cuda_reports_the_gpu(tmp_path: Path) -> None:
    fast = ["--runs", "20", "--warmup", "5", "--fidelity-samples", "8"]
    args = ["export", TINY, "-t", "torch", "--device", "cuda", "--input-size", "32"]
    result = _cli([*args, "-o", str(tmp_path), "--json", *fast])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "ok"
    assert report["device"]["name"] == torch.cuda.get_device_name(0)
    assert report["latency"]["runs"] == 20 and report["latency"]["p50_ms"] > 0
    assert report["backend"]["settings"]["cudnn_benchmark"] is True


@pytest.mark.gpu
def test_onnxruntime_cuda_where_onnxruntime_gpu_is_installed(tmp_path: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    fast = ["--runs", "20", "--warmup", "5", "--fidelity-samples", "8", "--min-seconds", "0.1"]
    args = ["export", TINY, "-t", "onnxruntime", "--device", "cuda", "--input-size", "32"]
    result = _cli([*args, "-o", str(tmp_path), "--json", *fast])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "CUDAExecutionProvider" in report["backend"]["providers"]
