"""TensorRT: strongly typed engines from FP32, FP16 or symmetric INT8 Q/DQ ONNX.

compile = prepare the ONNX (FP16 conversion checked in ONNX Runtime, or Q/DQ
checks and bias folding for INT8) -> plan (profiles, workspace, optimisation
level, timing cache, log) -> build with the TensorRT Python API -> engine.plan
+ engine.json. Everything before the build is plain Python and runs anywhere;
``plan()`` stops there (``--dry-run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploykit.backends.base import (
    Availability,
    Backend,
    Capabilities,
    CompiledArtifact,
    CompileOptions,
    Runner,
)
from deploykit.backends.tensorrt.plan import ENGINE_FILE, PLAN_FILE, BuildPlan, make_plan
from deploykit.errors import BackendUnavailableError, UserError
from deploykit.fsutil import sha256_file, write_json_atomic
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource

FIX = (
    "use the TensorRT image (docker build -f docker/Dockerfile.tensorrt -t deploykit:tensorrt . "
    "and docker run --gpus all deploykit:tensorrt ...) or install TensorRT 10+ from NVIDIA's "
    "index on a GPU machine (pip install 'deploykit[tensorrt]' "
    "--extra-index-url https://pypi.nvidia.com)"
)
FOLDER = "tensorrt"
# Inputs the FP16 conversion is checked on (ONNX Runtime, CPU).
FP16_CHECK_SAMPLES = 8


def tensorrt_version() -> str | None:
    """The importable TensorRT's version, or None."""
    try:
        import tensorrt
    except (ImportError, OSError):
        return None
    return str(tensorrt.__version__)


class TensorRtBackend(Backend):
    """NVIDIA TensorRT 10.x / 11.x, strongly typed."""

    name = "tensorrt"
    display_name = "TensorRT"

    def is_available(self) -> Availability:
        try:
            import tensorrt
        except ImportError as exc:
            return Availability(False, f"TensorRT is not installed ({exc})", FIX)
        except OSError as exc:  # the wheel is present but libnvinfer cannot load
            return Availability(False, f"TensorRT cannot load its libraries ({exc})", FIX)
        major = int(str(tensorrt.__version__).split(".")[0])
        if major < 10:
            return Availability(
                False,
                f"TensorRT {tensorrt.__version__} is too old (deploykit needs 10+, the "
                "name-based tensor API and strongly typed networks)",
                FIX,
            )
        from deploykit.harness.gpu import gpu_unavailable_reason

        reason = gpu_unavailable_reason()
        if reason:
            return Availability(
                False, f"TensorRT {tensorrt.__version__} is installed but {reason}", FIX
            )
        return Availability(True)

    def version(self) -> str | None:
        return tensorrt_version()

    def capabilities(self) -> Capabilities:
        # Static: precision comes from the ONNX (strongly typed); availability says if it runs.
        return Capabilities(
            precisions=("fp32", "fp16", "int8"),
            devices=("cuda",),
            dynamic_shapes=True,
            int8_encoding="s8s8",
        )

    def plan(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> dict[str, Any]:
        """Prepare the ONNX the engine is built from and write ``plan.json``; no TensorRT needed.

        Returns:
            The plan as a dict, with ``summary`` lines for the terminal.
        """
        build_plan = self._prepare(onnx_path, out_dir, contract, options)
        write_json_atomic(build_plan.folder / PLAN_FILE, build_plan.to_dict())
        return {**build_plan.to_dict(), "summary": build_plan.describe()}

    def _prepare(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
    ) -> BuildPlan:
        if onnx_path is None:
            raise UserError("the tensorrt target needs an ONNX model")
        if options.device != "cuda":
            raise UserError(f"TensorRT runs on cuda, not {options.device!r}: use --device cuda")
        import onnx

        folder = out_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        details: dict[str, Any] = {}
        if options.precision == "fp16":
            build_onnx, details["fp16"] = _fp16_onnx(onnx_path, out_dir, contract, options)
        elif options.precision == "int8":
            build_onnx, details["qdq"] = _int8_onnx(onnx_path, out_dir)
        else:
            build_onnx = onnx_path
        model = onnx.load(str(build_onnx), load_external_data=False)
        input_name = model.graph.input[0].name
        return make_plan(
            onnx_path=build_onnx,
            folder=folder,
            contract=contract,
            input_name=input_name,
            precision=options.precision,
            batch=options.batch,
            dynamic_batch=options.dynamic_batch,
            extra=options.extra,
            tensorrt_version=tensorrt_version(),
            onnx_details=details,
        )

    def compile(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> CompiledArtifact:
        availability = self.is_available()
        if not availability.ok:
            raise BackendUnavailableError(f"target tensorrt unavailable: {availability.message()}")
        from deploykit.backends.tensorrt.builder import build_engine, effective_precision
        from deploykit.backends.tensorrt.metadata import current_gpu

        build_plan = self._prepare(onnx_path, out_dir, contract, options)
        write_json_atomic(build_plan.folder / PLAN_FILE, build_plan.to_dict())
        meta = build_engine(
            build_plan,
            current_gpu(),
            sha256_file(build_plan.onnx),
            str(build_plan.onnx.relative_to(out_dir)),
        )
        layers = meta.extra.get("layer_precisions", {})
        return CompiledArtifact(
            backend=self.name,
            folder=build_plan.folder,
            files=[ENGINE_FILE],
            precision=options.precision,
            effective_precision=effective_precision(layers, options.precision),
            device="cuda",
            threads=options.threads,
            input_name=build_plan.input_name,
            contract=contract,
            source=source,
            settings={
                "strongly_typed": True,
                "builder_optimization_level": build_plan.builder_optimization_level,
                "workspace_bytes": build_plan.workspace_bytes,
            },
            info={
                "tensorrt_version": meta.tensorrt_version,
                "gpu": meta.gpu.to_dict(),
                "profiles": meta.profiles,
                "layer_precisions": layers,
                # Engine layers by output type, in the form the INT8 precision gate reads.
                "compute_ops": {
                    "int8": int(layers.get("int8", 0)),
                    "fp32": int(sum(n for k, n in layers.items() if k != "int8")),
                },
                "build_seconds": meta.build_seconds,
                **build_plan.onnx_details,
            },
        )

    def runner(self, artifact: CompiledArtifact) -> Runner:
        availability = self.is_available()
        if not availability.ok:
            raise BackendUnavailableError(f"target tensorrt unavailable: {availability.message()}")
        from deploykit.backends.tensorrt.runner import TensorRtRunner

        return TensorRtRunner(artifact.folder)


def _fp16_onnx(
    onnx_path: Path, out_dir: Path, contract: InputContract, options: CompileOptions
) -> tuple[Path, dict[str, Any]]:
    """Write model.fp16.onnx and check it against the FP32 graph in ONNX Runtime (CPU)."""
    from deploykit.harness.inputs import synthetic_images
    from deploykit.stages.fp16 import convert_fp16, verify_fp16

    dst = out_dir / "model.fp16.onnx"
    report = convert_fp16(onnx_path, dst)
    # Dynamic-batch graphs are exported at batch 1; static ones at the measured batch.
    batch = 1 if options.dynamic_batch is not None else options.batch
    count = -(-FP16_CHECK_SAMPLES // batch) * batch
    inputs = synthetic_images(contract, count, seed=20_000)
    verify_fp16(onnx_path, dst, inputs, batch, report)
    return dst, report.to_dict()


def _int8_onnx(onnx_path: Path, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Check the Q/DQ model against TensorRT's rules; fold INT32 bias dequantization."""
    from deploykit.backends.tensorrt.qdq import fold_bias_dequantize, require_trt_qdq

    dst = out_dir / "model.int8.trt.onnx"
    folded = fold_bias_dequantize(onnx_path, dst)
    report = require_trt_qdq(dst)
    return dst, {**report.to_dict(), "bias_dequantize_folded": folded, "source": onnx_path.name}
