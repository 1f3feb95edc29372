"""A frozen build's folded constants: the steps that compute each from the artifact's weights, checked and replayed.

Inductor's freezing (``aotpack build --freeze``) computes constants from the weights while it compiles: a weight
transposed, cast, or packed into oneDNN's blocked layout for the CPU (``mkldnn._reorder_linear_weight``). The
compiled code expects those constants by new names (``_frozen_paramN``). The artifact stores the weights, not
the constants: the manifest records each constant as a few steps over weights (``aotpack._torch_compat.
recording_folds`` writes them down at build), and the loader replays them on the box that runs the code, so a
packed layout is always the one this box's oneDNN chose. Steps are data: only the tensor operations listed in
``OPS`` run, on weights and literals, and each result must have the dtype, shape and layout the build recorded.
"""

from __future__ import annotations

from typing import Any, Callable

from aotpack.artifact.formats import SAFETENSORS_DTYPES
from aotpack.errors import IntegrityError

# The operations a folded constant may be computed with: views, casts, concatenation, elementwise arithmetic
# and the CPU's weight-packing calls. Nothing that reads a file, allocates more than its inputs, or runs code.
OPS = frozenset({
    "aten.permute.default", "aten.t.default", "aten.transpose.int", "aten.reshape.default", "aten.view.default",
    "aten.unsqueeze.default", "aten.squeeze.dim", "aten.slice.Tensor", "aten.select.int", "aten.clone.default",
    "aten.cat.default", "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
    "prims.convert_element_type.default", "aten._to_copy.default",
    "mkldnn._reorder_linear_weight.default", "mkl._mkl_reorder_linear_weight.default",
})
LAYOUTS = ("strided", "mkldnn")
MAX_STEPS = 64      # per constant: the flux-blocks bf16 build folds each in 2 or 3
_HINT = "the manifest was edited or comes from another aotpack; rebuild the artifact, or download it again"


def inputs(fold: dict[str, Any]) -> set[str]:
    """The weights (by constant name) the folded constants are computed from."""
    found: set[str] = set()

    def walk(a: Any) -> None:
        if isinstance(a, dict):
            if set(a) == {"w"}:
                found.add(a["w"])
            else:
                for v in a.values():
                    walk(v)
        elif isinstance(a, list):
            for v in a:
                walk(v)

    for recipe in fold.values():
        walk(recipe.get("steps") if isinstance(recipe, dict) else None)
    return found


def problems(fold: Any) -> list[str]:
    """What is wrong with a manifest's ``fold`` record (empty: every step is a listed operation on weights,
    literals and earlier steps, and every constant names a dtype, a shape and a layout)."""
    if not isinstance(fold, dict) or not fold:
        return ["fold must map constant names to their steps"]
    dtypes = set(SAFETENSORS_DTYPES.values())
    out = []
    for name, recipe in fold.items():
        if not (isinstance(recipe, dict) and set(recipe) == {"steps", "dtype", "shape", "layout"}):
            out.append(f"fold[{name!r:.60}] must hold steps, dtype, shape and layout")
            continue
        steps, shape = recipe["steps"], recipe["shape"]
        if recipe["dtype"] not in dtypes or recipe["layout"] not in LAYOUTS or not (
                isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            out.append(f"fold[{name!r:.60}] names no tensor dtype, shape and layout")
        if not (isinstance(steps, list) and 0 < len(steps) <= MAX_STEPS):
            out.append(f"fold[{name!r:.60}] must have 1 to {MAX_STEPS} steps")
            continue
        for i, step in enumerate(steps):
            bad = _step_problem(step, i, dtypes)
            if bad:
                out.append(f"fold[{name!r:.60}] step {i}: {bad}")
                break
    return out


def _step_problem(step: Any, index: int, dtypes: set[str]) -> str:
    if not (isinstance(step, list) and len(step) == 3 and isinstance(step[1], list) and isinstance(step[2], dict)):
        return "must be [operation, args, kwargs]"
    if step[0] not in OPS:
        return f"{str(step[0])[:60]!r} is not an operation a folded constant may use"
    return "" if _literal(step[1], index, dtypes) and _literal(step[2], index, dtypes) else \
        "arguments must be weights, earlier steps, dtypes or plain values"


def _literal(a: Any, index: int, dtypes: set[str], depth: int = 0) -> bool:
    if depth > 4:
        return False
    if a is None or isinstance(a, (bool, int, float, str)):
        return True
    if isinstance(a, list):
        return all(_literal(x, index, dtypes, depth + 1) for x in a)
    if isinstance(a, dict):
        if set(a) == {"w"}:
            return isinstance(a["w"], str) and bool(a["w"])
        if set(a) == {"s"}:
            return isinstance(a["s"], int) and not isinstance(a["s"], bool) and 0 <= a["s"] < index
        if set(a) == {"dtype"}:
            return a["dtype"] in dtypes
        return depth == 0 and all(isinstance(k, str) and _literal(v, index, dtypes, depth + 1) for k, v in a.items())
    return False


def replay(name: str, recipe: dict[str, Any], weight: Callable[[str], Any]) -> Any:
    """The constant ``name``, computed from the weights (``weight(constant name)``) by its recorded steps;
    IntegrityError unless it comes out with the recorded dtype, shape and layout."""
    import torch

    results: list[Any] = []

    def value(a: Any) -> Any:
        if isinstance(a, dict):
            if set(a) == {"w"}:
                return weight(a["w"])
            if set(a) == {"s"}:
                return results[a["s"]]
            if set(a) == {"dtype"}:
                return getattr(torch, a["dtype"])
            return {k: value(v) for k, v in a.items()}
        if isinstance(a, list):
            return [value(x) for x in a]
        return a

    with torch.no_grad():
        for op, args, kwargs in recipe["steps"]:
            if op not in OPS:  # parsing refused it already; the steps are data, never a lookup of any name
                raise IntegrityError(f"folded constant {name} uses {op}", _HINT)
            namespace, fn, overload = op.split(".")
            try:
                results.append(getattr(getattr(getattr(torch.ops, namespace), fn), overload)(*value(args),
                                                                                            **value(kwargs)))
            except (RuntimeError, TypeError, ValueError, IndexError) as e:
                raise IntegrityError(f"folded constant {name}: {op} failed ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0][:120] if str(e) else ''})", _HINT) from None
    out = results[-1]
    layout = "mkldnn" if out.is_mkldnn else "strided"
    got = [str(out.dtype).removeprefix("torch."), list(out.shape), layout]
    if got != [recipe["dtype"], recipe["shape"], recipe["layout"]]:
        raise IntegrityError(f"folded constant {name} comes out {got[0]} {got[1]} {got[2]}, the compiled code "
                             f"expects {recipe['dtype']} {recipe['shape']} {recipe['layout']}", _HINT)
    return out
