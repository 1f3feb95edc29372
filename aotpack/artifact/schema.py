"""JSON <-> frozen dataclasses, with the validation derived from the dataclasses' own type hints.

``decode(Cls, data)`` checks a parsed JSON value against ``Cls`` (nested dataclasses, ``tuple[X, ...]``,
``dict[str, X]``, ``X | None``, ``int``, ``float``, ``str``, ``bool``, free-form ``dict``) and gathers every
problem into a list instead of stopping at the first; ``encode(obj)`` is the inverse. Field names in problems
are written with ``repr`` so that a hostile manifest cannot print fake lines.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from functools import lru_cache
from typing import Any, Union

@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _name(where: str) -> str:
    return repr(where) if where else "manifest"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return "/".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "list"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "object"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def decode(tp: Any, value: Any, where: str = "", problems: list[str] | None = None) -> Any:
    """``value`` as ``tp``; a problem per mismatch is appended to ``problems`` (raises nothing itself).

    Returns a best-effort value even when there were problems (the caller raises if ``problems`` is not empty).
    """
    problems = problems if problems is not None else []
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _union(tp, value, where, problems)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, where, problems)
    if origin is tuple:
        return _tuple(tp, value, where, problems)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"field {_name(where)} must be an object, got {type(value).__name__}")
            return {}
        if tp is dict:  # free-form JSON (a diffusers config, a torchao config)
            return value
        val_tp = typing.get_args(tp)[1]
        return {k: decode(val_tp, v, f"{where}[{k!r}]", problems) for k, v in value.items()}
    return _scalar(tp, value, where, problems)


def _union(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    args = typing.get_args(tp)
    if value is None:
        if type(None) not in args:
            problems.append(f"field {_name(where)} must be {_type_name(tp)}, got null")
        return None
    options = [a for a in args if a is not type(None)]
    for option in options:  # the first that decodes without problems
        trial: list[str] = []
        out = decode(option, value, where, trial)
        if not trial:
            return out
    if len(options) == 1:
        return decode(options[0], value, where, problems)
    problems.append(f"field {_name(where)} must be {_type_name(tp)}, got {type(value).__name__}")
    return None


def _dataclass(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        problems.append(f"{_name(where)} must be an object" if where else "manifest must be an object")
        return None
    hints = _hints(tp)
    fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
    for key in sorted(set(value) - set(fields), key=str):
        problems.append(f"unknown field {(where + '.' if where else '') + str(key)!r}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{where}.{name}" if where else name
        if name in value:
            kwargs[name] = decode(hints[name], value[name], sub, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            problems.append(f"missing field {sub!r}")
    try:
        return tp(**kwargs)
    except (TypeError, ValueError):  # missing fields already reported
        return None


def _tuple(tp: Any, value: Any, where: str, problems: list[str]) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, list):
        problems.append(f"field {_name(where)} must be a list, got {type(value).__name__}")
        return ()
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(decode(args[0], v, f"{where}[{i}]", problems) for i, v in enumerate(value))
    if len(value) != len(args):
        problems.append(f"field {_name(where)} must have {len(args)} items")
        return ()
    return tuple(decode(a, v, f"{where}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value)))


def _scalar(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    if tp is float:  # JSON numbers; NaN and infinities are not numbers a manifest may hold
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif tp is int:
        ok = type(value) is int  # bool is an int subclass; a schema int never means a bool
    else:
        ok = type(value) is tp
    if not ok:
        got = type(value).__name__ if value is not None else "null"
        problems.append(f"field {_name(where)} must be {_type_name(tp)}, got {got}")
        return None
    return float(value) if tp is float else value


def _at_default(obj: Any, f: dataclasses.Field) -> bool:
    if not f.metadata.get("omit_default"):
        return False
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    return getattr(obj, f.name) == default


def encode(obj: Any) -> Any:
    """The JSON form of a dataclass value (tuples as lists; fields left at a default ``None`` are kept, except a
    field marked ``metadata={"omit_default": True}``, which is left out at its default: a field added later
    then changes nothing in the files that do not use it)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not _at_default(obj, f)}
    if isinstance(obj, (tuple, list)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: encode(v) for k, v in obj.items()}
    return obj
