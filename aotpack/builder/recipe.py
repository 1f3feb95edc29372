"""Recipes: one TOML file per model in ``recipes/``, loaded into a validated, frozen ``Recipe``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from aotpack.artifact.manifest import Relation, Request
from aotpack.errors import RecipeError, one_line

DTYPES = ("float32", "bfloat16", "float16")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TOP_KEYS = {
    "name", "family", "description", "pipeline", "component", "checkpoint", "revision", "checkpoint_needs",
    "dtype", "default_quant", "shapes", "capture", "run", "inputs", "variants", "call", "output", "blocks",
    "block_inputs", "regional", "ranges",
}
# The dynamic dims a recipe may name in [inputs], and how their ranges follow from [shapes]:
#   batch          the component's batch (shapes.batch)
#   image_seq      image tokens, (height / multiple) * (width / multiple)                      (Flux)
#                  (shapes.multiple: pixels per token; shapes.step, if set, what request sizes step by)
#   latent_frames  latent frames, (frames - 1) / temporal_compression + 1                      (video)
#   latent_height  latent rows, height / vae_scale, a multiple of multiple / vae_scale (patch)
#   latent_width   latent columns, as latent_height
#   video_seq      video tokens, latent_frames * (height / multiple) * (width / multiple)      (video)
#   text_seq       text tokens, 1 .. shapes.max_sequence_length                               (Flux)
#   rotary_seq     rows of a rotary table over text and image tokens: text_seq + image_seq    (Flux blocks)
# A [ranges] table may set any dim's [min, max(, multiple)] outright (a derived recipe does: `aotpack recipe`).
DIMS = ("batch", "image_seq", "latent_frames", "latent_height", "latent_width", "video_seq", "text_seq",
        "rotary_seq")
_VIDEO_DIMS = {"latent_frames", "video_seq"}
_VARIANT_KEYS = {"checkpoint", "revision", "description", "max_sequence_length", "run_steps", "guidance_scale",
                 "inputs", "dtype", "shapes"}


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
    multiple: int                                  # pixels per token (row or column): the dims' formulas
    max_sequence_length: int
    capture: dict[str, Any]
    run: dict[str, Any]
    dynamic: dict[str, dict[str, int]]
    checkpoint_needs: str | None = None
    variant: str | None = None
    variants: tuple[str, ...] = ()
    frames: tuple[int, int] | None = None          # video recipes: pixel frames [min, max]
    temporal_compression: int = 1
    vae_scale: int = 8
    call: dict[str, Any] = dataclasses.field(default_factory=dict)
    output: str = "image"                          # "image" or "video"
    blocks: tuple[str, ...] = ()                   # block classes to compile regionally (default: _repeated_blocks)
    regional: bool = False                         # build regionally unless --whole-graph
    block_inputs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # dims of the blocks' inputs
    ranges: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # [ranges]: dims set outright
    # the table this recipe was parsed from, as the manifest records it: an artifact is served from its own recipe
    data: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    step: int = 0                                  # a request's height/width are multiples of it (0: multiple)

    @property
    def size_step(self) -> int:
        """What a request's height and width must be multiples of: shapes.step (a pipeline that asks for
        multiples of 32 while its tokens are 4 px), else shapes.multiple."""
        return self.step or self.multiple

    @property
    def is_video(self) -> bool:
        return self.output == "video"

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

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1

    def dim_range(self, name: str) -> list[int]:
        """[min, max] of a dynamic dim, plus the multiple it must be when that is not 1."""
        if name in self.ranges:
            return list(self.ranges[name])
        if name == "batch":
            return list(self.batch)
        if name == "image_seq":
            return list(self.image_seq_range())
        frames = self.frames or (1, 1)
        lf = (self.latent_frames(frames[0]), self.latent_frames(frames[1]))
        if name == "latent_frames":
            return list(lf)
        patch = self.multiple // self.vae_scale
        if name in ("latent_height", "latent_width"):
            px = self.height if name == "latent_height" else self.width
            return [px[0] // self.vae_scale, px[1] // self.vae_scale] + ([patch] if patch > 1 else [])
        if name == "video_seq":
            lo, hi = self.image_seq_range()
            return [lf[0] * lo, lf[1] * hi]
        if name == "text_seq":
            return [1, self.max_sequence_length]
        if name == "rotary_seq":
            lo, hi = self.image_seq_range()
            return [1 + lo, self.max_sequence_length + hi]
        raise KeyError(name)

    def pipeline_kwargs(self, *, height: int, width: int, steps: int, guidance_scale: float, batch: int = 1,
                        frames: int | None = None) -> dict[str, Any]:
        """Keyword arguments for one pipeline call, named as this recipe's pipeline names them.

        ``batch`` is outputs per prompt (images or videos)."""
        kwargs: dict[str, Any] = {"height": height, "width": width, "num_inference_steps": steps,
                                  **self.call.get("fixed", {})}
        # [call] names the pipeline's own parameters; "" where the pipeline has none (it is then left out)
        for key, default, value in (("guidance", "guidance_scale", guidance_scale),
                                    ("text", "max_sequence_length", self.max_sequence_length),
                                    ("batch", "num_images_per_prompt", batch), ("area", "", height * width)):
            if self.call.get(key, default):
                kwargs[self.call.get(key, default)] = value
        if self.is_video:
            kwargs[self.call.get("frames", "num_frames")] = frames or self.run["frames"]
        return kwargs

    def relations(self) -> list[Relation]:
        """Equalities between dims that export cannot express and the loader must check itself (a module's
        InputSpec keeps those whose dims it uses)."""
        patch = self.multiple // self.vae_scale
        return [Relation("video_seq", ("latent_frames", "latent_height", "latent_width"), "product", patch * patch),
                Relation("rotary_seq", ("text_seq", "image_seq"), "sum")]

    def request(self) -> Request:
        """The bounds of a serving request, as the manifest records them."""
        return Request(batch=self.batch, height=self.height, width=self.width, multiple=self.size_step,
                       max_sequence_length=self.max_sequence_length, max_steps=self.run["max_steps"],
                       output=self.output, frames=self.frames, temporal_compression=self.temporal_compression)


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


def _pair(value: Any, key: str, problems: list[str]) -> tuple[int, int]:
    if (
        isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)
        and value[0] <= value[1]
    ):
        return (value[0], value[1])
    problems.append(f"shapes.{key} must be [min, max] with 0 < min <= max, got {value!r}")
    return (1, 1)


def parse_recipe(data: dict, *, source: str = "<recipe>", variant: str | None = None, pinned: bool = True) -> Recipe:
    """Validate a recipe dict; every problem is gathered into one RecipeError. ``pinned``: a Hub checkpoint must
    name its 40-hex revision here (a shipped recipe); a recipe file's is checked by the build, which knows
    whether the checkpoint is read at all (``--model`` replaces it)."""
    problems: list[str] = []
    _check_identity(data, problems)
    variants = data.get("variants") if isinstance(data.get("variants"), dict) else {}
    over = variants.get(variant) if variant is not None and isinstance(variants.get(variant), dict) else {}
    shapes = data.get("shapes") if isinstance(data.get("shapes"), dict) else {}
    if isinstance(over.get("shapes"), dict):
        shapes = {**shapes, **over["shapes"]}  # a variant may accept other sizes
    output = data.get("output", "image")
    if output not in ("image", "video"):
        problems.append(f"output must be 'image' or 'video', got {output!r}")
    s = _parse_shapes(shapes, output, problems)
    capture = data.get("capture") if isinstance(data.get("capture"), dict) else {}
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    _check_calls(capture, run, s, output, problems)
    call = data.get("call", {})
    if not isinstance(call, dict) or not all(isinstance(k, str) for k in call):
        problems.append("[call] must be a table")
        call = {}
    _check_call(call, problems)
    inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    if isinstance(over.get("inputs"), dict):
        inputs = over["inputs"]  # a variant may export other dims (e.g. fixed-size positional embeddings)
    if "batch" not in inputs:
        problems.append("inputs.batch must map input names to dim indices")
    dynamic = _dims_table(inputs, "inputs", output, problems)
    blocks = data.get("blocks", [])
    if not isinstance(blocks, list) or not all(isinstance(b, str) and b for b in blocks):
        problems.append("blocks must be a list of block class names")
        blocks = []
    block_inputs = _dims_table(data.get("block_inputs") or {}, "block_inputs", output, problems)
    ranges = _ranges(data.get("ranges") or {}, problems)
    if not isinstance(data.get("regional", False), bool):
        problems.append("regional must be true or false")
    fields, capture, run = dict(data), dict(capture), dict(run)
    if variant is not None and variant not in variants and not problems:
        # the user's word, not the file's: a variant the recipe lacks is a bad --variant, not a broken recipe
        raise RecipeError(f"recipe {data.get('name', source)} has no variant '{variant}'",
                          f"choose one of: {', '.join(sorted(variants))}" if variants
                          else "leave --variant out: this recipe has no variants")
    if variant is not None:
        _apply_variant(variant, variants, fields, s, capture, run, problems)
    if pinned and not str(fields.get("checkpoint", "")).startswith("builtin:") \
            and not _COMMIT.match(str(fields.get("revision"))):
        problems.append(f"revision must be a 40-hex commit of {fields.get('checkpoint')} (a branch or tag can move)")
    if problems:
        raise RecipeError(f"recipe {source} is invalid: " + "; ".join(problems), "fix the recipe file")
    return Recipe(
        name=fields["name"], family=fields["family"], description=fields["description"],
        pipeline=fields["pipeline"], component=fields["component"], checkpoint=fields["checkpoint"],
        revision=fields.get("revision"), dtype=fields["dtype"], default_quant=fields["default_quant"],
        batch=s["batch"], height=s["height"], width=s["width"], multiple=s["multiple"], step=s["step"],
        max_sequence_length=s["max_sequence_length"], capture=capture, run=run, dynamic=dynamic,
        checkpoint_needs=fields.get("checkpoint_needs"), variant=variant, variants=tuple(sorted(variants)),
        frames=s["frames"], temporal_compression=s["temporal_compression"], vae_scale=s["vae_scale"],
        call=dict(call), output=output, blocks=tuple(blocks), block_inputs=block_inputs,
        regional=data.get("regional") is True, ranges=ranges, data=json.loads(json.dumps(data)),
    )


_CALL_NAMES = ("batch", "text", "guidance", "frames", "area")


def _check_call(call: dict, problems: list[str]) -> None:
    """[call]: the pipeline's parameter names (or "" for none), the batch divisor and fixed plain keywords."""
    for key in sorted(set(call) - {*_CALL_NAMES, "batch_divisor", "fixed"}):
        problems.append(f"call.{key}: unknown key")
    for key in _CALL_NAMES:
        if key in call and not (isinstance(call[key], str) and re.fullmatch(r"[a-z_][a-z0-9_]*|", call[key])):
            problems.append(f"call.{key} must be a parameter name of the pipeline, or \"\"")
    if "batch_divisor" in call and not (type(call["batch_divisor"]) is int and call["batch_divisor"] >= 1):
        problems.append("call.batch_divisor must be an integer >= 1")
    fixed = call.get("fixed", {})
    if not isinstance(fixed, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"[a-z_][a-z0-9_]*", k) and isinstance(v, (bool, int, float, str))
            for k, v in fixed.items()):
        problems.append("call.fixed must map pipeline parameter names to booleans, numbers or strings")


def _ranges(table: Any, problems: list[str]) -> dict[str, tuple[int, ...]]:
    """[ranges]: {dim: [min, max] or [min, max, multiple]}, set outright."""
    if not isinstance(table, dict):
        problems.append("[ranges] must be a table")
        return {}
    out = {}
    for dim, rng in table.items():
        ok = (isinstance(rng, list) and len(rng) in (2, 3) and all(isinstance(v, int) and v > 0 for v in rng)
              and rng[0] <= rng[1])
        if dim not in DIMS:
            problems.append(f"ranges.{dim}: unknown dim (known: {', '.join(DIMS)})")
        elif not ok:
            problems.append(f"ranges.{dim} must be [min, max] or [min, max, multiple] of positive integers")
        else:
            out[dim] = tuple(rng)
    return out


def _check_identity(data: dict, problems: list[str]) -> None:
    for key in sorted(set(data) - _TOP_KEYS):
        problems.append(f"unknown key '{key}'")
    for key in ("name", "family", "description", "pipeline", "component", "checkpoint", "dtype", "default_quant"):
        if not isinstance(data.get(key), str) or not data.get(key):
            problems.append(f"'{key}' must be a non-empty string")
    if data.get("dtype") not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {data.get('dtype')!r}")


def _parse_shapes(shapes: dict, output: str, problems: list[str]) -> dict[str, Any]:
    """[shapes]: the ranges every dim follows from."""
    if not shapes:
        problems.append("missing [shapes]")
    s: dict[str, Any] = {key: _pair(shapes.get(key), key, problems) for key in ("batch", "height", "width")}
    multiple = shapes.get("multiple")
    if not isinstance(multiple, int) or multiple <= 0:
        problems.append("shapes.multiple must be a positive integer")
        multiple = 1
    s["multiple"] = multiple
    step = shapes.get("step", multiple)
    if not isinstance(step, int) or step <= 0 or step % multiple:
        problems.append(f"shapes.step must be a positive multiple of shapes.multiple ({multiple})")
        step = multiple
    s["step"] = step if step != multiple else 0
    for key in ("height", "width"):
        if any(v % step for v in s[key]):
            problems.append(f"shapes.{key} bounds must be multiples of {step}")
    s["max_sequence_length"] = shapes.get("max_sequence_length")
    s["temporal_compression"] = shapes.get("temporal_compression", 1)
    s["vae_scale"] = shapes.get("vae_scale", 8)
    for key in ("max_sequence_length", "temporal_compression", "vae_scale"):
        if not isinstance(s[key], int) or s[key] <= 0:
            problems.append(f"shapes.{key} must be a positive integer")
    s["frames"] = _pair(shapes.get("frames"), "frames", problems) if output == "video" else None
    if output == "video" and isinstance(s["vae_scale"], int) and s["vae_scale"] > 0 and multiple % s["vae_scale"]:
        problems.append("shapes.multiple must be a multiple of shapes.vae_scale")
    return s


def _check_calls(capture: dict, run: dict, s: dict[str, Any], output: str, problems: list[str]) -> None:
    """[capture] and [run]: pipeline calls inside the ranges of [shapes]."""
    for section, table in (("capture", capture), ("run", run)):
        for key in ("height", "width", "steps"):
            if not isinstance(table.get(key), int):
                problems.append(f"{section}.{key} must be an integer")
        for key in ("height", "width"):
            v, (lo, hi) = table.get(key), s[key]
            step = s["step"] or s["multiple"]
            if isinstance(v, int) and not (lo <= v <= hi and v % step == 0):
                problems.append(f"{section}.{key}={v} must lie in shapes.{key} and be a multiple of {step}")
        if output == "video":
            v = table.get("frames")
            if not isinstance(v, int) or not s["frames"][0] <= v <= s["frames"][1]:
                problems.append(f"{section}.frames must be an integer in shapes.frames")
    if not (isinstance(run.get("max_steps"), int) and isinstance(run.get("steps"), int)
            and 0 < run["steps"] <= run["max_steps"]):
        problems.append("run.max_steps must be an integer >= run.steps (the most steps a request may ask)")
    if isinstance(capture.get("batch"), int) and not s["batch"][0] <= capture["batch"] <= s["batch"][1]:
        problems.append("capture.batch must lie inside shapes.batch")


def _apply_variant(variant: str, variants: dict, fields: dict, s: dict[str, Any], capture: dict, run: dict,
                   problems: list[str]) -> None:
    """A variant's overrides, in place (its shapes and inputs were taken already)."""
    if variant not in variants:
        problems.append(f"unknown variant '{variant}' (this recipe has: {', '.join(sorted(variants)) or 'none'})")
        return
    over = variants[variant]
    for key in sorted(set(over) - _VARIANT_KEYS):
        problems.append(f"variants.{variant}: unknown key '{key}'")
    for key in ("checkpoint", "revision", "description", "dtype"):
        if key in over:
            fields[key] = over[key]
    if "max_sequence_length" in over:
        s["max_sequence_length"] = over["max_sequence_length"]
    if "run_steps" in over:
        run["steps"] = over["run_steps"]
    if "guidance_scale" in over:
        run["guidance_scale"] = capture["guidance_scale"] = over["guidance_scale"]


def _dims_table(inputs: Any, section: str, output: str, problems: list[str]) -> dict[str, dict[str, int]]:
    """{dim: {input name: axis}} of an [inputs]-like table; problems are appended."""
    if not isinstance(inputs, dict):
        problems.append(f"[{section}] must be a table")
        return {}
    out: dict[str, dict[str, int]] = {}
    for dim_name, table in inputs.items():
        if dim_name not in DIMS:
            problems.append(f"{section}.{dim_name}: unknown dim (known: {', '.join(DIMS)})")
        elif dim_name in _VIDEO_DIMS and output != "video":
            problems.append(f"{section}.{dim_name} needs output = 'video'")
        elif not isinstance(table, dict) or not all(isinstance(v, int) for v in table.values()):
            problems.append(f"{section}.{dim_name} must map input names to dim indices")
        else:
            out[dim_name] = dict(table)
    return out
