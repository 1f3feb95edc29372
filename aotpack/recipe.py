"""Recipes: one TOML file per model in ``recipes/``, loaded into a validated, frozen ``Recipe``."""

from __future__ import annotations

import dataclasses
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import RecipeError

DTYPES = ("float32", "bfloat16", "float16")
_TOP_KEYS = {
    "name", "family", "description", "pipeline", "component", "checkpoint", "revision", "checkpoint_needs",
    "dtype", "default_quant", "shapes", "capture", "run", "inputs", "variants",
}
_VARIANT_KEYS = {"checkpoint", "revision", "description", "max_sequence_length", "run_steps", "guidance_scale"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What to build: the pipeline, the checkpoint, the component to compile and the shapes it accepts."""

    name: str
    family: str
    description: str
    pipeline: str
    component: str
    checkpoint: str
    revision: str | None
    dtype: str
    default_quant: str
    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int
    max_sequence_length: int
    capture: dict[str, Any]
    run: dict[str, Any]
    dynamic: dict[str, dict[str, int]]
    checkpoint_needs: str | None = None
    variant: str | None = None
    variants: tuple[str, ...] = ()

    @property
    def builtin(self) -> str | None:
        """Name of the offline builder for ``builtin:NAME`` checkpoints, else None."""
        return self.checkpoint.split(":", 1)[1] if self.checkpoint.startswith("builtin:") else None

    @property
    def full_name(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name

    def image_seq_range(self) -> tuple[int, int]:
        """Image tokens for the smallest and largest allowed image (one token per `multiple` x `multiple` px)."""
        m = self.multiple
        return ((self.height[0] // m) * (self.width[0] // m), (self.height[1] // m) * (self.width[1] // m))


def recipes_dir() -> Path:
    """The folder holding the shipped recipes (inside the wheel as ``aotpack/recipes``, or the repo's)."""
    try:
        import importlib.resources

        path = Path(str(importlib.resources.files("aotpack.recipes")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "recipes"


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


def get_recipe(name: str, variant: str | None = None) -> Recipe:
    """Load and validate the recipe ``name`` (optionally one of its variants)."""
    raw = _raw_recipes()
    if name not in raw:
        raise RecipeError(
            f"unknown recipe '{name}'",
            f"choose one of: {', '.join(sorted(raw))} (run 'aotpack recipes')",
        )
    path, data = raw[name]
    return parse_recipe(data, source=path.name, variant=variant)


def _pair(value: Any, key: str, problems: list[str]) -> tuple[int, int]:
    if (
        isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)
        and value[0] <= value[1]
    ):
        return (value[0], value[1])
    problems.append(f"shapes.{key} must be [min, max] with 0 < min <= max, got {value!r}")
    return (1, 1)


def parse_recipe(data: dict, *, source: str = "<recipe>", variant: str | None = None) -> Recipe:
    """Validate a recipe dict; every problem is gathered into one RecipeError."""
    problems: list[str] = []
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown key '{key}'")
    for key in ("name", "family", "description", "pipeline", "component", "checkpoint", "dtype", "default_quant"):
        if not isinstance(data.get(key), str) or not data.get(key):
            problems.append(f"'{key}' must be a non-empty string")
    if data.get("dtype") not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {data.get('dtype')!r}")
    shapes = data.get("shapes") if isinstance(data.get("shapes"), dict) else {}
    if not shapes:
        problems.append("missing [shapes]")
    batch = _pair(shapes.get("batch"), "batch", problems)
    height = _pair(shapes.get("height"), "height", problems)
    width = _pair(shapes.get("width"), "width", problems)
    multiple = shapes.get("multiple")
    if not isinstance(multiple, int) or multiple <= 0:
        problems.append("shapes.multiple must be a positive integer")
        multiple = 1
    for key, pair in (("height", height), ("width", width)):
        if any(v % multiple for v in pair):
            problems.append(f"shapes.{key} bounds must be multiples of {multiple}")
    max_seq = shapes.get("max_sequence_length")
    if not isinstance(max_seq, int) or max_seq <= 0:
        problems.append("shapes.max_sequence_length must be a positive integer")
    capture = data.get("capture") if isinstance(data.get("capture"), dict) else {}
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    for section, table in (("capture", capture), ("run", run)):
        for key in ("height", "width", "steps"):
            if not isinstance(table.get(key), int):
                problems.append(f"{section}.{key} must be an integer")
    if isinstance(capture.get("batch"), int) and not batch[0] <= capture["batch"] <= batch[1]:
        problems.append("capture.batch must lie inside shapes.batch")
    for section, table in (("capture", capture), ("run", run)):
        for key, rng in (("height", height), ("width", width)):
            v = table.get(key)
            if isinstance(v, int) and not (rng[0] <= v <= rng[1] and v % multiple == 0):
                problems.append(f"{section}.{key}={v} must lie in shapes.{key} and be a multiple of {multiple}")
    inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    dynamic: dict[str, dict[str, int]] = {}
    for dim_name in ("batch", "image_seq"):
        table = inputs.get(dim_name)
        if not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            problems.append(f"inputs.{dim_name} must map input names to dim indices")
        else:
            dynamic[dim_name] = dict(table)
    variants = data.get("variants") if isinstance(data.get("variants"), dict) else {}
    fields = dict(data)
    if variant is not None:
        if variant not in variants:
            known = ", ".join(sorted(variants)) or "none"
            problems.append(f"unknown variant '{variant}' (this recipe has: {known})")
        else:
            over = variants[variant]
            for key in sorted(set(over) - _VARIANT_KEYS):
                problems.append(f"variants.{variant}: unknown key '{key}'")
            for key in ("checkpoint", "revision", "description"):
                if key in over:
                    fields[key] = over[key]
            if "max_sequence_length" in over:
                max_seq = over["max_sequence_length"]
            run = dict(run)
            capture = dict(capture)
            if "run_steps" in over:
                run["steps"] = over["run_steps"]
            if "guidance_scale" in over:
                run["guidance_scale"] = capture["guidance_scale"] = over["guidance_scale"]
    if problems:
        raise RecipeError(f"recipe {source} is invalid: " + "; ".join(problems), "fix the recipe file")
    return Recipe(
        name=fields["name"], family=fields["family"], description=fields["description"],
        pipeline=fields["pipeline"], component=fields["component"], checkpoint=fields["checkpoint"],
        revision=fields.get("revision"), dtype=fields["dtype"], default_quant=fields["default_quant"],
        batch=batch, height=height, width=width, multiple=multiple, max_sequence_length=max_seq,
        capture=capture, run=run, dynamic=dynamic, checkpoint_needs=fields.get("checkpoint_needs"),
        variant=variant, variants=tuple(sorted(variants)),
    )
