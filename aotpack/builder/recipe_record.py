"""The ``Recipe`` record: what to build, as a frozen dataclass, and the ranges of the dims it exports.

Made by ``recipe_parse.parse_recipe`` (which validates a recipe's TOML table); ``aotpack.builder.recipe``
re-exports every name here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aotpack.artifact.manifest import Relation, Request

DTYPES = ("float32", "bfloat16", "float16")
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
    freeze: bool = False                           # CPU builds of none / int8dq freeze where it gains (not --no-freeze)
    block_inputs: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # dims of the blocks' inputs
    ranges: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # [ranges]: dims set outright
    # the table this recipe was parsed from, as the manifest records it: an artifact is served from its own recipe
    data: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    step: int = 0                                  # a request's height/width are multiples of it (0: multiple)
    default_quants: tuple[str, ...] = ()           # default_quant as a list: the schemes in order of preference

    def __post_init__(self) -> None:
        if not self.default_quants:
            object.__setattr__(self, "default_quants", (self.default_quant,))
        elif self.default_quants[0] != self.default_quant:
            raise ValueError(f"default_quant {self.default_quant!r} is not the first of {self.default_quants!r}")

    def default_for(self, device: str, flags: tuple[str, ...] | list[str]) -> tuple[str, str | None]:
        """The scheme a build on ``device`` (its CPU ``flags``) takes when ``--quant`` is left out, and why when it
        is not ``default_quant``: the first of ``default_quants`` that does not run many times slower than float32
        there (``platform.slow_scheme``: int8 matmuls on a CPU without int8 units), else ``default_quant``."""
        from aotpack.artifact.platform import slow_scheme

        first_slow = slow_scheme(device, flags, self.default_quant)
        for scheme in self.default_quants:
            if not slow_scheme(device, flags, scheme):
                return scheme, (None if scheme == self.default_quant else
                                f"the recipe's default {self.default_quant} is slow here ({first_slow}), so its "
                                f"next choice: {scheme}")
        return self.default_quant, None

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

