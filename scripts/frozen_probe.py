"""Can an AOTInductor artifact carry inductor's freezing on CPU? A probe, not a product path (issue 21, item 3).

    python scripts/frozen_probe.py [RECIPE] [--dtype bfloat16] [--rounds N]

Exports the recipe's transformer (unquantized, static shapes at the run request), compiles it with AOTInductor and
freezing (under no_grad, the weights outside the .so) and runs it two ways, interleaved with torch.compile (+
freezing) in one process: with the frozen constants where AOTInductor keeps them in the .so, and with the very
tensors inductor computed at build (oneDNN-packed, in anonymous memory) handed over at load through
``load_constants(user_managed=True)``. The second needs the constants, which the package does not name back to the
weights (``_frozen_paramN``: concatenated q/k/v weights, folded biases), so this probe takes them from inductor's
graph while it compiles (a private hook: ``GraphLowering.codegen_with_cpp_wrapper``). Prints a table with each
forward's error against the float32 eager model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    import torch
    import torch._inductor.graph as inductor_graph

    from aotpack import _torch_compat as compat
    from aotpack.bench.interleaved import _compiled, _error, _first, _in_dtype, _reference, _rounds
    from aotpack.builder.compile import CPU_THREADING
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.source import load_pipeline, resolve_source

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", nargs="?", default="flux-blocks")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--dynamic", action="store_true", help="export the image and text lengths as dynamic dims (the "
                    "recipe's [inputs] image_seq and text_seq), as aotpack's builds do")
    args = ap.parse_args()
    recipe = get_recipe(args.recipe)
    source = resolve_source(recipe)
    kwargs32, reference = _reference(recipe, source)
    kwargs = _in_dtype(kwargs32, getattr(torch, args.dtype))
    model = getattr(load_pipeline(recipe, source, dtype=args.dtype), recipe.component).eval()

    inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    names, args_in = list(inputs), tuple(inputs.values())

    class Forward(torch.nn.Module):  # positional tensors in, one tensor out: what export and the AOTI runner take
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, *xs):
            return self.m(**dict(zip(names, xs)), return_dict=False)[0]

    wrapper = Forward(model)
    seen: dict[str, torch.Tensor] = {}
    original = inductor_graph.GraphLowering.codegen_with_cpp_wrapper

    def keep_constants(self, *a, **k):
        seen.update(self.constants)
        return original(self, *a, **k)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        dims = _dims(recipe, inputs)
        ep = torch.export.export(wrapper, args_in, strict=False,
                                 dynamic_shapes=(tuple(dims[n] for n in names),) if args.dynamic else None)
        for in_so in (True, False):
            configs = {"freezing": True, "aot_inductor.package_constants_in_so": in_so, **CPU_THREADING}
            inductor_graph.GraphLowering.codegen_with_cpp_wrapper = keep_constants
            try:
                package = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / f"{in_so}.pt2"),
                                                                   inductor_configs=configs)
            finally:
                inductor_graph.GraphLowering.codegen_with_cpp_wrapper = original
            compiled = compat.open_package(package)
            if not in_so:
                state = dict(wrapper.state_dict())
                constants = {f: state[f] if f in state else seen[f] for f in compiled.get_constant_fqns()}
                compiled.load_constants(constants, check_full_update=True, user_managed=True)
            name = "aoti + freezing, " + ("constants in the .so" if in_so else "packed constants handed at load")
            runs[name] = (lambda c: lambda: c(*args_in))(compiled)
        runs["compile + freezing"] = _compiled(model, kwargs, "freezing")
        runs["compile"] = _compiled(model, kwargs, "default")
        errors = {n: _error(_first(f()), reference) for n, f in runs.items()}
        times = _rounds(runs, args.rounds)
    print(f"{args.recipe} none {args.dtype}{', dynamic lengths' if args.dynamic else ''}, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads\n")
    print("| variant | median s | min s | forward error vs fp32 eager |\n|---|---|---|---|")
    for n, t in times.items():
        print(f"| {n} | {t['median_s']:.4f} | {t['min_s']:.4f} | {errors[n]:.2%} |")


def _dims(recipe, inputs: dict) -> dict:
    """torch.export dynamic shapes for the recipe's image and text lengths (one Dim each, shared by its inputs)."""
    import torch

    spec = {k: None for k in inputs}
    for group in ("image_seq", "text_seq"):
        dim = torch.export.Dim(group, min=2, max=8192)
        for name, axis in recipe.data.get("inputs", {}).get(group, {}).items():
            if name in spec:
                spec[name] = {**(spec[name] or {}), axis: dim}
    return spec


if __name__ == "__main__":
    main()
