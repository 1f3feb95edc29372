"""torch.export of a module called with one dict of tensors, its dynamic dims taken from an ``InputSpec``."""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping

import torch
from torch.export import Dim

from aotpack.artifact.manifest import InputSpec, Relation, TensorSpec
from aotpack.builder.capture import unflatten_inputs
from aotpack.builder.recipe import Recipe
from aotpack.errors import BuildError, first_line


log = logging.getLogger("aotpack")
COMPONENT_ROOT = "component"   # the wrapper's attribute: every compiled constant's name starts with it


class ComponentWrapper(torch.nn.Module):
    """A fixed calling convention for export: one dict of tensors in, one tensor out.

    ``constants`` (non-tensor arguments: ``img_shapes``, ``num_frames``, ``None``) are closed over, so export
    bakes them into the graph and the compiled code takes tensors only; ``inputs`` may repeat them (eager calls
    on a captured example do)."""

    def __init__(self, component: torch.nn.Module, constants: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.component = component
        self.constants = dict(constants or {})

    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.component(**unflatten_inputs({**self.constants, **inputs}), return_dict=False)[0]


class DecoderWrapper(torch.nn.Module):
    """The VAE's ``decode`` as a module: ``{"z": latents}`` in, the decoded sample out."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.vae.decode(inputs["z"], return_dict=False)[0]


def input_spec(example: Mapping[str, Any], axes: Mapping[str, Mapping[str, int]],
               ranges: Mapping[str, list[int] | tuple[int, ...]], relations: tuple[Relation, ...] = ()) -> InputSpec:
    """The InputSpec of ``example``: ``axes[dim][input] = axis`` names the dynamic axes, ``ranges[dim]`` their
    [min, max(, multiple)]; its non-tensor values are recorded as the constants the export bakes in."""
    tensors = []
    constants = {k: v for k, v in example.items() if not isinstance(v, torch.Tensor)}
    for name, t in example.items():
        if name in constants:
            continue
        shape: list[int | str] = list(t.shape)
        for dim, table in axes.items():
            if name in table and dim in ranges:
                shape[table[name]] = dim
        tensors.append(TensorSpec(name=name, shape=tuple(shape), dtype=str(t.dtype).removeprefix("torch.")))
    used = {d for t in tensors for d in t.shape if isinstance(d, str)}
    # a relation may name a fixed size no input carries (rotary_seq = a padded text length + image_seq)
    fixed = {d for d in ranges if ranges[d][0] == ranges[d][1]}
    kept = tuple(r for r in relations if r.dim in used and set(r.of) <= used | fixed)
    used |= {d for r in kept for d in r.of}
    return InputSpec(tensors=tuple(tensors), dynamic={d: tuple(ranges[d]) for d in ranges if d in used},
                     relations=kept, constants=constants)


def component_spec(example: Mapping[str, torch.Tensor], recipe: Recipe) -> InputSpec:
    """The component's InputSpec from its captured inputs and the recipe's dims."""
    return input_spec(example, recipe.dynamic, {d: recipe.dim_range(d) for d in recipe.dynamic},
                      tuple(recipe.relations()))


def decoder_inputs(vae: Any, recipe: Recipe, dtype: Any, device: str) -> tuple[dict, InputSpec]:
    """(example, spec) for exporting the VAE decoder over the recipe's batch and image sizes."""
    step = recipe.multiple // recipe.vae_scale
    ranges = {"batch": list(recipe.batch),
              "latent_height": [recipe.height[0] // recipe.vae_scale, recipe.height[1] // recipe.vae_scale, step],
              "latent_width": [recipe.width[0] // recipe.vae_scale, recipe.width[1] // recipe.vae_scale, step]}
    cap = recipe.capture
    z = torch.randn(2, vae.config.latent_channels, cap["height"] // recipe.vae_scale,
                    cap["width"] // recipe.vae_scale, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    axes = {"batch": {"z": 0}, "latent_height": {"z": 2}, "latent_width": {"z": 3}}
    return {"z": z}, input_spec({"z": z}, axes, ranges)


def tensor_attributes_as_buffers(module: torch.nn.Module) -> None:
    """Plain tensor attributes (Qwen-Image's rotary ``pos_freqs``, set with ``self.x = tensor``, neither
    parameter nor buffer) made non-persistent buffers: export would lift them as anonymous constants that the
    compiled code names ``_tensor_constantN``, apart from the weights; as buffers they are named constants like
    any other, saved with the weights."""
    for m in module.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                delattr(m, name)
                m.register_buffer(name, value, persistent=False)


_FIX = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*) = (\d+)\s*$")


def export_fitted(wrapper: torch.nn.Module, example: dict[str, Any], spec: InputSpec,
                  where: str = "the model") -> tuple[Any, InputSpec]:
    """``export``, and when the model's own code fixes a dim the spec made dynamic (Chroma's forward fixes the
    batch), that dim exported static at its captured size, as torch's suggested fix says: (program, spec as
    exported). Any other failure is export's BuildError."""
    try:
        return export(wrapper, example, spec), spec
    except BuildError as e:
        fixes = _specialized(e.__cause__, spec)
        if not fixes:
            raise
    for name, size in fixes.items():
        log.warning("%s's forward fixes %s to %d: exported static (requests with another %s are refused)",
                    where, name, size, name)
    fitted = dataclasses.replace(spec, dynamic={k: ((fixes[k], fixes[k]) if k in fixes else v)
                                                for k, v in spec.dynamic.items()})
    return export(wrapper, example, fitted), fitted


def _specialized(error: BaseException | None, spec: InputSpec) -> dict[str, int]:
    """{dim: size} of the dims torch's "Suggested fixes" pin to a constant (only dims of ``spec``, inside range)."""
    text = str(error or "")
    if "Suggested fixes:" not in text:
        return {}
    out = {}
    for line in text.split("Suggested fixes:", 1)[1].splitlines():
        m = _FIX.match(line)
        if m and m.group(1) in spec.dynamic:
            lo, hi, *_ = spec.dynamic[m.group(1)]
            if lo <= int(m.group(2)) <= hi and lo < hi:
                out[m.group(1)] = int(m.group(2))
    return out


def export(wrapper: torch.nn.Module, example: dict[str, Any], spec: InputSpec):
    """torch.export ``wrapper(example)`` with one Dim per dynamic dim of ``spec``, shared across inputs.

    Only the tensors of ``spec`` become inputs (contiguous: served inputs are); the example's other values are
    closed over by the wrapper and baked into the graph."""
    constants = {k: v for k, v in example.items() if k not in spec.names}
    if constants:
        if not isinstance(getattr(wrapper, "constants", None), dict):
            raise BuildError(f"{type(wrapper).__name__} was captured with non-tensor arguments "
                             f"({', '.join(sorted(constants))}) it cannot bake in",
                             "build the whole graph (leave --regional out) for this model")
        wrapper.constants = {**wrapper.constants, **constants}
    example = {k: v.contiguous() for k, v in example.items() if k in spec.names}
    tensor_attributes_as_buffers(wrapper)
    dims: dict[str, Any] = {}
    sums = {r.dim: r.of for r in spec.relations if r.op == "sum"}
    for name, (lo, hi, *step) in spec.dynamic.items():
        if name in sums:  # a sum of other dims (the rotary table over text + image): below
            continue
        if lo == hi:  # a fixed size: exported static (the loader still checks it)
            continue
        if step and step[0] > 1:  # a dim that steps by m (latent rows of patch m) is exported as m * Dim
            dims[name] = step[0] * Dim(f"{name}_div{step[0]}", min=lo // step[0], max=hi // step[0])
        else:
            dims[name] = Dim(name, min=lo, max=hi)
    for name, of in sums.items():
        static = [d for d in of if d in spec.dynamic and spec.dynamic[d][0] == spec.dynamic[d][1]]
        moving = [d for d in of if d not in static]
        if len(moving) == 1 and moving[0] in dims:  # one dim + a fixed size (padded text): a derived Dim
            dims[name] = dims[moving[0]] + sum(spec.dynamic[d][0] for d in static)
        elif moving:  # a sum of two moving dims: export derives it
            dims[name] = Dim.AUTO
    shapes = {t.name: ({axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str) and d in dims} or None)
              for t in spec.tensors}
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes={"inputs": shapes}, strict=False)
    except Exception as e:  # export errors are long; keep the first line and the class
        raise BuildError(f"torch.export failed: {type(e).__name__}: {first_line(e)}",
                         "set AOTPACK_DEBUG=1 for the full trace; narrow the recipe's shape ranges") from e
