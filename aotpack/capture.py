"""Record what the pipeline really passes to the component, by running the pipeline until its first call."""

from __future__ import annotations

from typing import Any

from .errors import BuildError
from .recipe import Recipe


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
            pipe(
                prompt=cap.get("prompt", "a photo"), height=cap["height"], width=cap["width"],
                num_images_per_prompt=cap.get("batch", 2), num_inference_steps=cap["steps"],
                guidance_scale=cap.get("guidance_scale", 3.5), max_sequence_length=recipe.max_sequence_length,
                generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
            )
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise BuildError(f"the pipeline never called its {recipe.component}", "check the recipe's capture settings")
    tensors = {k: v.detach() for k, v in seen.items() if isinstance(v, torch.Tensor)}
    others = {k: v for k, v in seen.items() if not isinstance(v, torch.Tensor) and v is not None}
    return tensors, others
