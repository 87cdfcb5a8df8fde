"""Recipe ⇄ :class:`deploykit.api.ExportRequest`, the resolved-recipe file, and the plan.

The two tables below are the single source of truth that ties the recipe schema to
`deploykit export`: ``REQUEST_FIELDS`` maps every ExportRequest field to its recipe key
(used in both directions), ``EXPORT_FLAGS`` maps every option of the click ``export``
command to its recipe key (or to None when it only shapes the command's own output).
A test fails when a field or flag is added to one side and not here: adding one is a
one-line change in each table plus the schema field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from deploykit.recipes.load import RecipeError
from deploykit.recipes.schema import BACKEND_SECTIONS, Recipe

if TYPE_CHECKING:
    from deploykit.api import ExportRequest

# ExportRequest field -> recipe key; None = not a recipe option (set by the command that
# runs it). "model.ref" is model.name or model.path; "backend_options" is the target
# backend's own section (torch:, onnxruntime:, tensorrt:), which ExportRequest.extra holds.
REQUEST_FIELDS: dict[str, str | None] = {
    "model": "model.ref",
    "target": "target.backend",
    "precision": "precision",
    "device": "target.device",
    "weights": "model.weights",
    "seed": "model.seed",
    "input_size": "input.size",
    "batch": "input.batch",
    "dynamic_batch": "input.dynamic_batch",
    "opset": "export.opset",
    "exporter": "export.exporter",
    "threads": "target.threads",
    "runs": "measure.runs",
    "warmup": "measure.warmup",
    "min_seconds": "measure.min_seconds",
    "fidelity_samples": "measure.fidelity_samples",
    "out": "outputs.out",
    "calib": "calibration.data",
    "calib_method": "calibration.method",
    "calib_samples": "calibration.samples",
    "calib_percentile": "calibration.percentile",
    "per_channel": "calibration.per_channel",
    "bias_correction": "calibration.bias_correction",
    "weight_rounding": "calibration.weight_rounding",
    "calib_cache": "calibration.cache",
    "quantizer": "calibration.quantizer",
    "int8_encoding": "calibration.encoding",
    "exact_residuals": "calibration.exact_residuals",
    "overflow_fix": "calibration.overflow_fix",
    "keep_float": "calibration.keep_float",
    "eval_data": "evaluation.data",
    "eval_samples": "evaluation.samples",
    "max_accuracy_drop": "gates.max_accuracy_drop",
    "min_top5_overlap": "gates.min_top5_overlap",
    "fallback": "gates.fallback",
    "max_fallback_layers": "gates.max_fallback_layers",
    "bn_recalibrate": "model.bn_recalibrate",
    "extra": "backend_options",
    "dry_run": None,
}

# `deploykit export` option (click parameter name) -> recipe key; None = not a recipe
# option (it only changes what the command prints). An option named like the
# ExportRequest field it sets maps to that field's key; the others are listed: negated
# flags map onto the key they negate (--per-tensor -> calibration.per_channel: false,
# --no-eval -> evaluation.data: []), and the backend sections' options onto their section.
_NOT_EXPORT_FLAGS = ("model", "per_channel", "calib_cache", "fallback", "extra")
EXPORT_FLAGS: dict[str, str | None] = {
    **{f: key for f, key in REQUEST_FIELDS.items() if f not in _NOT_EXPORT_FLAGS},
    "model": "model.name",
    "per_tensor": "calibration.per_channel",
    "no_calib_cache": "calibration.cache",
    "no_eval": "evaluation.data",
    "no_fallback": "gates.fallback",
    "torch_compile": "torch.compile",
    "ort_tensorrt": "onnxruntime.ort_tensorrt",
    "workspace": "tensorrt.workspace",
    "builder_opt_level": "tensorrt.builder_opt_level",
    "timing_cache": "tensorrt.timing_cache",
    "as_json": None,
}

RESOLVED_HEADER = (
    "# Resolved deploykit recipe: the options that produced this run.\n"
    "# Replay it with: deploykit run <this file>\n"
)
_MODEL_FILE_SUFFIXES = (".onnx", ".pt2", ".pt", ".pth", ".ts", ".torchscript", ".jit")


def get_key(recipe: Recipe, path: str) -> Any:
    """The value at a dotted recipe key (attributes, so ``model.ref`` works too)."""
    value: Any = recipe
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _set_key(data: dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    for part in parts[:-1]:
        data = data.setdefault(part, {})
    data[parts[-1]] = value


def to_request(recipe: Recipe) -> ExportRequest:
    """The ExportRequest a recipe stands for.

    Raises:
        RecipeError: ``tensorrt.opt_batch`` outside ``input.dynamic_batch``.
    """
    from deploykit.api import ExportRequest
    from deploykit.backends.base import BatchRange

    values: dict[str, Any] = {
        f: get_key(recipe, p) for f, p in REQUEST_FIELDS.items() if p is not None
    }
    values["input_size"] = tuple(recipe.input.size) if recipe.input.size else None
    opt = recipe.tensorrt.opt_batch
    if opt is not None and recipe.input.dynamic_batch is not None:
        rng = BatchRange.parse(recipe.input.dynamic_batch)
        if not rng.min <= opt <= rng.max:
            raise RecipeError(
                f"tensorrt.opt_batch {opt} is outside input.dynamic_batch {rng}; "
                f"choose {rng.min}..{rng.max}"
            )
        values["dynamic_batch"] = f"{rng.min}:{opt}:{rng.max}"
    if values["eval_data"] is not None:
        values["eval_data"] = list(values["eval_data"])
    return ExportRequest(**values)


def request_to_data(
    request: ExportRequest, batch: int | None = None, threads: int | None = None
) -> dict[str, Any]:
    """The recipe mapping of an ExportRequest (the inverse of :func:`to_request`).

    Args:
        request: The request.
        batch: The batch the run resolved (recorded as ``input.batch``).
        threads: The thread count the run resolved (recorded as ``target.threads``).
    """
    from deploykit.backends.registry import ALIASES

    data: dict[str, Any] = {}
    for name, path in REQUEST_FIELDS.items():
        value = getattr(request, name)
        if path is None:
            continue
        if name == "model":
            is_file = "/" in value or value.lower().endswith(_MODEL_FILE_SUFFIXES)
            _set_key(data, "model.path" if is_file else "model.name", value)
        elif name == "target":
            _set_key(data, path, ALIASES.get(value, value))
        elif name == "input_size":
            _set_key(data, path, list(value) if value else None)
        elif name == "extra":
            if value:  # the target backend's own section
                data[ALIASES.get(request.target, request.target)] = dict(value)
        else:
            _set_key(data, path, list(value) if isinstance(value, tuple) else value)
    if batch is not None:
        _set_key(data, "input.batch", batch)
    if threads is not None:
        _set_key(data, "target.threads", threads)
    return data


def recipe_yaml(recipe: Recipe | dict[str, Any]) -> str:
    """The resolved-recipe text: every key explicit, in schema order, no ``base``."""
    data = as_dict(recipe) if isinstance(recipe, Recipe) else dict(recipe)
    return RESOLVED_HEADER + yaml.safe_dump(data, sort_keys=False)


def request_yaml(
    request: ExportRequest, batch: int | None = None, threads: int | None = None
) -> str:
    """The resolved recipe of an ExportRequest (what ``recipe.resolved.yaml`` holds)."""
    from pydantic import ValidationError

    data = request_to_data(request, batch, threads)
    try:
        return recipe_yaml(Recipe.model_validate(data))
    except ValidationError:
        # A request made through the Python API with values the schema rejects: keep
        # them as given, so `deploykit run` on the file names the offending key.
        return recipe_yaml(data)


def check_references(recipe: Recipe) -> None:
    """Fail early on a recipe that names a calibration set or file that is not there.

    Raises:
        RecipeError: Missing calibration set, weights or model file, with the fix.
    """
    import difflib

    from deploykit.harness.datasets import SYNTHETIC
    from deploykit.harness.evalsets import list_manifests, manifest_dir

    if recipe.model.path is not None and not Path(recipe.model.path).exists():
        raise RecipeError(f"model.path {recipe.model.path} does not exist; fix the path")
    if recipe.model.weights is not None and not Path(recipe.model.weights).is_file():
        raise RecipeError(f"model.weights {recipe.model.weights} does not exist; fix the path")
    data = recipe.calibration.data
    if recipe.precision != "int8" or data is None or data == SYNTHETIC:
        return
    if data.endswith(".json"):
        if not Path(data).is_file():
            raise RecipeError(f"calibration.data manifest {data} does not exist; fix the path")
        return
    if (manifest_dir() / f"{data}.json").is_file() or Path(data).exists():
        return
    names = [m.name for m in list_manifests()]
    close = difflib.get_close_matches(data, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise RecipeError(
        f"calibration.data {data!r} is not a shipped set, folder or file; {hint}"
        f"choose one of {', '.join([*names, SYNTHETIC])} or an existing path"
    )


def run_dir_of(recipe: Recipe) -> Path:
    """The run folder a recipe writes (``<out>/<model>/<backend>-<precision>``)."""
    name = recipe.model.name if recipe.model.name else Path(str(recipe.model.path)).stem
    name = name.rsplit(":", 1)[-1]
    return Path(recipe.outputs.out) / name / f"{recipe.target.backend}-{recipe.precision}"


def plan(recipe: Recipe) -> list[str]:
    """What running the recipe will do, step by step, and whether the backend is here."""
    from deploykit.backends.registry import get_backend

    request = to_request(recipe)
    rng = request.dynamic_batch
    steps = [
        f"load {request.model} ("
        + (
            f"weights {request.weights}"
            if request.weights
            else f"catalogue weights, or random from seed {request.seed}"
        )
        + ")",
        f"export ONNX opset {request.opset} ({request.exporter} exporter), "
        + (f"dynamic batch {rng}" if rng else f"batch {request.batch or 1}"),
        "fuse Conv+BN and simplify the graph",
    ]
    if request.precision == "int8":
        steps.append(
            f"calibrate INT8 ({request.quantizer}): {request.calib_samples} inputs from "
            f"{request.calib or 'the model calibration set'}, "
            f"{request.calib_method}, {'per-channel' if request.per_channel else 'per-tensor'}"
        )
    options = f", options {request.extra}" if request.extra else ""
    steps.append(
        f"compile for {request.target} {request.precision} on {request.device}, "
        f"threads {request.threads or 'all usable cores'}{options}"
    )
    if request.eval_data:
        steps.append(f"evaluate on {', '.join(request.eval_data)}")
    steps.append(f"check fidelity on {request.fidelity_samples} inputs against FP32")
    steps.append(
        f"measure latency: {request.warmup} warm-up, >= {request.runs} runs and "
        f">= {request.min_seconds:g} s"
    )
    gates = [f"top-1 drop <= {request.max_accuracy_drop:g} pt"]
    if recipe.gates.latency_budget_ms is not None:
        gates.append(f"p50 <= {recipe.gates.latency_budget_ms:g} ms")
    steps.append("gates: precision, fidelity, " + ", ".join(gates))
    steps.append(f"write {run_dir_of(recipe)}/")
    availability = get_backend(recipe.target.backend).is_available()
    state = "available" if availability.ok else f"UNAVAILABLE here: {availability.message()}"
    steps.append(f"backend {recipe.target.backend}: {state}")
    return steps


def as_dict(recipe: Recipe) -> dict[str, Any]:
    """Plain-JSON form of a resolved recipe (a backend's own section only for that backend)."""
    exclude = {"base"} | {s for s in BACKEND_SECTIONS if s != recipe.target.backend}
    return recipe.model_dump(mode="json", exclude=exclude)


def replace(recipe: Recipe, **sections: dict[str, Any]) -> Recipe:
    """A copy of `recipe` with some keys of some sections replaced (validated)."""
    data = as_dict(recipe)
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return Recipe.model_validate(data)


def request_fields() -> list[str]:
    """The ExportRequest field names (for the one-source-of-truth check)."""
    from deploykit.api import ExportRequest

    return [f.name for f in dataclasses.fields(ExportRequest)]
