"""Export stage: PyTorch model -> checked ONNX that matches PyTorch numerically.

Both torch.onnx exporters are tried in order (the dynamo exporter, then the
TorchScript exporter, unless one is chosen). A graph is kept only when it passes
the ONNX checker and shape inference and ONNX Runtime reproduces the PyTorch
outputs at every batch that matters: the static batch, or min, opt and max of a
dynamic range (a batch size baked in as a constant, as in the classic channel
shuffle bug, is right at one batch and wrong at another).
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.backends.base import BatchRange
from deploykit.errors import ExportError, NumericMismatchError, OnnxFileError, UserError
from deploykit.harness.fidelity import EXACT, compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.stages.onnxcheck import OrtSession, load_onnx, op_counts

if TYPE_CHECKING:
    import torch

EXPORTERS = ("dynamo", "torchscript")
# Opsets each exporter can emit with torch 2.14 (dynamo targets opset 18 and later).
OPSET_RANGE = {"dynamo": (18, 23), "torchscript": (7, 20)}
DEFAULT_OPSET = 18
_EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass(frozen=True)
class ExportOptions:
    """Options of the export stage."""

    opset: int = DEFAULT_OPSET
    exporter: str = "auto"
    batch: int = 1
    dynamic_batch: BatchRange | None = None

    def order(self) -> list[str]:
        """Exporters to try, in order, that can emit the requested opset."""
        if self.exporter not in ("auto", *EXPORTERS):
            raise UserError(
                f"unknown exporter {self.exporter!r}: choose auto, dynamo or torchscript"
            )
        names = list(EXPORTERS) if self.exporter == "auto" else [self.exporter]
        usable = [n for n in names if OPSET_RANGE[n][0] <= self.opset <= OPSET_RANGE[n][1]]
        if not usable:
            ranges = ", ".join(f"{n} {OPSET_RANGE[n][0]}-{OPSET_RANGE[n][1]}" for n in names)
            raise UserError(
                f"unsupported opset {self.opset}: supported are {ranges}; pass --opset 18"
            )
        return usable

    def check_batches(self) -> list[int]:
        """Batches at which the exported graph must match PyTorch."""
        if self.dynamic_batch is None:
            return [self.batch]
        return sorted({self.dynamic_batch.min, self.dynamic_batch.opt, self.dynamic_batch.max})


@dataclass
class OnnxArtifact:
    """An ONNX file plus what produced it."""

    path: Path
    opset: int
    input_name: str
    exporter: str | None = None
    dynamic_batch: BatchRange | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def files(self) -> list[Path]:
        """The ONNX file and its external data file, if any."""
        extra = self.path.with_name(self.path.name + ".data")
        return [self.path, extra] if extra.exists() else [self.path]

    def size_bytes(self) -> int:
        """Total size on disk."""
        return sum(p.stat().st_size for p in self.files())


def export_onnx(
    module: torch.nn.Module,
    contract: InputContract,
    out_path: Path,
    options: ExportOptions,
    on_step: Callable[[str], None] | None = None,
) -> OnnxArtifact:
    """Export `module` to `out_path`, trying exporters until one matches PyTorch.

    Raises:
        ExportError: No exporter could produce a graph (unsupported op, ...).
        NumericMismatchError: Graphs were produced but none matches PyTorch; the numbers say how.
    """
    attempts: list[dict[str, Any]] = []
    mismatch = False
    references = _torch_references(module, contract, options.check_batches())
    for name in options.order():
        if on_step:
            on_step(f"exporting with the {name} exporter")
        tmp = out_path.with_name(f".{name}.{out_path.name}")
        started = time.perf_counter()
        try:
            _run_exporter(name, module, contract, tmp, options)
            model = load_onnx(tmp)
            _infer_shapes(model)
            checks = _numeric_checks(tmp, references)
        except (ExportError, OnnxFileError) as exc:
            attempts.append(_attempt(name, started, False, str(exc)))
            _remove(tmp)
            continue
        bad = [c for c in checks if c["violations"]]
        if bad:
            mismatch = True
            detail = "; ".join(f"batch {c['batch']}: {', '.join(c['violations'])}" for c in bad)
            attempts.append(_attempt(name, started, False, f"numeric mismatch ({detail})"))
            _remove(tmp)
            continue
        attempts.append(_attempt(name, started, True, ""))
        _publish(tmp, out_path)
        return OnnxArtifact(
            path=out_path,
            opset=options.opset,
            input_name=model.graph.input[0].name,
            exporter=name,
            dynamic_batch=options.dynamic_batch,
            op_counts=op_counts(model),
            attempts=attempts,
            checks=[{k: v for k, v in c.items() if k != "violations"} for c in checks],
        )
    summary = " | ".join(f"{a['exporter']}: {a['error']}" for a in attempts)
    if mismatch:
        raise NumericMismatchError(f"no exporter matched PyTorch: {summary}")
    raise ExportError(f"torch.onnx could not export the model: {summary}")


def _attempt(name: str, started: float, ok: bool, error: str) -> dict[str, Any]:
    return {
        "exporter": name,
        "ok": ok,
        "seconds": round(time.perf_counter() - started, 3),
        "error": error,
    }


def _torch_references(
    module: torch.nn.Module, contract: InputContract, batches: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    import torch

    from deploykit.backends.torch.backend import first_tensor

    pairs = []
    for batch in batches:
        inputs = synthetic_images(contract, batch, seed=1000 + batch)
        try:
            with torch.inference_mode():
                out = first_tensor(module(torch.from_numpy(inputs)))
        except Exception as exc:  # the user's model fails on its own contract
            raise UserError(
                f"the PyTorch model fails on input {tuple(inputs.shape)}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}; "
                "check --input-size"
            ) from exc
        pairs.append((inputs, out.float().numpy()))
    return pairs


def _run_exporter(
    name: str,
    module: torch.nn.Module,
    contract: InputContract,
    path: Path,
    options: ExportOptions,
) -> None:
    import torch

    example_batch = (
        options.batch if options.dynamic_batch is None else max(2, options.dynamic_batch.opt)
    )
    example = torch.from_numpy(synthetic_images(contract, example_batch, seed=7))
    kwargs: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["output"],
        "opset_version": options.opset,
    }
    if name == "dynamo":
        kwargs["dynamo"] = True
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        kwargs["external_data"] = params > _EXTERNAL_DATA_BYTES
        if options.dynamic_batch is not None:
            rng = options.dynamic_batch
            batch_dim = torch.export.Dim("batch", min=rng.min, max=max(rng.max, 2))
            kwargs["dynamic_shapes"] = ({0: batch_dim},)
    else:
        kwargs["dynamo"] = False
        if options.dynamic_batch is not None:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), **kwargs)
    except Exception as exc:  # exporters raise many types; each is a failed attempt
        message = str(exc).strip().splitlines()
        first = next((line for line in message if line.strip()), type(exc).__name__)
        raise ExportError(f"{type(exc).__name__}: {first[:240]}") from exc
    if not path.exists():
        raise ExportError("the exporter wrote no file")


def _infer_shapes(model: Any) -> None:
    import onnx

    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # InferenceError
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise OnnxFileError(f"shape inference failed: {first}") from exc


def _numeric_checks(
    path: Path, references: list[tuple[np.ndarray, np.ndarray]]
) -> list[dict[str, Any]]:
    session = OrtSession(path)
    checks = []
    for inputs, expected in references:
        try:
            got = session.run(inputs)
        except Exception as exc:  # ORT runtime failure at this batch: a broken graph
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            checks.append({"batch": int(inputs.shape[0]), "violations": [f"fails to run: {first}"]})
            continue
        if got.shape != expected.shape:
            violation = f"output shape {got.shape} != PyTorch {expected.shape}"
            checks.append({"batch": int(inputs.shape[0]), "violations": [violation]})
            continue
        fid = compare_outputs(expected, got)
        checks.append(
            {
                "batch": int(inputs.shape[0]),
                "cosine": fid.cosine,
                "rel_err": fid.rel_err,
                "max_abs_err": fid.max_abs_err,
                "violations": EXACT.violations(fid),
            }
        )
    return checks


def _publish(tmp: Path, final: Path) -> None:
    data = tmp.with_name(tmp.name + ".data")
    if data.exists():
        # External data is referenced by file name inside the graph: rewrite it to the final name.
        import onnx

        model = onnx.load(str(tmp))
        onnx.save_model(
            model,
            str(final),
            save_as_external_data=True,
            location=final.name + ".data",
            all_tensors_to_one_file=True,
        )
        _remove(tmp)
    else:
        tmp.replace(final)


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
