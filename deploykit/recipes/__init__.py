"""Recipes: `deploykit export` options as validated YAML, and sweeps over many of them.

Light to import (pydantic and PyYAML only); the runtimes load when a recipe runs.
"""

from __future__ import annotations

from deploykit.recipes.load import RecipeError, load_recipe
from deploykit.recipes.resolve import plan, recipe_yaml, request_yaml, to_request
from deploykit.recipes.run import run_recipe
from deploykit.recipes.schema import Recipe

__all__ = [
    "Recipe",
    "RecipeError",
    "load_recipe",
    "plan",
    "recipe_yaml",
    "request_yaml",
    "run_recipe",
    "to_request",
]
