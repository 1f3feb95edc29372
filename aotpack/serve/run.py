"""``run``: load the pipeline without its component, drop the artifact in, and write an image."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from aotpack.artifact import manifest as mf
from aotpack.errors import AotpackError, InputError
from aotpack.builder.source import load_pipeline, source_of  # source_of: re-exported for callers of aotpack.run
from aotpack.builder.recipe import get_recipe

log = logging.getLogger("aotpack")


def pipeline_for(artifact: str | os.PathLike, *, lora: str | None = None, lora_scale: float = 1.0, **load_kwargs):
    """A ready pipeline whose component is the artifact; the original component's weights are never read
    (nor the VAE's when the artifact carries a compiled VAE decoder)."""
    from aotpack.serve.module import assemble, load

    module = load(artifact, **load_kwargs)
    if lora is not None:
        module.swap_lora(lora, lora_scale)
    data = module.manifest
    recipe = get_recipe(data["recipe"]["name"], data["recipe"]["variant"])
    skip = ("vae",) if module.vae_decoder is not None else ()
    pipe = load_pipeline(recipe, source_of(data), dtype=data["dtype"], with_component=False, skip=skip)
    pipe.to(data["platform"]["device"])
    return assemble(pipe, module, remake=True), recipe


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".gif")


def mp4_writer_available() -> bool:
    """True when imageio with an ffmpeg binary is installed (``pip install aotpack[video]``)."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except Exception:  # not installed, or no ffmpeg binary for this platform
        return False


def default_out(data: dict) -> str:
    if data["inputs"]["image"].get("output") == "video":
        return "out.mp4" if mp4_writer_available() else "out.gif"
    return "out.png"


def run(
    artifact: str | os.PathLike,
    *,
    prompt: str,
    out: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    guidance_scale: float | None = None,
    batch: int = 1,
    frames: int | None = None,
    **load_kwargs,
) -> Path:
    """Generate an image (PNG/JPEG/WebP) or, for video recipes, a video (MP4, or an animated GIF) with the
    artifact; returns the path written."""
    import torch

    t0 = time.perf_counter()
    if Path(artifact).is_dir():  # a local folder: check the request before loading anything
        data = mf.read(artifact)
    else:  # a Hub repo id: its manifest comes with the download
        pipe, recipe = pipeline_for(artifact, **load_kwargs)
        data = getattr(pipe, recipe.component).manifest
    video = data["inputs"]["image"].get("output") == "video"
    out = Path(out or default_out(data))
    suffix = out.suffix.lower()
    if video and suffix not in VIDEO_SUFFIXES:
        raise InputError(f"this artifact makes videos; cannot write one to {out}", "name the output .mp4 or .gif")
    if not video and suffix not in IMAGE_SUFFIXES:
        raise InputError(f"cannot tell the image format of {out}", "name the output .png")
    if suffix == ".mp4" and not mp4_writer_available():
        raise InputError("no mp4 writer is installed (imageio + imageio-ffmpeg)",
                         "pip install 'aotpack[video]', or name the output .gif")
    if frames is not None and not video:
        raise InputError("--frames is for video artifacts; this one makes images", "leave --frames out")
    image = data["inputs"]["image"]
    recipe = get_recipe(data["recipe"]["name"], data["recipe"]["variant"])
    height = height or recipe.run["height"]
    width = width or recipe.run["width"]
    for name, value in (("height", height), ("width", width)):
        lo, hi = image[name]
        if not (lo <= value <= hi and value % image["multiple"] == 0):
            raise InputError(f"--{name} {value} is outside what the artifact accepts: {lo}..{hi}, "
                             f"a multiple of {image['multiple']}", f"pass a {name} in {lo}..{hi}")
    if video:
        frames = frames or recipe.run["frames"]
        lo, hi = image["frames"]
        step = recipe.temporal_compression
        if not (lo <= frames <= hi and (frames - 1) % step == 0):
            raise InputError(f"--frames {frames} is outside what the artifact accepts: {lo}..{hi}, "
                             f"of the form {step}k+1", f"pass --frames in {lo}..{hi}, e.g. {lo}")
    if Path(artifact).is_dir():
        pipe, recipe = pipeline_for(artifact, **load_kwargs)
    log.info("pipeline ready in %.2f s", time.perf_counter() - t0)
    t1 = time.perf_counter()
    kwargs = recipe.pipeline_kwargs(
        height=height, width=width, steps=steps or recipe.run["steps"],
        guidance_scale=recipe.run.get("guidance_scale", 3.5) if guidance_scale is None else guidance_scale,
        batch=batch, frames=frames)
    kwargs["max_sequence_length"] = data["inputs"]["max_sequence_length"]
    result = pipe(prompt=prompt, **kwargs, generator=torch.Generator("cpu").manual_seed(seed))
    log.info("%s generated in %.2f s (%.2f s from start)", "video" if video else "image",
             time.perf_counter() - t1, time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial{out.suffix}")
    try:
        if video:
            write_video(result.frames[0], tmp, fps=recipe.run.get("fps", 8))
        else:
            result.images[0].save(tmp, format=(out.suffix.lstrip(".").upper().replace("JPG", "JPEG")))
        os.replace(tmp, out)
    except OSError as e:
        raise AotpackError(f"could not write {out}: {e.strerror}", "check the folder and free space") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def write_video(frames: list, path: Path, *, fps: int = 8) -> None:
    """Write PIL frames as MP4 (imageio-ffmpeg) or animated GIF (Pillow), chosen by the file's suffix."""
    if path.suffix.lower() == ".gif":
        frames[0].save(path, format="GIF", save_all=True, append_images=list(frames[1:]),
                       duration=int(1000 / fps), loop=0)
        return
    import imageio.v2 as imageio
    import numpy as np

    with imageio.get_writer(str(path), format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1,
                            pixelformat="yuv420p") as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame.convert("RGB")))
