"""The TensorRT build plan: everything the builder will be asked to do, decided without libnvinfer.

The plan is plain data (printed by ``--dry-run``, saved as ``plan.json`` beside
the engine) and the builder follows it literally, so what a build does can be
read, tested and reviewed on any machine:

- network: parsed from the ONNX with the ONNX parser, created strongly typed
  (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; required for this path on
  TensorRT 10, always on and the flag ignored on 11) — precision comes from the
  ONNX itself (FP16 tensors, INT8 Q/DQ), no precision builder flags;
- one optimisation profile per dynamic input, min/opt/max from ``--dynamic-batch``;
- the workspace memory-pool limit and the builder optimisation level (0-5);
- a timing cache in the run folder, seeded from the previous build's cache or
  ``--timing-cache`` so repeated builds skip kernel timing;
- the builder's log to a file in the run folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploykit.backends.base import BatchRange
from deploykit.errors import UserError
from deploykit.models.contract import InputContract

ENGINE_FILE = "engine.plan"
PLAN_FILE = "plan.json"
TIMING_CACHE_FILE = "timing.cache"
BUILD_LOG_FILE = "build.log"
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class ProfileShapes:
    """One input's shapes in an optimisation profile."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        """``{"min": [...], "opt": [...], "max": [...]}``."""
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass
class BuildPlan:
    """What one engine build does.

    Attributes:
        precision: fp32, fp16 or int8: what the ONNX graph carries.
        onnx: The ONNX file the network is parsed from (FP32, FP16 or symmetric Q/DQ).
        folder: The artifact folder (engine, metadata, cache, log).
        input_name: The network input.
        dynamic: Whether the batch dimension is dynamic.
        profiles: Optimisation profile shapes (one profile; static graphs need none).
        workspace_bytes: Workspace memory-pool limit; None = TensorRT's default (device memory).
        builder_optimization_level: 0-5; higher searches more tactics, builds slower.
        timing_cache_seed: A timing cache to start from (previous build, or user given).
        strongly_typed: Create the network strongly typed (the only path).
        network_flags: Network creation flags set.
        builder_flags: Builder flags set (none: precision is in the graph).
        tensorrt_version: The TensorRT found here, or None.
        onnx_details: What preparing the ONNX did (FP16 conversion, Q/DQ checks).
    """

    precision: str
    onnx: Path
    folder: Path
    input_name: str
    dynamic: bool
    profiles: list[ProfileShapes]
    workspace_bytes: int | None = None
    builder_optimization_level: int = DEFAULT_OPT_LEVEL
    timing_cache_seed: Path | None = None
    strongly_typed: bool = True
    network_flags: list[str] = field(default_factory=lambda: ["STRONGLY_TYPED"])
    builder_flags: list[str] = field(default_factory=list)
    tensorrt_version: str | None = None
    onnx_details: dict[str, Any] = field(default_factory=dict)

    @property
    def engine_file(self) -> Path:
        """Where the serialized engine goes."""
        return self.folder / ENGINE_FILE

    @property
    def timing_cache(self) -> Path:
        """Where the timing cache is written after the build."""
        return self.folder / TIMING_CACHE_FILE

    @property
    def log_file(self) -> Path:
        """Where the builder's log goes."""
        return self.folder / BUILD_LOG_FILE

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder (the artifact folder's parent) when inside it."""
        try:
            return str(path.relative_to(self.folder.parent))
        except ValueError:
            return str(path)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form; paths inside the run folder are relative to it."""
        data = asdict(self)
        data["onnx"] = self.rel(self.onnx)
        data["folder"] = self.rel(self.folder)
        data["timing_cache_seed"] = str(self.timing_cache_seed) if self.timing_cache_seed else None
        data["profiles"] = {p.input: p.to_dict() for p in self.profiles}
        data.update(
            engine_file=self.rel(self.engine_file),
            timing_cache=self.rel(self.timing_cache),
            log_file=self.rel(self.log_file),
        )
        return data

    def describe(self) -> list[str]:
        """The plan as lines for the terminal."""
        trt = self.tensorrt_version or "not installed here (the build runs where it is)"
        workspace = (
            f"{self.workspace_bytes / 2**20:.0f} MiB"
            if self.workspace_bytes
            else "TensorRT default (device memory)"
        )
        lines = [
            f"TensorRT: {trt}",
            f"network: ONNX parser on {self.onnx.name}, flags {', '.join(self.network_flags)}",
            f"precision: {self.precision} from the ONNX graph; builder precision flags: "
            f"{', '.join(self.builder_flags) or 'none'}",
            f"workspace limit: {workspace}",
            f"builder optimisation level: {self.builder_optimization_level}",
        ]
        if self.profiles and self.dynamic:
            for p in self.profiles:
                lines.append(
                    f"profile {p.input}: min {list(p.min)} opt {list(p.opt)} max {list(p.max)}"
                )
        elif self.profiles:
            lines.append(f"static input {self.profiles[0].input}: {list(self.profiles[0].opt)}")
        seed = f" (seeded from {self.timing_cache_seed})" if self.timing_cache_seed else ""
        lines += [
            f"timing cache: {self.rel(self.timing_cache)}{seed}",
            f"build log: {self.rel(self.log_file)}",
            f"engine: {self.rel(self.engine_file)} + {self.rel(self.folder / 'engine.json')} "
            "(TensorRT version, GPU, CUDA/driver, profiles, precision)",
        ]
        if "fp16" in self.onnx_details:
            lines += _fp16_lines(self.onnx_details["fp16"])
        if "qdq" in self.onnx_details:
            lines += _qdq_lines(self.onnx_details["qdq"])
        return lines


def _fp16_lines(fp16: dict[str, Any]) -> list[str]:
    kept = ", ".join(f"{op} x{n}" for op, n in fp16.get("nodes_fp32", {}).items()) or "none"
    lines = [
        f"FP16 ONNX: {fp16.get('converter')}, {fp16.get('nodes_fp16')} nodes in FP16, "
        f"kept in FP32: {kept}, {fp16.get('casts_added')} casts, inputs/outputs FP32",
    ]
    fid = fp16.get("fidelity")
    if fid:
        lines.append(
            f"FP16 ONNX vs FP32 ({fp16.get('verified_with')}, {fid['samples']} inputs): "
            f"cosine {fid['cosine']:.6f}, rel err {fid['rel_err']:.2g}, "
            f"top-1 agreement {fid['top1_agreement']:.0%}"
        )
    if fp16.get("max_activation") is not None:
        lines.append(
            f"FP16 range: largest |tensor| of an FP16 node {fp16['max_activation']:.3g} "
            "(FP16 max 65504)"
        )
    return lines


def _qdq_lines(qdq: dict[str, Any]) -> list[str]:
    lines = [
        f"INT8 Q/DQ ({qdq.get('source')}): {qdq.get('quantize_nodes')} Q / "
        f"{qdq.get('dequantize_nodes')} DQ, symmetric INT8, {qdq.get('per_channel_weights')} "
        f"per-channel weights, {qdq.get('int8_layers')} INT8 layers, "
        f"{len(qdq.get('float_layers', []))} float, "
        f"{qdq.get('bias_dequantize_folded', 0)} INT32 bias DQ folded to float",
    ]
    lines += [f"warning: {w}" for w in qdq.get("warnings", [])]
    return lines


def parse_workspace(text: str | int | None) -> int | None:
    """Workspace limit in bytes from ``512M``, ``4G``, ``4GiB`` or a number of MiB.

    Raises:
        UserError: Unparseable or not positive.
    """
    if text is None or text == "":
        return None
    if isinstance(text, int):
        value, unit = float(text), "M"
    else:
        raw = text.strip().upper().removesuffix("IB").removesuffix("B")
        unit = raw[-1] if raw and raw[-1] in "KMG" else "M"
        number = raw[:-1] if raw and raw[-1] in "KMG" else raw
        try:
            value = float(number)
        except ValueError:
            value = -1.0
    if value <= 0:
        raise UserError(f"bad --workspace {text!r}: expected a size such as 512M or 4G")
    return int(value * {"K": 2**10, "M": 2**20, "G": 2**30}[unit])


def make_plan(
    onnx_path: Path,
    folder: Path,
    contract: InputContract,
    input_name: str,
    precision: str,
    batch: int,
    dynamic_batch: BatchRange | None,
    extra: dict[str, Any],
    tensorrt_version: str | None,
    onnx_details: dict[str, Any] | None = None,
) -> BuildPlan:
    """Decide the build from the options (no TensorRT needed).

    Args:
        onnx_path: The ONNX the engine is built from (already in the precision asked for).
        folder: The artifact folder.
        contract: Input contract (channels, height, width).
        input_name: The ONNX input name.
        precision: fp32, fp16 or int8.
        batch: Static batch (used when `dynamic_batch` is None).
        dynamic_batch: The dynamic batch range.
        extra: ``workspace`` (bytes, or a size string), ``builder_opt_level`` (0-5),
            ``timing_cache`` (a cache file to seed from).
        tensorrt_version: The TensorRT found here, or None.
        onnx_details: What preparing the ONNX did, shown with the plan.

    Raises:
        UserError: Bad precision, optimisation level or workspace.
    """
    if precision not in PRECISIONS:
        raise UserError(
            f"TensorRT builds {', '.join(PRECISIONS)} here, not {precision!r} "
            "(bf16 needs a BF16 ONNX and is not offered yet)"
        )
    level = extra.get("builder_opt_level")
    level = DEFAULT_OPT_LEVEL if level is None else int(level)
    if not 0 <= level <= 5:
        raise UserError(f"--builder-opt-level must be 0 to 5, got {level}")
    workspace = extra.get("workspace")
    workspace_bytes = workspace if isinstance(workspace, int) else parse_workspace(workspace)
    seed = extra.get("timing_cache")
    seed_path = Path(seed) if seed else None
    if seed_path is not None and not seed_path.is_file():
        raise UserError(f"--timing-cache {seed_path} does not exist; omit it to start a new cache")
    chw = (contract.channels, contract.height, contract.width)
    if dynamic_batch is not None:
        profile = ProfileShapes(
            input_name,
            (dynamic_batch.min, *chw),
            (dynamic_batch.opt, *chw),
            (dynamic_batch.max, *chw),
        )
    else:
        shape = (batch, *chw)
        profile = ProfileShapes(input_name, shape, shape, shape)
    return BuildPlan(
        precision=precision,
        onnx=onnx_path,
        folder=folder,
        input_name=input_name,
        dynamic=dynamic_batch is not None,
        profiles=[profile],
        workspace_bytes=workspace_bytes,
        builder_optimization_level=level,
        timing_cache_seed=seed_path,
        tensorrt_version=tensorrt_version,
        onnx_details=dict(onnx_details or {}),
    )
