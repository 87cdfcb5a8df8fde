"""Engine build with the TensorRT Python API (10.x and 11.x), following a BuildPlan literally.

This is the only module that needs libnvinfer at build time. It uses the
documented calls only: ``Builder.create_network`` with the STRONGLY_TYPED flag,
``OnnxParser.parse_from_file``, ``IBuilderConfig.set_memory_pool_limit``,
``builder_optimization_level``, ``create_optimization_profile``/``set_shape``,
``create_timing_cache``/``set_timing_cache``, ``build_serialized_network``,
and ``ICudaEngine.create_engine_inspector`` for the per-layer precisions.
No precision builder flags are set: TensorRT 11 removed them and a strongly
typed TensorRT 10 network rejects them.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from deploykit.backends.tensorrt.metadata import EngineMetadata, GpuInfo
from deploykit.backends.tensorrt.plan import BuildPlan
from deploykit.errors import UserError
from deploykit.fsutil import sha256_file, write_bytes_atomic


def _file_logger(trt: Any, path: Path) -> Any:
    """A TensorRT logger writing every message (INFO and up) to `path`."""

    class FileLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity))
            self.handle.write(f"[{name}] {msg}\n")
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

        def close(self) -> None:
            self.handle.close()

    return FileLogger()


def network_flags(trt: Any) -> int:
    """STRONGLY_TYPED on every TensorRT that has the flag (10.x; accepted and ignored on 11.x)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(plan: BuildPlan, gpu: GpuInfo, onnx_sha256: str, onnx_rel: str) -> EngineMetadata:
    """Build the engine the plan describes and write it, its timing cache and engine.json.

    Args:
        plan: The build plan (see :func:`deploykit.backends.tensorrt.plan.make_plan`).
        gpu: The GPU the build runs on (recorded in engine.json).
        onnx_sha256: Digest of the ONNX input.
        onnx_rel: The ONNX path relative to the run folder, for the metadata.

    Returns:
        The engine metadata (also written as ``engine.json``).

    Raises:
        UserError: The parser rejects the ONNX or the builder fails; the message points
            at the build log.
    """
    import tensorrt as trt

    plan.folder.mkdir(parents=True, exist_ok=True)
    logger = _file_logger(trt, plan.log_file)
    started = time.perf_counter()
    try:
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(plan.onnx)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            first = errors[0].splitlines()[0] if errors else "no detail"
            raise UserError(
                f"TensorRT's ONNX parser rejected {plan.onnx.name}: {first} "
                f"({len(errors)} error(s); see {plan.log_file})"
            )
        config = builder.create_builder_config()
        if plan.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        config.builder_optimization_level = plan.builder_optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        if plan.dynamic:
            profile = builder.create_optimization_profile()
            for shapes in plan.profiles:
                profile.set_shape(shapes.input, shapes.min, shapes.opt, shapes.max)
            config.add_optimization_profile(profile)
        cache = _timing_cache(trt, config, plan, logger)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = logger.errors[-1] if logger.errors else "no error message"
            raise UserError(
                f"TensorRT could not build {plan.onnx.name}: {detail} (see {plan.log_file})"
            )
        write_bytes_atomic(plan.engine_file, bytes(memoryview(serialized)))
        write_bytes_atomic(plan.timing_cache, bytes(memoryview(cache.serialize())))
        seconds = time.perf_counter() - started
        layers = _layer_precisions(trt, logger, plan.engine_file)
    finally:
        logger.close()
    meta = EngineMetadata(
        tensorrt_version=str(trt.__version__),
        gpu=gpu,
        precision=plan.precision,
        strongly_typed=True,
        profiles={p.input: p.to_dict() for p in plan.profiles},
        onnx_file=onnx_rel,
        onnx_sha256=onnx_sha256,
        engine_sha256=sha256_file(plan.engine_file),
        builder_optimization_level=plan.builder_optimization_level,
        workspace_bytes=plan.workspace_bytes,
        build_seconds=round(seconds, 2),
        extra={"layer_precisions": layers},
    )
    meta.save(plan.folder)
    return meta


def _timing_cache(trt: Any, config: Any, plan: BuildPlan, logger: Any) -> Any:
    """Create the timing cache, seeded from the plan's seed when it matches this device."""
    seed = plan.timing_cache_seed.read_bytes() if plan.timing_cache_seed else b""
    cache = config.create_timing_cache(seed)
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    # A cache from another GPU or TensorRT version: start afresh rather than mis-tune.
    logger.log(
        trt.ILogger.Severity.WARNING,
        f"timing cache {plan.timing_cache_seed} does not match this device; starting a new one",
    )
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _layer_precisions(trt: Any, logger: Any, engine_file: Path) -> dict[str, int]:
    """Count engine layers by output data type, from the engine inspector's JSON."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_file.read_bytes())
    if engine is None:
        raise UserError(f"TensorRT cannot load the engine it just built ({engine_file})")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    counts: Counter[str] = Counter()
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        outputs = layer.get("Outputs") or []
        if outputs and isinstance(outputs[0], dict):
            counts[_dtype_of(outputs[0])] += 1
    return dict(counts)


def _dtype_of(tensor: dict[str, Any]) -> str:
    """An inspector tensor entry's data type as fp32/fp16/bf16/int8.

    TensorRT 11 has a ``DataType`` field ("Float", "Half", "Int8"); TensorRT 10 folds
    it into ``Format/Datatype`` ("Row major linear FP32 format (kLINEAR)").
    """
    text = str(tensor.get("DataType") or tensor.get("Format/Datatype") or "").lower()
    tokens = (
        ("int8", "int8"),
        ("bfloat", "bf16"),
        ("bf16", "bf16"),
        ("half", "fp16"),
        ("fp16", "fp16"),
        ("fp32", "fp32"),
        ("float", "fp32"),
    )
    for token, name in tokens:
        if token in text:
            return name
    return text or "unknown"


def effective_precision(layers: dict[str, int], requested: str) -> str:
    """The precision the engine computes in, read back from its layers."""
    keys = {k for k, n in layers.items() if n}
    for precision in ("int8", "fp16", "bf16"):
        if precision in keys:
            return precision
    return "fp32" if keys else requested
