"""What travels to a job: the files it is sent (read and checked here, once), and its command (install this
aotpack with the pinned dependencies, write those files, build and push) and environment, never a token."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import shlex
from typing import Sequence

from aotpack._version import __version__
from aotpack.errors import AotpackError, FarmError, one_line
from aotpack.farm.cell_options import _check_local_files, _parsed, recipe_defaults
from aotpack.farm.cells import Cell, _cap, flavor_platform

_PLAN_HINT = "pass the plan.json of an earlier --quant auto build"


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file that travels to the job inside its command: the bytes read and checked here, once."""

    option: str                                   # the build option that names it, e.g. '--plan'
    source: str                                   # the path given here
    name: str                                     # its name in the job's folder
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> str:
        where = f"{self.option} {one_line(self.source, 120)} as {self.name}"
        return f"{where}: {len(self.data)} bytes, sha256 {self.sha256}"


def uploads_of(cell: Cell, params: dict, device: str, cap: tuple[int, int] | None) -> tuple[Upload, ...]:
    """The files the cell's job is sent, each read once and checked as what it claims to be, for the job's
    device: a ``--plan`` is a regular file (no link, FIFO, device or /proc file) holding a valid aotpack plan
    whose schemes run there. Anything else (the environment, a token file) is refused before any submission."""
    from aotpack.builder.plan import MAX_PLAN_BYTES, parse_plan, read_small_file

    plan = params.get("plan")
    if not plan:
        return ()
    if cell.scheme != "auto":
        raise FarmError(f"--plan and scheme {one_line(cell.scheme, 40)} contradict each other",
                        "give a cell with --plan the scheme 'auto'")
    shown = one_line(plan, 120)
    try:
        data = read_small_file(plan, MAX_PLAN_BYTES, follow_symlinks=False)
    except ValueError as e:
        raise FarmError(f"--plan {shown} {e}", _PLAN_HINT) from None
    try:
        parse_plan(data, shown, device, cap)
    except AotpackError as e:
        raise FarmError(f"--plan: {e.cause}", _PLAN_HINT) from None
    return (Upload("--plan", str(plan), "plan.json", data),)


def _pins() -> list[str]:
    """aotpack's dependencies at the versions installed here (what `make install` pinned), for the job."""
    from importlib.metadata import PackageNotFoundError, requires, version

    pins = []
    try:
        wanted = requires("aotpack") or []
    except PackageNotFoundError:
        return []
    for req in wanted:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")  # '+cpu' names a wheel index, not a release
        except PackageNotFoundError:
            continue
    return pins


def job_command(cell: Cell, *, tag_in_job: bool = True, uploads: Sequence[Upload] | None = None) -> list[str]:
    """The job's command: install aotpack and the pins, then build and push. No token in it. A farm tags its
    repos itself once every cell is in (``tag_in_job=False``): a tag is a pin and names one commit.
    ``uploads``: the files checked by ``plan_farm`` (their bytes are what travels); else they are read now."""
    params, options = _parsed(cell)
    if uploads is None:
        device, cap, _ = flavor_platform(cell.flavor)
        _check_local_files(params)
        uploads = uploads_of(cell, params, device, _cap(cap))
    install = [cell.install or f"aotpack=={__version__}", *_pins()]
    packages = " ".join(shlex.quote(x) for x in install)
    lines = ["set -e",  # uv where the image has it (the default one does), else pip
             f"if command -v uv >/dev/null; then uv pip install --system --quiet {packages}; "
             f"else python -m pip install --quiet {packages}; fi"]
    for upload in uploads:  # each travels inside the command, and the build reads it from the job's folder
        data = base64.b64encode(upload.data).decode()
        lines.append(f"echo {data} | base64 -d > {upload.name}")
        i = options.index(upload.option)
        options[i + 1] = upload.name
    args = ["aotpack", "build", cell.recipe, "--quant", cell.scheme]
    args += ["--variant", cell.variant] if cell.variant else []
    args += options + _named_freeze(cell, params) + ["--push", cell.repo]
    args += ["--tag", cell.tag] if cell.tag and tag_in_job else []
    lines.append(" ".join(shlex.quote(a) for a in args))
    return ["sh", "-c", "\n".join(lines)]


def _named_freeze(cell: Cell, params: dict) -> list[str]:
    """``--freeze`` where the plan named the build frozen from its recipe's default (``recipe_defaults``): the job
    builds, and pushes, the build the plan named, whatever its CPU and whatever aotpack version's default it runs."""
    from aotpack.builder.recipe import get_recipe

    device = flavor_platform(cell.flavor)[0]
    named = recipe_defaults(get_recipe(cell.recipe, cell.variant), params, device, cell.scheme)
    return ["--freeze"] if named.get("freeze") else []


def _job_env() -> dict[str, str]:
    """The job's environment: settings that say which Hub to push to, never a credential."""
    from huggingface_hub import constants

    from aotpack.hub import endpoint

    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if endpoint() != "https://huggingface.co":
        env["HF_ENDPOINT"] = endpoint()
    if constants.HF_HUB_DISABLE_XET:
        env["HF_HUB_DISABLE_XET"] = "1"
    return env
