"""Fuse stage: simplify the graph with onnxslim and prove nothing changed numerically.

onnxslim does the work: constant folding, dead-node elimination, Conv+BatchNorm
folding, Conv+Add/Mul folding, Gemm fusion and shape simplification. deploykit
records op counts by type before and after, and runs both graphs on the same
inputs in ONNX Runtime; a fused graph that disagrees with its source is not used
(the unfused graph is kept, and the report says why).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploykit.harness.fidelity import EXACT, compare_outputs
from deploykit.harness.inputs import synthetic_images
from deploykit.models.contract import InputContract
from deploykit.stages.export import OnnxArtifact
from deploykit.stages.onnxcheck import OrtSession, graph_opset, load_onnx, op_counts


@dataclass
class FuseReport:
    """What fusion changed."""

    ops_before: dict[str, int]
    ops_after: dict[str, int]
    applied: bool
    note: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "applied": self.applied,
            "note": self.note,
            "nodes_before": sum(self.ops_before.values()),
            "nodes_after": sum(self.ops_after.values()),
            "ops_before": self.ops_before,
            "ops_after": self.ops_after,
            "checks": self.checks,
        }


def fuse_onnx(
    source: OnnxArtifact,
    out_path: Path,
    contract: InputContract,
    batches: list[int],
) -> tuple[OnnxArtifact, FuseReport]:
    """Simplify `source` into `out_path` and check it against `source` at `batches`.

    Returns:
        The fused artifact and a report of op counts and checks.
    """
    import onnxslim

    started = time.perf_counter()
    model = load_onnx(source.path)
    before = op_counts(model)
    note = ""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            slim = onnxslim.slim(model)
    except Exception as exc:  # onnxslim raises arbitrary errors on exotic graphs
        slim = None
        note = f"onnxslim failed ({type(exc).__name__}: {str(exc)[:160]}); graph kept unfused"
    checks: list[dict[str, Any]] = []
    if slim is not None:
        import onnx

        tmp = out_path.with_name(f".{out_path.name}.tmp")
        onnx.save_model(slim, str(tmp))
        load_onnx(tmp)
        checks = _compare(source.path, tmp, contract, batches)
        bad = [c for c in checks if c["violations"]]
        if bad:
            note = (
                "fused graph differs from its source ("
                + "; ".join(f"batch {c['batch']}: {', '.join(c['violations'])}" for c in bad)
                + "); graph kept unfused"
            )
            tmp.unlink()
        else:
            tmp.replace(out_path)
    applied = not note
    if not applied:
        shutil.copyfile(source.path, out_path)
    fused = load_onnx(out_path, check=False)
    report = FuseReport(
        ops_before=before,
        ops_after=op_counts(fused),
        applied=applied,
        note=note,
        checks=[{k: v for k, v in c.items() if k != "violations"} for c in checks],
        seconds=time.perf_counter() - started,
    )
    artifact = OnnxArtifact(
        path=out_path,
        opset=graph_opset(fused),
        input_name=fused.graph.input[0].name,
        exporter=source.exporter,
        dynamic_batch=source.dynamic_batch,
        op_counts=report.ops_after,
    )
    return artifact, report


def _compare(
    reference: Path, candidate: Path, contract: InputContract, batches: list[int]
) -> list[dict[str, Any]]:
    ref = OrtSession(reference)
    cand = OrtSession(candidate)
    checks = []
    for batch in batches:
        inputs = synthetic_images(contract, batch, seed=2000 + batch)
        expected = ref.run(inputs)
        try:
            got = cand.run(inputs)
            fid = compare_outputs(expected, got)
        except Exception as exc:  # a fused graph that no longer runs or changed shape
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            checks.append({"batch": batch, "violations": [f"fails: {first}"]})
            continue
        checks.append(
            {
                "batch": batch,
                "cosine": fid.cosine,
                "rel_err": fid.rel_err,
                "violations": EXACT.violations(fid),
            }
        )
    return checks
