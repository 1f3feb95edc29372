"""``run``: load the pipeline without its component, drop the artifact in, and write an image."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import manifest as mf
from .errors import AotpackError, InputError
from .models import Source, load_pipeline
from .recipe import get_recipe

log = logging.getLogger("aotpack")


def source_of(data: dict) -> Source:
    """Where the rest of the pipeline comes from, as the manifest recorded it."""
    model = data["model"]
    if model["source"] == "builtin":
        from .tiny import ensure_builtin

        name = model["checkpoint"].split(":", 1)[1]
        return Source(model["checkpoint"], model["revision"], "builtin", str(ensure_builtin(name)))
    return Source(model["checkpoint"], model["revision"], model["source"], model["checkpoint"])


def pipeline_for(artifact: str | os.PathLike, **load_kwargs):
    """A ready pipeline whose component is the artifact; the original component's weights are never read."""
    from .runtime import load

    module = load(artifact, **load_kwargs)
    data = module.manifest
    recipe = get_recipe(data["recipe"]["name"], data["recipe"]["variant"])
    pipe = load_pipeline(recipe, source_of(data), dtype=data["dtype"], with_component=False)
    pipe.to(data["platform"]["device"])
    setattr(pipe, recipe.component, module)
    return pipe, recipe


def run(
    artifact: str | os.PathLike,
    *,
    prompt: str,
    out: str | os.PathLike,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    batch: int = 1,
    **load_kwargs,
) -> Path:
    """Generate an image with the artifact and save it to ``out`` (PNG); returns the path written."""
    import torch

    out = Path(out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise InputError(f"cannot tell the image format of {out}", "name the output .png")
    t0 = time.perf_counter()
    pipe, recipe = pipeline_for(artifact, **load_kwargs)
    data = getattr(pipe, recipe.component).manifest
    image = data["inputs"]["image"]
    height = height or recipe.run["height"]
    width = width or recipe.run["width"]
    for name, value in (("height", height), ("width", width)):
        lo, hi = image[name]
        if not (lo <= value <= hi and value % image["multiple"] == 0):
            raise InputError(f"--{name} {value} is outside what the artifact accepts: {lo}..{hi}, "
                             f"a multiple of {image['multiple']}", f"pass a {name} in {lo}..{hi}")
    log.info("pipeline ready in %.2f s", time.perf_counter() - t0)
    t1 = time.perf_counter()
    result = pipe(
        prompt=prompt, height=height, width=width,
        num_inference_steps=steps or recipe.run["steps"],
        guidance_scale=recipe.run.get("guidance_scale", 3.5) if guidance_scale is None else guidance_scale,
        max_sequence_length=data["inputs"]["max_sequence_length"], num_images_per_prompt=batch,
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    log.info("image generated in %.2f s (%.2f s from start)", time.perf_counter() - t1, time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        result.images[0].save(tmp, format=(out.suffix.lstrip(".").upper().replace("JPG", "JPEG")))
        os.replace(tmp, out)
    except OSError as e:
        raise AotpackError(f"could not write {out}: {e.strerror}", "check the folder and free space") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out
