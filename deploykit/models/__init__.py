"""Model catalogue and loaders."""

from deploykit.models.catalogue import ModelSpec, get_model_spec, list_models, register
from deploykit.models.contract import InputContract
from deploykit.models.loaders import RANDOM_WEIGHTS_NOTE, ModelSource, load_torch, resolve

__all__ = [
    "RANDOM_WEIGHTS_NOTE",
    "InputContract",
    "ModelSource",
    "ModelSpec",
    "get_model_spec",
    "list_models",
    "load_torch",
    "register",
    "resolve",
]
