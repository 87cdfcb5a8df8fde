"""Recipes: the shipped files, the schema, errors, overrides, and run/replay."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from deploykit.cli import main
from deploykit.recipes import RecipeError, load_recipe, to_request
from deploykit.recipes.jsonschema import schema_text
from deploykit.recipes.load import schema_annotation
from deploykit.recipes.resolve import EXPORT_FLAGS, REQUEST_FIELDS, get_key, request_to_data
from deploykit.recipes.schema import Recipe
from deploykit.recipes.sweep import collect

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
MODELS = (
    "mobilenet_v2",
    "mobilenet_v3_large",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "resnet50",
    "resnext50_32x4d",
)
TARGETS = ("openvino-int8", "onnxruntime-int8", "tensorrt-fp16", "tensorrt-int8")


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _export_command() -> click.Command:
    command = main.commands["export"]
    assert isinstance(command, click.Command)
    return command


# -- the shipped recipes ------------------------------------------------------------


def test_every_model_and_target_has_a_recipe() -> None:
    keys = {key for key, _ in collect([str(RECIPES)])}
    assert keys == {f"{m}/{t}" for m in MODELS for t in TARGETS}


@pytest.mark.parametrize("key", [f"{m}/{t}" for m in MODELS for t in TARGETS])
def test_every_recipe_validates(key: str) -> None:
    recipe = load_recipe(RECIPES / f"{key}.yaml")
    model, target = key.split("/")
    backend, precision = target.split("-")
    assert (recipe.model.name, recipe.target.backend, recipe.precision) == (
        model,
        backend,
        precision,
    )
    assert recipe.target.device == ("cuda" if backend == "tensorrt" else "cpu")
    request = to_request(recipe)
    assert request.model == model and request.target == backend
    if precision == "int8":
        assert recipe.calibration.data == "natural-images-calib"


def test_every_file_fits_the_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((RECIPES / "schema.json").read_text())
    files = sorted(RECIPES.rglob("*.yaml"))
    assert len(files) == len(MODELS) * len(TARGETS) + 2  # plus the two bases
    for file in files:
        jsonschema.validate(yaml.safe_load(file.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"calibration": {"sample": 3}}, schema)


def test_schema_json_is_generated_from_the_models() -> None:
    assert (RECIPES / "schema.json").read_text() == schema_text(), (
        "recipes/schema.json is stale: python -m deploykit.recipes.jsonschema recipes/schema.json"
    )


# -- one source of truth: export flags, ExportRequest, schema ------------------------


def test_every_export_flag_has_a_place_in_the_schema() -> None:
    params = {p.name for p in _export_command().params}
    missing = sorted(params - set(EXPORT_FLAGS))
    assert not missing, (
        f"`deploykit export` options {missing} have no recipe key: add them to "
        "deploykit/recipes/resolve.py EXPORT_FLAGS (None if they only shape the output)"
    )
    stale = sorted(set(EXPORT_FLAGS) - params)
    assert not stale, f"EXPORT_FLAGS lists options export no longer has: {stale}"
    for flag, path in EXPORT_FLAGS.items():
        if path is not None:
            assert schema_annotation(path.split(".")) is not None, f"{flag} -> {path}"


def test_every_request_field_has_a_recipe_key() -> None:
    from deploykit.api import ExportRequest

    fields = [f.name for f in dataclasses.fields(ExportRequest)]
    assert sorted(fields) == sorted(REQUEST_FIELDS), (
        "ExportRequest and deploykit/recipes/resolve.py REQUEST_FIELDS differ: "
        f"{sorted(set(fields) ^ set(REQUEST_FIELDS))}"
    )
    recipe = load_recipe(RECIPES / "resnet50/tensorrt-int8.yaml")
    for path in REQUEST_FIELDS.values():
        if path is not None:
            get_key(recipe, path)  # every key exists on a recipe


def _negated(flag: str, value: Any) -> Any:
    if flag in ("per_tensor", "no_calib_cache", "no_fallback"):  # --no-x / --per-tensor
        return not value
    return value


def test_export_defaults_equal_recipe_defaults() -> None:
    from deploykit import api

    recipe = Recipe.model_validate({"model": {"name": "m"}, "target": {"backend": "torch"}})
    command = _export_command()
    context = click.Context(command)
    for param in command.params:
        path = EXPORT_FLAGS[str(param.name)]
        if path is None or param.required or param.name in ("no_eval", "eval_data", "precision"):
            continue
        default = param.get_default(context)
        if not isinstance(default, (str, int, float, bool)):
            default = None  # no default (click's unset sentinel)
        assert _negated(str(param.name), default) == get_key(recipe, path), param.name
    for backend in ("torch", "onnxruntime", "openvino", "tensorrt"):
        data = {"model": {"name": "m"}, "target": {"backend": backend}}
        assert Recipe.model_validate(data).precision == api.default_precision(backend)


def test_request_round_trips_through_the_resolved_recipe() -> None:
    recipe = load_recipe(
        RECIPES / "resnet50/tensorrt-int8.yaml",
        ["tensorrt.opt_batch=16", "tensorrt.workspace=2G", "input.size=200x240"],
    )
    request = to_request(recipe)
    assert request.dynamic_batch == "1:16:32"
    assert request.extra == {"workspace": "2G"}
    assert request.input_size == (200, 240)
    again = to_request(Recipe.model_validate(request_to_data(request)))
    assert again == request
    request.keep_float = ["node_Conv_1", "out/resnet50/onnxruntime-int8"]
    again = to_request(Recipe.model_validate(request_to_data(request)))
    assert again == request and again.keep_float == request.keep_float


# -- errors ---------------------------------------------------------------------------

BASIC = """\
model:
  name: squeezenet1_1
precision: int8
calibration:
  data: synthetic
target:
  backend: onnxruntime
"""


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides or [])
    return str(info.value)


def test_unknown_key_names_its_path_line_and_a_close_match(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", BASIC.replace("data: synthetic", "sampels: 8"))
    message = _error(path)
    assert f"{path}:5" in message
    assert "unknown key calibration.sampels; did you mean calibration.samples?" in message


def test_malformed_yaml_reports_line_and_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", "model:\n  name: a\n target: b\n")
    message = _error(path)
    assert message.startswith(f"{path}:3:")
    duplicate = _write(tmp_path / "d.yaml", BASIC + "precision: fp32\n")
    assert f"{duplicate}:8:1: duplicate key 'precision'" in _error(duplicate)


def test_types_and_ranges_are_checked(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", BASIC + "measure:\n  runs: many\n")
    assert "measure.runs: Input should be a valid integer" in _error(path)
    path = _write(tmp_path / "r.yaml", BASIC + "measure:\n  runs: 0\n")
    assert f"{path}:9: measure.runs: Input should be greater than or equal to 1" in _error(path)
    path = _write(tmp_path / "r.yaml", BASIC.replace("onnxruntime", "onnxrt"))
    assert "target.backend: Input should be 'torch', 'onnxruntime'" in _error(path)
    path = _write(tmp_path / "r.yaml", BASIC + "tensorrt:\n  opt_batch: 4\n")
    assert "tensorrt.opt_batch applies only to target.backend tensorrt" in _error(path)
    path = _write(tmp_path / "r.yaml", "precision: int8\n")
    message = _error(path)
    assert "model is required" in message and "target is required" in message


def test_base_inheritance_is_one_level(tmp_path: Path) -> None:
    _write(tmp_path / "_base/a.yaml", "precision: int8\nmeasure:\n  runs: 7\n  warmup: 3\n")
    child = _write(
        tmp_path / "m/r.yaml",
        "base: ../_base/a.yaml\nmodel:\n  name: x\ntarget:\n  backend: openvino\n"
        "measure:\n  runs: 9\n",
    )
    recipe = load_recipe(child)
    assert (recipe.precision, recipe.measure.runs, recipe.measure.warmup) == ("int8", 9, 3)
    assert recipe.base is None
    _write(tmp_path / "_base/b.yaml", "base: a.yaml\n")
    grandchild = _write(tmp_path / "m/g.yaml", "base: ../_base/b.yaml\n")
    assert "one level of inheritance" in _error(grandchild)
    _write(tmp_path / "_base/c.yaml", "measure:\n  runz: 1\n")
    typo = _write(tmp_path / "m/t.yaml", "base: ../_base/c.yaml\n" + BASIC)
    assert f"{tmp_path / '_base/c.yaml'}:2: unknown key measure.runz" in _error(typo)


def test_set_overrides_are_coerced_by_the_schema(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", BASIC)
    recipe = load_recipe(
        path,
        [
            "measure.runs=20",
            "measure.min_seconds=0.5",
            "calibration.per_channel=false",
            "calibration.bias_correction=null",
            "input.dynamic_batch=1:4:16",
            "input.size=[96, 128]",
            "evaluation.data=[imagenet-photos20]",
            "calibration.quantizer=123",
            "precision=fp16",
        ],
    )
    assert recipe.measure.runs == 20 and recipe.measure.min_seconds == 0.5
    assert recipe.calibration.per_channel is False and recipe.calibration.bias_correction is None
    assert recipe.input.dynamic_batch == "1:4:16" and recipe.input.size == (96, 128)
    assert recipe.evaluation.data == ["imagenet-photos20"]
    assert recipe.calibration.quantizer == "123" and recipe.precision == "fp16"
    assert "did you mean measure.runs?" in _error(path, ["measure.rns=3"])
    assert "expected section.key=value" in _error(path, ["measure.runs"])
    assert "--set measure.runs=-1: measure.runs" in _error(path, ["measure.runs=-1"])


def test_unquoted_batch_range_stays_text(tmp_path: Path) -> None:
    # YAML 1.1 would read 1:4:16 as a base-60 integer.
    path = _write(tmp_path / "r.yaml", BASIC + "input:\n  dynamic_batch: 1:4:16\n")
    assert load_recipe(path).input.dynamic_batch == "1:4:16"


# -- the CLI --------------------------------------------------------------------------


def test_dry_run_prints_resolved_recipe_and_plan() -> None:
    result = CliRunner().invoke(
        main,
        [
            "run",
            str(RECIPES / "resnet50/tensorrt-int8.yaml"),
            "--set",
            "calibration.samples=512",
            "--set",
            "tensorrt.opt_batch=16",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)  # the plan lines are YAML comments
    assert resolved["calibration"]["samples"] == 512
    assert resolved["tensorrt"]["opt_batch"] == 16
    assert "dynamic batch 1:16:32" in result.output
    assert "512 inputs from natural-images-calib" in result.output
    assert "backend tensorrt: UNAVAILABLE here" in result.output


def test_tensorrt_recipe_ends_with_backend_unavailable() -> None:
    result = CliRunner().invoke(main, ["run", str(RECIPES / "mobilenet_v2/tensorrt-fp16.yaml")])
    assert result.exit_code == 2
    assert result.output.startswith("error: target tensorrt unavailable")


def test_bad_recipes_exit_2_with_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.yaml", BASIC.replace("synthetic", "natural-images-calb"))
    result = CliRunner().invoke(main, ["run", str(path), "--set", "outputs.out=" + str(tmp_path)])
    assert result.exit_code == 2
    assert "calibration.data 'natural-images-calb'" in result.output
    assert "did you mean natural-images-calib?" in result.output
    assert not (tmp_path / "squeezenet1_1").exists()
    broken = _write(tmp_path / "b.yaml", "model: [\n")
    result = CliRunner().invoke(main, ["run", str(broken)])
    assert result.exit_code == 2 and f"{broken}:2:1:" in result.output
    result = CliRunner().invoke(main, ["run", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


TINY = """\
description: tiny net through ONNX Runtime INT8
model:
  name: tinynets:tiny_net
  bn_recalibrate: false
input:
  size: [32, 32]
precision: int8
calibration:
  data: synthetic
  samples: 8
target:
  backend: onnxruntime
  threads: 1
measure:
  runs: 5
  warmup: 2
  min_seconds: 0.05
  fidelity_samples: 4
gates:
  latency_budget_ms: 10000
"""


def test_run_then_replay_the_resolved_recipe(tmp_path: Path) -> None:
    path = _write(tmp_path / "tiny.yaml", TINY)
    runner = CliRunner()
    result = runner.invoke(main, ["run", str(path), "--set", f"outputs.out={tmp_path}", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["status"] == "ok"
    assert [g["name"] for g in report["gates"]][-1] == "latency"
    run_dir = tmp_path / "tiny_net" / "onnxruntime-int8"
    resolved = run_dir / "recipe.resolved.yaml"
    first = resolved.read_text()
    replayed = load_recipe(resolved)
    assert replayed.description == "tiny net through ONNX Runtime INT8"
    assert replayed.input.batch == 1 and replayed.target.threads == 1
    assert replayed.gates.latency_budget_ms == 10000
    stored = json.loads((run_dir / "report.json").read_text())
    from deploykit.fsutil import sha256_file

    assert stored["artifacts"]["recipe.resolved.yaml"] == sha256_file(resolved)
    # Replaying reproduces the run (same options, same Q/DQ model); a budget it cannot
    # meet fails the latency gate with exit 1 and keeps the run folder marked failed.
    qdq = sha256_file(run_dir / "model.int8.qdq.onnx")
    result = runner.invoke(main, ["run", str(resolved)])
    assert result.exit_code == 0, result.output
    assert resolved.read_text() == first
    assert sha256_file(run_dir / "model.int8.qdq.onnx") == qdq
    result = runner.invoke(main, ["run", str(resolved), "--set", "gates.latency_budget_ms=1e-6"])
    assert result.exit_code == 1, result.output
    assert "latency gate failed" in result.output
    stored = json.loads((run_dir / "report.json").read_text())
    assert stored["status"] == "failed: latency"


def test_export_writes_the_same_resolved_format(tmp_path: Path) -> None:
    """`deploykit export` and `deploykit run` write one recipe format; run replays it."""
    result = CliRunner().invoke(
        main,
        [
            "export",
            "tinynets:tiny_net",
            "-t",
            "onnxruntime",
            "--input-size",
            "32",
            "--runs",
            "3",
            "--min-seconds",
            "0.05",
            "--fidelity-samples",
            "2",
            "--threads",
            "1",
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    resolved = tmp_path / "tiny_net" / "onnxruntime-fp32" / "recipe.resolved.yaml"
    recipe = load_recipe(resolved)
    assert (recipe.model.name, recipe.input.size, recipe.measure.runs) == (
        "tinynets:tiny_net",
        (32, 32),
        3,
    )
    result = CliRunner().invoke(main, ["run", str(resolved), "--dry-run"])
    assert result.exit_code == 0 and "compile for onnxruntime fp32 on cpu, threads 1" in (
        result.output
    )


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_help_imports_no_heavy_module(command: str) -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from deploykit.cli import main\n"
        f"assert CliRunner().invoke(main, [{command!r}, '--help']).exit_code == 0\n"
        "heavy = ('torch', 'onnxruntime', 'openvino', 'tensorrt', 'onnx', 'ray')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_recipe_calibration_methods_are_the_stages() -> None:
    """The schema's Literal spells the methods out; it must list exactly the stage's."""
    from typing import get_args

    from deploykit.recipes.schema import CalibrationSection
    from deploykit.stages import CALIBRATION_METHODS

    annotation = CalibrationSection.model_fields["method"].annotation
    assert get_args(annotation) == CALIBRATION_METHODS
