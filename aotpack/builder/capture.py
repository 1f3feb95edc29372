"""Record what the pipeline really passes to the component, by running the pipeline until its first call."""

from __future__ import annotations

from typing import Any

from aotpack.errors import BuildError
from aotpack.builder.recipe import Recipe


class _Captured(Exception):
    pass


def capture_inputs(pipe: Any, recipe: Recipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one real pipeline call and stop it at the component's first forward.

    Returns (tensor kwargs in call order, other kwargs). The batch is the recipe's capture batch (2), so
    that export sees a batch that is not specialised away.
    """
    import torch

    component = getattr(pipe, recipe.component)
    seen: dict[str, Any] = {}

    def hook(module, args, kwargs):
        if args:
            raise BuildError(f"{type(module).__name__} was called with positional arguments",
                             "aotpack captures keyword calls only; this pipeline is not supported")
        seen.update(kwargs)
        raise _Captured

    cap = recipe.capture
    handle = component.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            per_prompt = max(1, cap.get("batch", 2) // recipe.call.get("batch_divisor", 1))
            pipe(
                prompt=cap.get("prompt", "a photo"),
                **recipe.pipeline_kwargs(height=cap["height"], width=cap["width"], steps=cap["steps"],
                                         guidance_scale=cap.get("guidance_scale", 3.5), batch=per_prompt,
                                         frames=cap.get("frames")),
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
            )
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise BuildError(f"the pipeline never called its {recipe.component}", "check the recipe's capture settings")
    tensors = flatten_inputs(seen)
    others = {k: v for k, v in seen.items() if not isinstance(v, torch.Tensor) and not is_tensor_tuple(v)
              and v is not None}
    return tensors, others


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
    """The tensor keyword arguments (tuples spread), detached: what export gets."""
    import torch

    return {k: v.detach() for k, v in spread_tuples(kwargs).items() if isinstance(v, torch.Tensor)}


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
