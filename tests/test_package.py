"""Edge bundles: every format round trip, manifest, tamper cases, TensorRT compatibility."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from deploykit import api
from deploykit.backends.base import CompiledArtifact
from deploykit.backends.registry import get_backend
from deploykit.cli import main
from deploykit.harness.datasets import preprocess
from deploykit.harness.report import load_report
from deploykit.models.contract import InputContract
from deploykit.package.archive import (
    MANIFEST_NAME,
    BundleError,
    extract_bundle,
    read_bundle,
    write_bundle,
)
from deploykit.package.manifest import validate_manifest
from deploykit.runtime import compat, load

pytestmark = pytest.mark.onnxruntime

MODEL = "fmnist_mobilenet_v1"  # real weights and labels, 1x32x32: fast
FAST = {"runs": 5, "warmup": 1, "min_seconds": 0.05, "fidelity_samples": 4, "eval_data": []}


def _export(out: Path, target: str, precision: str) -> Path:
    request = api.ExportRequest(
        model=MODEL,
        target=target,
        precision=precision,
        out=str(out),
        calib="synthetic" if precision == "int8" else None,
        calib_samples=16,
        **FAST,  # type: ignore[arg-type]
    )
    return api.export(request).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("runs")
    found = {
        "ort-fp32": _export(out, "onnxruntime", "fp32"),
        "ort-int8": _export(out, "onnxruntime", "int8"),
    }
    if get_backend("openvino").is_available().ok:
        found["ov-int8"] = _export(out, "openvino", "int8")
    return found


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _run_outputs(run_dir: Path, images: list[np.ndarray]) -> np.ndarray:
    """What the run's own compiled artifact outputs for `images` (the reference)."""
    report = load_report(run_dir)
    contract = InputContract.from_dict(
        {k: v for k, v in report.input.items() if k not in ("batch", "dynamic_batch")}
    )
    artifact = CompiledArtifact.load(run_dir / report.backend_folder())
    with get_backend(report.target).runner(artifact) as runner:
        return np.concatenate([runner.infer(preprocess(i, contract)[None]) for i in images])


def _test_images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [
        (rng.random((40, 52, 3)) * 255).astype(np.uint8),
        (rng.random((32, 32, 3)) * 255).astype(np.uint8),
        np.full((64, 48, 3), 128, np.uint8),
    ]


@pytest.fixture(scope="module")
def packaged(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Package a run once per (run, format, options) through the CLI; later calls reuse it."""
    folder = tmp_path_factory.mktemp("bundles")
    done: dict[tuple[str, ...], tuple[Path, dict[str, Any]]] = {}

    def get(run: str, fmt: str, *options: str) -> tuple[Path, dict[str, Any]]:
        key = (run, fmt, *options)
        if key not in done:
            if run not in runs:
                pytest.skip(f"{run} run is not available here")
            bundle = folder / f"{'-'.join(key).replace('--', '')}.dkb"
            args = ["package", str(runs[run]), "--format", fmt, "-o", str(bundle), "--json"]
            result = _cli(*args, *options)
            assert result.exit_code == 0, result.output
            assert not list(folder.glob(".*")), "no staging file may be left behind"
            done[key] = (bundle, json.loads(result.stdout))
        return done[key]

    return get


AMD64 = ("--ort-platform", "amd64", "--no-type-reduction")
FORMAT_CASES = [
    ("ort-fp32", "onnx", (), 1e-5),
    ("ort-int8", "onnx", (), 1e-5),
    ("ort-int8", "ort-mobile", (), 1e-5),
    ("ort-fp32", "ort-mobile", AMD64, 1e-5),
    ("ort-fp32", "onnx-fp16", (), 2e-2),
    pytest.param("ov-int8", "openvino", (), 1e-5, marks=pytest.mark.openvino),
    pytest.param("ov-int8", "onnx", (), 0.1, marks=pytest.mark.openvino),
]


@pytest.mark.parametrize(("run", "fmt", "options", "rel_tol"), FORMAT_CASES)
def test_round_trip_package_verify_runtime(
    runs: dict[str, Path],
    packaged: Any,
    run: str,
    fmt: str,
    options: tuple[str, ...],
    rel_tol: float,
) -> None:
    bundle, result = packaged(run, fmt, *options)
    assert result["format"] == fmt and bundle.is_file()
    assert result["packaging_check"]["count"] == 2

    verified = _cli("verify", str(bundle), "--json")
    assert verified.exit_code == 0, verified.output
    checks = {c["name"]: c["passed"] for c in json.loads(verified.stdout)["checks"]}
    assert checks == dict.fromkeys(
        ["hashes", "manifest", "compatibility", "smoke", "reference"], True
    )

    model = load(bundle)
    images = _test_images()
    got = model.predict(images)
    want = _run_outputs(runs[run], images)
    scale = np.abs(want).max()
    assert got.shape == want.shape == (3, 10)
    assert np.abs(got - want).max() <= rel_tol * scale, (np.abs(got - want).max(), scale)
    if rel_tol <= 1e-5:
        assert (got.argmax(1) == want.argmax(1)).all()


def test_manifest_records_contract_measurements_and_hashes(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    run = runs["ort-int8"]
    bundle = tmp_path / "b.dkb"
    assert _cli("package", str(run), "-o", str(bundle)).exit_code == 0
    report = load_report(run)
    loaded = read_bundle(bundle)
    manifest = validate_manifest(loaded.manifest)
    assert manifest.schema_version == 1 and manifest.format == "onnx"
    assert manifest.precision == "int8" and manifest.backend.name == "onnxruntime"
    assert manifest.artifact.source_file == "model.int8.qdq.onnx"
    for key in ("channels", "height", "width", "resize", "interpolation", "color", "layout"):
        assert getattr(manifest.input, key) == report.input[key]
    assert manifest.input.mean == report.input["mean"]
    assert manifest.input.crop == [32, 32] and manifest.input.shape == [1, 1, 32, 32]
    assert manifest.output.num_classes == 10
    assert manifest.output.labels == "labels.txt" and manifest.output.label_set == "fashion-mnist"
    assert manifest.measured["latency"] == report.latency
    assert manifest.measured["fidelity"] == report.fidelity
    assert manifest.calibration is not None
    assert manifest.calibration["data"]["source"] == "synthetic"
    assert manifest.deploykit_version == report.versions["deploykit"]
    for name, entry in manifest.files.items():
        assert hashlib.sha256(loaded.files[name]).hexdigest() == entry.sha256
    qdq = (run / "model.int8.qdq.onnx").read_bytes()
    assert loaded.files["model.onnx"] == qdq
    top = load(bundle).top_k(np.full((32, 32, 3), 200, np.uint8), k=3)
    assert len(top) == 3 and top[0].label in loaded.files["labels.txt"].decode().splitlines()
    assert top[0].score >= top[1].score >= top[2].score

    shown = _cli("inspect", str(bundle))
    assert shown.exit_code == 0, shown.output
    assert "fashion-mnist" in shown.stdout and "model.onnx" in shown.stdout
    inspected = json.loads(_cli("inspect", str(bundle), "--json").stdout)
    assert inspected["bundle_id"] == loaded.manifest_sha256


def test_a_factory_models_own_class_count_is_packaged(tmp_path: Path) -> None:
    """A factory model's contract says nothing of its classes (default 1000): the bundle
    takes the count from the exported model's output, so `verify` passes."""
    run = api.export(
        api.ExportRequest(
            model="tinynets:tiny_net",
            target="onnxruntime",
            input_size=(32, 32),
            out=str(tmp_path / "out"),
            runs=3,
            warmup=1,
            min_seconds=0.0,
            fidelity_samples=4,
        )
    ).run_dir
    assert load_report(run).input["num_classes"] == 1000
    bundle = tmp_path / "tiny.dkb"
    assert _cli("package", str(run), "-o", str(bundle)).exit_code == 0
    assert validate_manifest(read_bundle(bundle).manifest).output.num_classes == 10
    verified = _cli("verify", str(bundle))
    assert verified.exit_code == 0, verified.output


def test_ort_mobile_carries_the_reduced_build_operator_config(packaged: Any) -> None:
    bundle, _ = packaged("ort-int8", "ort-mobile")
    loaded = read_bundle(bundle)
    config_name = loaded.manifest["artifact"]["operator_config"]
    assert config_name == "required_operators_and_types.config"
    config = loaded.files[config_name].decode()
    assert "ai.onnx;" in config and "QLinearConv" in config
    assert loaded.files["model.ort"][4:8] == b"ORTM"  # flatbuffer identifier of ORT format
    assert loaded.manifest["backend"]["settings"]["target_platform"] == "arm"
    amd, _ = packaged("ort-fp32", "ort-mobile", *AMD64)
    manifest = read_bundle(amd).manifest
    assert manifest["artifact"]["operator_config"] == "required_operators.config"
    assert manifest["backend"]["settings"]["target_platform"] == "amd64"


def test_int8_bundle_is_smaller(runs: dict[str, Path], tmp_path: Path) -> None:
    sizes = {}
    for name in ("ort-fp32", "ort-int8"):
        path = tmp_path / f"{name}.dkb"
        assert _cli("package", str(runs[name]), "-o", str(path), "--references", "0").exit_code == 0
        sizes[name] = path.stat().st_size
    assert sizes["ort-int8"] < 0.5 * sizes["ort-fp32"], sizes


def test_bad_package_input_is_exit_2(runs: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    cases = [
        ([str(tmp_path / "missing")], "report.json"),
        ([str(runs["ort-int8"]), "-f", "onnx-fp16"], "FP32"),
        ([str(runs["ort-int8"]), "-f", "openvino"], "--target openvino"),
        ([str(runs["ort-int8"]), "-f", "tensorrt"], "TensorRT engine"),
        ([str(runs["ort-int8"]), "--labels", str(labels)], "one name per class"),
        ([str(runs["ort-int8"]), "--references", "-1"], "--references"),
    ]
    for args, message in cases:
        out = tmp_path / "x.dkb"
        result = _cli("package", *args, "-o", str(out))
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not out.exists()


def test_a_run_file_changed_after_export_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["ort-int8"], run)
    with open(run / "model.int8.qdq.onnx", "ab") as handle:
        handle.write(b"\0")
    result = _cli("package", str(run), "-o", str(tmp_path / "x.dkb"))
    assert result.exit_code == 2 and "changed since the export" in result.stderr


# --- tamper cases -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bundle(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.dkb"
    result = _cli("package", str(runs["ort-int8"]), "-o", str(path))
    assert result.exit_code == 0, result.output
    return path


def _members(bundle: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    loaded = read_bundle(bundle)
    return copy.deepcopy(loaded.manifest), dict(loaded.files)


def _raw_tar(path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    path.write_bytes(gzip.compress(buffer.getvalue()))


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _with_extra(good: Path, path: Path, extra: tarfile.TarInfo, data: bytes | None = None) -> None:
    manifest, files = _members(good)
    entries = [_file(MANIFEST_NAME, json.dumps(manifest).encode()), (extra, data)]
    entries += [_file(n, d) for n, d in files.items()]
    _raw_tar(path, entries)


def _resign(path: Path, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
    manifest["files"] = {
        n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()
    }
    write_bundle(path, manifest, files)


def _tamper(kind: str, good: Path, bad: Path, outside: Path) -> None:
    manifest, files = _members(good)
    if kind == "absolute path":
        _with_extra(good, bad, *_file(str(outside / "evil"), b"x"))
    elif kind == "dot-dot":
        _with_extra(good, bad, *_file("../outside/evil", b"x"))
    elif kind == "symlink":
        info = tarfile.TarInfo("model.onnx")
        info.type, info.linkname = tarfile.SYMTYPE, str(outside / "target")
        _with_extra(good, bad, info)
    elif kind == "hard link":
        info = tarfile.TarInfo("labels.txt")
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        _with_extra(good, bad, info)
    elif kind == "device file":
        info = tarfile.TarInfo("labels.txt")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        _with_extra(good, bad, info)
    elif kind == "oversized member":
        entries = [_file(MANIFEST_NAME, json.dumps(manifest).encode())]
        for name, data in files.items():
            entries.append(_file(name, data + b"\0" * 4096 if name == "labels.txt" else data))
        _raw_tar(bad, entries)
    elif kind == "truncated archive":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "truncated tail":
        bad.write_bytes(good.read_bytes()[:-12])
    elif kind == "tampered file":
        model = bytearray(files["model.onnx"])
        model[len(model) // 2] ^= 0xFF
        files["model.onnx"] = bytes(model)
        write_bundle(bad, manifest, files)
    elif kind == "wrong hash":
        manifest["files"]["labels.txt"]["sha256"] = "0" * 64
        write_bundle(bad, manifest, files)
    elif kind == "unknown schema version":
        manifest["schema_version"] = 99
        entries = [_file(MANIFEST_NAME, json.dumps(manifest).encode())]
        _raw_tar(bad, entries + [_file(n, d) for n, d in files.items()])
    elif kind == "member not in manifest":
        _with_extra(good, bad, *_file("extra.bin", b"x"))
    elif kind == "manifest not first":
        entries = [_file(n, d) for n, d in files.items()]
        _raw_tar(bad, entries + [_file(MANIFEST_NAME, json.dumps(manifest).encode())])
    elif kind == "not a bundle":
        bad.write_bytes(b"definitely not a tar archive" * 10)
    else:  # pragma: no cover
        raise AssertionError(kind)


TAMPER_CASES = {
    "absolute path": "absolute path",
    "dot-dot": "outside the bundle",
    "symlink": "symbolic link",
    "hard link": "hard link",
    "device file": "device file",
    "oversized member": "manifest says",
    "truncated archive": "truncated",
    "truncated tail": "truncated",
    "tampered file": "sha256",
    "wrong hash": "sha256",
    "unknown schema version": "upgrade deploykit",
    "member not in manifest": "not in the manifest",
    "manifest not first": "does not start with manifest.json",
    "not a bundle": "not a bundle",
}


@pytest.mark.parametrize("kind", list(TAMPER_CASES))
def test_tampered_bundles_are_rejected_and_nothing_is_written(
    kind: str, good_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    bad = work / "bad.dkb"
    _tamper(kind, good_bundle, bad, outside)
    monkeypatch.chdir(work)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for command in ("verify", "inspect"):
        extra = ["--extract", str(work / "target")] if command == "verify" else []
        result = _cli(command, str(bad), *extra)
        assert result.exit_code == 2, (kind, command, result.output)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert TAMPER_CASES[kind] in result.stderr, result.stderr
    with pytest.raises(BundleError, match=TAMPER_CASES[kind]):
        load(bad)
    with pytest.raises(BundleError):
        extract_bundle(bad, work / "target")
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "a rejected bundle must write nothing"


def test_member_size_limit(good_bundle: Path) -> None:
    with pytest.raises(BundleError, match="oversized"):
        read_bundle(good_bundle, max_member_bytes=1000)


def test_verify_extracts_only_a_verified_bundle(good_bundle: Path, tmp_path: Path) -> None:
    target = tmp_path / "device" / "model"
    result = _cli("verify", str(good_bundle), "--extract", str(target))
    assert result.exit_code == 0, result.output
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    for name, entry in manifest["files"].items():
        assert hashlib.sha256((target / name).read_bytes()).hexdigest() == entry["sha256"]
    assert sorted(p.name for p in (tmp_path / "device").iterdir()) == ["model"]


def test_outputs_that_differ_from_the_reference_fail_the_gate(
    good_bundle: Path, tmp_path: Path
) -> None:
    manifest, files = _members(good_bundle)
    outputs = np.load(io.BytesIO(files["reference/outputs.npy"]))
    buffer = io.BytesIO()
    np.save(buffer, -outputs)
    files["reference/outputs.npy"] = buffer.getvalue()
    bad = tmp_path / "drift.dkb"
    _resign(bad, manifest, files)
    result = _cli("verify", str(bad))
    assert result.exit_code == 1, result.output
    assert "differ from the bundle's reference" in result.stderr and "cosine" in result.stderr


def test_incompatible_runtime_version_is_refused(good_bundle: Path, tmp_path: Path) -> None:
    manifest, files = _members(good_bundle)
    manifest["backend"]["min_version"] = "99.0"
    bad = tmp_path / "future.dkb"
    _resign(bad, manifest, files)
    with pytest.raises(BundleError, match=r"needs onnxruntime >= 99.0"):
        load(bad)
    result = _cli("verify", str(bad))
    assert result.exit_code == 2 and "upgrade onnxruntime" in result.stderr


def test_manifest_schema_is_validated(good_bundle: Path) -> None:
    manifest, _ = _members(good_bundle)
    validate_manifest(manifest)
    broken = [
        ("format", "tflite"),
        ("precision", "int4"),
        ("backend", {"name": "openvino"}),
        ("input", {**manifest["input"], "mean": [0.1, 0.2]}),
        ("artifact", {**manifest["artifact"], "files": ["absent.onnx"]}),
        ("output", {**manifest["output"], "num_classes": 0}),
    ]
    for key, value in broken:
        bad = copy.deepcopy(manifest)
        bad[key] = value
        with pytest.raises(BundleError, match="manifest is invalid"):
            validate_manifest(bad)
    del manifest["input"]
    with pytest.raises(BundleError, match="at input"):
        validate_manifest(manifest)


# --- TensorRT: packaging and the compatibility check (no TensorRT needed) ---------------------

ENGINE_META = {
    "tensorrt_version": "10.3.0",
    "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"},
    "precision": "int8",
    "strongly_typed": True,
    "profiles": {},
    "onnx_file": "model.int8.qdq.onnx",
    "onnx_sha256": "",
    "hardware_compatibility": "NONE",
    "schema_version": 1,
    "extra": {},
}


def _tensorrt_run(source: Path, dest: Path) -> Path:
    """A run folder laid out as the TensorRT target writes it (engine.plan + engine.json)."""
    shutil.copytree(source, dest)
    shutil.rmtree(dest / "onnxruntime")
    engine = dest / "tensorrt"
    engine.mkdir()
    (engine / "engine.plan").write_bytes(b"serialized-engine-bytes" * 100)
    (engine / "engine.json").write_text(json.dumps(ENGINE_META))
    report = json.loads((dest / "report.json").read_text())
    report["target"] = "tensorrt"
    report["backend"] = {"name": "tensorrt", "version": "10.3.0", "folder": "tensorrt"}
    report["artifacts"] = {
        str(p.relative_to(dest)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(dest.rglob("*"))
        if p.is_file() and p.name != "report.json"
    }
    (dest / "report.json").write_text(json.dumps(report))
    return dest


def test_tensorrt_engine_bundle_and_rebuild_message(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _tensorrt_run(runs["ort-int8"], tmp_path / "trt-run")
    bundle = tmp_path / "trt.dkb"
    result = _cli("package", str(run), "-o", str(bundle), "--json")
    assert result.exit_code == 0, result.output
    assert any("no reference outputs" in n for n in json.loads(result.stdout)["notes"])
    manifest = validate_manifest(read_bundle(bundle).manifest)
    assert manifest.format == "tensorrt" and manifest.device is not None
    assert manifest.device.gpu_name == "NVIDIA A100-SXM4-80GB"
    assert manifest.device.compute_capability == "8.0"
    assert manifest.device.tensorrt_version == "10.3.0"
    assert set(manifest.files) == {"engine.plan", "engine.json", "labels.txt"}
    assert _cli("inspect", str(bundle)).exit_code == 0
    if compat.gpu_fingerprint() is None:
        verified = _cli("verify", str(bundle))
        assert verified.exit_code == 2
        assert verified.stderr.count("\n") == 1 and "no NVIDIA GPU" in verified.stderr


@pytest.mark.parametrize(
    ("here", "problem"),
    [
        (
            {
                "gpu_name": "NVIDIA A100-SXM4-80GB",
                "compute_capability": "8.0",
                "tensorrt_version": "10.3.0",
            },
            None,
        ),
        (
            {"gpu_name": "NVIDIA H100", "compute_capability": "9.0", "tensorrt_version": "10.3.0"},
            "compute capability 9.0",
        ),
        (
            {
                "gpu_name": "NVIDIA A100-PCIE-40GB",
                "compute_capability": "8.0",
                "tensorrt_version": "10.3.0",
            },
            "GPU NVIDIA A100-PCIE-40GB",
        ),
        (
            {
                "gpu_name": "NVIDIA A100-SXM4-80GB",
                "compute_capability": "8.0",
                "tensorrt_version": "10.4.0",
            },
            "TensorRT 10.4.0",
        ),
        (
            {
                "gpu_name": "NVIDIA A100-SXM4-80GB",
                "compute_capability": "8.0",
                "tensorrt_version": None,
            },
            "TensorRT not installed",
        ),
        (None, "no NVIDIA GPU"),
    ],
)
def test_tensorrt_device_check(here: dict[str, Any] | None, problem: str | None) -> None:
    required = {
        "gpu_name": "NVIDIA A100-SXM4-80GB",
        "compute_capability": "8.0",
        "tensorrt_version": "10.3.0",
    }
    if problem is None:
        compat.check_device(required, here)
        return
    with pytest.raises(BundleError, match=problem) as info:
        compat.check_device(required, here)
    if here is not None:
        assert "rebuild the engine" in str(info.value)


def test_tensorrt_hardware_and_version_compatible_engines() -> None:
    required = {
        "gpu_name": "NVIDIA A100-SXM4-80GB",
        "compute_capability": "8.0",
        "tensorrt_version": "10.3.0",
        "hardware_compatibility": "AMPERE_PLUS",
        "version_compatible": True,
    }
    compat.check_device(
        required,
        {"gpu_name": "NVIDIA L4", "compute_capability": "8.9", "tensorrt_version": "10.3.1"},
    )
    with pytest.raises(BundleError, match=r"needs >= 8\.0"):
        compat.check_device(
            required,
            {"gpu_name": "Tesla T4", "compute_capability": "7.5", "tensorrt_version": "10.3.0"},
        )
    with pytest.raises(BundleError, match=r"TensorRT 10\.5\.0"):
        compat.check_device(
            required,
            {"gpu_name": "NVIDIA L4", "compute_capability": "8.9", "tensorrt_version": "10.5.0"},
        )
