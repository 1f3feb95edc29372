"""A frozen build's folded constants: the steps that compute each from the artifact's weights, checked and replayed.

Inductor's freezing (``aotpack build --freeze``) computes constants from the weights while it compiles: a weight
transposed, cast, summed (int8dq), or packed into oneDNN's blocked layout for the CPU
(``mkldnn._reorder_linear_weight``). The compiled code expects those constants by new names (``_frozen_paramN``).
The artifact stores the weights, not the constants: the manifest records each constant as a few steps over weights
(``aotpack._torch_compat.recording_folds`` writes them down at build), and the loader replays them on the box that
runs the code, so a packed layout is always the one this box's oneDNN chose.

A recipe is ``{"steps": [[op, args, kwargs], ...], "dtype", "shape", "stride", "layout"}``, the last step the
constant (``stride``: its strides, ``None`` for a packed one, whose layout oneDNN owns). In ``args``, and in the
values of the ``kwargs`` dict, ``{"w": name}`` is a weight by its constant name, ``{"s": i}`` the result of an
earlier step, ``{"dtype": d}`` a dtype; anything else is a plain value. Steps are data: only the tensor operations
in ``OPS`` run, a dry run on meta tensors first holds the results a replay keeps at once to twice the bytes of
what the recipe reads and makes, and each result must have the recorded dtype, shape, strides, layout and device.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from aotpack.artifact.formats import SAFETENSORS_DTYPES
from aotpack.errors import IntegrityError

# The operations a folded constant may be computed with: views, casts, concatenation, elementwise arithmetic,
# sums (int8dq: a weight's column sums, the int8 GEMM's compensation) and oneDNN's weight packing. Nothing that
# reads a file, moves a tensor to another device, or runs code.
OPS = frozenset({
    "aten.permute.default", "aten.t.default", "aten.transpose.int", "aten.reshape.default", "aten.view.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int", "aten.clone.default",
    "aten.cat.default", "aten.sum.dim_IntList", "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor",
    "aten.div.Tensor",
    "prims.convert_element_type.default", "mkldnn._reorder_linear_weight.default",
})
VIEWS = frozenset({"aten.permute.default", "aten.t.default", "aten.transpose.int", "aten.view.default",
                   "aten.unsqueeze.default", "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int"})
PACK = "mkldnn._reorder_linear_weight.default"   # no meta kernel: its dry run keeps its input's shape
LAYOUTS = ("strided", "mkldnn")
KEYS = {"steps", "dtype", "shape", "stride", "layout"}
MAX_STEPS = 64      # per constant: the flux-blocks bf16 build folds each in 2 or 3
MAX_ITEMS = 64      # per list argument (a permutation, a shape, the tensors of a cat)
_HINT = "the manifest was edited or comes from another aotpack; rebuild the artifact, or download it again"


def _refs(step: list) -> list[Any]:
    """A step's arguments: its args and the values of its kwargs (the kwargs dict itself is never a reference)."""
    return [step[1], *step[2].values()]


def inputs(fold: dict[str, Any]) -> set[str]:
    """The weights (by constant name) the folded constants are computed from."""
    found: set[str] = set()

    def walk(a: Any) -> None:
        if isinstance(a, dict) and set(a) == {"w"}:
            found.add(a["w"])
        elif isinstance(a, list):
            for v in a:
                walk(v)

    for recipe in fold.values():
        for step in recipe.get("steps") or () if isinstance(recipe, dict) else ():
            if isinstance(step, list) and len(step) == 3 and isinstance(step[2], dict):
                walk(_refs(step))
    return found


def problems(fold: Any) -> list[str]:
    """What is wrong with a manifest's ``fold`` record (empty: every step is a listed operation on weights,
    literals and earlier steps, and every constant names a dtype, a shape, its strides and a layout)."""
    if not isinstance(fold, dict) or not fold:
        return ["fold must map constant names to their steps"]
    out = []
    for name, recipe in fold.items():
        bad = _recipe_problem(recipe)
        if bad:
            out.append(f"fold[{name!r:.60}] {bad}")
    return out


def _dims(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_ITEMS and all(isinstance(d, int) and not isinstance(d, bool)
                                                                  and d >= 0 for d in v)


def _recipe_problem(recipe: Any) -> str:
    if not (isinstance(recipe, dict) and set(recipe) == KEYS):
        return "must hold steps, dtype, shape, stride and layout"
    steps, shape, stride = recipe["steps"], recipe["shape"], recipe["stride"]
    if not (isinstance(recipe["dtype"], str) and isinstance(recipe["layout"], str)) \
            or recipe["dtype"] not in set(SAFETENSORS_DTYPES.values()) or recipe["layout"] not in LAYOUTS \
            or not _dims(shape) or not (stride is None if recipe["layout"] == "mkldnn" else
                                        _dims(stride) and len(stride) == len(shape)):
        return "names no tensor dtype, shape, strides and layout"
    if not (isinstance(steps, list) and 0 < len(steps) <= MAX_STEPS):
        return f"must have 1 to {MAX_STEPS} steps"
    for i, step in enumerate(steps):
        bad = _step_problem(step, i)
        if bad:
            return f"step {i}: {bad}"
    return ""


def _step_problem(step: Any, index: int) -> str:
    if not (isinstance(step, list) and len(step) == 3 and isinstance(step[1], list) and isinstance(step[2], dict)
            and all(isinstance(k, str) for k in step[2])):
        return "must be [operation, args, kwargs]"
    if not isinstance(step[0], str) or step[0] not in OPS:
        return f"{str(step[0])[:60]!r} is not an operation a folded constant may use"
    return "" if all(_literal(a, index) for a in _refs(step)) else \
        "arguments must be weights, earlier steps, dtypes or plain values"


def _literal(a: Any, index: int, depth: int = 0) -> bool:
    if depth > 3:
        return False
    if a is None or isinstance(a, (bool, int, str)) or isinstance(a, float) and math.isfinite(a):
        return True
    if isinstance(a, list):
        return len(a) <= MAX_ITEMS and all(_literal(x, index, depth + 1) for x in a)
    if isinstance(a, dict) and len(a) == 1:
        (key, v), = a.items()
        if key == "w":
            return isinstance(v, str) and bool(v)
        if key == "s":
            return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < index
        if key == "dtype":
            return isinstance(v, str) and v in set(SAFETENSORS_DTYPES.values())
    return False


def _run(recipe: dict[str, Any], weight: Callable[[str], Any], op_of: Callable[[str], Callable]) -> list[Any]:
    """Every step's result, with ``weight`` for the weights and ``op_of`` for the operations."""
    import torch

    results: list[Any] = []

    def value(a: Any) -> Any:
        if isinstance(a, dict):
            (key, v), = a.items()
            return weight(v) if key == "w" else results[v] if key == "s" else getattr(torch, v)
        if isinstance(a, list):
            return [value(x) for x in a]
        return a

    for op, args, kwargs in recipe["steps"]:
        results.append(op_of(op)(*value(args), **{k: value(v) for k, v in kwargs.items()}))
    return results


def _op(name: str) -> Callable:
    import torch

    if name not in OPS:  # parsing refused it already; a step is data, never a lookup of any other name
        raise IntegrityError(f"a folded constant uses {name}", _HINT)
    namespace, fn, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, namespace), fn), overload)


def _fast_op(name: str) -> Callable:
    """``_op``, but a 2-d int8 tensor's sum along one dim into int32 (int8dq's GEMM compensation, a column sum of
    every int8 weight) runs as an int8 matmul with a row of ones: the same integers (int32 accumulation both ways;
    taken only for a weight or its transpose with both dims over 1, and where no sum can reach 2**31), ~50x faster
    than ``aten.sum`` on int8, which dominated a frozen int8dq artifact's load (flux-blocks: 0.83 of its 0.92 s)."""
    fn = _op(name)
    return _int8_sum if name == "aten.sum.dim_IntList" else fn


def _int8_sum(x: Any, dim: Any, keepdim: bool = False, *, dtype: Any = None) -> Any:
    import torch

    d = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    # only a weight or its transpose, both dims > 1: on other strides (a size-1 dim, a slice, a broadcast) the CPU
    # _int_mm leaves its output unwritten or warns and falls back
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.int8 and x.device.type == "cpu" and x.dim() == 2
            and dtype == torch.int32 and d in (0, 1, -1, -2) and x.shape[d] < 2**31 // 128 and min(x.shape) > 1
            and x.layout == torch.strided and (x.is_contiguous() or x.t().is_contiguous())):
        return torch.ops.aten.sum.dim_IntList(x, dim, keepdim, dtype=dtype)
    if d % 2 == 0:
        out = torch._int_mm(torch.ones(1, x.shape[0], dtype=torch.int8), x)          # (1, N)
        return out if keepdim else out.reshape(x.shape[1])
    out = torch._int_mm(x, torch.ones(x.shape[1], 1, dtype=torch.int8))              # (M, 1)
    return out if keepdim else out.reshape(x.shape[0])


def _dry_run(name: str, recipe: dict[str, Any], weight: Callable[[str], Any]) -> None:
    """The steps on meta tensors (shapes only, nothing allocated): refused when the results a replay holds at once
    (every step's that is not a view of another) would take more than twice the bytes of the weights it reads and
    the constant it makes (a broadcast, a cat of a cat, a pile of float64 casts)."""
    import torch

    read = {w: weight(w) for w in inputs({name: recipe})}
    made = nbytes({name: recipe})
    budget = 2 * (sum(t.numel() * t.element_size() for t in read.values()) + made)
    meta = {w: torch.empty(t.shape, dtype=t.dtype, device="meta") for w, t in read.items()}
    held = [0]

    def op_of(op: str) -> Callable:
        fn = _op(op)

        def checked(*args: Any, **kwargs: Any) -> Any:
            if op == PACK:  # oneDNN pads a packed weight to its blocks: counted with each dim rounded up to 64
                w = args[0]
                if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.is_floating_point()):
                    raise IntegrityError(f"folded constant {name}: {op} takes a 2-d float weight", _HINT)
                out, size = w, math.prod(-(-d // 64) * 64 for d in w.shape) * w.element_size()
            else:
                out = fn(*args, **kwargs)
                size = out.numel() * out.element_size() if isinstance(out, torch.Tensor) and op not in VIEWS else 0
            held[0] += size
            if not isinstance(out, torch.Tensor) or held[0] > budget:
                raise IntegrityError(f"folded constant {name}: its steps would hold {held[0]} bytes to make "
                                     f"{made} from weights of {budget // 2 - made}", _HINT)
            return out
        return checked

    _run(recipe, meta.__getitem__, op_of)


def replay(name: str, recipe: dict[str, Any], weight: Callable[[str], Any]) -> Any:
    """The constant ``name``, computed from the weights (``weight(constant name)``) by its recorded steps (dry run
    first); IntegrityError unless it comes out with the recorded dtype, shape, strides, layout, on the CPU."""
    import torch

    with torch.no_grad():
        try:
            _dry_run(name, recipe, weight)
            out = _run(recipe, weight, _fast_op)[-1]
        except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError, NotImplementedError) as e:
            raise IntegrityError(f"folded constant {name} cannot be computed from the weights ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:120] if str(e) else ''})", _HINT) from None
    got = describe(out)
    want = [recipe[k] for k in ("dtype", "shape", "stride", "layout")] + ["cpu"]
    if got != want:
        raise IntegrityError(f"folded constant {name} comes out {_shown(got)}, the compiled code expects "
                             f"{_shown(want)}", _HINT)
    return out


def describe(t: Any) -> list:
    """[dtype, shape, strides (None when packed), layout, device type] of a folded constant."""
    packed = t.is_mkldnn
    return [str(t.dtype).removeprefix("torch."), list(t.shape), None if packed else list(t.stride()),
            "mkldnn" if packed else "strided", t.device.type]


def _shown(d: list) -> str:
    return f"{d[0]} {d[1]} {d[3]}" + (f" strides {d[2]}" if d[2] is not None else "") + f" on {d[4]}"


def nbytes(fold: dict[str, Any] | None) -> int:
    """The memory one instance's folded constants take (a packed one with each dim rounded up to 64; one made by
    views alone, int8dq's transposed weight, none: it is its weight's bytes)."""
    import torch

    return sum(math.prod(-(-d // 64) * 64 if r["layout"] == "mkldnn" else d for d in r["shape"])
               * getattr(torch, r["dtype"]).itemsize for r in (fold or {}).values()
               if not all(step[0] in VIEWS for step in r["steps"]))


def stored(fqns: list[str], fold: dict[str, Any] | None) -> list[str]:
    """The constants a module takes from its weights file when its code expects ``fqns``: those, where ``fold``
    computes some, the weights those are computed from instead."""
    if not fold:
        return list(fqns)
    return sorted({f for f in fqns if f not in fold} | inputs(fold))


def swapped(module: Any, instance: str, fqns: list[str], keys: dict[str, Any], base: dict[str, Any] | None = None,
            loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The constants ``fqns`` of one instance of ``module`` (a ``CompiledModule``) from ``keys`` (weights-file
    name -> tensor: the load's, a LoRA swap's or its undo's): a folded constant is replayed, or, given what the
    load made (``loaded``), kept as loaded unless ``keys`` holds another tensor than ``base`` (what the load
    started from) for a weight it reads."""
    fold = module.fold or {}

    def weight(f: str) -> Any:
        return keys[module.key(instance, f)]

    def folded(f: str) -> Any:
        read = [module.key(instance, w) for w in inputs({f: fold[f]})]
        if loaded is not None and base is not None and all(keys[k] is base[k] for k in read):
            return loaded[f]
        return replay(f, fold[f], weight)

    return {f: folded(f) if f in fold else weight(f) for f in fqns}
