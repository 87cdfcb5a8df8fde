"""GPU latency harness shared by every CUDA target (torch eager/compile, TensorRT, ...).

Timing follows what trtexec does: warm-up first, then CUDA events recorded on
the runner's stream right before and after the enqueue, one synchronisation
per timed call (latency) and a back-to-back burst between two events
(throughput). Optionally the enqueue is captured once in a CUDA graph and
replayed, which removes the launch overhead a small batch otherwise pays.
Every result carries the GPU's name, compute capability and clocks.

A GPU runner provides ``stream`` (``torch.cuda.Stream``), ``prepare(batch)`` and
``enqueue()`` (launch without waiting); see :class:`GpuRunner`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from deploykit.errors import BackendUnavailableError
from deploykit.harness.latency import LatencyStats, stats_from_samples


class GpuRunner(Protocol):
    """What the harness needs from a CUDA runner."""

    stream: Any

    def prepare(self, batch: np.ndarray) -> None:
        """Copy `batch` to the device and bind it."""

    def enqueue(self) -> None:
        """Launch one inference on ``stream`` without synchronising."""


@dataclass(frozen=True)
class GpuOptions:
    """How long to measure on the GPU.

    Attributes:
        warmup_runs: Untimed enqueues first (cuDNN/TensorRT tactic warm-up, clocks ramp).
        runs: Timed calls for the latency percentiles.
        throughput_runs: Enqueues in the back-to-back throughput burst.
        cuda_graph: Capture the enqueue in a CUDA graph and replay it.
    """

    warmup_runs: int = 50
    runs: int = 200
    throughput_runs: int = 200
    cuda_graph: bool = False


@dataclass(frozen=True)
class GpuResult:
    """One GPU measurement: per-call latency and burst throughput at one batch."""

    latency: LatencyStats
    throughput_ips: float
    cuda_graph: bool
    gpu: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        data = asdict(self)
        data["latency"] = self.latency.to_dict()
        return data


def gpu_unavailable_reason() -> str | None:
    """Why no CUDA GPU can be used here, or None when one can."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed ({exc}); pip install 'deploykit[torch]'"
    if not torch.backends.cuda.is_built():
        return f"this torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    return None


def require_gpu() -> None:
    """Raise BackendUnavailableError with the reason when there is no usable GPU."""
    reason = gpu_unavailable_reason()
    if reason:
        raise BackendUnavailableError(f"{reason}; run on a machine with an NVIDIA GPU")


def gpu_info(device: int = 0) -> dict[str, Any]:
    """The GPU as a report ``device`` entry: name, compute capability, memory, CUDA, clocks."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return {
        "kind": "cuda",
        "name": str(props.name),
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": int(props.multi_processor_count),
        "cuda_runtime": torch.version.cuda,
        "driver": driver_version(),
        "clocks": _clocks(device),
    }


def driver_version() -> str | None:
    """The NVIDIA driver version from the kernel module, without NVML or a subprocess."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as handle:
            text = handle.read()
    except OSError:
        return None
    for token in text.split():
        parts = token.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return token
    return None


def _clocks(device: int) -> dict[str, Any]:
    """SM and memory clocks (current and maximum, MHz) through NVML when it is installed."""
    try:
        import pynvml
    except ImportError:
        return {"note": "clocks need NVML: pip install nvidia-ml-py"}
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device)
        sm, mem = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
        return {
            "sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, sm),
            "sm_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, sm),
            "mem_mhz": pynvml.nvmlDeviceGetClockInfo(handle, mem),
            "mem_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, mem),
        }
    except pynvml.NVMLError as exc:
        return {"note": f"NVML could not read the clocks ({exc})"}


def measure_gpu(
    runner: GpuRunner, batch: np.ndarray, options: GpuOptions | None = None
) -> GpuResult:
    """Measure a prepared GPU runner with CUDA events.

    Args:
        runner: An activated GPU runner.
        batch: The NCHW input (its first axis is the batch).
        options: Lengths and CUDA-graph capture.

    Returns:
        Latency percentiles (one synchronised call each) and burst throughput.
    """
    import torch

    require_gpu()
    opts = options or GpuOptions()
    runner.prepare(batch)
    stream = runner.stream
    launch = runner.enqueue
    with torch.cuda.stream(stream):
        for _ in range(max(1, opts.warmup_runs)):
            launch()
    stream.synchronize()
    if opts.cuda_graph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            runner.enqueue()
        launch = graph.replay
        with torch.cuda.stream(stream):
            launch()
        stream.synchronize()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        for _ in range(max(1, opts.runs)):
            start.record(stream)
            launch()
            end.record(stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        start.record(stream)
        for _ in range(max(1, opts.throughput_runs)):
            launch()
        end.record(stream)
        end.synchronize()
    burst_s = start.elapsed_time(end) / 1e3
    n = int(batch.shape[0])
    stats = stats_from_samples(np.asarray(samples), n, threads=1, total_seconds=float(sum(samples)))
    throughput = n * max(1, opts.throughput_runs) / burst_s if burst_s > 0 else 0.0
    return GpuResult(
        latency=stats, throughput_ips=throughput, cuda_graph=opts.cuda_graph, gpu=gpu_info()
    )


def latency_stats(runner: GpuRunner, batch: np.ndarray, runs: int, warmup: int) -> LatencyStats:
    """The harness's latency in the CPU harness's form, for report.json ``latency``."""
    result = measure_gpu(runner, batch, GpuOptions(warmup_runs=warmup, runs=runs))
    return result.latency
