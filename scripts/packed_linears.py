"""Which packed float32 GEMM runs fastest on this CPU: artifacts against torch.compile + freezing for one shape,
with inductor's own choice (MKL's packed GEMM for fixed rows) and with oneDNN's packing forced (what an artifact,
whose rows are symbolic, gets), interleaved in ONE process; then the model's linear shapes alone.

    python scripts/packed_linears.py ARTIFACT [ARTIFACT ...] [--rounds N]

Give the float32 `none` artifacts of one model (say its frozen and its `--no-freeze` build). The forced row patches
``torch._inductor.fx_passes.mkldnn_fusion.has_free_symbols`` while it compiles (the rule "Disable MKL prepack linear
when batch_size has free symbols"); it prints how many linears that rule saw. Prints two tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from rounds_table import print_rounds  # scripts/, beside this file


def compiled_rows(transformer, kwargs) -> dict:
    """torch.compile (default; freezing as inductor chooses; freezing with oneDNN packing forced), each compiled by a
    first call under no_grad with its own options (dynamo keeps one graph per options)."""
    import torch
    from torch._inductor.fx_passes import mkldnn_fusion

    real, rows = mkldnn_fusion.has_free_symbols, {}
    for name, opts, forced in (("compile", {}, False), ("compile+freezing (inductor's choice: MKL)",
                                                         {"freezing": True}, False),
                               ("compile+freezing (oneDNN forced)", {"freezing": True, "trace.enabled": False}, True)):
        seen: list[int] = []
        torch._inductor.config.freezing = bool(opts)
        if forced:
            mkldnn_fusion.has_free_symbols = lambda x: seen.append(1) or True
        try:
            compiled = torch.compile(transformer, dynamic=False, options=opts)
            with torch.no_grad():
                compiled(**kwargs)
        finally:
            mkldnn_fusion.has_free_symbols = real
            torch._inductor.config.freezing = False
        if forced:
            print(f"oneDNN forced: the rule was asked {len(seen)} times (3 for each packed linear)")
        rows[name] = (lambda c: lambda: c(**kwargs))(compiled)
    return rows


def linear_table(shapes, rounds: int = 15) -> list[str]:
    """One linear per shape (rows, in, out): plain addmm, oneDNN-packed, MKL-packed, interleaved (the model's
    widths, not each of its linears: its single block's output projection is 5w -> w)."""
    import torch

    out = ["| rows x in x out | plain addmm GFLOP/s | oneDNN packed | MKL packed |", "|---|---|---|---|"]
    for m, k, n in shapes:
        x, w, b = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
        dnn, mkl = torch.ops.mkldnn._reorder_linear_weight(w, m), torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        fs = {"plain": lambda: torch.nn.functional.linear(x, w, b),
              "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, dnn, b, "none", [], ""),
              "mkl": lambda: torch.ops.mkl._mkl_linear(x, mkl, w, b, m)}
        times: dict[str, list[float]] = {n_: [] for n_ in fs}
        names = list(fs)
        for f in fs.values():
            f()
        for r in range(rounds):
            for name in names[r % 3:] + names[:r % 3]:
                t = time.perf_counter()
                fs[name]()
                times[name].append(time.perf_counter() - t)
        gf = [2 * m * k * n / 1e9 / statistics.median(times[name]) for name in names]
        out.append(f"| {m} x {k} x {n} | " + " | ".join(f"{g:.0f}" for g in gf) + " |")
    return out


def main() -> None:
    import torch

    import aotpack
    from aotpack.artifact.platform import describe, tag
    from aotpack.bench.interleaved import _rounds, captured_kwargs
    from aotpack.builder.recipe import recipe_of
    from aotpack.builder.source import load_pipeline, source_of

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    manifest = aotpack.inspect(args.artifacts[0])
    recipe = recipe_of(manifest.recipe)
    pipe = load_pipeline(recipe, source_of(manifest.model), dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    kwargs = captured_kwargs(pipe, recipe)
    runs = {f"aotpack {a}": (lambda m: lambda: m(**kwargs))(aotpack.load(a)) for a in args.artifacts}
    transformer = getattr(pipe, recipe.component).eval()
    runs.update(compiled_rows(transformer, kwargs))
    print_rounds(f"{manifest.recipe.name} float32; {platform.machine()} {tag(describe())}, {torch.get_num_threads()} "
                 f"threads, {args.rounds} interleaved rounds", _rounds(runs, args.rounds))
    rows = kwargs["hidden_states"].shape[1] + kwargs["encoder_hidden_states"].shape[1]
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    print("\n" + "\n".join(linear_table([(rows, width, width), (rows, width, 4 * width), (rows, 4 * width, width)])))


if __name__ == "__main__":
    main()
