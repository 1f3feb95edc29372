"""A recipe derived from a diffusers pipeline folder or Hub id, with nothing written by hand.

The pipeline class comes from ``model_index.json``, the component's class from its ``config.json``, the dtype from
its weights, the block classes from ``_repeated_blocks``. The dynamic dims come from real pipeline calls, each
stopped at the component's first forward (its weights are never read: a streamed skeleton stands in): a base call,
then one call for each thing a request can change (batch, size, frames, prompt, text length), one at a time. An axis
that moves with one of them is named by how it moves:

    batch           doubles when the outputs per prompt go 1 -> 2 (its size at 1: the batch divisor, 2 under CFG)
    latent_height   doubles with the height (height x2, width x3 in the size call)
    latent_width    triples with the width
    image_seq       x6 with the size: one token per multiple x multiple pixels
    latent_frames   moves with the frames only; video_seq moves with frames and size (frames x size tokens)
    text_seq        moves with the prompt (an unpadded text encoder) or the text length (a padded one)
    rotary_seq      moves with text and size: a table over text + image tokens

Axes whose sizes move together share one dim; the others stay static. A non-tensor argument that changes with a
setting (Qwen-Image's ``img_shapes``, LTX's ``num_frames``) is baked into compiled code, so that setting is fixed
at its run value. Ranges come from the pipeline's own defaults (``height``, ``num_frames``, ``max_sequence_length``
of its ``__call__``, ``default_sample_size``) or ``max_size`` / ``max_frames`` / ``max_batch``.
"""

from __future__ import annotations


import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aotpack.builder.probe import (H_RATIO, PROMPTS, W_RATIO, Options, Pipeline, Plan, calls, inspect_pipeline,
                                   is_pipeline_source, observe, plan_calls)
from aotpack.errors import RecipeError, one_line

DEFAULT_QUANT = "int8wo"     # a derived recipe's default scheme (runs on every CPU and GPU)
__all__ = ["DEFAULT_QUANT", "Options", "derive", "is_pipeline_source", "to_toml"]


# ---- naming the axes ------------------------------------------------------------------------------------------

@dataclass
class Axes:
    """The named axes and what the calls showed."""

    inputs: dict[str, dict[str, int]]          # dim -> {input: axis}
    sizes: dict[str, dict[str, int]]           # dim -> {call label: size}
    fixed: set[str]                            # settings fixed by a baked-in constant ("size", "batch", ...)
    divisor: int                               # the component's batch per output at batch 1


def name_axes(seen: dict[str, dict[str, Any]], model_class: str) -> Axes:
    """Name every axis that moves between the calls, or refuse in one line."""
    import torch

    base = seen["base"]
    tensors = [k for k, v in base.items() if isinstance(v, torch.Tensor)]
    fixed: set[str] = set()
    for label, got in seen.items():
        if sorted(k for k, v in got.items() if isinstance(v, torch.Tensor)) != sorted(tensors):
            raise RecipeError(f"{model_class} gets other tensor arguments when the {label} changes", _WRITE)
        for k, v in base.items():
            if not isinstance(v, torch.Tensor) and _plain(got.get(k)) != _plain(v):
                if label == "prompt":
                    raise RecipeError(f"{model_class}'s argument {k} depends on the prompt ({_show(v)} -> "
                                      f"{_show(got.get(k))}): compiled code cannot bake it in", _WRITE)
                fixed.add(label)
    moves: dict[tuple[str, int], dict[str, int]] = {}
    for name in tensors:
        for axis in range(base[name].dim()):
            sizes = {label: int(got[name].shape[axis]) for label, got in seen.items()}
            if base[name].dim() != seen["size"][name].dim() or len(set(sizes.values())) > 1:
                moves[(name, axis)] = sizes
    return _classify(moves, fixed, seen, model_class)


_WRITE = "write a recipe file for this model ('aotpack recipe SOURCE' gives a start)"


def _plain(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _show(v: Any) -> str:
    return one_line(repr(v), 40)


def _classify(moves: dict, fixed: set[str], seen: dict, model_class: str) -> Axes:
    inputs: dict[str, dict[str, int]] = {}
    sizes: dict[str, dict[str, int]] = {}

    def put(dim: str, key: tuple[str, int], s: dict[str, int]) -> None:
        if dim in sizes and sizes[dim] != s:
            raise RecipeError(f"{model_class}: {key[0]} axis {key[1]} moves like {dim} but not by the same sizes "
                              f"({s} vs {sizes[dim]})", _WRITE)
        inputs.setdefault(dim, {})[key[0]] = key[1]
        sizes[dim] = s

    later = []
    for key, s in moves.items():
        b = s["base"]
        changed = {label for label, v in s.items() if v != b}
        ratio = {label: s[label] / b for label in changed} if b else {}
        if changed == {"batch"} and s["batch"] == 2 * b:
            put("batch", key, s)
        elif changed == {"size"} and ratio["size"] == H_RATIO:
            put("latent_height", key, s)
        elif changed == {"size"} and ratio["size"] == W_RATIO:
            put("latent_width", key, s)
        elif changed == {"size"} and ratio["size"] == H_RATIO * W_RATIO:
            put("image_seq", key, s)
        elif changed == {"frames"}:
            put("latent_frames", key, s)
        elif changed == {"size", "frames"} and ratio["size"] == H_RATIO * W_RATIO:
            put("video_seq", key, s)
        elif changed and changed <= {"prompt", "text"}:
            put("text_seq", key, s)
        else:
            later.append((key, s, changed))
    for key, s, changed in later:  # sums: text + image tokens (a rotary table, a joint attention mask)
        image = sizes.get("image_seq") or sizes.get("video_seq")
        text = sizes.get("text_seq")
        if image and all(s[c] - image[c] == s["base"] - image["base"] for c in s) and not (
                changed & {"prompt", "text"}) and changed & {"size"}:
            put("rotary_seq", key, s)  # text + image tokens, the text part static
        elif image and text and all(s[c] == text[c] + image[c] for c in s):
            put("rotary_seq", key, s)
        else:
            name, axis = key
            shown = ", ".join(f"{c} {v}" for c, v in s.items())
            raise RecipeError(f"{model_class}: axis {axis} of {name} moves in a way aotpack cannot name ({shown})",
                              _WRITE)
    divisor = sizes["batch"]["base"] if "batch" in sizes else max(
        [int(v.shape[0]) for v in seen["base"].values() if hasattr(v, "shape") and v.dim()] or [1])
    return Axes(inputs=inputs, sizes=sizes, fixed=fixed, divisor=divisor)


# ---- the recipe -----------------------------------------------------------------------------------------------

def derive(source: str, opts: Options | None = None, *, device: str = "cpu") -> dict[str, Any]:
    """The recipe (as the dict a TOML recipe file holds) for the pipeline at ``source``."""
    import torch

    from aotpack.builder.source import Source, load_pipeline
    from aotpack.builder.weights import CheckpointReader, Streamed, skeleton

    opts = opts or Options()
    info = inspect_pipeline(source, opts)
    src = Source(info.checkpoint, None, "local", info.location)  # a Hub checkpoint: its snapshot, read locally
    ref = _Ref(info.pipeline, opts.component)
    pipe = load_pipeline(ref, src, dtype=info.dtype, with_component=False)
    pipe.to(device)
    from aotpack.builder.source import component_folder

    folder = component_folder(src, opts.component)
    streamed = Streamed(skeleton(info.config), CheckpointReader(folder), dtype=getattr(torch, info.dtype),
                        device=device, lora=None)
    try:
        setattr(pipe, opts.component, streamed.model)
        plan = plan_calls(pipe, info)
        seen = {label: observe(pipe, opts.component, kw, label) for label, kw in calls(plan).items()}
    finally:
        streamed.close()
    axes = name_axes(seen, info.model_class)
    blocks = list(opts.blocks) or repeated_blocks(streamed.model)
    return recipe_dict(info, plan, axes, opts, blocks)


def repeated_blocks(model: Any) -> list[str]:
    """The block classes a regional build compiles: the model's ``_repeated_blocks``, else (SD3, Sana declare
    none) the classes of the root's ModuleLists, in order."""
    import torch

    declared = list(getattr(model, "_repeated_blocks", None) or [])
    if declared:
        return declared
    found: list[str] = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            found += [type(b).__name__ for b in child if type(b).__name__ not in found]
    return found


@dataclass(frozen=True)
class _Ref:
    pipeline: str
    component: str


def recipe_dict(info: Pipeline, plan: Plan, axes: Axes, opts: Options, blocks: list[str]) -> dict[str, Any]:
    """The recipe a TOML file would hold, from what the calls showed."""
    q, d = plan.quantum, plan.defaults
    s = axes.sizes
    base_h = 2 * q
    multiple, vae, step = _token_sizes(plan, s)
    video = bool(plan.frames)
    sized = "size" not in axes.fixed
    limit = opts.max_size or max(d["height"], d["width"])
    top = max(step, limit - limit % step)
    run_h = _clip(d["height"], step, top)
    run_w = _clip(d["width"], step, top)
    capture_h, capture_w = _capture_size(sized, run_h, run_w, base_h, top, limit)
    name = re.sub(r"[^a-z0-9-]+", "-", Path(info.checkpoint).name.lower()).strip("-") or "model"
    recipe: dict[str, Any] = {
        "name": name, "family": info.pipeline.lower().removesuffix("pipeline") or "custom",
        "description": f"derived by aotpack from {info.checkpoint}: {info.pipeline} / {info.model_class}",
        "pipeline": info.pipeline, "component": opts.component, "checkpoint": info.checkpoint,
        "dtype": info.dtype, "default_quant": DEFAULT_QUANT,
    }
    if info.revision:
        recipe["revision"] = info.revision
    if video:
        recipe["output"] = "video"
    if blocks:
        recipe["blocks"] = blocks
    batched = "batch" in s and "batch" not in axes.fixed
    div = axes.divisor
    shapes: dict[str, Any] = {
        "batch": [div, div * opts.max_batch] if batched else [div, div],
        "height": [step * 2, top] if sized else [run_h, run_h],
        "width": [step * 2, top] if sized else [run_w, run_w],
        "multiple": multiple, "max_sequence_length": d["text"] if plan.text else 77, "vae_scale": vae}
    if step != multiple:
        shapes["step"] = step
    if sized:
        shapes["height"][0] = min(shapes["height"][0], capture_h)
        shapes["width"][0] = min(shapes["width"][0], capture_w)
    capture: dict[str, Any] = {"prompt": PROMPTS[0], "height": capture_h, "width": capture_w,
                               "batch": 2 * div if batched else div, "steps": 2}
    run: dict[str, Any] = {"height": run_h, "width": run_w, "steps": d["steps"], "max_steps": max(100, d["steps"])}
    if plan.guidance:
        capture["guidance_scale"] = run["guidance_scale"] = float(d["guidance"])
    if video:
        _add_frames(plan, axes, opts, shapes, capture, run)
    inputs = {dim: table for dim, table in axes.inputs.items() if dim != "batch" or batched}
    inputs.setdefault("batch", {})
    recipe.update({"shapes": shapes, "capture": capture, "run": run, "call": _call_table(plan, div),
                   "inputs": inputs, "ranges": _ranges(axes, plan, shapes, sized)})
    return recipe


def _token_sizes(plan: Plan, s: dict) -> tuple[int, int, int]:
    """(multiple, vae scale, step): pixels per token, pixels per latent pixel, and what request sizes step by."""
    q = plan.quantum
    base_h = 2 * q
    if "image_seq" in s:
        multiple = round((base_h * base_h / s["image_seq"]["base"]) ** 0.5)
    elif "video_seq" in s:  # the base call's frames, tc + 1, are 2 latent frames
        multiple = round((base_h * base_h * 2 / s["video_seq"]["base"]) ** 0.5)
    elif "latent_height" in s:
        multiple = base_h // s["latent_height"]["base"] * plan.patch
    else:
        multiple = q
    vae = base_h // s["latent_height"]["base"] if "latent_height" in s else plan.spatial
    if multiple % vae:  # a token is a whole number of latent pixels
        multiple = math.lcm(multiple, vae)
    # requests step by what the model needs and by the quantum every call used (the pipeline's own checks passed)
    return multiple, vae, math.lcm(multiple, q)


def _capture_size(sized: bool, run_h: int, run_w: int, base_h: int, top: int, limit: int) -> tuple[int, int]:
    """(height, width) of the capture call."""
    if not sized:  # a baked-in argument follows the size: one size, the run's
        return run_h, run_w
    if base_h * W_RATIO <= top:  # the size call: rows and columns of different sizes
        return base_h * H_RATIO, base_h * W_RATIO
    if base_h <= top:
        return base_h, base_h
    raise RecipeError(f"--max-size {limit} is below the smallest size the pipeline was called at ({base_h})",
                      f"pass --max-size {base_h} or more")


def _add_frames(plan: Plan, axes: Axes, opts: Options, shapes: dict, capture: dict, run: dict) -> None:
    """A video recipe's frames: the run's and the capture's, and shapes.frames (in place)."""
    d = plan.defaults
    framed = "frames" not in axes.fixed
    default_frames = d["frames"] or 4 * plan.tc + 1
    most = min(default_frames, opts.max_frames) if opts.max_frames else default_frames
    most -= (most - 1) % plan.tc
    run["frames"] = most
    capture["frames"] = 2 * plan.tc + 1 if framed else most
    shapes["frames"] = [plan.tc + 1, max(most, capture["frames"])] if framed else [most, most]
    shapes["temporal_compression"] = plan.tc


def _call_table(plan: Plan, div: int) -> dict[str, Any]:
    """[call]: the pipeline's own parameter names, as the probe found them."""
    call: dict[str, Any] = {"batch": plan.batch, "text": plan.text, "guidance": plan.guidance,
                            "batch_divisor": div}
    if plan.frames:
        call["frames"] = plan.frames
    if plan.area:
        call["area"] = plan.area
    if plan.fixed:
        call["fixed"] = dict(plan.fixed)
    return call


def _clip(v: int, multiple: int, top: int) -> int:
    v = min(int(v), top)
    return max(multiple, v - v % multiple)


def _ranges(axes: Axes, plan: Plan, shapes: dict, sized: bool) -> dict[str, list[int]]:
    """Ranges the recipe's formulas cannot give: the text tokens (padded: the size at the default length;
    unpadded: 1 .. the largest seen or the default length) and a sum over them."""
    out: dict[str, list[int]] = {}
    s = axes.sizes
    text = s.get("text_seq")
    if text:
        if "prompt" in {c for c, v in text.items() if v != text["base"]}:
            out["text_seq"] = [1, max(max(text.values()), plan.defaults["text"] or 0)]
        else:
            out["text_seq"] = [text["base"], text["base"]]
    if "rotary_seq" in s:
        image = s.get("image_seq") or s.get("video_seq")
        offset = s["rotary_seq"]["base"] - image["base"]
        m = shapes["multiple"]
        lo = (shapes["height"][0] // m) * (shapes["width"][0] // m)
        hi = (shapes["height"][1] // m) * (shapes["width"][1] // m)
        if "video_seq" in s:
            frames = [(f - 1) // plan.tc + 1 for f in shapes["frames"]]
            lo, hi = lo * frames[0], hi * frames[1]
        t = out.get("text_seq", [offset, offset])
        out["rotary_seq"] = [t[0] + lo, t[1] + hi] if "text_seq" in s else [offset + lo, offset + hi]
    return out


# ---- TOML ------------------------------------------------------------------------------------------------------

def to_toml(recipe: dict[str, Any]) -> str:
    """The recipe as a TOML file (the subset recipes use: strings, numbers, booleans, lists, tables)."""
    head = [f"{k} = {_value(v)}" for k, v in recipe.items() if not isinstance(v, dict)]
    lines = ["# Derived by 'aotpack recipe'; edit and pin it (aotpack build ./this.toml).", *head]
    for k, v in recipe.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{_key(a)} = {_value(b)}" for a, b in v.items()]
    return "\n".join(lines) + "\n"


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(a)} = {_value(b)}" for a, b in v.items()) + " }" if v else "{}"
    raise TypeError(type(v))
