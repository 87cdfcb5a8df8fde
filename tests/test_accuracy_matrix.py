"""scripts/accuracy_matrix.py: per-backend rows, and the two backends scored against each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deploykit.harness import fashion_mnist

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "accuracy_matrix.py"


def _matrix(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900
    )


def test_cross_backend_needs_both_backends() -> None:
    done = _matrix("--models", "fmnist_lenet5", "--targets", "openvino", "--cross-backend")
    assert done.returncode == 2
    assert "--cross-backend needs --targets onnxruntime openvino" in done.stderr


def test_an_unknown_model_is_one_line_and_exit_2() -> None:
    done = _matrix("--models", "no_such_model", "--no-fp32")
    assert done.returncode == 2
    assert done.stderr.startswith("error: unknown model 'no_such_model'")
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(
    not fashion_mnist.is_available(),
    reason=f"Fashion-MNIST not found in {fashion_mnist.data_dir()}: "
    "apt-get install dataset-fashion-mnist (or run scripts/setup.sh)",
)
def test_cross_backend_scores_openvino_against_onnxruntime(tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    done = _matrix(
        "--models", "fmnist_lenet5", "--methods", "minmax", "--no-fp32",
        "--cross-backend", "--weight-rounding", "gptq", "--json", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    per_backend = [r for r in rows if r.get("kind") != "cross-backend"]
    assert {r["target"] for r in per_backend} == {"onnxruntime", "openvino"}
    (pair,) = [r for r in rows if r.get("kind") == "cross-backend"]
    assert (pair["set"], pair["samples"]) == ("fashion-mnist-test", 10_000)
    assert (pair["method"], pair["weight_rounding"]) == ("minmax", "gptq")
    # OpenVINO's run, scored against ONNX Runtime's (not against FP32, nor itself).
    assert "/openvino-int8" in pair["run"]
    assert pair["reference"].startswith("onnxruntime int8")
    # LeNet-5 has no residual Add, so the two files of one calibration (GPTQ rounds both
    # files' weights to the same codes) agree all but exactly (measured with nearest
    # rounding: 100.00% top-1, cosine mean 1.00000, smallest 0.99997).
    assert pair["top1_agreement"] >= 99.9
    assert pair["decisive_agreement"] >= 99.9
    assert pair["cosine_mean"] >= 0.9999
    assert "| fmnist_lenet5 | fashion-mnist-test | minmax | per-channel | gptq |" in done.stdout
