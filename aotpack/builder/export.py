"""torch.export of the component with dynamic batch and image-sequence dims."""

from __future__ import annotations

from typing import Any

from aotpack.errors import BuildError, first_line
from aotpack.builder.recipe import Recipe


def _wrapper_class():
    import torch

    class ExportWrapper(torch.nn.Module):
        """A fixed calling convention for export: one dict of tensors in, one tensor out."""

        def __init__(self, component: torch.nn.Module) -> None:
            super().__init__()
            self.component = component

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            from aotpack.builder.capture import unflatten_inputs

            return self.component(**unflatten_inputs(inputs), return_dict=False)[0]

    return ExportWrapper


def wrap(component: Any) -> Any:
    return _wrapper_class()(component).eval()


def wrap_decoder(vae: Any) -> Any:
    """The VAE's ``decode`` as a module: ``{"z": latents}`` in, the decoded sample out."""
    import torch

    class DecoderWrapper(torch.nn.Module):
        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.vae.decode(inputs["z"], return_dict=False)[0]

    return DecoderWrapper(vae).eval()


def decoder_inputs(vae: Any, recipe: Recipe, dtype: Any, device: str) -> tuple[dict, dict, dict]:
    """(example, ranges, table) for exporting the VAE decoder over the recipe's batch and image sizes."""
    import torch

    step = recipe.multiple // recipe.vae_scale
    ranges = {"batch": list(recipe.batch),
              "latent_height": [recipe.height[0] // recipe.vae_scale, recipe.height[1] // recipe.vae_scale, step],
              "latent_width": [recipe.width[0] // recipe.vae_scale, recipe.width[1] // recipe.vae_scale, step]}
    cap = recipe.capture
    z = torch.randn(2, vae.config.latent_channels, cap["height"] // recipe.vae_scale,
                    cap["width"] // recipe.vae_scale, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    table = {"batch": {"z": 0}, "latent_height": {"z": 2}, "latent_width": {"z": 3}}
    return {"z": z}, ranges, table


def dynamic_ranges(recipe: Recipe) -> dict[str, list[int]]:
    """The dynamic dims and their [min, max] (and [min, max, multiple] where a dim steps by more than 1)."""
    return {name: recipe.dim_range(name) for name in recipe.dynamic}


def tensor_specs(example: dict[str, Any], recipe: Recipe | None, table_of: dict | None = None) -> list[dict]:
    """Each input's shape with dynamic dims named, for the manifest and the call-time check."""
    specs = []
    for name, t in example.items():
        shape: list[int | str] = list(t.shape)
        for dim_name, table in (table_of if table_of is not None else recipe.dynamic).items():
            if name in table:
                shape[table[name]] = dim_name
        specs.append({"name": name, "shape": shape, "dtype": str(t.dtype).removeprefix("torch.")})
    return specs


def export_component(wrapper: Any, example: dict[str, Any], recipe: Recipe):
    """torch.export the wrapped component with one Dim per dynamic axis shared across inputs."""
    return export_dynamic(wrapper, example, dynamic_ranges(recipe), recipe.dynamic)


def export_dynamic(wrapper: Any, example: dict[str, Any], ranges: dict[str, list[int]],
                   table_of: dict[str, dict[str, int]]):
    """torch.export ``wrapper(example)``; ``table_of[dim][input] = axis`` names the dynamic axes."""
    import torch
    from torch.export import Dim

    dims: dict[str, Any] = {}
    for name, (lo, hi, *step) in ranges.items():
        if lo == hi:  # a fixed size: exported static (the loader still checks it)
            continue
        if step and step[0] > 1:  # a dim that steps by m (latent rows of patch m) is exported as m * Dim
            dims[name] = step[0] * Dim(f"{name}_div{step[0]}", min=lo // step[0], max=hi // step[0])
        else:
            dims[name] = Dim(name, min=lo, max=hi)
    spec: dict[str, Any] = {}
    for name in example:
        axes = {table[name]: dims[dim_name] for dim_name, table in table_of.items() if name in table and dim_name in dims}
        spec[name] = axes or None
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes={"inputs": spec}, strict=False)
    except Exception as e:  # export errors are long; keep the first line and the class
        first = first_line(e)
        raise BuildError(f"torch.export failed: {type(e).__name__}: {first[:300]}",
                         "set AOTPACK_DEBUG=1 for the full trace; narrow the recipe's shape ranges") from e
