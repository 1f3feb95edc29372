"""Record what the pipeline really passes to the component, by running the pipeline until its first call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aotpack.errors import BuildError
from aotpack.builder.recipe import Recipe


class _Captured(Exception):
    pass


@dataclass
class Call:
    """One pipeline call at the recipe's capture settings, as the component saw it: ``example`` (every argument
    of its first call bound to its parameter name: tensors flattened and made contiguous, non-tensor values as
    constants), ``constants`` (those non-tensor values alone); for a call run to the end (``record_call``), the
    component's first output and the final latents."""

    example: dict[str, Any]
    constants: dict[str, Any]
    first_output: Any = None
    latents: Any = None


def capture_inputs(pipe: Any, recipe: Recipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one real pipeline call and stop it at the component's first forward.

    Returns (example, constants) (see :class:`Call`). The batch is the recipe's capture batch (2), so that export
    sees a batch that is not specialised away.
    """
    call = _call(pipe, recipe, finish=False)
    return call.example, call.constants


def record_call(pipe: Any, recipe: Recipe) -> Call:
    """One real pipeline call at the capture settings run to its final latents, recording the component's first
    call (the inputs ``capture_inputs`` stops at) and its output: what a build measures against, in one call
    instead of a capture, a forward on the captured inputs and a second pipeline call."""
    return _call(pipe, recipe, finish=True)


def _call(pipe: Any, recipe: Recipe, *, finish: bool) -> Call:
    import torch

    component = getattr(pipe, recipe.component)
    seen: dict[str, Any] = {}
    out: list[Any] = []

    def before(module, args, kwargs):
        if seen:
            return
        seen.update(bind_call(module, args, kwargs))
        if not finish:
            raise _Captured
        # the call goes on: keep copies, not tensors the pipeline may write into in later steps
        seen.update({k: v.clone() if isinstance(v, torch.Tensor) else type(v)(x.clone() for x in v)
                     for k, v in seen.items() if isinstance(v, torch.Tensor) or is_tensor_tuple(v)})

    def after(module, args, kwargs, output):
        if not out:
            out.append((output[0] if isinstance(output, tuple) else output.sample).clone())

    handles = [component.register_forward_pre_hook(before, with_kwargs=True)]
    if finish:
        handles.append(component.register_forward_hook(after, with_kwargs=True))
    cap = recipe.capture
    latents = None
    try:
        with torch.no_grad():
            per_prompt = max(1, cap.get("batch", 2) // recipe.call.get("batch_divisor", 1))
            result = pipe(
                prompt=cap.get("prompt", "a photo"),
                **recipe.pipeline_kwargs(height=cap["height"], width=cap["width"], steps=cap["steps"],
                                         guidance_scale=cap.get("guidance_scale", 3.5), batch=per_prompt,
                                         frames=cap.get("frames")),
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
            )
            latents = (result.frames if recipe.is_video else result.images).float()
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise BuildError(f"the pipeline never called its {recipe.component}", "check the recipe's capture settings")
    name = type(component).__name__
    example: dict[str, Any] = {}
    for k, v in seen.items():
        if isinstance(v, torch.Tensor) or is_tensor_tuple(v):
            example.update(flatten_inputs({k: v}))
        else:
            example[k] = constant(v, f"{name}'s argument {k}")
    constants = {k: v for k, v in example.items() if not isinstance(v, torch.Tensor)}
    return Call(example, constants, out[0] if out else None, latents)


# Arguments the wrapper or the loaded module handle themselves: never captured as inputs.
_HANDLED = ("return_dict", "attention_kwargs", "joint_attention_kwargs")


def bind_call(module: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of ``module(*args, **kwargs)`` by parameter name (positional first, then keywords in call
    order; a ``**kwargs`` catch-all spread), without those the wrapper passes itself (``return_dict``)."""
    import inspect

    sig = inspect.signature(module.forward)
    what = type(module).__name__
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise BuildError(f"{what} was called with arguments its forward does not take: {e}",
                         "check that the pipeline and the model come from the same diffusers") from None
    params = sig.parameters
    if any(params[n].kind is inspect.Parameter.VAR_POSITIONAL for n in bound.arguments):
        raise BuildError(f"{what} was called with extra positional arguments (*args)",
                         "aotpack binds arguments by name; this model's forward is not supported")
    named = dict(zip(list(bound.arguments)[:len(args)], args))
    named.update(kwargs)
    return {k: v for k, v in named.items() if k not in _HANDLED}


def constant(value: Any, where: str) -> Any:
    """``value`` as a constant the export can bake in and the manifest can record: ``None``, a bool, int,
    finite float or string, or a (nested) list/tuple of those; anything else is refused in one line."""
    import math
    import numbers

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return float(value) if not isinstance(value, float) else value
    if isinstance(value, (list, tuple)):
        items = [constant(v, where) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    raise BuildError(f"{where} is a {type(value).__name__} ({str(value)[:60]}), which aotpack cannot bake into "
                     "compiled code", "aotpack bakes in None, numbers, strings and lists of those; tensors are "
                     "inputs. Pass it as one of those, or keep this model eager")


def is_tensor_tuple(v: Any) -> bool:
    import torch

    return isinstance(v, (tuple, list)) and bool(v) and all(isinstance(x, torch.Tensor) for x in v)


def spread_tuples(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments with each tuple of tensors (rotary embeddings) spread as ``name.0``, ``name.1``, ...:
    the names they are exported under. Everything else is kept as it is."""
    out: dict[str, Any] = {}
    for k, v in kwargs.items():
        out.update({f"{k}.{i}": x for i, x in enumerate(v)} if is_tensor_tuple(v) else {k: v})
    return out


def flatten_inputs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The tensor keyword arguments (tuples spread), detached and contiguous: what export gets."""
    import torch

    # contiguous: compiled code assumes the strides it was exported with, and a loaded artifact serves
    # contiguous copies (a pipeline's own inputs can be transposed views or stride-0 expansions)
    return {k: v.detach().contiguous() for k, v in spread_tuples(kwargs).items() if isinstance(v, torch.Tensor)}


def unflatten_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten_inputs``: ``name.0``, ``name.1`` become the tuple ``name``."""
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for k, v in inputs.items():
        base, dot, idx = k.rpartition(".")
        if dot and idx.isdigit():
            groups.setdefault(base, {})[int(idx)] = v
        else:
            out[k] = v
    for base, parts in groups.items():
        out[base] = tuple(parts[i] for i in sorted(parts))
    return out
