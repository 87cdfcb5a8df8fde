"""The CLI's cheap paths: --help and --version import no heavy framework or runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "onnxruntime", "openvino", "tensorrt", "torchvision", "onnx")

_PROBE = """
import sys
from click.testing import CliRunner
from deploykit.cli import main
result = CliRunner().invoke(main, sys.argv[1:])
assert result.exit_code == 0, result.output
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["export", "--help"],
        ["bench", "--help"],
        ["compare", "--help"],
        ["models", "--help"],
        ["backends", "--help"],
    ],
)
def test_help_imports_no_heavy_module(args: list[str]) -> None:
    code = _PROBE.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, f"--help imported: {proc.stdout.strip()}"


def test_console_script_is_installed() -> None:
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("deploykit") == "deploykit.cli:main"


def test_help_lists_every_command() -> None:
    from click.testing import CliRunner

    from deploykit.cli import main

    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("export", "bench", "compare", "models", "backends"):
        assert command in out
