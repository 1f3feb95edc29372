"""export from an InputSpec on a small module: dynamic dims, dims that step by a multiple, and fixed sizes."""

import torch

from aotpack.builder.export import export, input_spec


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, inputs):
        return self.proj(inputs["x"]).sum(1)


def test_fixed_stepped_and_free_dims():
    ex = {"x": torch.randn(2, 6, 8)}
    axes = {"batch": {"x": 0}, "rows": {"x": 1}}
    spec = input_spec(ex, axes, {"batch": [1, 4], "rows": [2, 12, 2]})
    assert [t.shape for t in spec.tensors] == [("batch", "rows", 8)]
    ep = export(Wrapper(), ex, spec)
    assert ep.module()({"x": torch.randn(3, 10, 8)}).shape == (3, 8)
    fixed = export(Wrapper(), ex, input_spec(ex, axes, {"batch": [1, 4], "rows": [6, 6]}))
    assert fixed.module()({"x": torch.randn(4, 6, 8)}).shape == (4, 8)
