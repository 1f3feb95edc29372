"""``run``: load the pipeline without its component, drop the artifact in, and write an image or a video.

A request is checked against the artifact's bounds (the manifest's ``request``) before anything is loaded:
sizes, frames, steps, batch, seed, guidance and the prompt each get their own one-line error.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aotpack.artifact import manifest as mf
from aotpack.artifact.manifest import Manifest
from aotpack.builder.recipe import Recipe, recipe_of
from aotpack.errors import AotpackError, InputError
from aotpack.serve.load import resolve_location

log = logging.getLogger("aotpack")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".gif")
MAX_PROMPT_CHARS = 10_000


def pipeline_for(artifact: str | os.PathLike, *, lora: str | None = None, lora_scale: float = 1.0,
                 **load_kwargs: Any) -> tuple[Any, Recipe]:
    """A ready pipeline whose component is the artifact (``from_pretrained`` of the checkpoint it was built
    from), and the artifact's recipe; the original component's weights are never read (nor the VAE's when the
    artifact carries a compiled VAE decoder)."""
    from aotpack.serve.pipe import from_pretrained

    pipe = from_pretrained(None, artifact, lora=lora, lora_scale=lora_scale, **load_kwargs)
    manifest = pipe.components[pipe_component(pipe)].manifest
    return pipe, recipe_of(manifest.recipe)


def pipe_component(pipe: Any) -> str:
    """The name of the pipeline component that is an aotpack artifact."""
    return next(n for n, c in pipe.components.items() if hasattr(c, "manifest") and hasattr(c, "swap_lora"))


def mp4_writer_available() -> bool:
    """True when imageio with an ffmpeg binary is installed (``pip install aotpack[video]``)."""
    try:
        import imageio.v2  # noqa: F401
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except Exception:  # not installed, or no ffmpeg binary for this platform
        return False


def default_out(manifest: Manifest) -> str:
    if manifest.is_video:
        return "out.mp4" if mp4_writer_available() else "out.gif"
    return "out.png"


@dataclass(frozen=True)
class Call:
    """One checked request: what the pipeline is called with."""

    prompt: str
    height: int
    width: int
    steps: int
    seed: int
    guidance_scale: float
    batch: int
    frames: int | None
    max_sequence_length: int


def check_request(manifest: Manifest, recipe: Recipe, *, prompt: str, height: int | None = None,
                  width: int | None = None, steps: int | None = None, seed: int = 0,
                  guidance_scale: float | None = None, batch: int = 1, frames: int | None = None,
                  max_sequence_length: int | None = None) -> Call:
    """The request with the recipe's defaults filled in, or InputError naming the first value out of bounds.
    ``None`` means "the recipe's default"; 0 is a value, and an error where it is not allowed."""
    req = manifest.request
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("--prompt is empty", "pass a text prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("--prompt is not valid UTF-8 text", "pass the prompt as UTF-8") from None
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"--prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}",
                         "shorten the prompt (the text encoder reads at most "
                         f"{req.max_sequence_length} tokens)")
    height = recipe.run["height"] if height is None else height
    width = recipe.run["width"] if width is None else width
    for name, value, (lo, hi) in (("height", height, req.height), ("width", width, req.width)):
        if not lo <= value <= hi:
            raise InputError(f"--{name} {value} is outside what the artifact accepts: {lo}..{hi}, "
                             f"a multiple of {req.multiple}", f"pass a {name} in {lo}..{hi}")
        if value % req.multiple:
            below = value - value % req.multiple
            near = " or ".join(str(v) for v in (below, below + req.multiple) if lo <= v <= hi)
            raise InputError(f"--{name} {value} is not a multiple of {req.multiple}, as the artifact needs",
                             f"pass --{name} {near}")
    steps = recipe.run["steps"] if steps is None else steps
    if not 1 <= steps <= req.max_steps:
        raise InputError(f"--steps {steps} is outside 1..{req.max_steps}",
                         f"pass --steps between 1 and {req.max_steps} (the recipe's maximum)")
    if not 0 <= seed < 2**63:
        raise InputError(f"--seed {seed} is not in 0..2^63-1", "pass a non-negative seed")
    guidance = recipe.run.get("guidance_scale", 3.5) if guidance_scale is None else float(guidance_scale)
    if not math.isfinite(guidance) or guidance < 0:
        raise InputError(f"--guidance-scale {guidance} is not a finite number >= 0", "e.g. --guidance-scale 3.5")
    divisor = recipe.call.get("batch_divisor", 1)
    if not 1 <= batch * divisor <= req.batch[1]:
        raise InputError(f"--batch {batch} is outside 1..{req.batch[1] // divisor}",
                         "use a smaller batch, or rebuild with a wider recipe")
    if manifest.is_video:
        frames = recipe.run["frames"] if frames is None else frames
        lo, hi = req.frames
        step = req.temporal_compression
        if not (lo <= frames <= hi and (frames - 1) % step == 0):
            raise InputError(f"--frames {frames} is outside what the artifact accepts: {lo}..{hi}, "
                             f"of the form {step}k+1", f"pass --frames in {lo}..{hi}, e.g. {lo}")
    elif frames is not None:
        raise InputError("--frames is for video artifacts; this one makes images", "leave --frames out")
    text = req.max_sequence_length if max_sequence_length is None else max_sequence_length
    if not 1 <= text <= req.max_sequence_length or (text != req.max_sequence_length and not _dynamic_text(manifest)):
        allowed = f"1..{req.max_sequence_length}" if _dynamic_text(manifest) else str(req.max_sequence_length)
        raise InputError(f"--max-sequence-length {text} is not one the artifact accepts ({allowed})",
                         f"pass --max-sequence-length in {allowed}")
    return Call(prompt, height, width, steps, seed, guidance, batch, frames, text)


def _dynamic_text(manifest: Manifest) -> bool:
    return any("text_seq" in m.inputs.dynamic for m in manifest.modules)


def _check_out(manifest: Manifest, out: Path) -> None:
    suffix = out.suffix.lower()
    if manifest.is_video and suffix not in VIDEO_SUFFIXES:
        raise InputError(f"this artifact makes videos; cannot write one to {out}", "name the output .mp4 or .gif")
    if not manifest.is_video and suffix not in IMAGE_SUFFIXES:
        raise InputError(f"cannot tell the image format of {out}", "name the output .png")
    if suffix == ".mp4" and not mp4_writer_available():
        raise InputError("no mp4 writer is installed (imageio + imageio-ffmpeg)",
                         "pip install 'aotpack[video]', or name the output .gif")
    parent = out.absolute().parent
    if not parent.is_dir():  # never make folders the user did not ask for (seen: one made at /)
        raise InputError(f"--out {out}: the folder {parent} does not exist", "create it first, or write elsewhere")


def run(artifact: str | os.PathLike, *, prompt: str, out: str | os.PathLike | None = None, height: int | None = None,
        width: int | None = None, steps: int | None = None, seed: int = 0, guidance_scale: float | None = None,
        batch: int = 1, frames: int | None = None, max_sequence_length: int | None = None,
        **load_kwargs: Any) -> Path:
    """Generate an image (PNG/JPEG/WebP) or, for video recipes, a video (MP4, or an animated GIF) with the
    artifact; returns the path written. Every request value is checked before anything is loaded."""
    import torch

    t0 = time.perf_counter()
    hub = {k: load_kwargs[k] for k in ("revision", "trust", "token", "quant", "refresh_pins") if k in load_kwargs}
    # a repo id: the build that fits, pulled and verified; the load below checks it against the pull's record
    folder, _ = resolve_location(artifact, **hub)
    manifest = mf.read(folder)
    recipe = recipe_of(manifest.recipe)
    call = check_request(manifest, recipe, prompt=prompt, height=height, width=width, steps=steps, seed=seed,
                         guidance_scale=guidance_scale, batch=batch, frames=frames,
                         max_sequence_length=max_sequence_length)
    out = Path(out or default_out(manifest))
    _check_out(manifest, out)
    pipe, recipe = pipeline_for(folder, **{k: v for k, v in load_kwargs.items() if k not in hub})
    log.info("pipeline ready in %.2f s", time.perf_counter() - t0)
    t1 = time.perf_counter()
    kwargs = recipe.pipeline_kwargs(height=call.height, width=call.width, steps=call.steps,
                                    guidance_scale=call.guidance_scale, batch=call.batch, frames=call.frames)
    if recipe.call.get("text", "max_sequence_length"):  # a pipeline without the parameter gets none
        kwargs[recipe.call.get("text", "max_sequence_length")] = call.max_sequence_length
    # output_type "pil": some pipelines (Wan) default to numpy frames
    result = pipe(prompt=call.prompt, **kwargs, output_type="pil",
                  generator=torch.Generator("cpu").manual_seed(call.seed))
    log.info("%s generated in %.2f s (%.2f s from start)", "video" if manifest.is_video else "image",
             time.perf_counter() - t1, time.perf_counter() - t0)
    _write(result, manifest, out, recipe.run.get("fps", 8), call.frames)
    return out


def _write(result: Any, manifest: Manifest, out: Path, fps: int, frames_asked: int | None = None) -> None:
    """Write through a temporary file renamed into place (never a half-written output)."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".partial{out.suffix}", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600: an image is written as any other file would be
    try:
        if manifest.is_video:
            frames = result.frames[0]
            if frames_asked is not None and len(frames) != frames_asked:
                log.warning("the pipeline made %d frames for --frames %d; writing all %d", len(frames),
                            frames_asked, len(frames))
            write_video(frames, tmp, fps=fps)
        else:
            result.images[0].save(tmp, format=(out.suffix.lstrip(".").upper().replace("JPG", "JPEG")))
        os.replace(tmp, out)
    except OSError as e:
        raise AotpackError(f"could not write {out}: {e.strerror}", "check the folder and free space") from None
    finally:
        tmp.unlink(missing_ok=True)


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
