"""``aotpack bench``: eager, torch.compile and the aotpack artifacts of one recipe, each in a fresh process."""

from __future__ import annotations

from pathlib import Path

import click

from aotpack.cli.output import echo_result, quiet_pipelines
from aotpack.options import json_option, quiet_option


@click.command()
@quiet_option
@click.argument("recipe")
@click.option("--quant", "quants", multiple=True, help="Scheme(s) to compare (repeatable; default: none and the recipe's).")
@click.option("--variant", default=None, help="A recipe variant.")
@click.option("--steps", type=int, default=None, help="Denoising steps per image (default: the recipe's run steps).")
@click.option("--images", type=int, default=2, show_default=True, help="Images after the first, for steady latency.")
@click.option("--out", type=click.Path(), default=None,
              help="Results folder (default: artifacts/bench/<recipe>-<platform>; with --build-only "
                   "artifacts/bench/<recipe>-builds-<platform>, shared by the recipe's variants).")
@click.option("--max-autotune", is_flag=True, help="torch.compile with mode='max-autotune' (GPU).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default=None,
              help="Every variant in this dtype (default: the recipe's; flux-blocks: auto, this machine's fastest). "
                   "The default folder then ends in -<dtype>.")
@click.option("--regional/--no-regional", default=None,
              help="Also build and run the regional artifact (row aotpack-regional). Default: on when the model "
                   "has repeated blocks.")
@click.option("--build-only", is_flag=True,
              help="Only build, each artifact afresh in its own process with an empty compile cache, and write the "
                   "build table (builds.md/.csv/.json: stage times, .pt2 bytes, peak RSS); rows of other runs in "
                   "the same folder are kept.")
@click.option("--compile-matrix", is_flag=True,
              help="Also run the recipe's default artifact against torch.compile in every dtype (float32, bfloat16) "
                   "x scheme (none, int8dq, int8wo) x mode (default, freezing; with --max-autotune also "
                   "max-autotune + freezing), interleaved in one process, each with its forward error against "
                   "the float32 eager model: is the box's default the fastest, and the fastest as accurate? "
                   "On a CPU the other frozen builds (bf16 none, bf16 int8dq, fp32 int8dq) run beside it "
                   "(built when missing; not those the CPU runs slowly: bf16 without bf16 units, int8dq without "
                   "VNNI/AMX); a variant over 3x the fastest in its first calls joins no round. "
                   "(12 compiles at real width: ~15 min on 2 cores, ~15 GiB.)")
@json_option
def bench(recipe, quants, variant, steps, images, out, max_autotune, dtype, regional, build_only, compile_matrix,
          as_json) -> None:
    """Compare eager, torch.compile (cold; and with inductor's freezing), torch.compile + its portable cache and
    the aotpack artifacts.

    Each variant runs in a fresh process with the checkpoint and artifact evicted from the page cache and an
    empty compiler cache; then, per scheme, the artifacts and torch.compile run interleaved in one process (the
    forward target is marked there). Writes results.md (table, targets, each forward's share of the machine's
    matmul rate), results.csv, results.json and results.png; prints the folder. Artifacts are built first when missing (into artifacts/, from an empty compile cache).

    \b
    Examples:
      aotpack bench tiny-flux --quant int8wo
      aotpack bench flux-blocks --quant none --quant int8wo --quant auto   # real width: `make bench`
      aotpack bench flux-blocks --quant int8wo --no-regional     # whole graph only
      aotpack bench flux-blocks --quant none --dtype float32     # beside the default (bf16 where the CPU has bf16 units)
      aotpack bench flux-blocks --compile-matrix   # the box's default against every torch.compile variant
      aotpack bench flux-depth --quant int8wo --build-only --variant shallow   # 1 + 1 blocks
      aotpack bench flux-depth --quant int8wo --build-only       # 19 + 38 blocks, same table
    """
    quiet_pipelines()
    from aotpack.bench import run_bench
    from aotpack.artifact.platform import describe, tag
    from aotpack.builder.recipe import get_recipe

    r = get_recipe(recipe, variant)
    here = describe()
    quants = list(quants) or list(dict.fromkeys(["none", r.default_for(here.device, here.cpu_flags)[0]]))
    name = f"{r.name}-builds" if build_only else r.full_name
    folder = Path(out) if out else Path("artifacts") / "bench" / (f"{name}-{tag(here)}"
                                                                  + (f"-{dtype}" if dtype else ""))
    done = run_bench(recipe, quants, out=folder, steps=steps, images=images, variant=variant,
                     max_autotune=max_autotune, dtype=dtype, regional=regional, build_only=build_only,
                     compile_matrix=compile_matrix)
    echo_result(as_json, {"path": str(done)}, str(done))
