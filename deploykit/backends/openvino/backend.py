"""OpenVINO: read ONNX, save IR (xml/bin), compile for the CPU with a pinned precision.

OpenVINO's CPU plugin runs an FP32 model in bfloat16 by default on CPUs with
AVX512-BF16 or AMX. deploykit always sets ``INFERENCE_PRECISION_HINT`` so the
precision is what the user asked for, and reads back from the compiled model's
runtime graph the precision the convolutions really run in.

INT8 comes either from deploykit's Q/DQ ONNX or, with ``--quantizer nncf``, from
an IR quantized by NNCF (see `nncf_quantizer`); :meth:`OpenVinoBackend.compile`
takes both, since ``read_model`` reads ONNX and IR alike.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.backends.base import (
    Availability,
    Backend,
    Capabilities,
    CompiledArtifact,
    CompileOptions,
    Runner,
)
from deploykit.errors import UserError
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource

FIX = "install it with `pip install 'deploykit[cpu]'`"
# deploykit precision -> (INFERENCE_PRECISION_HINT, CPU capability that must be present).
# INT8 comes from the Q/DQ nodes of the model; the layers around them stay pinned to f32.
_HINTS = {
    "fp32": ("f32", "FP32"),
    "bf16": ("bf16", "BF16"),
    "fp16": ("f16", "FP16"),
    "int8": ("f32", "INT8"),
}
_COMPUTE_LAYERS = frozenset(
    {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
)
_OV_TO_DK = {"f32": "fp32", "bf16": "bf16", "f16": "fp16", "i8": "int8", "u8": "int8"}


def _import_ov() -> Any:
    import openvino

    return openvino


class OpenVinoBackend(Backend):
    """OpenVINO runtime on the CPU device."""

    name = "openvino"
    display_name = "OpenVINO"

    def is_available(self) -> Availability:
        try:
            ov = _import_ov()
            devices = ov.Core().available_devices
        except ImportError as exc:
            return Availability(False, f"openvino is not installed ({exc})", FIX)
        if "CPU" not in devices:
            return Availability(False, f"OpenVINO found no CPU device (devices: {devices})")
        return Availability(True)

    def version(self) -> str | None:
        try:
            return str(_import_ov().__version__).split("-")[0]
        except ImportError:
            return None

    def capabilities(self) -> Capabilities:
        from deploykit.backends.openvino.nncf_quantizer import nncf_available

        caps = set(_import_ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        precisions = tuple(p for p, (_, cap) in _HINTS.items() if cap in caps)
        return Capabilities(
            precisions=precisions,
            devices=("cpu",),
            dynamic_shapes=True,
            int8_encoding="mixed",
            native_quantizer="nncf" if "int8" in precisions and nncf_available() else None,
        )

    def quantize(
        self,
        onnx_path: Path,
        calibration: np.ndarray,
        out_dir: Path,
        contract: InputContract,
        options: dict[str, Any],
    ) -> tuple[Path, dict[str, Any]]:
        """Quantize with NNCF into ``model.int8.nncf.xml/.bin`` in `out_dir`.

        Args:
            onnx_path: The fused FP32 ONNX model.
            calibration: Preprocessed NCHW calibration inputs (all of them are used).
            out_dir: Run folder to write the IR into.
            contract: The model's input contract.
            options: ``method`` (minmax or percentile), ``percentile``, ``per_channel``.

        Returns:
            The INT8 IR's xml path and what NNCF did.

        Raises:
            UserError: NNCF is not installed, or an option it has no equivalent for.
        """
        from deploykit.backends.openvino.nncf_quantizer import NncfOptions, quantize_to_ir

        return quantize_to_ir(onnx_path, calibration, out_dir, NncfOptions.from_dict(options))

    def compile(
        self,
        onnx_path: Path | None,
        out_dir: Path,
        contract: InputContract,
        options: CompileOptions,
        source: ModelSource | None = None,
    ) -> CompiledArtifact:
        if onnx_path is None:
            raise UserError("the openvino target needs an ONNX model or an OpenVINO IR")
        if options.device != "cpu":
            raise UserError(f"the openvino target runs on the cpu device, not {options.device!r}")
        ov = _import_ov()
        hint = self._hint(options.precision)
        folder = out_dir / "openvino"
        folder.mkdir(parents=True, exist_ok=True)
        # ONNX (FP32 or Q/DQ) or an IR (NNCF's INT8): FakeQuantize nodes and int8 weights
        # pass through save_model unchanged.
        model = ov.Core().read_model(str(onnx_path))
        fake_quantize = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
        tmp_xml = folder / ".model.tmp.xml"
        # Keep FP32 weights in the IR: save_model compresses to FP16 unless told not to.
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        os.replace(tmp_xml.with_suffix(".bin"), folder / "model.bin")
        os.replace(tmp_xml, folder / "model.xml")
        settings = compile_settings(hint, options.threads)
        compiled = ov.Core().compile_model(str(folder / "model.xml"), "CPU", settings)
        precisions = runtime_precisions(compiled)
        effective = effective_precision(precisions, fallback=options.precision)
        return CompiledArtifact(
            backend=self.name,
            folder=folder,
            files=["model.xml", "model.bin"],
            precision=options.precision,
            effective_precision=effective,
            device=options.device,
            threads=options.threads,
            input_name=compiled.inputs[0].get_any_name(),
            contract=contract,
            source=source,
            settings=settings,
            info={
                "compute_layer_precisions": precisions,
                "inference_precision_hint": compiled.get_property(
                    "INFERENCE_PRECISION_HINT"
                ).to_string(),
                "num_streams": int(compiled.get_property("NUM_STREAMS")),
                "input_format": "ir" if onnx_path.suffix == ".xml" else "onnx",
                "fake_quantize_ops": fake_quantize,
            },
        )

    def runner(self, artifact: CompiledArtifact) -> Runner:
        return OpenVinoRunner(artifact.folder / artifact.files[0], artifact.settings)

    def _hint(self, precision: str) -> str:
        if precision not in _HINTS:
            raise UserError(
                f"openvino has no {precision} mode here; choose one of {', '.join(_HINTS)}"
            )
        hint, cap = _HINTS[precision]
        caps = set(_import_ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        if cap not in caps:
            raise UserError(
                f"this CPU has no {precision} support in OpenVINO (capabilities: "
                f"{', '.join(sorted(caps))}); use --precision fp32"
            )
        return hint


def compile_settings(hint: str, threads: int) -> dict[str, Any]:
    """CPU plugin settings: latency hint, pinned precision and thread count."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": hint,
        "INFERENCE_NUM_THREADS": threads,
    }


def runtime_precisions(compiled: Any) -> dict[str, int]:
    """Count compute layers of the compiled (runtime) graph by the precision they run in."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else ""
        if layer in _COMPUTE_LAYERS and "runtimePrecision" in info:
            counts[info["runtimePrecision"].astype(str)] += 1
    return dict(counts)


def effective_precision(precisions: dict[str, int], fallback: str) -> str:
    """The precision most compute layers run in, in deploykit's names."""
    if not precisions:
        return fallback
    top = max(precisions.items(), key=lambda kv: kv[1])[0]
    return _OV_TO_DK.get(top, top)


class OpenVinoRunner(Runner):
    """Runs an IR with one synchronous infer request (latency mode, one stream)."""

    name = "openvino"

    def __init__(self, xml_path: Path, settings: dict[str, Any]) -> None:
        self.xml_path = xml_path
        self.settings = settings
        self.request: Any = None

    def activate(self) -> None:
        ov = _import_ov()
        self.compiled = ov.Core().compile_model(str(self.xml_path), "CPU", self.settings)
        self.request = self.compiled.create_infer_request()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.request.infer({0: batch})
        return np.array(self.request.get_output_tensor(0).data, copy=True)

    def prepare(self, batch: np.ndarray) -> None:
        ov = _import_ov()
        self._prepared = np.ascontiguousarray(batch)
        self.request.set_input_tensor(ov.Tensor(self._prepared, shared_memory=True))

    def run_prepared(self) -> None:
        self.request.infer()

    def deactivate(self) -> None:
        self.request = None
        self.compiled = None
