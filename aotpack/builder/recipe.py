"""Recipes: one TOML file per model in ``recipes/``, loaded into a validated, frozen ``Recipe``.

The record is ``recipe_record``, its validation ``recipe_parse``; both are re-exported here.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from aotpack.builder.recipe_parse import _COMMIT, parse_recipe
from aotpack.builder.recipe_record import DIMS, DTYPES, Recipe
from aotpack.errors import RecipeError, one_line

__all__ = [
    "get_recipe", "is_local_checkpoint", "is_recipe_file", "list_recipes", "recipe_file", "recipe_of", "recipes_dir",
    # re-exported: recipe_record, recipe_parse (and the revision pattern spec.py checks against)
    "DIMS", "DTYPES", "Recipe", "_COMMIT", "parse_recipe",
]


def recipes_dir() -> Path:
    """The folder holding the shipped recipes (inside the wheel as ``aotpack/recipes``, or the repo's)."""
    try:
        import importlib.resources

        path = Path(str(importlib.resources.files("aotpack.recipes")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "recipes"  # a plain checkout: the repo's recipes/


@lru_cache(maxsize=None)
def _raw_recipes() -> dict[str, tuple[Path, dict]]:
    out: dict[str, tuple[Path, dict]] = {}
    for path in sorted(recipes_dir().glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"recipe file {path.name} is not valid TOML: {e}", "fix the file") from None
        out[str(data.get("name", path.stem))] = (path, data)
    return out


def list_recipes() -> list[str]:
    """Names of all shipped recipes, sorted."""
    return sorted(_raw_recipes())


def get_recipe(name: "str | os.PathLike | Recipe", variant: str | None = None) -> Recipe:
    """Load and validate the recipe ``name``: a shipped recipe's name, a recipe file (``./my.toml``) or a
    ``Recipe`` (optionally one of its variants)."""
    if isinstance(name, Recipe):
        if variant is not None and variant != name.variant:
            raise RecipeError(f"--variant {variant} given with a Recipe object ({name.full_name})",
                              "pick the variant when the Recipe is made: get_recipe(FILE, variant)")
        return name
    if is_recipe_file(name):
        return recipe_file(Path(name), variant)
    raw = _raw_recipes()
    if name not in raw:
        raise RecipeError(
            f"unknown recipe '{name}'",
            f"choose one of: {', '.join(sorted(raw))} (run 'aotpack recipes'), or pass a recipe file (./my.toml)",
        )
    path, data = raw[name]
    return parse_recipe(data, source=path.name, variant=variant)


def recipe_of(ref: Any) -> Recipe:
    """The recipe an artifact was built from (``ref``: its manifest's RecipeRef): the table the manifest records
    (a shipped recipe, a recipe file or a derived one, as it was at build time), else - an artifact of an
    aotpack that did not record it - the shipped recipe of that name."""
    if ref.data:
        return parse_recipe(dict(ref.data), source=f"the artifact's recipe ({ref.name})", variant=ref.variant,
                            pinned=False)
    return get_recipe(ref.name, ref.variant)


def is_recipe_file(name: "str | os.PathLike") -> bool:
    """A recipe argument that names a file rather than a shipped recipe: a path, or a name ending in .toml."""
    text = os.fspath(name)
    return text.endswith(".toml") or os.sep in text or text.startswith((".", "~"))


def recipe_file(path: Path, variant: str | None = None) -> Recipe:
    """The recipe in the TOML file ``path``. Its revision may be left out: a recipe file is usually built from
    ``--model`` (a Hub checkpoint it names must still be pinned; the build checks). A ``checkpoint`` written as
    a path (``./pipe``, ``/data/pipe``) is a local folder, relative to the file's own folder."""
    path = path.expanduser()
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe file",
                          "pass a recipe file (./my.toml) or a shipped recipe's name, and the folder as --model")
    if not path.is_file():
        raise RecipeError(f"no recipe file {path}", "check the path, or name a shipped recipe (aotpack recipes)")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {path.name} is not valid TOML: {one_line(str(e))}", "fix the file") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {path}: {e.strerror or e}", "check the path") from None
    checkpoint = data.get("checkpoint")
    if isinstance(checkpoint, str) and checkpoint.startswith((".", "/", "~")):
        data = {**data, "checkpoint": str((path.parent / Path(checkpoint).expanduser()).resolve())}
    return parse_recipe(data, source=path.name, variant=variant, pinned=False)


def is_local_checkpoint(checkpoint: str) -> bool:
    """A recipe checkpoint that is a local folder (an absolute path, as ``recipe_file`` writes it), not a Hub id."""
    return checkpoint.startswith(("/", ".", "~"))

