"""A `deploykit calibrate` folder as the model of `deploykit export`: its Q/DQ file, as written.

Calibrate once, compile everywhere: ``deploykit calibrate MODEL --calib DATA -o DIR``
writes the Q/DQ ONNX file, the FP32 ONNX model it came from and ``calibration.json``
(model, input contract, calibration method and data, sha256 of every file). Then
``deploykit export DIR --target T`` compiles that file on T, here or on another machine
(a TensorRT box), without calibration data and without calibrating again: the run's
``model.int8.qdq.onnx`` is the folder's, byte for byte. Accuracy and fidelity are
measured against the folder's FP32 ONNX model on ONNX Runtime (the calibrate run
checked that export against PyTorch).

What the calibration fixed cannot change here: options that would need a new Q/DQ
file (calibration data, method, encoding, float layers, input size, batch...) are
refused with the `deploykit calibrate` option to use instead, and the accuracy
fallback cannot run (it recalibrates): a missed budget fails the run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit.errors import UserError
from deploykit.fsutil import sha256_file
from deploykit.harness.report import Report
from deploykit.models.contract import InputContract
from deploykit.models.loaders import ModelSource
from deploykit.pipeline.records import record_stage
from deploykit.pipeline.request import ExportRequest, Step

RECORD = "calibration.json"
QDQ = "model.int8.qdq.onnx"
FILES = ("model.onnx", "model.fused.onnx", QDQ)

# Request fields a calibration folder fixes, with the option that sets them.
FIXED = {
    "weights": "--weights",
    "input_size": "--input-size",
    "dynamic_batch": "--dynamic-batch",
    "opset": "--opset",
    "exporter": "--exporter",
    "calib": "--calib",
    "calib_method": "--calib-method",
    "calib_samples": "--calib-samples",
    "calib_percentile": "--calib-percentile",
    "per_channel": "--per-tensor",
    "bias_correction": "--bias-correction",
    "weight_rounding": "--weight-rounding",
    "calib_cache": "--no-calib-cache",
    "quantizer": "--quantizer",
    "int8_encoding": "--int8-encoding",
    "exact_residuals": "--exact-residuals",
    "overflow_fix": "--overflow-fix",
    "keep_float": "--keep-float",
    "bn_recalibrate": "--bn-recalibrate",
}


@dataclass(frozen=True)
class CalibrationFolder:
    """A checked `deploykit calibrate` output folder.

    Attributes:
        folder: The folder.
        record: Its calibration.json.
    """

    folder: Path
    record: dict[str, Any]

    @property
    def encoding(self) -> str:
        """The Q/DQ file's encoding: s8s8, u8s8 or mixed."""
        return str(self.record["calibration"]["encoding"])

    def source(self) -> ModelSource:
        """The model the folder was calibrated from."""
        return ModelSource.from_dict(self.record["model_source"])

    def contract(self) -> InputContract:
        """The input contract the folder was calibrated for."""
        return InputContract.from_dict(self.record["input"])


def folder_of(model: str) -> Path | None:
    """The calibration folder `model` names (the folder or its Q/DQ file), else None."""
    path = Path(model)
    if path.is_file() and path.name == QDQ:
        path = path.parent
    return path if path.is_dir() and (path / RECORD).is_file() else None


def find(model: str) -> CalibrationFolder | None:
    """The checked calibration folder `model` names (see `folder_of`), else None.

    Raises:
        UserError: A calibration folder that cannot be used as it is (see `load`).
    """
    folder = folder_of(model)
    return load(folder) if folder is not None else None


def load(folder: Path) -> CalibrationFolder:
    """Read `folder`'s calibration.json and check every file against its sha256.

    Raises:
        UserError: Unreadable or foreign record, a missing file, or one that changed.
    """
    fix = f"write it again with `deploykit calibrate ... -o {folder}`"
    try:
        record = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{folder / RECORD} cannot be read ({exc}); {fix}") from exc
    keys = ("model_source", "input", "calibration", "artifacts")
    if not isinstance(record, dict) or record.get("kind") != "calibration":
        raise UserError(f"{folder / RECORD} is not a deploykit calibration record; {fix}")
    if any(not isinstance(record.get(key), dict) for key in keys):
        missing = [key for key in keys if not isinstance(record.get(key), dict)]
        raise UserError(f"{folder / RECORD} lacks {', '.join(missing)}; {fix}")
    for name in FILES:
        path = folder / name
        expected = record["artifacts"].get(name)
        if not path.is_file():
            raise UserError(f"{path} is missing from the calibration folder; {fix}")
        if expected != sha256_file(path):
            raise UserError(
                f"{path} is not the file calibration.json records (sha256 differs): it "
                f"was changed after calibration; {fix}"
            )
    return CalibrationFolder(folder=folder, record=record)


def check_request(request: ExportRequest, found: CalibrationFolder, caps: Any) -> None:
    """Refuse what the folder's Q/DQ file cannot give.

    Raises:
        UserError: A precision other than int8, an option the calibration fixed, a batch
            the file was not exported for, or an encoding the target cannot build.
    """
    where = found.folder
    if request.precision != "int8":
        raise UserError(
            f"{where} holds an INT8 Q/DQ model: use --precision int8 (or leave it out), "
            "or export the FP32 model by name"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(ExportRequest)}
    for name, flag in FIXED.items():
        if getattr(request, name) != defaults[name]:
            raise UserError(
                f"{flag} is fixed by the calibration in {where}: pass it to "
                "`deploykit calibrate` and compile the new folder"
            )
    if request.batch not in (None, 1):
        raise UserError(f"{where} was exported at batch 1: drop --batch {request.batch}")
    if caps.int8_encoding == "s8s8" and found.encoding != "s8s8":
        raise UserError(
            f"{where} holds a {found.encoding} Q/DQ file; {request.target} builds only the "
            "portable symmetric one: `deploykit calibrate ... --encoding s8s8`"
        )


def stage(report: Report, work: Path, found: CalibrationFolder, caps: Any, on_step: Step) -> Path:
    """Copy the folder's models into the run folder and record its calibration.

    Returns:
        The run folder's Q/DQ file, to compile.
    """
    on_step(f"reading the calibration in {found.folder}")
    started = time.perf_counter()
    for name in FILES:
        shutil.copyfile(found.folder / name, work / name)
    details = {
        **found.record["calibration"],
        "from": str(found.folder.resolve()),
        "fallback": "off: the Q/DQ file is compiled as written",
    }
    record_stage(report, "calibrate", started, work, work / QDQ, details)
    report.notes.append(
        f"INT8 from the calibration folder {found.folder} ({found.record['calibration']['method']}"
        f", {found.encoding}), compiled as written; accuracy and fidelity against its FP32 ONNX "
        "model on ONNX Runtime"
    )
    if caps.int8_encoding and found.encoding != caps.int8_encoding:
        report.notes.append(
            f"the Q/DQ file is {found.encoding}; {report.target} runs {caps.int8_encoding} "
            f"fastest: `deploykit calibrate ... --encoding {caps.int8_encoding}`"
        )
    return work / QDQ
