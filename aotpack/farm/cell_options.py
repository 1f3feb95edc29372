"""A cell's options: parsed by `aotpack build`'s own parser (declared in aotpack.options), turned back into the
arguments its job is given, and refused where they name what only this machine has."""

from __future__ import annotations

import os
from typing import Any

from aotpack.errors import FarmError, first_line, one_line
from aotpack.farm.cells import Cell

# build options a job cannot be given: where the job writes, and what makes it a job or a push
_NOT_OPTIONS = {"recipe", "quant", "variant", "out", "overwrite", "push_to", "tag_name", "on_flavor", "install",
                "as_json"}  # the job's last line must stay the URL of its push
# files on this machine that a job cannot read (and a private key that must never travel)
_LOCAL_ONLY = {"lora": "a LoRA file", "reuse": "an artifact folder", "sign_key": "a private key"}


def _build_command():
    """A parser of `aotpack build`'s options (those a job is given), declared where the CLI's own are."""
    import click

    from aotpack.options import build_options

    return click.command("build")(build_options(lambda *args, **kwargs: None))


def options_from_context(ctx: Any) -> list[str]:
    """The options typed on an ``aotpack build`` command line, as arguments again (for the job's command)."""
    from click.core import ParameterSource

    args: list[str] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in _NOT_OPTIONS:
            continue
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if param.is_flag:  # a two-way flag typed off (--no-freeze, --whole-graph) must reach the job too
            args += [flag] if value else param.secondary_opts[:1]
        else:
            for v in (value if param.multiple else [value]):
                args += [flag, str(v)]
    return args


def _parsed(cell: Cell) -> tuple[dict, list[str]]:
    """The cell's options parsed by `aotpack build`'s own parser: (their values, the options normalized)."""
    import click

    command = _build_command()
    try:
        ctx = command.make_context("build", [cell.recipe, *cell.options], resilient_parsing=False)
    except (click.ClickException, click.exceptions.Exit) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else "--help is not a build option"
        raise FarmError(f"options {one_line(' '.join(cell.options), 120)}: {first_line(Exception(message))}",
                        "use the options of 'aotpack build --help'") from None
    for param in ctx.command.params:
        if param.name in _NOT_OPTIONS and param.name != "recipe" and \
                ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            raise FarmError(f"options: {param.opts[0]} is set by the farm, not by a cell's options",
                            "use the matrix keys: schemes, variant, repo, tag, install")
    return ctx.params, options_from_context(ctx)


def _check_local_files(params: dict) -> None:
    for name, what in _LOCAL_ONLY.items():
        if params.get(name):
            if name == "sign_key":
                raise FarmError("--sign-key names a private key on this machine, which never goes into a job",
                                "sign the pulled build here with 'aotpack sign', then push it again")
            raise FarmError(f"--{name.replace('_', '-')} names {what} on this machine, which a job cannot read",
                            "build it here, or put the file in a Hub repo the job can download")
    model = params.get("model")
    if model and (os.path.exists(model) or model.startswith(("/", "./", "../", "~"))):
        raise FarmError(f"--model {one_line(model, 120)} is a local folder, which a job cannot read",
                        "pass a Hub repo id as --model")


def recipe_defaults(recipe: Any, params: dict, device: str, scheme: str) -> dict[str, bool]:
    """The options a job's build takes from its recipe where the cell says nothing (--regional, --freeze): they
    name the build it pushes as much as typed ones do. The job's CPU is unknown here, so --freeze is decided by the
    recipe alone and said on the job's command line (``job_script``): the job builds what the plan named."""
    from aotpack.builder.schemes import freezes_by_default

    out = {}
    if params.get("regional") is None and recipe.regional:
        out["regional"] = True
    if params.get("freeze") is None and freezes_by_default(
            recipe, device, scheme, lora=params.get("lora") is not None, compile_vae=bool(params.get("compile_vae")),
            reuse=params.get("reuse") is not None):
        out["freeze"] = True
    return out
