"""Regional builds: each repeated block class is compiled once, and every instance runs that code with its own
weights (the ZeroGPU AoTI pattern, for ahead-of-time artifacts). Build time and compiled code stay flat in depth.

The blocks to compile are the model's ``_repeated_blocks`` (diffusers declares them for Flux) or the recipe's
``blocks`` (CogVideoX declares none). Instances whose linears were quantized alike share one compiled module;
with ``--quant auto`` a class whose instances got different per-layer plans gets one module per plan pattern.
The parts outside the blocks (embedders, final norm and projection) stay eager in the model dtype: they are
~0.5% of FLUX.1's weights, and unquantized eager costs about what compiling them would (measured).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from aotpack.artifact.manifest import InputSpec
from aotpack.builder.capture import flatten_inputs, unflatten_inputs
from aotpack.builder.export import input_spec
from aotpack.builder.recipe import Recipe
from aotpack.errors import BuildError, RecipeError

BLOCK_ROOT = "block"   # the wrapper's attribute: every compiled block constant's name starts with it


class BlockWrapper(torch.nn.Module):
    """One block called with a dict of tensors (rotary tuples spread as ``name.0``/``name.1``), its non-tensor
    arguments (``constants``: Sana's ``height``/``width``, FLUX.2's ``encoder_hidden_states=None``) closed over;
    returns the tensors of its output, in order (a ``None`` item, as SD3's last block returns, is left out: the
    manifest's ``output`` puts it back)."""

    def __init__(self, block: torch.nn.Module, constants: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.block = block
        self.constants = dict(constants or {})

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        out = self.block(**unflatten_inputs({**self.constants, **inputs}))
        items = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        return tuple(x for x in items if x is not None)


def output_form(out: Any) -> str:
    """How a block's forward returns (see ``CompiledModule.output``); BuildError for what compiled code cannot."""
    if isinstance(out, torch.Tensor):
        return "tensor"
    if isinstance(out, (tuple, list)) and all(x is None or isinstance(x, torch.Tensor) for x in out) and \
            any(x is not None for x in out):
        return "" if all(x is not None for x in out) else ",".join("none" if x is None else "tensor" for x in out)
    raise BuildError(f"a block returns {type(out).__name__}, which compiled code cannot return",
                     "build with --whole-graph")


def structure(block: torch.nn.Module) -> tuple:
    """The names and shapes of a block's weights: instances of one class that differ (SD3's last block, which
    has no context output) get their own compiled module."""
    return tuple(sorted((n, tuple(p.shape)) for n, p in block.named_parameters()))


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


def instance_paths(model: Any, classes: list[str]) -> set[str]:
    """The module paths of every instance of every class in ``classes``."""
    return {p for paths in instances(model, classes).values() for p in paths}


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


def group(by_class: dict[str, list[str]], schemes: Schemes, model: Any = None) -> list[Group]:
    """Instances quantized alike (each linear at the same place with the same scheme) and built alike (the same
    weights: ``structure``) share a module."""
    groups: list[Group] = []
    for cls, paths in by_class.items():
        patterns: dict[tuple, list[str]] = {}
        for path in paths:
            shape = structure(model.get_submodule(path)) if model is not None else ()
            patterns.setdefault((schemes.pattern(path), shape), []).append(path)
        for i, members in enumerate(patterns.values()):
            groups.append(Group(cls if i == 0 else f"{cls}.{i}", cls, members))
    return groups


class _AllSeen(Exception):
    pass


@contextmanager
def first_inputs(component: Any, classes: list[str], *, stop: bool = False) -> Iterator[dict[str, dict[str, Any]]]:
    """While inside, record the arguments of the first call of each block class in ``component`` ({class: bound by
    name (positional calls too): tensors flattened and copied, other values as they are}), into the dict it
    yields. ``stop``: end the component's call as soon as every class was seen (its output is not wanted); the
    caller catches nothing, the call just returns early from the ``with``."""
    from aotpack.builder.capture import bind_call, constant, is_tensor_tuple

    seen: dict[str, dict[str, Any]] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        cls = type(module).__name__
        if cls in seen:
            return
        for key in ("joint_attention_kwargs", "attention_kwargs"):
            if kwargs.get(key):
                raise BuildError(f"{cls} was called with {key} {sorted(kwargs[key])}",
                                 "regional code cannot take attention kwargs; build with --whole-graph")
        named = bind_call(module, args, kwargs)
        inputs: dict[str, Any] = {}
        for k, v in named.items():
            if isinstance(v, torch.Tensor) or is_tensor_tuple(v):
                inputs.update({n: t.clone() for n, t in flatten_inputs({k: v}).items()})
            else:
                inputs[k] = constant(v, f"{cls}'s argument {k}")
        seen[cls] = inputs
        if stop and len(seen) == len(classes):
            raise _AllSeen

    handles = [component.get_submodule(paths[0]).register_forward_pre_hook(hook, with_kwargs=True)
               for paths in instances(component, classes).values() if paths]
    try:
        yield seen
    except _AllSeen:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [c for c in classes if c not in seen]
    if missing:
        raise BuildError(f"the model never called its {', '.join(missing)} blocks", "check the recipe's `blocks`")


def capture_blocks(component: Any, example: dict[str, torch.Tensor], classes: list[str], *,
                   stop: bool = False) -> tuple[dict, Any]:
    """Run the component on ``example``; returns ({class: its first instance's arguments (``first_inputs``)}, the
    component's output), both recorded from the real call. ``stop``: only the arguments are wanted; the call ends
    once every class was seen (the output is None)."""
    out = None
    with torch.no_grad(), first_inputs(component, classes, stop=stop) as seen:
        out = component(**unflatten_inputs(example), return_dict=False)[0]
    return seen, out


def tensors_of(example: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in example.items() if isinstance(v, torch.Tensor)}


def constants_of(example: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if not isinstance(v, torch.Tensor)}


def block_spec(example: dict[str, Any], recipe: Recipe, derived: "BlockDims | None" = None) -> InputSpec:
    """The InputSpec of a block's captured inputs: from the recipe's ``[block_inputs]`` dims, or (a recipe
    without them, as a derived one) from ``derived``, the dims named by ``name_block_axes``."""
    if derived is not None:
        return input_spec(example, derived.axes, derived.ranges, derived.relations)
    if not recipe.block_inputs:
        raise RecipeError(f"recipe {recipe.full_name} has no [block_inputs] table", "add one, or build --whole-graph")
    dims = recipe.block_inputs  # names the blocks are not called with (rotary tables of a variant without) are skipped
    return input_spec(example, dims, {d: recipe.dim_range(d) for d in dims}, tuple(recipe.relations()))


@dataclass
class BlockDims:
    axes: dict[str, dict[str, int]]
    ranges: dict[str, list[int]]
    relations: tuple


def name_block_axes(cls: str, first: dict[str, Any], second: dict[str, Any],
                    dims: dict[str, tuple[int, int, list[int]]], recipe: Recipe) -> BlockDims:
    """The dims of a block's inputs, from two captured calls of the component that differ in every dynamic dim
    (``dims``: {dim: (size in the first, size in the second, [min, max(, step)])}). A block axis that moves is the
    component dim that moved the same way; or the image tokens of latent rows x columns (SD3, Sana: 4-D latents,
    tokens inside); or a sum of two (text + image tokens: a single-stream block, a rotary table). Each block
    class gets its own table: a double-stream block sees image tokens, a single-stream one text + image."""
    known = _known_dims(dims, recipe)
    axes: dict[str, dict[str, int]] = {}
    ranges: dict[str, list[int]] = {}
    relations: list = []
    for name, t in first.items():
        if not isinstance(t, torch.Tensor):
            if second.get(name) != t:  # baked into the code, but it follows the request (Sana's height/width)
                raise BuildError(f"{cls} is called with {name}={t!r} here and {second.get(name)!r} for another "
                                 "request: compiled code would bake one in", "build with --whole-graph")
            continue
        u = second.get(name)
        if not isinstance(u, torch.Tensor) or u.dim() != t.dim():
            raise BuildError(f"{cls}'s input {name} differs in kind between two calls", "build with --whole-graph")
        for axis, (a, b) in enumerate(zip(t.shape, u.shape)):
            if a == b:
                continue
            same = [d for d, (x, y, _) in known.items() if (x, y) == (a, b)]
            if same:
                dim = same[0]
                ranges[dim] = list(known[dim][2])
            else:
                dim = _sum_dim(f"axis {axis} of {cls}'s input {name}", a, b, known, recipe, axes, ranges, relations)
            if name in axes.get(dim, {}) and axes[dim][name] != axis:
                raise BuildError(f"{cls}'s input {name} has two axes that move as {dim}", "build with --whole-graph")
            axes.setdefault(dim, {})[name] = axis
    return BlockDims({d: a for d, a in axes.items() if a}, ranges, tuple(dict.fromkeys(relations)))


def _known_dims(dims: dict[str, tuple[int, int, list[int]]], recipe: Recipe) -> dict[str, tuple[int, int, list[int]]]:
    """``dims`` and the token dims that follow from them where the component has none of its own: image tokens
    of latent rows x columns, video tokens of latent frames x image tokens."""
    known = dict(dims)
    patch = max(1, recipe.multiple // recipe.vae_scale)
    if "latent_height" in dims and "latent_width" in dims and "image_seq" not in dims:
        (h1, h2, _), (w1, w2, _) = dims["latent_height"], dims["latent_width"]
        known["image_seq"] = (h1 * w1 // patch ** 2, h2 * w2 // patch ** 2, recipe.dim_range("image_seq"))
    if "latent_frames" in dims and "video_seq" not in dims and "image_seq" in known:
        f1, f2, _ = dims["latent_frames"]
        known["video_seq"] = (f1 * known["image_seq"][0], f2 * known["image_seq"][1], recipe.dim_range("video_seq"))
    return known


def _sum_dim(what: str, a: int, b: int, known: dict, recipe: Recipe, axes: dict[str, dict[str, int]],
             ranges: dict[str, list[int]], relations: list) -> str:
    """The dim of a block axis (``what``) that moves from ``a`` to ``b`` as no component dim does: text + image
    tokens (a rotary table, a single-stream block), the text part moving or padded to one length. Its range
    and its relation to the parts are added to ``ranges`` and ``relations`` (and ``axes``) in place."""
    from aotpack.artifact.manifest import Relation

    pair = next(((p, q) for p in ("text_seq", "rotary_seq") for q in ("image_seq", "video_seq")
                 if p in known and q in known and (known[p][0] + known[q][0], known[p][1] + known[q][1])
                 == (a, b)), None)
    statics = [(d, r) for d, r in recipe.ranges.items() if r[0] == r[1] and d == "text_seq"]
    image = next((q for q in ("image_seq", "video_seq") if q in known), None)
    if pair:
        dim = "rotary_seq"
        lo_p, hi_p = known[pair[0]][2][:2]
        lo_q, hi_q = known[pair[1]][2][:2]
        ranges[dim] = [lo_p + lo_q, hi_p + hi_q]
        relations.append(Relation(dim, pair, "sum"))
        for d in pair:
            ranges.setdefault(d, list(known[d][2]))
        return dim
    if statics and image and (a - known[image][0], b - known[image][1]) == (statics[0][1][0],) * 2:
        dim = "rotary_seq"  # text (padded: one length) + image tokens
        text = statics[0][1][0]
        lo_q, hi_q = known[image][2][:2]
        ranges[dim] = [text + lo_q, text + hi_q]
        ranges.setdefault("text_seq", [text, text])
        ranges.setdefault(image, list(known[image][2]))
        relations.append(Relation(dim, ("text_seq", image), "sum"))
        axes.setdefault("text_seq", {})
        return dim
    raise BuildError(f"{what} moves in a way aotpack cannot name ({a} -> {b})", "build with --whole-graph")


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
