"""Resolve what the user named into a model source, and load it.

A `ModelSource` is a small, JSON-serialisable description (catalogue name,
``package.module:factory``, TorchScript file, torch.export ``.pt2`` file or ONNX
file, plus weights and seed), so a run folder can rebuild its reference model
later (`deploykit bench` on the torch target, fidelity checks) without pickles.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploykit.errors import ModelNotFoundError, OnnxFileError, UserError, WeightsError
from deploykit.fsutil import sha256_file
from deploykit.models.catalogue import get_model_spec
from deploykit.models.contract import InputContract

if TYPE_CHECKING:
    import torch

DEFAULT_SEED = 0
RANDOM_WEIGHTS_NOTE = "random weights: fidelity only, not accuracy"
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: ``catalogue``, ``factory``, ``torchscript``, ``exported_program`` or ``onnx``.
        ref: Catalogue name, ``package.module:factory`` or a file path.
        name: Short name used for output folders and reports.
        weights: Path of a state_dict file, or None for random weights.
        weights_sha256: sha256 of the weights file, or None.
        seed: Seed of the random initialisation.
        weights_origin: Where pretrained weights came from (a package or this repo), or None.
    """

    kind: str
    ref: str
    name: str
    weights: str | None = None
    weights_sha256: str | None = None
    seed: int = DEFAULT_SEED
    weights_origin: str | None = None

    @property
    def random_weights(self) -> bool:
        """True when the model carries no trained weights (catalogue or factory without a file)."""
        return self.kind in ("catalogue", "factory") and self.weights is None

    @property
    def is_torch(self) -> bool:
        """True when a PyTorch model exists (everything but ONNX files)."""
        return self.kind != "onnx"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


def resolve(
    model: str,
    weights: str | Path | None = None,
    seed: int = DEFAULT_SEED,
    input_size: tuple[int, int] | None = None,
    random_weights: bool = False,
) -> tuple[ModelSource, InputContract]:
    """Turn a model argument into a source and its input contract.

    A catalogue entry with pretrained weights (shipped in a package or in this
    repository) gets them unless `weights` or `random_weights` says otherwise.

    Args:
        model: Catalogue name, ``package.module:factory``, or a .onnx/.pt2/TorchScript path.
        weights: Optional state_dict file for catalogue and factory models.
        seed: Seed for random initialisation.
        input_size: Optional (height, width) overriding the contract's input size.
        random_weights: Ignore a catalogue entry's pretrained weights.

    Returns:
        The source and the input contract.

    Raises:
        ModelNotFoundError: Unknown name or missing file.
        WeightsError: Missing weights file, or weights given for a self-contained file.
    """
    path = Path(model)
    weights_path, weights_sha = _check_weights(weights)
    if path.suffix == ".onnx" or path.suffix == ".pt2" or path.suffix in _TORCHSCRIPT_SUFFIXES:
        if not path.is_file():
            raise ModelNotFoundError(f"model file {model} does not exist; check the path")
        if weights_path is not None:
            raise WeightsError(
                f"--weights cannot be used with {path.name}: the file already holds its weights"
            )
        kind = {".onnx": "onnx", ".pt2": "exported_program"}.get(path.suffix, "torchscript")
        source = ModelSource(kind=kind, ref=str(path.resolve()), name=_slug(path.stem), seed=seed)
        if kind == "onnx":
            contract = _onnx_contract(path)
        elif kind == "exported_program":
            contract = _exported_program_contract(path)
        else:
            contract = InputContract()
    elif _FACTORY_RE.match(model):
        source = ModelSource(
            kind="factory",
            ref=model,
            name=_slug(model.rsplit(":", 1)[1]),
            weights=weights_path,
            weights_sha256=weights_sha,
            seed=seed,
        )
        contract = InputContract()
    else:
        spec = get_model_spec(model)
        origin = None
        if weights_path is None and spec.pretrained is not None and not random_weights:
            pretrained = spec.pretrained.path()
            weights_path, weights_sha = str(pretrained), spec.pretrained.sha256
            origin = spec.pretrained.origin
        source = ModelSource(
            kind="catalogue",
            ref=model,
            name=model,
            weights=weights_path,
            weights_sha256=weights_sha,
            seed=seed,
            weights_origin=origin,
        )
        contract = spec.contract
    if input_size is not None:
        contract = contract.with_size(*input_size)
    return source, contract


def load_torch(source: ModelSource) -> torch.nn.Module:
    """Build or load the PyTorch model of `source`, in eval mode on the CPU.

    Raises:
        UserError: The source is an ONNX file, or a factory/file cannot be loaded.
        WeightsError: The weights file does not fit the architecture.
    """
    import torch

    if source.kind == "onnx":
        raise UserError(
            f"{source.ref} is an ONNX file: there is no PyTorch model to run; "
            "pick an ONNX backend (--target onnxruntime/openvino)"
        )
    if source.kind == "exported_program":
        # An exported program is already in inference form; its module refuses .eval().
        return _load_exported_program(source.ref)
    if source.kind == "torchscript":
        module = _load_torchscript(source.ref)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.seed)
            module = _build(source)
        if source.weights is not None:
            load_weights(module, Path(source.weights), source.name)
    return module.eval()


def load_weights(module: torch.nn.Module, path: Path, name: str) -> None:
    """Load a state_dict file into `module` with ``weights_only=True``, strictly.

    Raises:
        WeightsError: Unreadable file, or keys/shapes that do not match.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"cannot read weights {path}: {first[:200]}; pass a state_dict saved with torch.save"
        ) from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise WeightsError(f"weights {path} hold a {type(state).__name__}, not a state_dict")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state
        and hasattr(state[k], "shape")
        and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
        raise WeightsError(
            f"weights {path.name} do not match {name}: {'; '.join(parts)}; "
            "pass weights saved from this architecture"
        )
    module.load_state_dict(state, strict=True)


def _check_weights(weights: str | Path | None) -> tuple[str | None, str | None]:
    if weights is None:
        return None, None
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(
            f"weights file {path} does not exist; pass a local state_dict file "
            "(deploykit never downloads weights)"
        )
    return str(path.resolve()), sha256_file(path)


def _build(source: ModelSource) -> torch.nn.Module:
    import torch

    if source.kind == "catalogue":
        return get_model_spec(source.ref).builder()
    module_name, func_name = source.ref.rsplit(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelNotFoundError(
            f"cannot import {module_name} for {source.ref}: {exc}; check PYTHONPATH"
        ) from exc
    factory = getattr(module, func_name, None)
    if factory is None or not callable(factory):
        raise ModelNotFoundError(f"{module_name} has no callable {func_name!r}")
    built = factory()
    if not isinstance(built, torch.nn.Module):
        raise UserError(f"{source.ref} returned {type(built).__name__}, not a torch.nn.Module")
    return built


def _load_torchscript(path: str) -> torch.nn.Module:
    import torch

    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception as exc:  # RuntimeError or pickle errors for a non-TorchScript file
        raise UserError(
            f"{path} is not a TorchScript file ({type(exc).__name__}); for a state_dict use "
            "a catalogue name with --weights"
        ) from exc


def _load_exported_program(path: str) -> torch.nn.Module:
    import torch

    try:
        program = torch.export.load(path)
    except Exception as exc:  # torch raises various types for a corrupt archive
        raise UserError(
            f"cannot load torch.export file {path} ({type(exc).__name__}); save it with "
            "torch.export.save"
        ) from exc
    return program.module()


def _exported_program_contract(path: Path) -> InputContract:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises various types for a corrupt archive
        raise UserError(
            f"cannot load torch.export file {path} ({type(exc).__name__}); save it with "
            "torch.export.save"
        ) from exc
    example = getattr(program, "example_inputs", None)
    if example and example[0] and hasattr(example[0][0], "shape") and example[0][0].dim() == 4:
        _, channels, height, width = (int(d) for d in example[0][0].shape)
        return _generic_contract(channels, height, width)
    return InputContract()


def _onnx_contract(path: Path) -> InputContract:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and friends for a corrupt file
        raise OnnxFileError(
            f"cannot read ONNX file {path}: {type(exc).__name__}; re-export it or check the file"
        ) from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OnnxFileError(
            f"{path.name} has {len(inputs)} inputs; deploykit exports single-image models"
        )
    dims = [
        d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim
    ]
    if len(dims) != 4:
        raise OnnxFileError(f"{path.name} input has rank {len(dims)}; expected NCHW (rank 4)")
    return _generic_contract(dims[1] or 3, dims[2] or 224, dims[3] or 224)


def _generic_contract(channels: int, height: int, width: int) -> InputContract:
    """Contract of a model that carries no preprocessing: ImageNet norm for RGB, 0.5 otherwise."""
    if channels == 3:
        return InputContract(height=height, width=width, resize=height, num_classes=0)
    return InputContract(
        channels=channels,
        height=height,
        width=width,
        resize=height,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        color="GRAY" if channels == 1 else "RAW",
        num_classes=0,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "model"
