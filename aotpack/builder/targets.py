"""The modules a build compiles: the whole component, or one per block class (regional), and the VAE decoder;
each with the wrapper export sees, its captured example and InputSpec, and its eager (quantized) reference."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

from aotpack._torch_compat import unwrap_tensor_subclass
from aotpack.artifact.files import MODEL
from aotpack.artifact.manifest import CompiledModule, FileEntry, InputSpec
from aotpack.builder import regional
from aotpack.builder.capture import unflatten_inputs
from aotpack.builder.export import COMPONENT_ROOT, ComponentWrapper, DecoderWrapper, component_spec, decoder_inputs
from aotpack.builder.regional import Schemes
from aotpack.builder.schemes import quantize_named
from aotpack.builder.spec import BuildSpec
from aotpack.builder.weights import Lora
from aotpack.errors import BuildError

VAE_MODEL = "vae_decoder.pt2"


@dataclass
class Quantized:
    """The component streamed from its checkpoint and quantized, and what the manifest records of it."""

    model: torch.nn.Module
    config: dict
    plan: dict | None
    lora: Lora | None
    commit: str | None
    files: dict[str, FileEntry]
    schemes: Schemes                      # the scheme each quantized linear got
    classes: list[str]                    # regional: the block classes compiled once each
    glue_int8: list[str] = field(default_factory=list)  # regional: the linears outside the blocks made int8


@dataclass
class Target:
    """One module to compile: the wrapper export sees, its captured example and InputSpec, and where its
    constants go in the weights file."""

    name: str
    kind: str
    code: str
    root: str
    instances: tuple[str, ...]
    wrapper: torch.nn.Module
    example: dict[str, torch.Tensor]
    spec: InputSpec
    schemes: set[str]
    reference: torch.Tensor
    config: dict | None = None
    block_class: str | None = None
    # regional: each instance's module and its eager (quantized) output on the example
    members: list[torch.nn.Module] | None = None
    references: list[torch.Tensor] | None = None   # each instance's, on ``check``
    check: dict[str, Any] | None = None            # the block inputs at the smallest request
    output: str = ""                      # a block's output form (CompiledModule.output)


@dataclass
class Compiled:
    target: Target
    module: CompiledModule
    constants: dict[str, torch.Tensor]      # weights-file key -> tensor


def _schemes(spec: BuildSpec, plan: dict | None) -> set[str]:
    return {e["scheme"] for e in plan["layers"].values()} | {"none"} if plan else {spec.quant}


def component_target(spec: BuildSpec, q: Quantized, example: dict[str, torch.Tensor]) -> Target:
    """The whole component as one module; its eager (quantized) output on the captured inputs is the reference."""
    wrapper = ComponentWrapper(q.model).eval()
    reference = wrapper(example)
    if spec.quant != "none":  # torchao subclasses -> plain tensors for export
        unwrap_tensor_subclass(wrapper)
    component = spec.recipe.component
    return Target(name=component, kind="component", code=MODEL, root=COMPONENT_ROOT, instances=(component,),
                  wrapper=wrapper, example=example, spec=component_spec(example, spec.recipe),
                  schemes=_schemes(spec, q.plan), reference=reference)


@dataclass
class EndToEnd:
    """A regional build's end-to-end check: the component's inputs at the smallest request the recipe allows (the
    capture's batch), and the quantized eager model's output on them, which the compiled blocks, handing each
    other their outputs, are held to."""

    example: dict[str, Any]
    reference: torch.Tensor


def block_targets(spec: BuildSpec, q: Quantized, example: dict[str, Any], blocks: dict[str, dict[str, Any]],
                  small: dict[str, Any], second: dict[str, Any] | None = None) -> tuple[list[Target], EndToEnd]:
    """Regional: one module per block class (and quantization pattern, and structure), each with its instances.

    ``example``: the component's captured inputs; ``blocks``: each class's first instance's arguments at the capture request (recorded in the full-precision
    reference call: the export example); ``small``: the component's inputs at the smallest request. One
    quantized eager pass at ``small`` gives the end-to-end reference and each class's block inputs there, on
    which every instance's own eager output is taken (every instance is checked through the shared code at
    that size; the first also at the export size). ``second``: the component's inputs for another request,
    when the recipe has no [block_inputs] (a derived recipe): the blocks' dims are named by how their inputs
    move between the two."""
    component, r = spec.recipe.component, spec.recipe
    at_small, whole = regional.capture_blocks(q.model, small, q.classes)
    dims = None
    if second is not None:
        again, _ = regional.capture_blocks(q.model, second, q.classes, stop=True)
        outer = component_spec(example, r)
        moved = {d: (example[n].shape[a], second[n].shape[a], list(outer.dynamic[d]))
                 for d, table in outer.axes().items() for n, a in list(table.items())[:1]}
        dims = {cls: regional.name_block_axes(cls, blocks[cls], again[cls], moved, r) for cls in q.classes}
    targets = []
    for g in regional.group(regional.instances(q.model, q.classes), q.schemes, q.model):
        members = [q.model.get_submodule(p) for p in g.instances]
        ex, check = blocks[g.block_class], at_small[g.block_class]
        constants = regional.constants_of(ex)
        if regional.constants_of(check) != constants:
            raise BuildError(f"{g.block_class} is called with {regional.constants_of(check)} at the smallest "
                             f"request and {constants} at the capture's: compiled code would bake one in",
                             "build with --whole-graph")
        form = regional.output_form(members[0](**unflatten_inputs(ex)))
        first = regional.BlockWrapper(members[0], constants).eval()(regional.tensors_of(ex))[0]
        refs = [regional.BlockWrapper(b, constants).eval()(regional.tensors_of(check))[0] for b in members]
        targets.append(Target(
            name=g.name, kind="block", code=f"{g.name}.pt2", root=regional.BLOCK_ROOT,
            instances=tuple(f"{component}.{p}" for p in g.instances),
            wrapper=regional.BlockWrapper(members[0], constants).eval(), example=ex,
            spec=regional.block_spec(ex, r, dims[g.block_class] if dims else None),
            schemes=set(s for _, s in q.schemes.pattern(g.instances[0])) or {"none"}, reference=first,
            block_class=g.block_class, members=members, references=refs, check=check, output=form))
    if spec.quant != "none":  # every instance, after every reference was taken
        unwrap_tensor_subclass(q.model)
    return targets, EndToEnd(small, whole)


def glue_weights(spec: BuildSpec, q: Quantized, targets: list[Target]) -> dict[str, torch.Tensor]:
    """Regional: the component's weights outside its blocks, under the pipeline's names (they run eager)."""
    component = spec.recipe.component
    inside = tuple(i[len(component) + 1:] + "." for t in targets if t.kind == "block" for i in t.instances)
    return {f"{component}.{k}": v.detach().contiguous() for k, v in q.model.state_dict().items()
            if not k.startswith(inside)}


def vae_target(spec: BuildSpec, vae: Any) -> Target:
    """The VAE's decoder (quantized with ``--quantize-vae``) as a second module."""
    wrapper = DecoderWrapper(vae).eval()
    dtype = next(vae.parameters()).dtype
    example, input_spec = decoder_inputs(vae, spec.recipe, dtype, spec.device)
    scheme = spec.options.quantize_vae or "none"
    quantized = quantize_named(vae, scheme)
    reference = wrapper(example)
    if quantized:
        unwrap_tensor_subclass(wrapper)
    return Target(name="vae_decoder", kind="vae_decoder", code=VAE_MODEL, root="vae", instances=("vae",),
                  wrapper=wrapper, example=example, spec=input_spec, schemes={scheme}, reference=reference,
                  config=json.loads(json.dumps(dict(vae.config), default=list)))


