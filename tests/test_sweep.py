"""Sweeps: the local process pool, the Ray executor, Ctrl-C, and the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.recipes.summary import to_markdown
from deploykit.recipes.sweep import SweepOptions, add_speedups, sweep

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent

BASE = """\
model:
  name: tinynets:tiny_net
  bn_recalibrate: false
input:
  size: [32, 32]
calibration:
  data: synthetic
  samples: 8
measure:
  runs: 5
  warmup: 2
  min_seconds: 0.05
  fidelity_samples: 4
"""


def _recipe(backend: str, precision: str, device: str = "cpu") -> str:
    return (
        f"base: ../_base.yaml\nprecision: {precision}\n"
        f"target:\n  backend: {backend}\n  device: {device}\n"
    )


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch, ONNX Runtime and OpenVINO recipes that run, one TensorRT recipe that cannot
    here, and one naming a model that does not exist."""
    root = tmp_path_factory.mktemp("recipes")
    (root / "_base.yaml").write_text(BASE)
    tiny = root / "tiny"
    tiny.mkdir()
    (tiny / "torch-fp32.yaml").write_text(_recipe("torch", "fp32"))
    (tiny / "onnxruntime-int8.yaml").write_text(_recipe("onnxruntime", "int8"))
    (tiny / "openvino-int8.yaml").write_text(_recipe("openvino", "int8"))
    (tiny / "tensorrt-fp16.yaml").write_text(_recipe("tensorrt", "fp16", "cuda"))
    (tiny / "missing-model.yaml").write_text(
        "base: ../_base.yaml\nmodel:\n  name: no_such_model\ntarget:\n  backend: onnxruntime\n"
    )
    return root


@pytest.fixture(scope="module")
def tests_on_path() -> Iterator[None]:
    """Worker processes (and Ray workers) import tinynets from tests/."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), old]))
    yield
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


EXPECTED = {
    "tiny/missing-model": "error",
    "tiny/onnxruntime-int8": "ok",
    "tiny/openvino-int8": "ok",
    "tiny/tensorrt-fp16": "unavailable",
    "tiny/torch-fp32": "ok",
}


@pytest.fixture(scope="module")
def local_summary(
    recipe_dir: Path, tests_on_path: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("local")
    markdown = out / "sweep.md"
    result = CliRunner().invoke(
        main,
        [
            "sweep",
            str(recipe_dir),
            "--workers",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
            "--markdown",
            str(markdown),
            "--json",
        ],
    )
    # One recipe names a missing model: reported per recipe, exit 2 for the sweep.
    assert result.exit_code == 2, result.output
    summary: dict[str, Any] = json.loads(result.stdout)
    summary["_out"] = str(out)
    summary["_markdown"] = markdown.read_text()
    return summary


def _rows(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["recipe"]: row for row in summary["rows"]}


def test_local_pool_runs_each_recipe_isolated(local_summary: dict[str, Any]) -> None:
    rows = _rows(local_summary)
    assert {k: r["status"] for k, r in rows.items()} == EXPECTED
    assert local_summary["counts"] == {"error": 1, "ok": 3, "unavailable": 1}
    assert "unknown model 'no_such_model'" in rows["tiny/missing-model"]["reason"]
    assert "TensorRT" in rows["tiny/tensorrt-fp16"]["reason"]
    out = Path(local_summary["_out"])
    for key in ("onnxruntime-int8", "openvino-int8", "torch-fp32"):
        row = rows[f"tiny/{key}"]
        assert row["run_dir"] == str(out / "tiny_net" / key)
        assert (out / "tiny_net" / key / "report.json").is_file()
        assert row["latency_p50_ms"] > 0 and row["artifact_bytes"] > 0
        assert row["threads"] == 1 and row["top1_agreement"] is not None
    assert sorted(p.name for p in (out / "tiny_net").iterdir()) == [
        "onnxruntime-int8",
        "openvino-int8",
        "torch-fp32",
    ]
    # Speedups over the torch eager row of the same model, batch and threads.
    assert rows["tiny/torch-fp32"]["speedup_vs_torch"] == 1.0
    assert rows["tiny/onnxruntime-int8"]["speedup_vs_torch"] > 0
    assert rows["tiny/tensorrt-fp16"]["speedup_vs_torch"] is None


def test_markdown_summary_has_every_column(local_summary: dict[str, Any]) -> None:
    text = local_summary["_markdown"]
    header = text.splitlines()[0]
    for column in ("status", "latency p50", "speedup vs torch", "accuracy vs FP32", "size"):
        assert column in header
    assert "| tiny/openvino-int8 | ok |" in text
    assert "- tiny/tensorrt-fp16: unavailable: target tensorrt unavailable" in text


def test_ray_path_gives_the_same_summary(
    recipe_dir: Path,
    tests_on_path: None,
    local_summary: dict[str, Any],
    tmp_path: Path,
) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        options = SweepOptions(executor="ray", threads=1, out=str(tmp_path))
        summary = sweep([str(recipe_dir)], options)
    finally:
        ray.shutdown()
    local, remote = _rows(local_summary), _rows(summary)
    assert {k: r["status"] for k, r in remote.items()} == EXPECTED
    assert "no GPU in the Ray cluster" in remote["tiny/tensorrt-fp16"]["reason"]
    for key, row in remote.items():
        if row["status"] != "ok":
            continue
        mine = local[key]
        assert row["run_dir"] == str(tmp_path / "tiny_net" / key.split("/")[1])
        # Same artifact (its size varies by a few bytes of embedded run paths), same
        # fidelity, latency within the noise of a shared machine.
        assert row["artifact_bytes"] == pytest.approx(mine["artifact_bytes"], rel=0.02), key
        assert row["top1_agreement"] == mine["top1_agreement"], key
        assert row["cosine"] == pytest.approx(mine["cosine"], abs=1e-6), key
        ratio = row["latency_p50_ms"] / mine["latency_p50_ms"]
        assert 0.2 < ratio < 5, (key, row["latency_p50_ms"], mine["latency_p50_ms"])


def test_dry_run_reports_each_invalid_recipe(tmp_path: Path, recipe_dir: Path) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "good.yaml").write_text("model:\n  name: squeezenet1_1\ntarget:\n  backend: torch\n")
    (folder / "typo.yaml").write_text(
        "model:\n  name: x\ntarget:\n  backend: torch\n  devise: cpu\n"
    )
    (folder / "broken.yaml").write_text("model: [\n")
    result = CliRunner().invoke(main, ["sweep", str(folder), "--dry-run", "--out", "o"])
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0].startswith(f"broken: INVALID: {folder / 'broken.yaml'}:2:1:")
    assert lines[1] == f"good: {Path('o').resolve() / 'squeezenet1_1' / 'torch-fp32'}"
    assert "unknown key target.devise; did you mean target.device?" in lines[2]
    result = CliRunner().invoke(main, ["sweep", str(folder), "--match", "nothing*"])
    assert result.exit_code == 2 and "no recipe matches nothing*" in result.output


def test_ctrl_c_stops_cleanly(tmp_path: Path, recipe_dir: Path, cli_env: dict[str, str]) -> None:
    """SIGINT to the sweep's process group (what Ctrl-C does): exit 130, the running
    recipe is reported interrupted, and no run folder (complete-looking or not) is left."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "_base.yaml").write_text(BASE.replace("min_seconds: 0.05", "min_seconds: 120"))
    (folder / "slow.yaml").write_text(
        "base: _base.yaml\ntarget:\n  backend: onnxruntime\n  threads: 1\n"
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploykit", "sweep", str(folder), "--out", str(out), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        staged: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            staged = list(out.glob("tiny_net/.onnxruntime-fp32.*.staging/model.fused.onnx"))
            if staged:
                break
            time.sleep(0.2)
        assert staged, "the run never started"
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr.decode()
    summary = json.loads(stdout)
    assert [r["status"] for r in summary["rows"]] == ["interrupted"]
    assert "no run folder is half-written" in stderr.decode()
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []
    assert leftovers in ([], ["tiny_net"]), leftovers


def test_speedups_need_a_torch_row_with_the_same_batch_and_threads() -> None:
    def row(recipe: str, target: str, p50: float | None, threads: int = 1) -> dict[str, Any]:
        return {
            "recipe": recipe,
            "model": "m",
            "target": target,
            "precision": "fp32" if target == "torch" else "int8",
            "status": "ok" if p50 else "unavailable",
            "reason": "" if p50 else "no backend",
            "latency_p50_ms": p50,
            "speedup_vs_torch": None,
            "top1_drop_pt": None,
            "top1_agreement": 1.0 if p50 else None,
            "cosine": 0.999 if p50 else None,
            "artifact_bytes": 2_500_000 if p50 else None,
            "batch": 1,
            "threads": threads,
        }

    rows = [
        row("m/torch", "torch", 4.0),
        row("m/ov", "openvino", 1.0),
        row("m/ort-4t", "onnxruntime", 2.0, threads=4),
        row("m/trt", "tensorrt", None),
    ]
    add_speedups(rows)
    assert [r["speedup_vs_torch"] for r in rows] == [1.0, 4.0, None, None]
    summary = {"rows": rows, "counts": {"ok": 3}, "wall_seconds": 1.0, "executor": "local"}
    text = to_markdown(summary)
    assert "| m/ov | ok | 1.000 ms | 4.00x | top-1 agree 100.0%, cos 0.9990 | 2.5 MB |" in text
    assert "| m/trt | unavailable |  |  |  |  |" in text


@pytest.mark.slow
def test_shipped_cpu_recipes_run_green(tmp_path: Path) -> None:
    """Every shipped CPU recipe passes its gates (small input and few runs for speed)."""
    options = SweepOptions(
        workers=2,
        out=str(tmp_path),
        match=["*/openvino-int8", "*/onnxruntime-int8"],
        overrides=[
            "input.size=64",
            "measure.runs=10",
            "measure.min_seconds=0.2",
            "measure.fidelity_samples=8",
            "calibration.samples=16",
        ],
    )
    summary = sweep([str(ROOT / "recipes")], options)
    assert len(summary["rows"]) == 12
    assert {r["recipe"]: r["status"] for r in summary["rows"]} == {
        r["recipe"]: "ok" for r in summary["rows"]
    }, [r["reason"] for r in summary["rows"] if r["status"] != "ok"]
