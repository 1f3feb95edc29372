"""``--quant auto``: a per-layer quantization plan, stored as JSON in the artifact (torchao 0.18 removed autoquant).

For each distinct linear shape, every candidate scheme this device runs is timed on a linear of that shape
with the recipe's token count; for each layer, its output error under each scheme is measured on its real
weights (relative max error against the high-precision layer, on a fixed random input). Each layer gets the
fastest scheme whose error is within the budget (``none`` always is). ``--plan FILE`` rebuilds from a saved
plan without timing again.

plan.json keeps the choices twice over: ``layers`` (scheme name, error and timings per layer, for people and
for aotpack) and ``torchao``: the same choices as torchao's own ``FqnToConfig``, serialized with
``config_to_dict``, so that ``quantize_(transformer, config_from_dict(plan["torchao"]))`` applies the plan
to an eager model with torchao alone.

Timings are of eager torchao kernels, a proxy for the compiled ones (the compiled program is what runs);
they are recorded in the plan so the choice can be checked.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Any

from aotpack.errors import InputError, first_line, one_line
from aotpack.builder.schemes import SCHEMES, Scheme, get_scheme, quantize_named, torchao_config, why_not

PLAN_FILE = "plan.json"
PLAN_VERSION = 2
_READABLE_VERSIONS = (1, 2)
# Schemes auto chooses from, when this device runs them (dynamic fp8 and int4 need GPUs; sparsify needs
# pruned weights, never chosen automatically).
CANDIDATES = ("none", "int8wo", "int8dq", "fp8wo", "int4wo", "fp8dqrow")
DEFAULT_BUDGET = 0.05
MAX_PLAN_BYTES = 1 << 20


def candidates(device: str, cap: tuple[int, int] | None = None, flags: tuple[str, ...] | None = None) -> list[Scheme]:
    """The schemes a plan times on ``device``: those it can run, less those many times slower than float32 there
    (``platform.slow_scheme``: int8dq on a CPU without int8 units, ~25x; timing it per layer would cost minutes)."""
    from aotpack.artifact.platform import cpu_flags, slow_scheme

    flags = cpu_flags() if flags is None else flags
    return [SCHEMES[n] for n in CANDIDATES
            if why_not(SCHEMES[n], device, cap) is None and slow_scheme(device, flags, n) is None]


class Planner:
    """Chooses a scheme per linear as the build streams them; ``plan()`` is the JSON to store."""

    def __init__(self, device: str, tokens: int, dtype: Any, budget: float = DEFAULT_BUDGET,
                 cap: tuple[int, int] | None = None, repeats: int = 5) -> None:
        self.device, self.tokens, self.dtype, self.budget, self.repeats = device, tokens, dtype, budget, repeats
        self.schemes = candidates(device, cap)
        self.timings: dict[str, dict[str, float]] = {}
        self.layers: dict[str, dict[str, Any]] = {}

    def _time(self, linear: Any, x: Any) -> float:
        import torch

        with torch.no_grad():
            linear(x)  # warm-up
            best = float("inf")
            for _ in range(self.repeats):
                if self.device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                linear(x)
                if self.device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
        return best

    def _quantized_copy(self, linear: Any, scheme: Scheme) -> Any | None:
        import copy

        import torch

        from aotpack.builder.schemes import quantize

        q = copy.deepcopy(linear)
        config = torchao_config(scheme)
        if config is None:
            return q
        if scheme.group_size and q.in_features % scheme.group_size:
            return None
        try:
            quantize(q, scheme, config)
        except Exception:  # a scheme with no kernel for this shape is simply not a candidate for it
            return None
        return q if type(q.weight.data) is not torch.Tensor else None

    def choose(self, name: str, linear: Any) -> str:
        """The scheme for layer ``name`` (an nn.Linear holding its high-precision weight)."""
        import torch

        g = torch.Generator().manual_seed(0)
        x = torch.randn(self.tokens, linear.in_features, generator=g).to(self.device, self.dtype)
        shape = f"{linear.out_features}x{linear.in_features}"
        with torch.no_grad():
            ref = linear(x)
            scale = float(ref.abs().max()) or 1.0
            errors, times = {}, self.timings.setdefault(shape, {})
            for scheme in self.schemes:
                q = self._quantized_copy(linear, scheme)
                if q is None:
                    continue
                errors[scheme.name] = float((q(x) - ref).abs().max()) / scale
                if scheme.name not in times:
                    times[scheme.name] = self._time(q, x)
        fits = [s for s in errors if errors[s] <= self.budget]
        best = min(fits, key=lambda s: times[s])
        self.layers[name] = {"scheme": best, "error": round(errors[best], 6),
                             "errors": {k: round(v, 6) for k, v in errors.items()}}
        return best

    def plan(self) -> dict:
        return {"version": PLAN_VERSION, "device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                "tokens": self.tokens, "budget": self.budget,
                "timings": self.timings, "layers": self.layers, "torchao": fqn_to_config(self.layers)}


def fqn_to_config(layers: dict[str, dict]) -> dict:
    """The plan as torchao's ``FqnToConfig`` (each layer's config; ``None`` leaves a layer as it is), in the
    JSON form of ``torchao.core.config.config_to_dict``."""
    from torchao.core.config import config_to_dict
    from torchao.quantization import FqnToConfig

    return config_to_dict(FqnToConfig({name: torchao_config(get_scheme(entry["scheme"]))
                                       for name, entry in sorted(layers.items())}))


def read_plan(path: str | Path, device: str, cap: tuple[int, int] | None = None) -> dict:
    """Read and check a plan file (a regular file of at most 1 MiB, read once): see :func:`parse_plan`."""
    try:
        data = read_small_file(path, MAX_PLAN_BYTES)
    except ValueError as e:
        raise InputError(f"plan file {one_line(path, 120)} {e}", "pass the plan.json of an earlier --quant auto build")
    return parse_plan(data, Path(path).name, device, cap)


def read_small_file(path: str | os.PathLike, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of ``path``, opened once and read once: a regular file of at most ``limit`` bytes whose
    content is as long as its size says (which a /proc or /sys file is not). A FIFO, a device, a folder (and,
    without ``follow_symlinks``, a symbolic link) is refused before a byte is read. ValueError says why."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # a FIFO must not block
    try:
        fd = os.open(path, flags | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)))
    except OSError as e:
        why = "is a symbolic link (pass the file itself)" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
        raise ValueError(why) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("is not a regular file (a folder, a FIFO or a device)")
        if st.st_size > limit:
            raise ValueError(f"is larger than {limit >> 10} KiB")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != st.st_size:
        raise ValueError("is not what its size says (a /proc or /sys file, or one being written)")
    return data


def parse_plan(text: bytes, name: str, device: str, cap: tuple[int, int] | None = None) -> dict:
    """Check plan JSON fully (:func:`check_plan`), and that every scheme it uses runs on ``device``."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"plan file {one_line(name, 120)} is not valid JSON ({first_line(e, 120)})",
                         "pass a plan.json written by aotpack") from None
    check_plan(data, name)
    for scheme_name in sorted({v["scheme"] for v in data["layers"].values()}):
        reason = why_not(SCHEMES[scheme_name], device, cap)
        if reason:
            raise InputError(f"plan file {one_line(name, 120)} uses {scheme_name}, which cannot run here: {reason}",
                             "make the plan on this kind of machine (--quant auto)")
    return data


_TOP_KEYS = {"version", "device", "dtype", "tokens", "budget", "timings", "layers", "torchao"}
PLAN_DTYPES = ("float32", "bfloat16", "float16")  # the dtype the plan's errors and timings were measured in
_LAYER_KEYS = {"scheme", "error", "errors"}


def _number(value: Any, low: float = 0.0) -> bool:
    """A finite JSON number >= ``low`` (a bool is not a number here, though Python says it is)."""
    return type(value) in (int, float) and math.isfinite(value) and value >= low


def _scheme_map(value: Any) -> bool:
    """{known scheme: finite number >= 0}, as a layer's errors and a shape's timings are."""
    return isinstance(value, dict) and all(k in SCHEMES and _number(v) for k, v in value.items())


def check_plan(data: Any, name: str) -> None:
    """Check the shape of a plan (what :meth:`Planner.plan` writes) before any build starts: known keys only,
    ``version`` an int aotpack reads, ``budget`` a number in [0, 1), ``tokens`` a positive int, every layer
    a known scheme with finite errors, every timing finite. One InputError naming the first problem."""
    def bad(what: str) -> InputError:
        return InputError(f"plan file {one_line(name, 120)} is not a valid aotpack plan: {what}",
                          "pass a plan.json written by aotpack (--quant auto)")

    if not isinstance(data, dict):
        raise bad("it is not a JSON object")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise bad(f"unknown key {one_line(repr(unknown[0]), 60)}")
    if type(data.get("version")) is not int or data["version"] not in _READABLE_VERSIONS:
        raise bad(f"'version' must be one of {', '.join(map(str, _READABLE_VERSIONS))}")
    if "device" in data and not isinstance(data["device"], str):
        raise bad("'device' must be a string")
    if "dtype" in data and data["dtype"] not in PLAN_DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(PLAN_DTYPES)}")
    if "tokens" in data and (type(data["tokens"]) is not int or data["tokens"] < 1):
        raise bad("'tokens' must be a positive integer")
    if data.get("budget") is not None and not (_number(data["budget"]) and data["budget"] < 1):
        raise bad("'budget' must be a number in [0, 1)")
    timings = data.get("timings", {})
    if not isinstance(timings, dict) or not all(isinstance(k, str) and _scheme_map(v) for k, v in timings.items()):
        raise bad("'timings' must map shapes to {scheme: seconds}")
    if "torchao" in data and not isinstance(data["torchao"], dict):
        raise bad("'torchao' must be an object")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise bad("no 'layers' table")
    for layer, entry in layers.items():
        where = f"layer {one_line(repr(layer), 80)}"
        if not layer or not isinstance(entry, dict) or set(entry) - _LAYER_KEYS:
            raise bad(f"{where} must be an object with keys {', '.join(sorted(_LAYER_KEYS))}")
        if not isinstance(entry.get("scheme"), str) or entry["scheme"] not in SCHEMES:
            scheme = one_line(repr(entry.get("scheme")), 40)
            raise bad(f"{where} has the unknown scheme {scheme} (known: {', '.join(SCHEMES)})")
        if "error" in entry and not _number(entry["error"]):
            raise bad(f"{where}: 'error' must be a finite number >= 0")
        if "errors" in entry and not _scheme_map(entry["errors"]):
            raise bad(f"{where}: 'errors' must map schemes to finite numbers >= 0")


def linear_quantizer(scheme: str, plan: dict | None = None):
    """The ``(name, linear)`` callback a build (or a LoRA swap) quantizes each linear with: the plan's scheme
    for that layer (layers it does not name stay as they are), else ``scheme``; None when nothing is quantized."""
    if plan is not None:
        layers = plan["layers"]
        return lambda name, linear: quantize_named(linear, layers[name]["scheme"]) if name in layers else None
    if torchao_config(get_scheme(scheme)) is None:
        return None
    return lambda name, linear: quantize_named(linear, scheme)


def check_plan_covers(plan: dict, names: set[str]) -> None:
    unknown = sorted(set(plan["layers"]) - names)
    if unknown:
        raise InputError(f"the plan names layers this model does not have: {', '.join(unknown[:3])}",
                         "use a plan made for this recipe (and the same --fuse-qkv)")


def summary(plan: dict) -> dict:
    """What the manifest records: budget, layers per scheme and each layer's scheme."""
    counts: dict[str, int] = {}
    for entry in plan["layers"].values():
        counts[entry["scheme"]] = counts.get(entry["scheme"], 0) + 1
    return {"file": PLAN_FILE, "budget": plan.get("budget"), "counts": counts,
            "layers": {k: v["scheme"] for k, v in plan["layers"].items()}}
