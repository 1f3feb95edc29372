"""torch.export of the component with dynamic batch and image-sequence dims."""

from __future__ import annotations

from typing import Any

from .errors import BuildError, first_line
from .recipe import Recipe


def _wrapper_class():
    import torch

    class ExportWrapper(torch.nn.Module):
        """A fixed calling convention for export: one dict of tensors in, one tensor out."""

        def __init__(self, component: torch.nn.Module) -> None:
            super().__init__()
            self.component = component

        def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            return self.component(**inputs, return_dict=False)[0]

    return ExportWrapper


def wrap(component: Any) -> Any:
    return _wrapper_class()(component).eval()


def dynamic_ranges(recipe: Recipe) -> dict[str, list[int]]:
    """The dynamic dims and their [min, max], as the manifest records them."""
    return {"batch": list(recipe.batch), "image_seq": list(recipe.image_seq_range())}


def tensor_specs(example: dict[str, Any], recipe: Recipe) -> list[dict]:
    """Each input's shape with dynamic dims named, for the manifest and the call-time check."""
    specs = []
    for name, t in example.items():
        shape: list[int | str] = list(t.shape)
        for dim_name, table in recipe.dynamic.items():
            if name in table:
                shape[table[name]] = dim_name
        specs.append({"name": name, "shape": shape, "dtype": str(t.dtype).removeprefix("torch.")})
    return specs


def export_component(wrapper: Any, example: dict[str, Any], recipe: Recipe):
    """torch.export the wrapped component with one Dim per dynamic axis shared across inputs."""
    import torch
    from torch.export import Dim

    ranges = dynamic_ranges(recipe)
    dims = {name: Dim(name, min=lo, max=hi) for name, (lo, hi) in ranges.items()}
    spec: dict[str, Any] = {}
    for name in example:
        axes = {table[name]: dims[dim_name] for dim_name, table in recipe.dynamic.items() if name in table}
        spec[name] = axes or None
    try:
        with torch.no_grad():
            return torch.export.export(wrapper, (example,), dynamic_shapes={"inputs": spec}, strict=False)
    except Exception as e:  # export errors are long; keep the first line and the class
        first = first_line(e)
        raise BuildError(f"torch.export failed: {type(e).__name__}: {first[:300]}",
                         "set AOTPACK_DEBUG=1 for the full trace; narrow the recipe's shape ranges") from e
