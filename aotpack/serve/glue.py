"""The eager linears around a regional artifact's compiled blocks, where they cost time: int8 weights for the
ones that see one row per image.

A regional artifact runs the model's own forward around its compiled blocks. On CPU the linears there that see
one row per image (Flux's time, guidance and text embedders, its output norm's modulation: rows = batch) read
their whole weight for those few rows: memory-bound. In fp32 that was ~7 ms of a 0.15 s flux-blocks forward
(2-core Xeon with AMX) and most of regional's lag behind the whole graph, which compiles them in int8. A
quantized regional build in float32 or bfloat16 for a CPU with bf16 units gives each such linear int8 weights
(one scale per output row, symmetric: torchao's int8 weight-only) run by the int8 weight-only CPU kernel with
bf16 activations: a quarter of fp32's bytes (flux-blocks: regional 1.03x -> 1.01x the whole graph on a quiet
box, 1.08x -> 1.04x on a busier one, in one process).

Which linears, the build decides from the full-precision capture call (at most ``ONE_ROW_MAX`` rows, at least
``MIN_WEIGHT`` weights, an inner size the kernel takes), keeping them only if the model still runs and moves by
at most ``TOLERANCE`` at the smallest request; the manifest lists them (``glue_int8``): the loader makes exactly
those, and checks each, before any weight is placed. A later call with more than ``KERNEL_ROWS`` rows (a larger
batch than the capture's) still computes right, dequantizing the weight for that call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from aotpack import _torch_compat as compat

MIN_WEIGHT = 1 << 20  # smaller weights read fast enough; the kernel's fixed cost (casts, a launch) loses there
ONE_ROW_MAX = 8       # rows in the capture call: its batch (x2 with classifier-free guidance)
KERNEL_ROWS = 32      # a call with more rows dequantizes and multiplies in its own dtype (the kernel lost at 64)
TOLERANCE = 2e-2      # how far the model's output may move when they are made int8 (flux-blocks: ~1e-3)


class Int8Linear(torch.nn.Module):
    """A linear with int8 weights [out, in] and one scale per output row (``scale``, in the model dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: Any = "meta") -> None:
        super().__init__()
        if in_features % compat.INT8_MM_MULTIPLE:
            raise ValueError(f"an int8 linear needs an input size that is a multiple of {compat.INT8_MM_MULTIPLE}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> "Int8Linear":
        """``linear`` quantized: the scale of each row is its largest magnitude / 127, rounded first to the dtype
        the kernel multiplies in (the weights are divided by the very scale the kernel multiplies by)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, device=w.device)
        kind = _kernel_dtype(w.dtype)
        scale = (w.abs().amax(dim=1).float() / 127).to(kind).clamp(min=torch.finfo(kind).tiny).to(w.dtype)
        m.weight = torch.round(w.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        m.scale = scale
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= KERNEL_ROWS:
            kind = _kernel_dtype(x.dtype)
            y = compat.int8_weight_mm(rows.to(kind), self.weight, self.scale.to(kind)).to(x.dtype)
        else:
            y = torch.nn.functional.linear(rows, self.weight.to(x.dtype) * self.scale.to(x.dtype)[:, None])
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 activations ran the kernel 4x slower than bf16 ones (3.99 vs 0.86 ms a call, 3072 x 3072, one row)
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def applies(platform: Any, quant: str, dtype: str) -> bool:
    """A quantized regional build for a CPU with bf16 units, in float32 or bfloat16 (the kernel's activations are
    bf16; without the units bf16 runs widened, several times slower; with float16 activations the kernel ran
    19 ms against 1.7 ms for the float16 linear, 3072 x 3072 at one row). Otherwise the linears stay as they are."""
    from aotpack.artifact.platform import BF16_UNITS

    return (platform.device == "cpu" and quant != "none" and dtype in ("float32", "bfloat16")
            and any(f in platform.cpu_flags for f in BF16_UNITS))


def inside(name: str, paths: set[str]) -> bool:
    """``name`` (a module, parameter or weights key) lies under one of the module ``paths``."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))


def _outside(name: str, blocks: set[str]) -> bool:
    return name not in blocks and not inside(name, blocks)


@contextmanager
def first_rows(model: torch.nn.Module, blocks: set[str]) -> Iterator[dict[str, int]]:
    """While inside, {name: rows of its first call} of every linear of ``model`` outside the block paths."""
    rows: dict[str, int] = {}

    def hook(name: str, linear: torch.nn.Linear, args: tuple) -> None:
        if name not in rows and args and isinstance(args[0], torch.Tensor):
            rows[name] = args[0].numel() // max(linear.in_features, 1)

    handles = [m.register_forward_pre_hook(lambda mod, args, name=n: hook(name, mod, args))
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _outside(n, blocks)]
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


def chosen(model: torch.nn.Module, rows: dict[str, int], blocks: set[str]) -> list[str]:
    """The linears outside the blocks that get int8 weights: few rows at the capture, a large weight, an inner
    size the kernel takes."""
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and _outside(n, blocks) and 0 < rows.get(n, 0) <= ONE_ROW_MAX
                  and m.weight.numel() >= MIN_WEIGHT and m.in_features % compat.INT8_MM_MULTIPLE == 0)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def pack(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Module]:
    """Build: each named linear (with its real weights) becomes an ``Int8Linear``; returns the linears replaced."""
    originals = {name: model.get_submodule(name) for name in names}
    for name, linear in originals.items():
        _replace(model, name, Int8Linear.of(linear))
    return originals


def unpack(model: torch.nn.Module, originals: dict[str, torch.nn.Module]) -> None:
    """``pack`` undone: the linears it replaced put back."""
    for name, linear in originals.items():
        _replace(model, name, linear)


def place(model: torch.nn.Module, names: tuple[str, ...], blocks: set[str], dtype: torch.dtype) -> None:
    """Load: each linear the manifest lists becomes an empty ``Int8Linear`` (its weights come from the weights
    file) — after checking it is a linear outside the blocks that the kernel can run."""
    from aotpack.errors import ManifestError, one_line

    for name in names:
        try:
            linear = model.get_submodule(name) if name else None
        except AttributeError:
            linear = None
        if (not isinstance(linear, torch.nn.Linear) or not _outside(name, blocks)
                or linear.in_features % compat.INT8_MM_MULTIPLE):
            raise ManifestError(f"glue_int8 names {one_line(name, 120)}, which is not a linear outside the blocks "
                                f"with an input size that is a multiple of {compat.INT8_MM_MULTIPLE}",
                                "the manifest was edited or belongs to another model; rebuild the artifact, or "
                                "download it again")
        _replace(model, name, Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype))
