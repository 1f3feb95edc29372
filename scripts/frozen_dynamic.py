"""A frozen artifact against torch.compile + freezing compiled for one shape and for any shape, interleaved in ONE
process: how much of the gap is the artifact's dynamic shapes?

    python scripts/frozen_dynamic.py ARTIFACT [--rounds N]

Inductor's freezing packs a float32 linear weight for MKL's packed GEMM only when the rows it multiplies are a
fixed number (``torch._inductor.fx_passes.mkldnn_fusion``: "Disable MKL prepack linear when batch_size has free
symbols"; also in AOT mode); otherwise it packs for oneDNN. An artifact takes any request size, so its rows are
symbolic: oneDNN. torch.compile of one request size takes MKL's. The third row, torch.compile with
``dynamic=True`` + freezing, is the like-for-like one. Prints a table.
"""

from __future__ import annotations

import argparse
import platform

from rounds_table import print_rounds  # scripts/, beside this file


def main() -> None:
    import torch

    import aotpack
    from aotpack.artifact.platform import describe, tag
    from aotpack.bench.interleaved import _cast, _rounds, captured_kwargs
    from aotpack.bench.variants import _quantize
    from aotpack.builder.recipe import recipe_of
    from aotpack.builder.source import load_pipeline, source_of

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    manifest = aotpack.inspect(args.artifact)
    recipe = recipe_of(manifest.recipe)
    pipe = load_pipeline(recipe, source_of(manifest.model), dtype=manifest.dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = captured_kwargs(pipe, recipe)
    module = aotpack.load(args.artifact)
    runs = {"aotpack": (lambda kw: lambda: module(**kw))(_cast(kwargs, manifest))}
    transformer = getattr(pipe, recipe.component).eval()
    _quantize(transformer, {"quant": manifest.scheme.name, "artifact": args.artifact})
    torch._inductor.config.freezing = True
    try:
        for name, dynamic in (("compile+freezing (one shape)", False), ("compile+freezing dynamic=True", True)):
            compiled = torch.compile(transformer, dynamic=dynamic, options={"freezing": True})
            with torch.no_grad():
                compiled(**kwargs)
            runs[name] = (lambda c: lambda: c(**kwargs))(compiled)
    finally:
        torch._inductor.config.freezing = False
    print_rounds(f"{manifest.recipe.name} {manifest.scheme.name} {manifest.dtype}; {platform.machine()} "
                 f"{tag(describe())}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds",
                 _rounds(runs, args.rounds))


if __name__ == "__main__":
    main()
