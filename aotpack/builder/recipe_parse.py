"""Validate a recipe's TOML table into a ``Recipe``: every problem gathered into one RecipeError.

``aotpack.builder.recipe`` (which finds and reads the recipe files) re-exports ``parse_recipe``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aotpack.builder.recipe_record import DIMS, DTYPES, Recipe
from aotpack.errors import RecipeError

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TOP_KEYS = {
    "name", "family", "description", "pipeline", "component", "checkpoint", "revision", "checkpoint_needs",
    "dtype", "default_quant", "shapes", "capture", "run", "inputs", "variants", "call", "output", "blocks",
    "block_inputs", "regional", "freeze", "ranges",
}
_VIDEO_DIMS = {"latent_frames", "video_seq"}
_VARIANT_KEYS = {"checkpoint", "revision", "description", "max_sequence_length", "run_steps", "guidance_scale",
                 "inputs", "dtype", "shapes"}


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
    call = _call_table(data.get("call", {}), problems)
    inputs = data.get("inputs") if isinstance(data.get("inputs"), dict) else {}
    if isinstance(over.get("inputs"), dict):
        inputs = over["inputs"]  # a variant may export other dims (e.g. fixed-size positional embeddings)
    if "batch" not in inputs:
        problems.append("inputs.batch must map input names to dim indices")
    dynamic = _dims_table(inputs, "inputs", output, problems)
    blocks = _block_names(data.get("blocks", []), problems)
    block_inputs = _dims_table(data.get("block_inputs") or {}, "block_inputs", output, problems)
    ranges = _ranges(data.get("ranges") or {}, problems)
    for key in ("regional", "freeze"):
        if not isinstance(data.get(key, False), bool):
            problems.append(f"{key} must be true or false")
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
    quants = tuple([fields["default_quant"]] if isinstance(fields["default_quant"], str) else fields["default_quant"])
    return Recipe(
        name=fields["name"], family=fields["family"], description=fields["description"],
        pipeline=fields["pipeline"], component=fields["component"], checkpoint=fields["checkpoint"],
        revision=fields.get("revision"), dtype=fields["dtype"], default_quant=quants[0], default_quants=quants,
        batch=s["batch"], height=s["height"], width=s["width"], multiple=s["multiple"], step=s["step"],
        max_sequence_length=s["max_sequence_length"], capture=capture, run=run, dynamic=dynamic,
        checkpoint_needs=fields.get("checkpoint_needs"), variant=variant, variants=tuple(sorted(variants)),
        frames=s["frames"], temporal_compression=s["temporal_compression"], vae_scale=s["vae_scale"],
        call=dict(call), output=output, blocks=tuple(blocks), block_inputs=block_inputs,
        regional=data.get("regional") is True, freeze=data.get("freeze") is True, ranges=ranges,
        data=json.loads(json.dumps(data)),
    )


def _block_names(blocks: Any, problems: list[str]) -> list[str]:
    """``blocks``: the block class names to compile regionally (a bad value is a problem, and no names)."""
    if not isinstance(blocks, list) or not all(isinstance(b, str) and b for b in blocks):
        problems.append("blocks must be a list of block class names")
        return []
    return blocks


_CALL_NAMES = ("batch", "text", "guidance", "frames", "area")


def _call_table(call: Any, problems: list[str]) -> dict:
    """[call]: the pipeline's parameter names (or "" for none), the batch divisor and fixed plain keywords
    (a [call] that is not a table is a problem, and an empty one)."""
    if not isinstance(call, dict) or not all(isinstance(k, str) for k in call):
        problems.append("[call] must be a table")
        call = {}
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
    return call


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
    for key in ("name", "family", "description", "pipeline", "component", "checkpoint", "dtype"):
        if not isinstance(data.get(key), str) or not data.get(key):
            problems.append(f"'{key}' must be a non-empty string")
    quants = data.get("default_quant")
    if not (isinstance(quants, str) and quants or isinstance(quants, list) and quants
            and all(isinstance(q, str) and q for q in quants) and len(set(quants)) == len(quants)):
        problems.append("'default_quant' must be a scheme's name, or a list of distinct names (the first this "
                        f"machine runs at its speed is the default), got {quants!r}")
    else:
        from aotpack.builder.schemes import SCHEMES

        for q in [quants] if isinstance(quants, str) else quants:  # a fallback is checked where no box takes it
            if q not in SCHEMES and q != "auto":
                problems.append(f"default_quant names an unknown scheme {q!r} (schemes: {', '.join(SCHEMES)}, auto)")
    if data.get("dtype") not in (*DTYPES, "auto"):  # auto: what the build machine computes fastest
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, auto, got {data.get('dtype')!r}")


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
