"""Golden accuracy metrics: real weights, real data, every backend and method in golden file.

tests/golden/accuracy.json holds, per run configuration, the expected metrics and a
tolerance. A change that costs accuracy fails here with the numbers. To record new
values after an intended change: DEPLOYKIT_UPDATE_GOLDEN=1 pytest tests/test_golden_accuracy.py
(then review the diff of the JSON file). Rows marked "slow" (minutes each on 2 cores) run
with -m slow or DEPLOYKIT_SLOW=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from deploykit import api
from deploykit.errors import GateError

GOLDEN = Path(__file__).parent / "golden" / "accuracy.json"
UPDATE = os.environ.get("DEPLOYKIT_UPDATE_GOLDEN") == "1"
CONFIGS: dict[str, Any] = json.loads(GOLDEN.read_text())["runs"]


def _skip_reason(config: dict[str, Any]) -> str | None:
    from deploykit.backends.registry import get_backend
    from deploykit.harness.evalsets import find_manifest, origin_root
    from deploykit.models.catalogue import get_model_spec

    availability = get_backend(config["target"]).is_available()
    if not availability.ok:
        return availability.message()
    spec = get_model_spec(config["model"])
    try:
        assert spec.pretrained is not None
        spec.pretrained.path()
        for name in spec.pretrained.eval_sets:
            for source in find_manifest(name).files:
                origin_root(source.origin)
    except Exception as exc:  # the data extra or the Debian package is missing
        return f"real weights or data not installed: {exc}"
    return None


def _params() -> list[Any]:
    # The costliest rows (histogram calibration of a real ImageNet net) run with -m slow.
    return [
        pytest.param(key, marks=[pytest.mark.slow] if CONFIGS[key].get("slow") else [], id=key)
        for key in sorted(CONFIGS)
    ]


@pytest.mark.parametrize("key", _params())
def test_golden_accuracy(key: str, tmp_path: Path) -> None:
    config = CONFIGS[key]
    reason = _skip_reason(config)
    if reason:
        pytest.skip(reason)
    request = api.ExportRequest(
        model=config["model"],
        target=config["target"],
        precision=config["precision"],
        calib_method=config.get("calib_method", "minmax"),
        calib_samples=config.get("calib_samples", 256),
        per_channel=config.get("per_channel", True),
        out=str(tmp_path),
        runs=3,
        warmup=1,
        min_seconds=0.0,
        fidelity_samples=4,
        fallback=False,
        max_accuracy_drop=100.0,  # judged here against the golden numbers instead
    )
    try:
        report = api.export(request).report
    except GateError as exc:
        pytest.fail(f"{key}: {exc}")
    assert report.accuracy is not None
    measured = {
        name: {metric: round(float(result[metric]), 3) for metric in config["expect"][name]}
        for name, result in report.accuracy.items()
        if name in config["expect"]
    }
    if UPDATE:
        data = json.loads(GOLDEN.read_text())
        for name, metrics in measured.items():
            for metric, value in metrics.items():
                data["runs"][key]["expect"][name][metric]["value"] = value
        GOLDEN.write_text(json.dumps(data, indent=2) + "\n")
        return
    worse = []
    for name, metrics in config["expect"].items():
        for metric, golden in metrics.items():
            value = measured[name][metric]
            if value < golden["value"] - golden["tolerance"]:
                worse.append(
                    f"{name} {metric} {value:.2f} < golden {golden['value']:.2f} "
                    f"- {golden['tolerance']:g}"
                )
    assert not worse, f"{key} lost accuracy: " + "; ".join(worse)
