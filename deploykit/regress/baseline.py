"""Baseline and measurement files: a versioned JSON schema shared by `bench` and `regress`.

A measurement set holds, per model/target/precision/batch, the latency of
several independent rounds (each the p50 of many runs), the reference
workload's latency in the same rounds, accuracy figures from the run's report,
and the environment that measured it. A baseline is a measurement set that a
user chose to keep.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from deploykit.errors import UserError
from deploykit.fsutil import write_json_atomic

SCHEMA_VERSION = 1
KIND: Literal["deploykit-measurements"] = "deploykit-measurements"


class EntryLatency(BaseModel):
    """Latency of one entry over rounds (ms)."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    round_p50s_ms: list[float]
    reference_round_p50s_ms: list[float]
    round_p10s_ms: list[float]
    round_mins_ms: list[float]
    reference_round_p10s_ms: list[float]


class Entry(BaseModel):
    """One measured artifact."""

    model: str
    target: str
    precision: str
    batch: int
    threads: int
    latency: EntryLatency
    accuracy: dict[str, float] = Field(default_factory=dict)
    run_dir: str | None = None
    artifact_sha256: str | None = None
    backend_version: str | None = None

    @property
    def key(self) -> str:
        """Identity of the entry across baseline and current measurements."""
        return entry_key(self.model, self.target, self.precision, self.batch)

    def normalised_rounds(self) -> list[float]:
        """Each round's p50 divided by the reference workload's p50 of the same round."""
        lat = self.latency
        return [m / r for m, r in zip(lat.round_p50s_ms, lat.reference_round_p50s_ms, strict=True)]


class Measurements(BaseModel):
    """A set of entries and the environment that measured them (also the baseline format)."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["deploykit-measurements"] = KIND
    created: str
    environment: dict[str, Any]
    reference_workload: str
    rounds: int
    entries: dict[str, Entry]
    # Baseline artifacts re-measured in the same rounds as `entries` (same keys); never saved.
    paired: dict[str, Entry] = Field(default_factory=dict, exclude=True)

    def save(self, path: Path) -> None:
        """Write atomically."""
        write_json_atomic(path, self.model_dump(mode="json"))


def entry_key(model: str, target: str, precision: str, batch: int) -> str:
    """``model/target-precision@bN``."""
    return f"{model}/{target}-{precision}@b{batch}"


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def load_measurements(path: Path, what: str = "baseline") -> Measurements:
    """Read a baseline or measurement file; any problem is a one-line UserError.

    Raises:
        UserError: Missing, unreadable, corrupt, wrong schema or inconsistent file.
    """
    if not path.is_file():
        raise UserError(
            f"{what} {path} does not exist; record one with "
            "`deploykit regress --baseline FILE --run RUN_DIR... --update-baseline`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON ({exc}); re-record it") from exc
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} is not a deploykit measurement file; re-record it")
    if data.get("kind") == "bench":
        return from_bench(data, path)
    if data.get("kind") == "bench-compare":
        raise UserError(
            f"{what} {path} compares several run folders; measure one folder per file "
            "(`deploykit bench RUN_DIR --json`) or pass the folders with --run"
        )
    version = data.get("schema_version")
    if data.get("kind") != KIND or version != SCHEMA_VERSION:
        raise UserError(
            f"{what} {path} has kind {data.get('kind')!r} schema_version {version}, this "
            f"deploykit reads {KIND!r} version {SCHEMA_VERSION}; re-record it"
        )
    try:
        result = Measurements.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{what} {path} is not valid at {where}: {err['msg']}") from exc
    for key, entry in result.entries.items():
        lat = entry.latency
        if key != entry.key:
            raise UserError(f"{what} {path}: entry {key!r} describes {entry.key!r}")
        if not lat.round_p50s_ms or len(lat.round_p50s_ms) != len(lat.reference_round_p50s_ms):
            raise UserError(f"{what} {path}: entry {key!r} has no or mismatched rounds")
        if min(lat.round_p50s_ms + lat.reference_round_p50s_ms) <= 0:
            raise UserError(f"{what} {path}: entry {key!r} has non-positive latencies")
    return result


def from_bench(data: dict[str, Any], path: Path) -> Measurements:
    """Turn the output of `deploykit bench --json` into a one-entry measurement set."""
    try:
        entry = Entry.model_validate(data["entry"])
        return Measurements(
            created=data["created"],
            environment=data["environment"],
            reference_workload=data["reference_workload"],
            rounds=len(entry.latency.round_p50s_ms),
            entries={entry.key: entry},
        )
    except (KeyError, TypeError, ValidationError) as exc:
        raise UserError(
            f"{path} is a bench result without round data; re-run `deploykit bench --json`"
        ) from exc


def merge(files: list[Measurements]) -> Measurements:
    """Merge several measurement sets (later files win on the same key)."""
    if not files:
        raise UserError("no measurements given: pass --current FILE or --run RUN_DIR")
    merged = files[0].model_copy(deep=True)
    for extra in files[1:]:
        merged.entries.update(extra.entries)
        merged.rounds = min(merged.rounds, extra.rounds)
    return merged
