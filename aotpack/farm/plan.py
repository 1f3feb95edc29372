"""Checking a farm before anything is submitted: each cell's flavor, scheme, recipe, options and files, the build
name it will push, and one model per repo; every refused cell named in one error."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from aotpack.errors import AotpackError, FarmError, one_line
from aotpack.farm.cell_options import _check_local_files, _parsed, recipe_defaults
from aotpack.farm.cells import Cell, _cap, _timeout_problem, flavor_platform, platform_label
from aotpack.farm.job_script import Upload, uploads_of


@dataclasses.dataclass
class Planned:
    """A checked cell: the platform its flavor gives, its price, and why it cannot be built (None: it can)."""

    cell: Cell
    platform: str
    price: str
    build: str | None = None                      # the build name it will push, where it can be told
    problem: str | None = None
    uploads: tuple[Upload, ...] = ()              # the files its job is sent (checked, read once)


def _hardware(api: Any) -> dict[str, Any]:
    return {h.name: h for h in api.list_jobs_hardware()}


def plan_farm(cells: Sequence[Cell], *, hardware: dict[str, Any] | None = None) -> list[Planned]:
    """Check every cell before anything is submitted: the flavor exists and its GPU can run the scheme, the
    recipe and options are valid, each repo receives one checkpoint, and no two cells push the same build."""
    out: list[Planned] = []
    checkpoints: dict[str, set[str]] = {}
    names: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        planned = Planned(cell, "?", "?")
        out.append(planned)
        try:
            _plan_cell(planned, hardware, checkpoints, names)
        except AotpackError as e:
            planned.problem = e.cause
    for repo, recipes in checkpoints.items():
        if len(recipes) > 1:
            for planned in out:
                if planned.problem is None and planned.cell.repo == repo:
                    planned.problem = (f"{repo} would receive builds of {', '.join(sorted(recipes))}; a repo holds "
                                       "one model: put {recipe} in the repo name")
    return out


def _plan_cell(planned: Planned, hardware: dict[str, Any] | None, checkpoints: dict[str, set[str]],
               names: dict[tuple[str, str], Cell]) -> None:
    """Check one cell and fill in ``planned``; note its repo's checkpoint and its build name (raises the first
    problem found)."""
    from huggingface_hub.utils import validate_repo_id

    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.schemes import get_scheme, why_not
    from aotpack.hub import _OPTION_NAMES, name_of

    cell = planned.cell
    problem = _timeout_problem(cell.timeout)
    if problem:
        raise FarmError(problem, "e.g. timeout = \"2h\"")
    if hardware is not None and cell.flavor not in hardware:
        raise FarmError(f"flavor {one_line(repr(cell.flavor), 60)} is not offered by Hugging Face Jobs",
                        f"choose one of: {', '.join(sorted(hardware))}")
    device, cap, gpu = flavor_platform(cell.flavor)
    planned.platform = platform_label(cell.flavor)
    if hardware is not None:
        h = hardware[cell.flavor]
        planned.price = f"${h.unit_cost_usd:.4f}/{h.unit_label}"
    recipe = get_recipe(cell.recipe, cell.variant)
    if cell.scheme != "auto":
        reason = why_not(get_scheme(cell.scheme), device, _cap(cap))
        if reason:
            raise FarmError(f"{one_line(cell.flavor, 60)} ({gpu}) cannot build {cell.scheme}: {reason}",
                            "drop the cell or choose a newer GPU")
    params, _ = _parsed(cell)
    _check_local_files(params)
    if params.get("freeze"):  # a CPU-only option: refused before a paid GPU job starts
        from aotpack.builder.schemes import check_freeze
        from aotpack.errors import SchemeError

        try:
            check_freeze(device, params.get("lora") is not None, quant=cell.scheme,
                         compile_vae=bool(params.get("compile_vae")), reuse=params.get("reuse") is not None)
        except SchemeError as e:
            raise FarmError(f"{one_line(cell.flavor, 60)}: {e.cause}", e.hint) from None
    planned.uploads = uploads_of(cell, params, device, _cap(cap))
    repo = cell.repo
    try:
        validate_repo_id(repo)
    except ValueError:
        raise FarmError(f"repo {repo!r} is not owner/name", "e.g. repo = \"me/{recipe}-aot\"") from None
    checkpoints.setdefault(repo, set()).add(recipe.full_name)
    options = {k: params.get(k) for k in _OPTION_NAMES if params.get(k)} | recipe_defaults(recipe, params, device,
                                                                                          cell.scheme)
    # a CPU flavor's ISA is known once its job runs
    planned.build = name_of(cell.scheme, options, False, planned.platform if cap else "cpu-...")
    other = names.setdefault((repo, planned.build), cell)
    if other is not cell:
        raise FarmError(f"{one_line(other.flavor, 60)} and {one_line(cell.flavor, 60)} would both push "
                        f"{planned.build} into {repo}",
                        "keep one of them (the build name does not tell them apart)")


def check_farm(cells: Sequence[Cell], *, token: str | None = None) -> list[Planned]:
    """``plan_farm`` against the flavors Hugging Face Jobs offers now (and their prices); needs no login."""
    from huggingface_hub import HfApi

    from aotpack.hub import _hub_errors, endpoint

    with _hub_errors("jobs"):
        return plan_farm(cells, hardware=_hardware(HfApi(endpoint=endpoint(), token=token or False)))


def refused(planned: Sequence[Planned]) -> FarmError | None:
    """One error naming every cell that cannot be built, or None."""
    bad = [p for p in planned if p.problem]
    if not bad:
        return None
    first = bad[0]
    more = f" (and {len(bad) - 1} more cell{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return FarmError(f"cell {first.cell.where}: {one_line(first.problem, 300)}{more}",
                     "fix or drop the refused cells (aotpack farm MATRIX --dry-run lists them); nothing was submitted")
