"""Regional builds: each repeated block class is compiled once, and every instance runs that code with its own
weights (the ZeroGPU AoTI pattern, for ahead-of-time artifacts). Build time and compiled code stay flat in depth.

The blocks to compile are the model's ``_repeated_blocks`` (diffusers declares them for Flux) or the recipe's
``blocks`` (CogVideoX declares none). Instances whose linears were quantized alike share one compiled module;
with ``--quant auto`` a class whose instances got different per-layer plans gets one module per plan pattern.
The parts outside the blocks (embedders, final norm and projection) stay eager in the model dtype: they are
~0.5% of FLUX.1's weights, and unquantized eager costs about what compiling them would (measured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from aotpack.artifact.manifest import InputSpec
from aotpack.builder.capture import flatten_inputs, unflatten_inputs
from aotpack.builder.export import input_spec
from aotpack.builder.recipe import Recipe
from aotpack.errors import BuildError, RecipeError

BLOCK_ROOT = "block"   # the wrapper's attribute: every compiled block constant's name starts with it


class BlockWrapper(torch.nn.Module):
    """One block called with a dict of tensors (rotary tuples spread as ``name.0``/``name.1``); returns its tuple."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.block(**unflatten_inputs(inputs))
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclass
class Group:
    """Instances of one block class, quantized alike, that share one compiled module."""

    name: str                   # the module's name in the manifest (the class, or class.N for a second pattern)
    block_class: str
    instances: list[str]        # paths inside the component (transformer_blocks.0, ...)


def block_classes(model: Any, recipe: Recipe) -> list[str]:
    """The block classes to compile: the recipe's, else the model's ``_repeated_blocks``."""
    names = list(recipe.blocks or getattr(model, "_repeated_blocks", None) or [])
    if not names:
        raise RecipeError(f"{type(model).__name__} declares no repeated blocks and the recipe names none",
                          "add `blocks = [\"BlockClass\"]` to the recipe, or build with --whole-graph")
    found = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in found]
    if missing:
        raise RecipeError(f"{type(model).__name__} has no block of class {', '.join(missing)}",
                          "fix the recipe's `blocks`, or build with --whole-graph")
    return names


def instances(model: Any, classes: list[str]) -> dict[str, list[str]]:
    """{class: the module paths of its instances, in model order}."""
    out: dict[str, list[str]] = {c: [] for c in classes}
    for name, m in model.named_modules():
        if type(m).__name__ in out:
            out[type(m).__name__].append(name)
    return out


def only_in_blocks(quantize_unit: Callable[[str, Any], Any], paths: list[str]) -> Callable[[str, Any], Any]:
    """``quantize_unit`` for the linears inside the block instances ``paths``; the others stay as they are."""
    prefixes = tuple(p + "." for p in paths)
    return lambda name, linear: quantize_unit(name, linear) if name.startswith(prefixes) else None


class Schemes:
    """The scheme the build gave each linear it quantized."""

    def __init__(self) -> None:
        self.by_layer: dict[str, str] = {}

    def record(self, name: str, scheme: str) -> None:
        self.by_layer[name] = scheme

    def pattern(self, path: str) -> tuple:
        """(name inside the block, scheme) of every quantized linear of the instance at ``path``."""
        prefix = path + "."
        return tuple(sorted((n[len(prefix):], s) for n, s in self.by_layer.items() if n.startswith(prefix)))


def group(by_class: dict[str, list[str]], schemes: Schemes) -> list[Group]:
    """Instances quantized alike (each linear at the same place with the same scheme) share a module."""
    groups: list[Group] = []
    for cls, paths in by_class.items():
        patterns: dict[tuple, list[str]] = {}
        for path in paths:
            patterns.setdefault(schemes.pattern(path), []).append(path)
        for i, members in enumerate(patterns.values()):
            groups.append(Group(cls if i == 0 else f"{cls}.{i}", cls, members))
    return groups


def capture_blocks(component: Any, example: dict[str, torch.Tensor], classes: list[str]) -> tuple[dict, Any]:
    """Run the component once on its captured inputs; returns ({class: the first instance's inputs}, the
    component's output), both recorded from the real call."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        cls = type(module).__name__
        if cls in seen:
            return
        if args:
            raise BuildError(f"{cls} was called with positional arguments",
                             "aotpack captures keyword calls only; build with --whole-graph")
        for key in ("joint_attention_kwargs", "attention_kwargs"):
            if kwargs.get(key):
                raise BuildError(f"{cls} was called with {key} {sorted(kwargs[key])}",
                                 "regional code cannot take attention kwargs; build with --whole-graph")
        seen[cls] = {k: v.clone() for k, v in flatten_inputs(kwargs).items()}

    by_class = instances(component, classes)
    for cls, paths in by_class.items():
        handles.append(component.get_submodule(paths[0]).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = component(**unflatten_inputs(example), return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
    missing = [c for c in classes if c not in seen]
    if missing:
        raise BuildError(f"the model never called its {', '.join(missing)} blocks", "check the recipe's `blocks`")
    return seen, out


def block_spec(example: dict[str, torch.Tensor], recipe: Recipe) -> InputSpec:
    """The InputSpec of a block's captured inputs, from the recipe's ``[block_inputs]`` dims."""
    if not recipe.block_inputs:
        raise RecipeError(f"recipe {recipe.full_name} has no [block_inputs] table", "add one, or build --whole-graph")
    dims = recipe.block_inputs  # names the blocks are not called with (rotary tables of a variant without) are skipped
    return input_spec(example, dims, {d: recipe.dim_range(d) for d in dims}, tuple(recipe.relations()))


def instance_state(block: torch.nn.Module, fqns: list[str]) -> dict[str, torch.Tensor]:
    """An instance's value for each compiled constant (named ``block.<name>``), from its own state dict."""
    state = block.state_dict(keep_vars=True)
    out = {}
    for fqn in fqns:
        name = fqn[len(BLOCK_ROOT) + 1:]
        if name not in state:
            raise BuildError(f"compiled block expects {name}, which {type(block).__name__} does not hold",
                             "this model is not supported regionally; build with --whole-graph")
        t = state[name].detach()
        out[fqn] = t if t.is_contiguous() else t.contiguous()
    return out
