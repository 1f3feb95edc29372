"""The commands that say what can be built: ``recipes``, ``schemes`` and ``recipe SOURCE`` (a derived recipe)."""

from __future__ import annotations

import json

import click

from aotpack.cli.output import echo_result, quiet_pipelines
from aotpack.errors import RecipeError
from aotpack.options import derive_options, json_option, quiet_option


@click.command()
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def recipes(as_json: bool) -> None:
    """List recipes and the quantization schemes each can use on this machine.

    \b
    Examples:
      aotpack recipes
      aotpack recipes --json
    """
    from aotpack.artifact.platform import cpu_flags, default_device
    from aotpack.builder.recipe import get_recipe, list_recipes
    from aotpack.builder.schemes import SCHEMES, why_not

    device, flags = default_device(), cpu_flags()
    usable = [name for name, s in SCHEMES.items() if why_not(s, device) is None]
    rows = []
    for name in list_recipes():
        r = get_recipe(name)
        rows.append({"name": name, "description": r.description, "checkpoint": r.checkpoint, "dtype": r.dtype,
                     "variants": list(r.variants), "default_quant": r.default_for(device, flags)[0],
                     "build": "regional" if r.regional else "whole-graph",
                     "runs_here": not (r.checkpoint_needs and r.checkpoint_needs != device)})
    if as_json:
        click.echo(json.dumps({"device": device, "schemes_here": usable, "recipes": rows}, indent=2))
        return
    for row in rows:
        variants = f" (variants: {', '.join(row['variants'])})" if row["variants"] else ""
        note = "" if row["runs_here"] else "  [needs a GPU; use --model for a local checkpoint]"
        click.echo(f"{row['name']:<12} {row['description']}{variants}{note}")
        click.echo(f"{'':<12} checkpoint {row['checkpoint']}, dtype {row['dtype']}, default --quant {row['default_quant']}, "
                   f"{row['build']} build")
    click.echo(f"\nschemes usable on this machine ({device}): {', '.join(usable)}")
    click.echo("all schemes and what they need: aotpack schemes")
    click.echo("any other diffusers model: aotpack build ./pipeline-folder (or OWNER/NAME); aotpack recipe SOURCE "
               "shows the recipe derived for it")


@click.command()
@quiet_option
def schemes() -> None:
    """List every quantization scheme, the torchao config behind it and the hardware it needs."""
    from aotpack.artifact.platform import cpu_flags, default_device, slow_scheme
    from aotpack.builder.schemes import SCHEMES, why_not

    device, flags = default_device(), cpu_flags()
    for name, s in SCHEMES.items():
        status = "ok here" if why_not(s, device) is None else f"not here (use {s.instead})"
        if status == "ok here" and slow_scheme(device, flags, name):
            status = "ok here, ~25x slower than float32 (no VNNI/AMX)"
        click.echo(f"{name:<10} {s.description:<52} needs {s.needs():<30} {status}")
    from aotpack.builder.plan import candidates

    here = ", ".join(c.name for c in candidates(device))
    click.echo(f"{'auto':<10} {'a scheme per layer: the fastest within --error-budget':<52} "
               f"{'chooses among':<36} {here}")


@click.command()
@quiet_option
@click.argument("source")
@derive_options
@json_option
def recipe(source, as_json, **derive_kwargs) -> None:
    """Derive the recipe of SOURCE (a diffusers pipeline folder or Hub repo id) and print it as TOML.

    The dims come from real pipeline calls, each stopped at the transformer's first forward (its weights are not
    read). Save it, edit it, pin it: `aotpack build ./my.toml` builds exactly that.

    \b
    Examples:
      aotpack recipe ./my-wan-pipeline > wan.toml
      aotpack recipe Qwen/Qwen-Image --revision main --max-size 1024 > qwen.toml
    """
    from aotpack.builder.derive import Options, derive, is_pipeline_source, to_toml

    if not is_pipeline_source(source):
        raise RecipeError(f"{source} is neither a diffusers pipeline folder nor a Hub repo id",
                          "pass the folder (holding model_index.json) or OWNER/NAME")
    quiet_pipelines()
    from aotpack.artifact.platform import default_device
    from aotpack.builder.recipe import parse_recipe

    opts = {k: v for k, v in derive_kwargs.items() if v not in (None, ())}
    opts["blocks"] = tuple(opts.get("blocks", ()))
    data = derive(source, Options(**opts), device=default_device())
    parse_recipe(data, source=f"the recipe derived from {source}", pinned=False)  # what build would refuse
    echo_result(as_json, data, to_toml(data).rstrip("\n"))
