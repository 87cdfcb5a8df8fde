"""report.json: the stable, versioned contract CI jobs and other tools read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deploykit.errors import UserError
from deploykit.fsutil import write_json_atomic

SCHEMA_VERSION = 1
REPORT_FILE = "report.json"


class StageRecord(BaseModel):
    """One pipeline stage: how long it took and what it produced."""

    model_config = ConfigDict(extra="forbid")

    name: str
    seconds: float
    artifact: str | None = None
    size_bytes: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class Gate(BaseModel):
    """One checked gate."""

    model_config = ConfigDict(extra="forbid")

    name: str
    passed: bool
    detail: str


def gate_status(gates: Sequence[Gate]) -> str:
    """``ok``, or ``failed: <names>`` of the gates that failed."""
    failed = [g.name for g in gates if not g.passed]
    return "failed: " + ", ".join(failed) if failed else "ok"


def gate_failures(gates: Sequence[Gate]) -> str:
    """The failed gates with their numbers, for a GateError's one line ("" if none)."""
    return "; ".join(f"{g.name} gate failed ({g.detail})" for g in gates if not g.passed)


class Report(BaseModel):
    """The run report. Additive changes keep `schema_version`; breaking ones bump it."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    model: str
    model_source: dict[str, Any]
    target: str
    device: dict[str, Any]
    precision: str
    effective_precision: str | None = None
    weights: str
    notes: list[str] = Field(default_factory=list)
    input: dict[str, Any]
    versions: dict[str, str | None]
    stages: list[StageRecord] = Field(default_factory=list)
    latency: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None
    fidelity_reference: str | None = None
    accuracy: dict[str, Any] | None = None
    fallback: dict[str, Any] | None = None
    backend: dict[str, Any] = Field(default_factory=dict)
    gates: list[Gate] = Field(default_factory=list)
    status: str = "ok"
    artifacts: dict[str, str] = Field(default_factory=dict)
    created: str

    def backend_folder(self) -> str:
        """Name of the backend artifact's folder inside the run folder."""
        return str(self.backend.get("folder", self.target))

    def save(self, folder: Path) -> Path:
        """Write report.json atomically into `folder`."""
        path = folder / REPORT_FILE
        write_json_atomic(path, self.model_dump(mode="json"))
        return path


def load_report(folder: Path) -> Report:
    """Read and validate a run folder's report.json.

    Raises:
        UserError: Missing, corrupt or incompatible report.
    """
    path = folder / REPORT_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} has no {REPORT_FILE}; pass a run folder made by deploykit export"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; re-run deploykit export") from exc
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path} has schema_version {version}, this deploykit reads {SCHEMA_VERSION}; "
            "re-run deploykit export"
        )
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path} is not a valid report: {exc.errors()[0]['msg']}") from exc
