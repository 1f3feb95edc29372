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

import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotpack.errors import AotpackError, RecipeError, first_line, one_line

PROMPTS = ("a photo of a cat",
           "a watercolor painting of a lighthouse on a cliff at dawn, gulls above")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DEFAULT_QUANT = "int8wo"     # a derived recipe's default scheme (runs on every CPU and GPU)
H_RATIO, W_RATIO = 2, 3     # the size call: height x2, width x3 (so rows, columns and tokens move apart)


def is_pipeline_source(name: Any) -> bool:
    """A build source that names a diffusers pipeline (a local folder, or a Hub repo id) rather than a recipe."""
    if not isinstance(name, str) or name.endswith(".toml"):
        return False
    if "/" not in name and os.sep not in name:  # a bare name: a shipped recipe wins over a folder of that name
        from aotpack.builder.recipe import list_recipes

        if name in list_recipes():
            return False
    path = Path(name).expanduser()
    if path.is_dir():
        return True
    return bool(_HUB_ID.match(name)) and not path.exists()


@dataclass
class Options:
    """What a user may set on a derived recipe (``build SOURCE --component ... --max-size ...``)."""

    component: str = "transformer"
    blocks: tuple[str, ...] = ()
    max_size: int | None = None
    max_frames: int | None = None
    max_batch: int = 4
    revision: str | None = None


@dataclass
class Pipeline:
    """What the derivation knows of the pipeline before it calls it."""

    location: str                  # what from_pretrained gets
    checkpoint: str                # as the recipe records it (an absolute folder, or the repo id)
    revision: str | None           # the commit (Hub)
    pipeline: str
    model_class: str
    config: dict
    dtype: str
    params: dict[str, inspect.Parameter] = field(default_factory=dict)


def locate(source: str, opts: Options) -> tuple[str, str | None, Path]:
    """(checkpoint, commit, local folder holding model_index.json and the component's config)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise RecipeError(f"{source} is not a diffusers pipeline folder (no model_index.json)",
                              "pass a folder written by save_pretrained, a Hub repo id, or a recipe")
        if opts.revision:
            raise RecipeError("--revision is for a Hub repo id; a local folder has none", "leave --revision out")
        return str(path.resolve()), None, path.resolve()
    from huggingface_hub import snapshot_download

    from aotpack.hub import endpoint

    try:  # the pipeline at one commit, in the Hub cache; pickled and other frameworks' weights left out
        root = Path(snapshot_download(source, revision=opts.revision, endpoint=endpoint(),
                                      ignore_patterns=["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack",
                                                       "*.h5", "*.onnx", "*.onnx_data", "*.gguf"]))
    except Exception as e:  # network, auth, missing repo or revision: one line
        raise RecipeError(f"could not read {source} from the Hub: {first_line(e)}",
                          "check the repo id, --revision, the network and 'hf auth login'") from None
    commit = root.name if re.fullmatch(r"[0-9a-f]{40}", root.name) else None
    if commit is None:
        raise RecipeError(f"could not tell which commit of {source} was read", "pass --revision with a commit")
    return source, commit, root


def inspect_pipeline(source: str, opts: Options) -> Pipeline:
    checkpoint, commit, root = locate(source, opts)
    index = _json(root / "model_index.json")
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str):
        raise RecipeError(f"{source}'s model_index.json names no pipeline class", "check the folder")
    if opts.component not in index:
        parts = sorted(k for k, v in index.items() if isinstance(v, list) and not k.startswith("_"))
        raise RecipeError(f"{pipeline} has no component '{opts.component}'",
                          f"pass --component, one of: {', '.join(parts)}")
    config = _json(root / opts.component / "config.json")
    model_class = config.get("_class_name")
    if not isinstance(model_class, str):
        raise RecipeError(f"{source}/{opts.component}/config.json names no model class", "check the folder")
    import diffusers

    cls = getattr(diffusers, pipeline, None)
    if cls is None:
        raise RecipeError(f"diffusers {diffusers.__version__} has no pipeline class {pipeline}", "upgrade diffusers")
    location = str(root)  # a Hub checkpoint: its snapshot at the commit read (what the calls run on)
    return Pipeline(location=location, checkpoint=checkpoint, revision=commit, pipeline=pipeline,
                    model_class=model_class, config=config, dtype=_weights_dtype(root / opts.component, source),
                    params=dict(inspect.signature(cls.__call__).parameters))


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"{path} does not exist", "check that the folder is a complete diffusers pipeline") from None
    except (OSError, ValueError) as e:
        raise RecipeError(f"cannot read {path}: {one_line(str(e), 120)}", "check the folder") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path} does not hold a JSON object", "check the folder")
    return data


def _weights_dtype(folder: Path, source: str) -> str:
    """The dtype most of the component's floating weights are stored in (read from the safetensors headers); a
    Hub component whose weights are not downloaded yet is taken as bfloat16, as most current checkpoints are."""
    import os
    from collections import Counter

    from aotpack.artifact.files import read_safetensors_header

    counts: Counter = Counter()
    for f in sorted(folder.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            entries = read_safetensors_header(fd, os.fstat(fd).st_size, f.name, RecipeError)
        finally:
            os.close(fd)
        counts.update(e.dtype for e in entries.values() if e.dtype in ("float32", "bfloat16", "float16"))
    return counts.most_common(1)[0][0] if counts else "bfloat16"


# ---- the calls ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The pipeline's own parameter names and defaults, and the calls the derivation makes."""

    batch: str                     # "num_images_per_prompt", "num_videos_per_prompt" or "" (none)
    frames: str                    # "num_frames" or ""
    text: str                      # "max_sequence_length" or ""
    guidance: str                  # "guidance_scale" or ""
    fixed: dict[str, Any]          # passed on every call (use_resolution_binning=False)
    area: str                      # "max_area" where the pipeline resizes to an area, else ""
    quantum: int                   # capture sizes are multiples of it
    spatial: int                   # the VAE's spatial compression
    patch: int                     # the transformer's spatial patch
    tc: int                        # temporal compression
    defaults: dict[str, Any]       # height, width, steps, guidance, frames, text


def plan_calls(pipe: Any, info: Pipeline) -> Plan:
    params = info.params
    for need in ("prompt", "height", "width", "num_inference_steps"):
        if need not in params:
            raise RecipeError(f"{info.pipeline}.__call__ takes no '{need}'",
                              "aotpack derives recipes for text-to-image and text-to-video pipelines; "
                              "write a recipe file for this one")

    def default(name: str) -> Any:
        p = params.get(name)
        return None if p is None or p.default is inspect.Parameter.empty else p.default

    spatial = _attr(pipe, ("vae_scale_factor_spatial", "vae_spatial_compression_ratio", "vae_scale_factor"), 8)
    patch = info.config.get("patch_size") or 1
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    quantum = max(int(spatial) * max(int(patch), 2), 32)  # pipelines ask for multiples of up to 32
    size = (getattr(pipe, "default_sample_size", None) or 128) * int(spatial)
    defaults = {"height": default("height") or size, "width": default("width") or size,
                "steps": default("num_inference_steps") or 28, "guidance": default("guidance_scale"),
                "frames": default("num_frames"), "text": default("max_sequence_length")}
    batch = next((n for n in ("num_images_per_prompt", "num_videos_per_prompt") if n in params), "")
    return Plan(batch=batch, frames="num_frames" if "num_frames" in params else "",
                text="max_sequence_length" if isinstance(defaults["text"], int) else "",
                guidance="guidance_scale" if isinstance(defaults["guidance"], (int, float)) else "",
                fixed={"use_resolution_binning": False} if "use_resolution_binning" in params else {},
                area="max_area" if "max_area" in params else "",
                quantum=quantum, spatial=int(spatial), patch=int(patch), tc=int(_attr(pipe, ("vae_scale_factor_temporal", "vae_temporal_compression_ratio"),
                                              4)), defaults=defaults)


def _attr(pipe: Any, names: tuple[str, ...], default: int) -> int:
    for n in names:
        v = getattr(pipe, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def calls(plan: Plan) -> dict[str, dict[str, Any]]:
    """{label: pipeline kwargs}: the base call, then one per setting, each changing that setting alone."""
    q = plan.quantum
    base: dict[str, Any] = {"prompt": PROMPTS[0], "height": 2 * q, "width": 2 * q, "num_inference_steps": 2,
                            **plan.fixed}
    if plan.guidance:
        base[plan.guidance] = plan.defaults["guidance"]
    if plan.batch:
        base[plan.batch] = 1
    if plan.frames:
        base[plan.frames] = plan.tc + 1
    if plan.text:
        base[plan.text] = plan.defaults["text"]
    out = {"base": base, "size": {**base, "height": 2 * q * H_RATIO, "width": 2 * q * W_RATIO},
           "prompt": {**base, "prompt": PROMPTS[1]}}
    if plan.area:  # a pipeline that resizes to an area (FLUX.1 Kontext's max_area): the area of the request
        for kw in out.values():
            kw[plan.area] = kw["height"] * kw["width"]
    if plan.batch:
        out["batch"] = {**base, plan.batch: 2}
    if plan.frames:
        out["frames"] = {**base, plan.frames: 2 * plan.tc + 1}
    if plan.text and plan.defaults["text"] > 2:
        out["text"] = {**base, plan.text: plan.defaults["text"] // 2}
    return out


def observe(pipe: Any, component: str, kwargs: dict[str, Any], label: str) -> dict[str, Any]:
    """What the pipeline passes its component on the first forward of one call: tensors flattened by name
    (tuples spread), the other values as they are."""
    import torch

    from aotpack.builder.capture import bind_call, flatten_inputs, is_tensor_tuple

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def hook(module, args, kw):
        seen.update(bind_call(module, args, kw))
        raise Stop

    handle = getattr(pipe, component).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    except Stop:
        pass
    except AotpackError:
        raise
    except Exception as e:  # the pipeline refused this call: say which one
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "prompt")
        raise RecipeError(f"the {label} call ({shown}) failed in the pipeline: {type(e).__name__}: {first_line(e)}",
                          "write a recipe file for this model (start from 'aotpack recipe SOURCE' with "
                          "--max-size, or another family's recipe)") from None
    finally:
        handle.remove()
    if not seen:
        raise RecipeError(f"the pipeline never called its {component}", "check --component")
    out: dict[str, Any] = {}
    for k, v in seen.items():
        out.update(flatten_inputs({k: v}) if isinstance(v, torch.Tensor) or is_tensor_tuple(v) else {k: v})
    return out


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
    step = math.lcm(multiple, q)
    video = bool(plan.frames)
    sized = "size" not in axes.fixed
    limit = opts.max_size or max(d["height"], d["width"])
    top = max(step, limit - limit % step)
    run_h = _clip(d["height"], step, top)
    run_w = _clip(d["width"], step, top)
    if not sized:  # a baked-in argument follows the size: one size, the run's
        capture_h, capture_w = run_h, run_w
    elif base_h * W_RATIO <= top:  # the size call: rows and columns of different sizes
        capture_h, capture_w = base_h * H_RATIO, base_h * W_RATIO
    elif base_h <= top:
        capture_h = capture_w = base_h
    else:
        raise RecipeError(f"--max-size {limit} is below the smallest size the pipeline was called at ({base_h})",
                          f"pass --max-size {base_h} or more")
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
        framed = "frames" not in axes.fixed
        default_frames = d["frames"] or 4 * plan.tc + 1
        most = min(default_frames, opts.max_frames) if opts.max_frames else default_frames
        most -= (most - 1) % plan.tc
        run["frames"] = most
        capture["frames"] = 2 * plan.tc + 1 if framed else most
        shapes["frames"] = [plan.tc + 1, max(most, capture["frames"])] if framed else [most, most]
        shapes["temporal_compression"] = plan.tc
    call: dict[str, Any] = {"batch": plan.batch, "text": plan.text, "guidance": plan.guidance,
                            "batch_divisor": div}
    if plan.frames:
        call["frames"] = plan.frames
    if plan.area:
        call["area"] = plan.area
    if plan.fixed:
        call["fixed"] = dict(plan.fixed)
    inputs = {dim: table for dim, table in axes.inputs.items() if dim != "batch" or batched}
    inputs.setdefault("batch", {})
    recipe.update({"shapes": shapes, "capture": capture, "run": run, "call": call, "inputs": inputs,
                   "ranges": _ranges(axes, plan, shapes, sized)})
    return recipe


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
