"""Reading recipes: YAML with line numbers, one level of ``base:``, ``--set`` overrides.

Every problem is a :class:`RecipeError` (exit 2) whose one line names the file, the
line and column or the key's path, and what to write instead.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from deploykit.errors import UserError
from deploykit.recipes.schema import Recipe


class RecipeError(UserError):
    """A recipe that cannot be read, does not fit the schema, or names a missing thing."""


class _Loader(yaml.SafeLoader):
    """Safe YAML without YAML 1.1's base-60 numbers ('1:4:16' stays text) or duplicate keys."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)"
        r"(?:[eE][-+]?[0-9]+)|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
        r"|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """Parse YAML text into data and its node tree (for line numbers).

    Raises:
        RecipeError: Malformed YAML, with ``source:line:column``.
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or exc.context or "malformed YAML"
        raise RecipeError(f"{where}: {problem}; fix the YAML syntax there") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: malformed YAML ({exc})") from None
    finally:
        loader.dispose()
    return data, node


def load_yaml_value(text: str) -> Any:
    """One YAML scalar or flow value, as ``--set`` reads it ('16' → 16, 'null' → None)."""
    data, _ = parse_yaml(text, "--set value")
    return data


@dataclass
class _Source:
    """One file that contributed keys, with its node tree for line lookups."""

    path: str
    node: yaml.Node | None


@dataclass
class _Layers:
    """Where each key of the merged recipe came from (first match wins)."""

    sources: list[_Source] = field(default_factory=list)
    overrides: dict[tuple[str, ...], str] = field(default_factory=dict)

    def where(self, loc: tuple[Any, ...]) -> str:
        """``file:line`` (or ``--set a.b=c``) of the deepest known key on `loc`."""
        for depth in range(len(loc), 0, -1):
            if tuple(loc[:depth]) in self.overrides:
                return self.overrides[tuple(loc[:depth])]
        for source in self.sources:
            line = _line_of(source.node, loc)
            if line is not None:
                return f"{source.path}:{line}"
        return self.sources[0].path if self.sources else "recipe"


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    current, line = node, None
    for key in loc:
        if not isinstance(current, yaml.MappingNode):
            break
        for key_node, value_node in current.value:
            if key_node.value == str(key):
                line = key_node.start_mark.line + 1
                current = value_node
                break
        else:
            break
    return line


def read_recipe_file(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    """Read one recipe file into a mapping.

    Raises:
        RecipeError: Missing, unreadable, malformed or not a mapping.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} not found; pass a .yaml recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}") from None
    data, node = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, target:, ...)")
    return data, node


def merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child` over `base`: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def schema_annotation(path: list[str]) -> Any:
    """The schema's type annotation at a dotted path (None when the path is unknown)."""
    model: type[BaseModel] = Recipe
    annotation: Any = None
    for index, key in enumerate(path):
        info = model.model_fields.get(key)
        if info is None:
            return None
        annotation = info.annotation
        if index < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
    return annotation


def _is_text(annotation: Any) -> bool:
    """True for str and Optional[str] (and str Literals): --set keeps the raw text."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return all(isinstance(a, str) for a in args)
    if origin in (typing.Union, types.UnionType):
        return all(_is_text(a) or a is type(None) for a in args)
    return False


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc` (the parent of an unknown key)."""
    model: type[BaseModel] = Recipe
    for key in loc:
        info = model.model_fields.get(str(key))
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def apply_override(data: dict[str, Any], assignment: str) -> tuple[str, ...]:
    """Apply one ``a.b=c`` to `data`, coercing the text by the schema's type at ``a.b``.

    Returns:
        The key path that was set.

    Raises:
        RecipeError: Not ``key=value``, or a path that is not in the schema.
    """
    key, sep, text = assignment.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not sep or not all(parts):
        raise RecipeError(f"--set {assignment!r}: expected section.key=value, e.g. runs=20")
    annotation = schema_annotation(parts)
    if annotation is None:
        valid = _section_fields(tuple(parts[:-1]))
        prefix = ".".join(parts[:-1])
        names = [f"{prefix}.{v}" if prefix else v for v in valid]
        close = difflib.get_close_matches(".".join(parts), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise RecipeError(f"--set {key.strip()}: no such recipe key; {hint}see recipes/schema.json")
    value: Any = text if _is_text(annotation) and text.strip() != "null" else None
    if value is None and text.strip() != "null":
        value = load_yaml_value(text)
    target = data
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value
    return tuple(parts)


def describe_errors(exc: ValidationError, layers: _Layers, limit: int = 3) -> str:
    """One line per schema error: where, the key path, what is expected."""
    lines = []
    for error in exc.errors()[:limit]:
        loc = tuple(str(p) for p in error["loc"])
        path = ".".join(loc) or "recipe"
        where = layers.where(loc)
        kind = error["type"]
        if kind == "extra_forbidden":
            known = _section_fields(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
            parent = ".".join(loc[:-1])
            suggestion = f"{parent}.{close[0]}" if parent and close else (close or [""])[0]
            hint = f"; did you mean {suggestion}?" if close else ""
            choices = f" (keys here: {', '.join(known)})" if not close and known else ""
            lines.append(f"{where}: unknown key {path}{hint}{choices}")
        elif kind == "missing":
            lines.append(f"{where}: {path} is required")
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
            got = error.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {path}: {message}{shown}")
    more = len(exc.errors()) - limit
    if more > 0:
        lines.append(f"... and {more} more")
    return "\n".join(lines)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, inherit, override and validate a recipe.

    Args:
        path: The recipe file.
        overrides: ``section.key=value`` assignments applied after inheritance.

    Returns:
        The validated recipe, with ``base`` resolved (the field is left empty).

    Raises:
        RecipeError: Malformed YAML, a bad base, an unknown key or a wrong type.
    """
    file = Path(path)
    data, node = read_recipe_file(file)
    layers = _Layers(sources=[_Source(str(file), node)])
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise RecipeError(f"{layers.where(('base',))}: base must be a recipe file path")
        base_file = (file.parent / base).resolve()
        base_data, base_node = read_recipe_file(base_file)
        if "base" in base_data:
            raise RecipeError(
                f"{base_file}: a base recipe cannot have its own base (one level of "
                "inheritance); copy its keys into one base"
            )
        layers.sources.append(_Source(str(base_file), base_node))
        data = merge(base_data, data)
    for assignment in overrides:
        parts = apply_override(data, assignment)
        layers.overrides[parts] = f"--set {assignment}"
    return validate_recipe(data, layers)


def validate_recipe(data: dict[str, Any], layers: _Layers | None = None) -> Recipe:
    """Validate an already merged mapping.

    Raises:
        RecipeError: Unknown key (with a close match), wrong type or range.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(describe_errors(exc, layers or _Layers())) from None
