"""The recipe JSON Schema (``recipes/schema.json``), generated from the pydantic models.

Regenerate after changing :mod:`deploykit.recipes.schema`::

    python -m deploykit.recipes.jsonschema recipes/schema.json

Editors validate recipes with it (e.g. a ``# yaml-language-server: $schema=...`` line);
a test fails when the committed file and the models differ.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from deploykit.recipes.schema import Recipe


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe file."""
    schema = Recipe.model_json_schema(mode="validation")
    # A file may inherit `model` and `target` from its base, and a base has neither:
    # the file-level schema requires nothing; the resolved recipe requires both.
    schema.pop("required", None)
    schema["description"] = (
        "A deploykit recipe (deploykit run FILE). model and target are required once "
        "base: is resolved; every section rejects unknown keys."
    )
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def schema_text() -> str:
    """The schema as the committed file holds it (stable key order, trailing newline)."""
    return json.dumps(recipe_json_schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    """Write the schema to the path given (stdout without one)."""
    if not argv:
        sys.stdout.write(schema_text())
        return 0
    from deploykit.fsutil import write_text_atomic

    write_text_atomic(Path(argv[0]), schema_text())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
