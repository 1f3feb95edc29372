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

import json
import time
from pathlib import Path
from typing import Any

from aotpack.errors import InputError, SchemeError, first_line
from aotpack.builder.schemes import SCHEMES, Scheme, get_scheme, quantize_named, torchao_config, why_not

PLAN_FILE = "plan.json"
PLAN_VERSION = 2
_READABLE_VERSIONS = (1, 2)
# Schemes auto chooses from, when this device runs them (dynamic fp8 and int4 need GPUs; sparsify needs
# pruned weights, never chosen automatically).
CANDIDATES = ("none", "int8wo", "int8dq", "fp8wo", "int4wo", "fp8dqrow")
DEFAULT_BUDGET = 0.05


def candidates(device: str, cap: tuple[int, int] | None = None) -> list[Scheme]:
    return [SCHEMES[n] for n in CANDIDATES if why_not(SCHEMES[n], device, cap) is None]


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
        return {"version": PLAN_VERSION, "device": self.device, "tokens": self.tokens, "budget": self.budget,
                "timings": self.timings, "layers": self.layers, "torchao": fqn_to_config(self.layers)}


def fqn_to_config(layers: dict[str, dict]) -> dict:
    """The plan as torchao's ``FqnToConfig`` (each layer's config; ``None`` leaves a layer as it is), in the
    JSON form of ``torchao.core.config.config_to_dict``."""
    from torchao.core.config import config_to_dict
    from torchao.quantization import FqnToConfig

    return config_to_dict(FqnToConfig({name: torchao_config(get_scheme(entry["scheme"]))
                                       for name, entry in sorted(layers.items())}))


def read_plan(path: str | Path, device: str, cap: tuple[int, int] | None = None) -> dict:
    """Read and check a plan file: JSON only, every scheme known and runnable here."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"plan file {path} does not exist", "pass the plan.json of an earlier --quant auto build")
    return parse_plan(p.read_bytes(), p.name, device, cap)


def parse_plan(text: bytes, name: str, device: str, cap: tuple[int, int] | None = None) -> dict:
    """Check plan JSON: every layer has a scheme, each known and runnable here."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"plan file {name} is not valid JSON ({first_line(e, 120)})",
                         "pass a plan.json written by aotpack") from None
    if not isinstance(data, dict) or data.get("version") not in _READABLE_VERSIONS:
        raise InputError(f"plan file {name} is not an aotpack plan (version {PLAN_VERSION})",
                         "pass a plan.json written by aotpack")
    layers = data.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) and isinstance(v.get("scheme"), str)
                                               for v in layers.values()):
        raise InputError(f"plan file {name} has no valid 'layers' table", "pass a plan.json written by aotpack")
    for scheme_name in sorted({v["scheme"] for v in layers.values()}):
        try:
            scheme = get_scheme(scheme_name)
        except SchemeError as e:
            raise InputError(f"plan file {name}: {e.cause}", e.hint) from None
        reason = why_not(scheme, device, cap)
        if reason:
            raise InputError(f"plan file {name} uses {scheme_name}, which cannot run here: {reason}",
                             "make the plan on this kind of machine (--quant auto)")
    return data


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
