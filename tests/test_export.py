"""export_dynamic on a small module: dynamic dims, dims that step by a multiple, and fixed sizes."""

import torch

from aotpack.builder.export import export_dynamic


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, inputs):
        return self.proj(inputs["x"]).sum(1)


def test_fixed_stepped_and_free_dims():
    ex = {"x": torch.randn(2, 6, 8)}
    ranges = {"batch": [1, 4], "rows": [2, 12, 2]}
    ep = export_dynamic(Wrapper(), ex, ranges, {"batch": {"x": 0}, "rows": {"x": 1}})
    assert ep.module()({"x": torch.randn(3, 10, 8)}).shape == (3, 8)
    fixed = export_dynamic(Wrapper(), ex, {"batch": [1, 4], "rows": [6, 6]}, {"batch": {"x": 0}, "rows": {"x": 1}})
    assert fixed.module()({"x": torch.randn(4, 6, 8)}).shape == (4, 8)
