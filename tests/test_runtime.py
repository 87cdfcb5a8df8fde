"""deploykit.runtime: torch-free loading, harness-identical preprocessing, inputs, refusals."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit import api
from deploykit.backends.registry import get_backend
from deploykit.cli import main
from deploykit.errors import UserError
from deploykit.harness.datasets import preprocess as harness_preprocess
from deploykit.models.contract import InputContract
from deploykit.package.archive import BundleError, read_bundle, write_bundle
from deploykit.runtime import load
from deploykit.runtime.model import run_in_batches
from deploykit.runtime.preprocess import ImageSpec
from deploykit.runtime.preprocess import preprocess as runtime_preprocess

pytestmark = pytest.mark.onnxruntime

FAST = {"runs": 5, "warmup": 1, "min_seconds": 0.05, "fidelity_samples": 4, "eval_data": []}


def _bundle(out: Path, target: str, fmt: str) -> Path:
    request = api.ExportRequest(
        model="fmnist_squeezenet",
        target=target,
        precision="int8",
        out=str(out),
        calib="synthetic",
        calib_samples=16,
        **FAST,  # type: ignore[arg-type]
    )
    run_dir = api.export(request).run_dir
    path = out / f"{target}-{fmt}.dkb"
    result = CliRunner().invoke(main, ["package", str(run_dir), "-f", fmt, "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("rt")
    found = {"onnx": _bundle(out, "onnxruntime", "onnx")}
    if get_backend("openvino").is_available().ok:
        found["openvino"] = _bundle(out, "openvino", "openvino")
    return found


# Fails the subprocess as soon as anything tries to import torch (or a module that would
# pull in the workstation side of deploykit), then checks what was imported at the end.
_PROBE = """
import importlib.abc, sys
BLOCKED = ("torch", "torchvision", "pydantic", "onnx", "deploykit.models", "deploykit.harness",
           "deploykit.backends", "deploykit.api", "click", "yaml")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"the runtime imported {name}")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
import deploykit.runtime
lazy = [m for m in ("onnxruntime", "openvino", "PIL", "tensorrt") if m in sys.modules]
assert not lazy, f"imported before load: {lazy}"
from deploykit.runtime import load
model = load(sys.argv[1])
image = (np.arange(40 * 50 * 3) % 251).astype(np.uint8).reshape(40, 50, 3)
scores = model.predict(image)
best = model.top_k(image, k=2)
check = model.reference_check()
assert check is not None and check["passed"], check
assert "torch" not in sys.modules
print("OK", scores.shape, best[0].label)
"""


@pytest.mark.parametrize("fmt", ["onnx", pytest.param("openvino", marks=pytest.mark.openvino)])
def test_runtime_runs_a_bundle_without_torch(bundles: dict[str, Path], fmt: str) -> None:
    if fmt not in bundles:
        pytest.skip(f"no {fmt} bundle here")
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(bundles[fmt])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK (10,)" in proc.stdout


CONTRACTS = [
    InputContract(height=32, width=32, resize=36),
    InputContract(height=24, width=40, resize=40, interpolation="bicubic"),
    InputContract(height=32, width=32, resize=32, interpolation="nearest"),
    InputContract(channels=1, height=32, width=32, resize=32, mean=(0.286,), std=(0.353,)),
]


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.describe())
def test_runtime_preprocessing_is_the_harness_preprocessing(contract: InputContract) -> None:
    rng = np.random.default_rng(0)
    spec = ImageSpec.from_manifest(contract.to_dict())
    for shape in [(48, 64, 3), (100, 37, 3), (32, 32, 3), (17, 90, 3)]:
        image = (rng.random(shape) * 255).astype(np.uint8)
        want = harness_preprocess(image, contract)
        assert np.array_equal(runtime_preprocess(image, spec), want)
        assert np.array_equal(runtime_preprocess(image, contract), want)


def test_every_input_kind_gives_the_same_scores(bundles: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    model = load(bundles["onnx"])
    rng = np.random.default_rng(1)
    image = (rng.random((40, 44, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    base = model.predict(image)
    assert base.shape == (10,) and base.dtype == np.float32
    assert np.array_equal(model.predict(tmp_path / "x.png"), base)
    assert np.array_equal(model.predict(str(tmp_path / "x.png")), base)
    assert np.array_equal(model.predict(Image.fromarray(image)), base)
    tensor = model.preprocess(image)
    assert tensor.shape == (1, 32, 32)
    assert np.array_equal(model.predict(tensor), base)
    batch = model.predict([image, image[::-1], tensor])
    assert batch.shape == (3, 10)
    assert np.array_equal(batch[0], base) and np.array_equal(batch[2], base)
    assert np.array_equal(model.predict(np.stack([tensor, tensor])), np.stack([base, base]))
    gray = image[:, :, 0]
    assert np.array_equal(model.predict(gray), model.predict(np.dstack([gray] * 3)))
    with pytest.raises(UserError, match="shape"):
        model.predict(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(UserError, match="uint8"):
        model.predict(np.zeros((32, 32, 3), np.int64))
    top = model.top_k(image, k=3)
    assert [p.index for p in top] == list(np.argsort(-base)[:3])
    assert abs(sum(p.score for p in model.top_k(image, k=10)) - 1.0) < 1e-5
    assert all(isinstance(p.label, str) for p in top)


def test_static_batches_are_split_and_padded() -> None:
    seen: list[int] = []

    def infer(batch: np.ndarray) -> np.ndarray:
        assert len(batch) == 2
        seen.append(len(batch))
        return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)

    inputs = np.arange(5 * 4, dtype=np.float32).reshape(5, 1, 2, 2)
    out = run_in_batches(infer, inputs, 2)
    assert seen == [2, 2, 2]
    assert np.array_equal(out, inputs.reshape(5, -1).sum(axis=1, keepdims=True))


def _resign(source: Path, dest: Path, change: Any) -> Path:
    loaded = read_bundle(source)
    manifest = json.loads(json.dumps(loaded.manifest))
    files = dict(loaded.files)
    change(manifest, files)
    manifest["files"] = {
        n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()
    }
    write_bundle(dest, manifest, files)
    return dest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m, f: m["backend"].update(min_version="99.1"), r"needs onnxruntime >= 99\.1"),
        (lambda m, f: m.update(format="tflite"), "format 'tflite'"),
        (lambda m, f: m["backend"].update(name="openvino"), "cannot run on backend"),
        (lambda m, f: m["input"].update(mean=[0.1, 0.2]), "one number per channel"),
        (lambda m, f: m["input"].pop("height"), "input.height"),
        (lambda m, f: m["input"].update(layout="NHWC"), "NCHW"),
        (lambda m, f: f.update({"model.onnx": b"not a model"}), "cannot load"),
    ],
)
def test_the_runtime_refuses_what_it_cannot_run(
    bundles: dict[str, Path], tmp_path: Path, change: Any, message: str
) -> None:
    bad = _resign(bundles["onnx"], tmp_path / "bad.dkb", change)
    with pytest.raises(BundleError, match=message):
        load(bad)


def test_the_runtime_refuses_a_tampered_bundle(bundles: dict[str, Path], tmp_path: Path) -> None:
    loaded = read_bundle(bundles["onnx"])
    files = dict(loaded.files)
    model = bytearray(files["model.onnx"])
    model[-1] ^= 1
    files["model.onnx"] = bytes(model)
    bad = tmp_path / "t.dkb"
    write_bundle(bad, loaded.manifest, files)
    with pytest.raises(BundleError, match="does not match its sha256"):
        load(bad)


@pytest.mark.slow
def test_cold_start_of_mobilenet_v2_int8_is_under_1_5_s(tmp_path: Path) -> None:
    path = _bundle_full(tmp_path)
    code = (
        "import time; t = time.perf_counter()\n"
        "import numpy as np\nfrom deploykit.runtime import load\n"
        "m = load(__import__('sys').argv[1]); m.predict(np.zeros((300, 400, 3), np.uint8))\n"
        "print(time.perf_counter() - t)"
    )
    times = []
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
        )
        times.append(float(proc.stdout.strip()))
    assert min(times) < 1.5, times


def _bundle_full(out: Path) -> Path:
    # Random weights as built (no BatchNorm re-estimation): synthetic calibration then
    # passes the INT8 fidelity gate; the cold start does not depend on weight values.
    fields = api.ExportRequest.__dataclass_fields__
    keep: dict[str, Any] = {"bn_recalibrate": False} if "bn_recalibrate" in fields else {}
    request = api.ExportRequest(
        model="mobilenet_v2",
        target="onnxruntime",
        precision="int8",
        out=str(out),
        calib="synthetic",
        calib_samples=128,
        **FAST,  # type: ignore[arg-type]
        **keep,
    )
    run_dir = api.export(request).run_dir
    path = out / "mobilenet_v2.dkb"
    result = CliRunner().invoke(main, ["package", str(run_dir), "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


def test_verify_and_inspect_commands_do_not_import_torch(bundles: dict[str, Path]) -> None:
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom deploykit.cli import main\n"
        "for args in (['verify', sys.argv[1]], ['inspect', sys.argv[1]]):\n"
        "    result = CliRunner().invoke(main, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "print('HEAVY=' + ','.join(m for m in ('torch', 'torchvision') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(bundles["onnx"])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY=\n" in proc.stdout, proc.stdout
