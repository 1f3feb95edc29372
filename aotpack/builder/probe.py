"""Probe a diffusers pipeline for a derived recipe (see ``aotpack.builder.derive``): where it is (a folder, or a Hub
repo at one commit), what it is (pipeline and model class, dtype, its ``__call__``'s names and defaults), and what
it passes its component on the first forward of each probe call (the weights are never read)."""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotpack.errors import AotpackError, RecipeError, first_line, one_line

PROMPTS = ("a photo of a cat",
           "a watercolor painting of a lighthouse on a cliff at dawn, gulls above")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
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
