"""The matrix file: a TOML of ``[[build]]`` entries (or ``recipes = [...]``) read into the cells of a farm, every
problem in it reported at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aotpack.errors import FarmError, first_line, one_line
from aotpack.farm.cells import DEFAULT_IMAGE, DEFAULT_TIMEOUT, Cell, _timeout_problem

_MAX_MATRIX_BYTES = 1 << 20
_TOP = {"repo", "tag", "flavors", "schemes", "recipes", "build", "install", "image", "timeout"}
_ENTRY = {"recipe", "variant", "schemes", "flavors", "options", "repo", "tag", "install", "image", "timeout"}


def read_matrix(path: str | os.PathLike) -> list[Cell]:
    """The cells of a matrix file: every ``[[build]]`` entry (or ``recipes = [...]``) x its schemes x its
    flavors. Top-level keys are defaults that an entry may override. Every problem is reported at once."""
    path = Path(path)
    data = _load_matrix(path)
    problems = [f"unknown key {one_line(repr(k), 60)}" for k in sorted(set(data) - _TOP)]
    entries = data.get("build") or [{"recipe": r} for r in data.get("recipes", [])]
    if not isinstance(entries, list) or not entries:
        problems.append("no [[build]] entries and no 'recipes = [...]'")
        entries = []
    cells = []
    for i, entry in enumerate(entries, 1):
        where = f"build #{i}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is not a table")
            continue
        problems += [f"{where}: unknown key {one_line(repr(k), 60)}" for k in sorted(set(entry) - _ENTRY)]
        get = lambda key, default=None: entry.get(key, data.get(key, default))  # noqa: E731
        fields = {k: get(k) for k in ("recipe", "repo", "schemes", "flavors")}
        for key, value in fields.items():
            ok = isinstance(value, str) if key in ("recipe", "repo") else (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            if not ok:
                kind = "a string" if key in ("recipe", "repo") else "a list of strings"
                problems.append(f"{where}: '{key}' must be {kind}")
        options = entry.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            problems.append(f"{where}: 'options' must be a list of strings, e.g. [\"--fuse-qkv\"]")
            options = []
        scalars = {k: get(k) for k in ("variant", "tag", "install", "image", "timeout")}
        for key, value in scalars.items():
            if value is not None and not isinstance(value, str):
                problems.append(f"{where}: '{key}' must be a string")
        if isinstance(scalars["timeout"], str):
            problems += [f"{where}: {p}" for p in [_timeout_problem(scalars["timeout"])] if p]
        problems += _unprintable(where, {**fields, **scalars, "options": options})
        if any(p.startswith(where) for p in problems):
            continue
        for scheme in fields["schemes"]:
            for flavor in fields["flavors"]:
                cells.append(Cell(recipe=fields["recipe"], scheme=scheme, flavor=flavor, repo_id=fields["repo"],
                                  variant=scalars["variant"], options=tuple(options), tag=scalars["tag"],
                                  install=scalars["install"], image=scalars["image"] or DEFAULT_IMAGE,
                                  timeout=scalars["timeout"] or DEFAULT_TIMEOUT))
    if problems:
        raise FarmError(f"{one_line(path, 120)}: " + "; ".join(problems),
                        "see 'Build farm' in the README for the format")
    return cells


def _load_matrix(path: Path) -> dict:
    """The matrix file's TOML: a regular file of at most 1 MiB, UTF-8 (as TOML is)."""
    import tomllib

    from aotpack.builder.plan import read_small_file

    hint = "pass the path of a matrix .toml (see 'Build farm' in the README)"
    try:
        data = read_small_file(path, _MAX_MATRIX_BYTES)
    except ValueError as e:
        raise FarmError(f"matrix {one_line(path, 120)} {e}", hint) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise FarmError(f"matrix {one_line(path, 120)} is not UTF-8 text (byte {e.start})", hint) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FarmError(f"{one_line(path, 120)} is not valid TOML: {first_line(e)}", hint) from None


def _unprintable(where: str, values: dict[str, Any]) -> list[str]:
    """A problem for each value holding a control character (a newline would print a second 'Error:' line,
    an escape sequence would redraw the terminal): no flavor, repo or option needs one."""
    out = []
    for key, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.isprintable():
                out.append(f"{where}: '{key}' holds a control character: {one_line(repr(v), 80)}")
                break
    return out
