"""`deploykit eval`: a run folder's compiled artifact on a data set, against a reference."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from deploykit.backends.registry import require_backend
from deploykit.errors import UserError
from deploykit.harness.accuracy import EvalGates
from deploykit.harness.report import gate_status, load_report
from deploykit.models.loaders import load_torch
from deploykit.pipeline.records import REFERENCE_BATCH, fp32_reference
from deploykit.pipeline.request import Step, quiet


def evaluate(
    run_dir: str | Path,
    data: str,
    samples: int | None = None,
    save: bool = True,
    against: str | Path | None = None,
    stability: int = 0,
    gates: EvalGates | None = None,
    on_step: Step = quiet,
) -> dict[str, Any]:
    """Evaluate a run folder's compiled artifact on a set, next to the FP32 reference.

    With `against`, the reference is another run folder's artifact instead (e.g. the
    OpenVINO INT8 model against the ONNX Runtime one built from the same statistics);
    the labels, where the set has them, still score both.

    Args:
        run_dir: A run folder made by ``deploykit export``.
        data: A set name (``deploykit datasets``), a manifest, or an image folder with
            labels (sub-folder names or a labels file).
        samples: Inputs to use; None = the whole set.
        save: Record the result in the run's report.json under ``accuracy`` (not with
            `against`).
        against: Another run folder whose artifact is the reference.
        stability: Also run this many copies of the set with each input moved by one
            grey level in one value, and compare the artifact with itself
            (`deploykit.harness.stability`): the floor for any agreement figure.
        gates: Thresholds to check against the reference; the result lists each gate
            and its ``status`` is ``ok`` or ``failed: <gates>`` (the caller decides
            what a failure does: the CLI exits 1).

    Returns:
        The evaluation (see :class:`deploykit.harness.evaluate.Evaluation`), its
        gates and status.

    Raises:
        UserError: A negative `stability`, a threshold out of range, a drop budget on
            a set without labels, or a run folder or set that cannot be read.
    """
    from deploykit.backends.base import CompiledArtifact
    from deploykit.harness.datasets import load_eval_data
    from deploykit.harness.evaluate import evaluate_outputs, run_batched
    from deploykit.models.loaders import ModelSource
    from deploykit.stages import bnrecal

    if stability < 0:
        raise UserError(f"--stability takes a number of draws (0 = off), got {stability}")
    gates = gates or EvalGates()
    gates.validate()
    folder = Path(run_dir)
    report = load_report(folder)
    backend = require_backend(report.target)
    artifact = CompiledArtifact.load(folder / report.backend_folder())
    source = ModelSource.from_dict(report.model_source)
    on_step(f"loading {data}")
    dataset = load_eval_data(data, artifact.contract, samples)
    if gates.max_accuracy_drop is not None and dataset.labels is None:
        raise UserError(
            f"--max-accuracy-drop needs a labelled set and {data} has no labels: "
            "gate on --min-agreement instead"
        )
    batch = int(report.input.get("batch", 1))
    on_step(f"evaluating {dataset.inputs.shape[0]} inputs")
    if against is not None:
        other_dir = Path(against)
        other = load_report(other_dir)
        other_artifact = CompiledArtifact.load(other_dir / other.backend_folder())
        with require_backend(other.target).runner(other_artifact) as other_runner:
            reference_outputs = run_batched(
                other_runner.infer, dataset.inputs, int(other.input.get("batch", 1))
            )
        label = f"{other.target} {other.precision} ({other_dir})"
        short = f"{other.target} {other.precision}"
        save = False
    else:
        module = load_torch(source) if source.is_torch else None
        if module is not None and report.weights == bnrecal.WEIGHTS_LABEL:
            # The run exported the re-estimated model: rebuild the same reference.
            bnrecal.recalibrate_model(module, source.ref, artifact.contract, seed=source.seed)
        reference, label = fp32_reference(module, folder / "model.onnx")
        short = "fp32"
        reference_outputs = run_batched(
            reference, dataset.inputs, REFERENCE_BATCH if module is not None else batch
        )
    with backend.runner(artifact) as runner:
        started = time.perf_counter()
        outputs = run_batched(runner.infer, dataset.inputs, batch)
        result = evaluate_outputs(
            outputs, reference_outputs, dataset, label, time.perf_counter() - started
        )
        if stability:
            from deploykit.harness.stability import measure_stability

            on_step(f"stability: {stability} one-grey-level draws")
            contract = artifact.contract
            steady = measure_stability(
                runner.infer,
                dataset.inputs,
                contract.mean,
                contract.std,
                batch,
                stability,
                base=outputs,
            )
            result = dataclasses.replace(result, stability=steady.to_dict())
    if save:
        report.accuracy = {**(report.accuracy or {}), result.dataset: result.to_dict()}
        report.save(folder)
    checked = gates.check(result.to_dict(), short)
    return {
        "schema_version": 1,
        "kind": "eval",
        "run_dir": str(folder),
        "model": report.model,
        "target": report.target,
        "precision": report.precision,
        "evaluation": result.to_dict(),
        "summary": result.summary(),
        "gates": [g.model_dump() for g in checked],
        "status": gate_status(checked),
    }
