"""Bad input: one line on stderr that says what to do, exit 2, and nothing half-written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from deploykit.cli import main

FAST = ["--runs", "5", "--warmup", "1", "--min-seconds", "0", "--fidelity-samples", "2"]


def _fails(args: list[str], out: Path, match: str, code: int = 2) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.output
    if out.exists():
        leftovers = [p for p in out.rglob("*")]
        assert leftovers == [], leftovers
    return lines[0]


def test_unknown_model_suggests(tmp_path: Path) -> None:
    line = _fails(["export", "mobilenetv2", "-t", "onnxruntime", "-o", str(tmp_path)], tmp_path, "")
    assert "did you mean mobilenet_v2" in line and "deploykit models" in line


def test_unknown_target(tmp_path: Path) -> None:
    _fails(["export", "resnet18", "-t", "openvin", "-o", str(tmp_path)], tmp_path, "openvino")


def test_tensorrt_unavailable(tmp_path: Path) -> None:
    from deploykit.backends.registry import get_backend

    if get_backend("tensorrt").is_available().ok:
        pytest.skip("TensorRT is installed here")
    _fails(["export", "resnet18", "-t", "tensorrt", "-o", str(tmp_path)], tmp_path, "tensorrt")


def test_missing_weights_file(tmp_path: Path) -> None:
    _fails(
        [
            "export",
            "resnet18",
            "-t",
            "torch",
            "--weights",
            str(tmp_path / "w.pt"),
            "-o",
            str(tmp_path / "o"),
        ],
        tmp_path / "o",
        "does not exist",
    )


def test_weights_that_do_not_match(tmp_path: Path) -> None:
    import torch

    weights = tmp_path / "w.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    _fails(
        [
            "export",
            "squeezenet1_1",
            "-t",
            "onnxruntime",
            "--weights",
            str(weights),
            "--input-size",
            "64",
            "-o",
            str(tmp_path / "o"),
            *FAST,
        ],
        tmp_path / "o",
        "do not match squeezenet1_1",
    )


def test_weights_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"\x00garbage" * 10)
    _fails(
        [
            "export",
            "squeezenet1_1",
            "-t",
            "torch",
            "--weights",
            str(weights),
            "-o",
            str(tmp_path / "o"),
            *FAST,
        ],
        tmp_path / "o",
        "cannot read weights",
    )


@pytest.mark.onnxruntime
def test_corrupt_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not a protobuf" * 7)
    _fails(["export", str(bad), "-t", "onnxruntime", "-o", str(tmp_path / "o")], tmp_path / "o", "")


@pytest.mark.onnxruntime
def test_truncated_onnx_file(tmp_path: Path) -> None:
    import torch
    from tinynets import tiny_net

    good = tmp_path / "good.onnx"
    torch.onnx.export(tiny_net(), (torch.randn(1, 3, 32, 32),), str(good), dynamo=False)
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _fails(["export", str(bad), "-t", "onnxruntime", "-o", str(tmp_path / "o")], tmp_path / "o", "")


def test_missing_model_file(tmp_path: Path) -> None:
    _fails(
        ["export", str(tmp_path / "none.onnx"), "-t", "onnxruntime", "-o", str(tmp_path / "o")],
        tmp_path / "o",
        "does not exist",
    )


@pytest.mark.parametrize("opset", ["5", "99"])
def test_unsupported_opset(opset: str, tmp_path: Path) -> None:
    _fails(
        ["export", "squeezenet1_1", "-t", "onnxruntime", "--opset", opset, "-o", str(tmp_path)],
        tmp_path,
        f"unsupported opset {opset}",
    )


def test_bad_dynamic_batch(tmp_path: Path) -> None:
    _fails(
        [
            "export",
            "squeezenet1_1",
            "-t",
            "onnxruntime",
            "--dynamic-batch",
            "8:2:1",
            "-o",
            str(tmp_path),
        ],
        tmp_path,
        "MIN:OPT:MAX",
    )


def test_unsupported_precision(tmp_path: Path) -> None:
    _fails(
        ["export", "squeezenet1_1", "-t", "torch", "--precision", "fp16", "-o", str(tmp_path)],
        tmp_path,
        "--precision",
    )


def test_output_folder_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    _fails(
        [
            "export",
            "squeezenet1_1",
            "-t",
            "torch",
            "--input-size",
            "64",
            *FAST,
            "-o",
            str(blocker / "out"),
        ],
        tmp_path / "nothing",
        "pass a writable --out",
    )
    assert blocker.read_text() == "a file, not a folder"


def test_factory_that_is_not_a_model(tmp_path: Path) -> None:
    _fails(
        ["export", "tinynets:not_a_module", "-t", "torch", "-o", str(tmp_path)],
        tmp_path,
        "not a torch.nn.Module",
    )


def test_factory_module_missing(tmp_path: Path) -> None:
    _fails(
        ["export", "no_such_pkg.models:net", "-t", "torch", "-o", str(tmp_path)],
        tmp_path,
        "cannot import no_such_pkg.models",
    )


def test_bench_on_a_folder_without_a_run(tmp_path: Path) -> None:
    _fails(["bench", str(tmp_path)], tmp_path / "nothing", "pass a run folder")


@pytest.mark.onnxruntime
def test_failed_gate_exits_1_and_keeps_the_run_marked_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gate failure is not bad input: exit 1, the numbers, and a run folder marked failed."""
    import json

    from deploykit.harness import fidelity

    strict = fidelity.Tolerance(min_cosine=1.5, max_rel_err=0.0)  # impossible to meet
    monkeypatch.setitem(fidelity.PRECISION_TOLERANCE, "fp32", strict)
    result = CliRunner().invoke(
        main,
        [
            "export",
            "squeezenet1_1",
            "-t",
            "onnxruntime",
            "--input-size",
            "64",
            *FAST,
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "fidelity gate failed" in result.stderr and "cosine" in result.stderr
    report = json.loads(
        (tmp_path / "squeezenet1_1" / "onnxruntime-fp32" / "report.json").read_text()
    )
    assert report["status"].startswith("failed")


def test_real_process_exit_code_and_one_line(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploykit",
            "export",
            "resnet05",
            "-t",
            "torch",
            "-o",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=cli_env,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: unknown model")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("option", "match"),
    [
        (["--max-fallback-layers", "0"], "--max-fallback-layers must be at least 1"),
        (["--max-accuracy-drop", "-1"], "--max-accuracy-drop must be >= 0"),
        (["--quantizer", "nope"], "no 'nope' quantizer"),
        (["--min-top5-overlap", "0"], "--min-top5-overlap is a percentage in (0, 100]"),
        (["--min-top5-overlap", "101"], "--min-top5-overlap is a percentage in (0, 100]"),
        # resnet18 has random weights and so no evaluation sets of its own.
        (["--min-top5-overlap", "97"], "--min-top5-overlap needs evaluation data"),
    ],
)
def test_bad_int8_accuracy_options(option: list[str], match: str, tmp_path: Path) -> None:
    args = ["export", "resnet18", "-t", "onnxruntime", "-p", "int8", "--calib", "synthetic"]
    _fails([*args, *option, "-o", str(tmp_path)], tmp_path, match)


def test_bn_recalibration_of_real_weights_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deploykit.models.loaders as loaders

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(loaders, "load_torch", no_load)
    monkeypatch.setattr("deploykit.pipeline.export.load_torch", no_load)
    args = ["export", "fmnist_lenet5", "-t", "onnxruntime", "--bn-recalibrate"]
    _fails([*args, "-o", str(tmp_path)], tmp_path, "random-weight models only")
