"""Full-size acceptance runs (slow: `DEPLOYKIT_SLOW=1 pytest` or `pytest -m slow`).

resnet50 at 224x224 through the whole pipeline on each CPU runtime, with the
issue's acceptance figures: under 90 s wall, FP32 cosine >= 0.9999 and top-1
agreement >= 99% against PyTorch on 100 inputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deploykit import api


@pytest.mark.slow
@pytest.mark.parametrize(
    "target",
    [
        pytest.param("openvino", marks=pytest.mark.openvino),
        pytest.param("onnxruntime", marks=pytest.mark.onnxruntime),
    ],
)
def test_resnet50_end_to_end(target: str, tmp_path: Path) -> None:
    started = time.perf_counter()
    result = api.export(api.ExportRequest(model="resnet50", target=target, out=str(tmp_path)))
    wall = time.perf_counter() - started
    report = result.report
    assert report.status == "ok"
    assert report.effective_precision == "fp32"
    assert report.fidelity is not None and report.latency is not None
    assert report.fidelity["samples"] == 100
    assert report.fidelity["cosine"] >= 0.9999
    assert report.fidelity["top1_agreement"] >= 0.99
    assert wall < 90, f"{target}: {wall:.1f} s"
