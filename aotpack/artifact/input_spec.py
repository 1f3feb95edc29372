"""What a compiled module accepts (``InputSpec``: its tensors, dynamic dims, relations between dims and baked-in
constants) and the call-time check that keeps a wrong size from reaching AOTInductor, which checks no shapes itself.

Part of the manifest (``aotpack.artifact.manifest`` re-exports every name); export, capture, the loader, the bench
and run all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from aotpack.errors import InputError, one_line


@dataclass(frozen=True)
class TensorSpec:
    """One input of a compiled module: its shape (ints, or the names of dynamic dims) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class Relation:
    """A tie between dims that export cannot express and the loader checks itself:
    ``dim == product(of) / divisor`` (``op="product"``) or ``dim == sum(of)`` (``op="sum"``)."""

    dim: str
    of: tuple[str, ...]
    op: str = "product"
    divisor: int = 1

    def expected(self, sizes: Mapping[str, int]) -> int:
        if self.op == "sum":
            return sum(sizes[d] for d in self.of)
        n = 1
        for d in self.of:
            n *= sizes[d]
        return n // self.divisor

    def describe(self) -> str:
        if self.op == "sum":
            return " + ".join(self.of)
        return " x ".join(self.of) + (f" / {self.divisor}" if self.divisor != 1 else "")


@dataclass(frozen=True)
class InputSpec:
    """What a compiled module accepts: its tensors in call order, the dynamic dims' [min, max(, multiple)]
    and the relations between dims. Export, capture, the call-time check, the bench and run all use it."""

    tensors: tuple[TensorSpec, ...]
    dynamic: dict[str, tuple[int, ...]]
    relations: tuple[Relation, ...] = ()
    # non-tensor arguments baked into the compiled code ({name: None, a number, a string or a list of those});
    # left out of the JSON when empty, so manifests without any read (and are written) as before
    constants: dict[str, Any] = field(default_factory=dict, metadata={"omit_default": True})

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def axes(self) -> dict[str, dict[str, int]]:
        """{dim: {input: axis}}: where each dynamic dim appears."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            for axis, d in enumerate(t.shape):
                if isinstance(d, str):
                    out.setdefault(d, {})[t.name] = axis
        return out

    def problems(self) -> list[str]:
        out = []
        for name, rng in self.dynamic.items():
            if not (len(rng) in (2, 3) and 0 <= rng[0] <= rng[1] and (len(rng) == 2 or rng[2] >= 1)):
                out.append(f"inputs.dynamic.{name!r} must be [min, max] or [min, max, multiple]")
        for t in self.tensors:
            if not all((isinstance(d, int) and d >= 0) or d in self.dynamic for d in t.shape):
                out.append(f"input {t.name!r} must have a shape of ints >= 0 or dynamic dims")
        for r in self.relations:
            if r.dim not in self.dynamic or not r.of or not all(d in self.dynamic for d in r.of) \
                    or r.op not in ("product", "sum") or r.divisor < 1:
                out.append(f"relation of {r.dim!r} must name dynamic dims, op product or sum, divisor >= 1")
        for name, value in self.constants.items():
            if name in self.names or not _plain(value):
                out.append(f"inputs.constants.{name!r} must be null, a number, a string or a list of those, "
                           "and not name a tensor input")
        return out

    def check_constants(self, inputs: Mapping[str, Any]) -> None:
        """Raise InputError if an argument baked into the compiled code is passed with another value (one left
        out takes the baked value)."""
        for name, want in self.constants.items():
            if name not in inputs or _same(inputs[name], want):
                continue
            got = inputs[name]
            shown = f"a {type(got).__name__}" if hasattr(got, "shape") else _show(got)
            raise InputError(f"{name} is {shown}, but the artifact was compiled with {name}={_show(want)} baked in",
                             f"pass {name}={_show(want)} (the build's capture settings), or rebuild with a recipe "
                             f"whose capture call uses the size, frames and batch that give this {name}")

    def check(self, inputs: Mapping[str, Any], device: Any, hint: Callable[[str], str] | None = None) -> None:
        """Raise InputError unless every input matches the exported names, dtypes, devices and ranges.

        AOTInductor does not check shapes itself: a wrong size would read out of bounds.
        """
        import torch

        hint = hint or (lambda dim: "rebuild with a wider range")
        self.check_constants(inputs)  # first: a baked size (img_shapes) says more than the tensor it shapes
        names = self.names
        missing = [n for n in names if inputs.get(n) is None]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}", "pass every input the artifact was exported with")
        extra = sorted(str(k) for k, v in inputs.items() if k not in names and k not in self.constants
                       and v is not None)
        if extra:
            raise InputError(f"unexpected input(s): {', '.join(extra)}", "this artifact was exported without them")
        bound: dict[str, int] = {}
        for spec in self.tensors:
            name, t = spec.name, inputs[spec.name]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(t).__name__}", "pass a torch.Tensor")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != spec.dtype:
                raise InputError(f"{name} has dtype {dtype}, the artifact expects {spec.dtype}",
                                 f"cast it, or build with --dtype {dtype}")
            if t.device.type != torch.device(device).type:
                raise InputError(f"{name} is on {t.device.type}, the artifact runs on {torch.device(device).type}",
                                 f"move the inputs (and the pipeline) to {torch.device(device).type}")
            want = spec.shape
            if t.dim() != len(want):
                raise InputError(f"{name} has {t.dim()} dims {list(t.shape)}, the artifact expects {len(want)} "
                                 f"({list(want)})", "check the pipeline and the artifact match")
            for axis, (size, w) in enumerate(zip(t.shape, want)):
                if isinstance(w, int):
                    if size != w:
                        raise InputError(f"{name} dim {axis} is {size}, the artifact was exported with {w}",
                                         "use the recipe's settings (e.g. max_sequence_length) or rebuild")
                    continue
                lo, hi, *step = self.dynamic[w]
                if not lo <= size <= hi:
                    raise InputError(f"{name} dim {axis} ({w}) is {size}, outside the artifact's range [{lo}, {hi}]",
                                     hint(w))
                if step and size % step[0]:
                    raise InputError(f"{name} dim {axis} ({w}) is {size}, not a multiple of {step[0]}", hint(w))
                if bound.setdefault(w, size) != size:
                    raise InputError(f"{name} dim {axis} ({w}) is {size} but another input has {bound[w]}",
                                     "inputs disagree on one dynamic size")
        for name, (lo, hi, *_) in self.dynamic.items():  # a fixed size no tensor carries (padded text)
            if lo == hi:
                bound.setdefault(name, lo)
        for rel in self.relations:
            if rel.dim in bound and all(d in bound for d in rel.of):
                want_size = rel.expected(bound)
                if bound[rel.dim] != want_size:
                    raise InputError(f"{rel.dim} is {bound[rel.dim]} but {rel.describe()} is {want_size}",
                                     "inputs disagree (e.g. rotary embeddings made for another size)")

    def sizes(self, choose: Callable[[str, tuple[int, ...]], int]) -> dict[str, int]:
        """One size per dynamic dim (``choose(dim, range)``), with the relations applied."""
        sizes = {name: choose(name, rng) for name, rng in self.dynamic.items()}
        for rel in self.relations:
            sizes[rel.dim] = rel.expected(sizes)
        return sizes


def _plain(value: Any, depth: int = 0) -> bool:
    """A value a manifest may record as a baked-in argument: null, bool, int, finite float, string, or a list of
    those (bounded depth)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return isinstance(value, (list, tuple)) and depth < 8 and all(_plain(v, depth + 1) for v in value)


def _same(got: Any, want: Any) -> bool:
    """``got`` equals the recorded ``want``, a tuple matching a list (JSON has lists only) and a bool never a
    number."""
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, bool) or isinstance(got, bool) or want is None or isinstance(want, str):
        return type(got) is type(want) and got == want
    import numbers

    return isinstance(got, numbers.Real) and got == want


def _show(value: Any) -> str:
    """A value as a request shows it (tuples as lists, as the manifest holds them), cut to one short line."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    text = repr(plain(value))
    return one_line(text if len(text) <= 80 else text[:77] + "...")
