"""diffusers' LoRA API on a loaded artifact, routed to ``swap_lora``.

``pipe.load_lora_weights(...)``, ``set_adapters``, ``fuse_lora``, ``unload_lora_weights``, ``delete_adapters``,
``disable_lora`` / ``enable_lora`` reach the transformer through the model-level methods diffusers calls
(``load_lora_adapter``, ``set_adapters``, ``fuse_lora``, ``unload_lora``, ...); a loaded artifact answers them by
fusing the LoRA into its compiled constants at the right scale (no recompile, the same weights a ``--lora``
build makes). Compiled code holds one weight set, so one LoRA at a time: what needs two is refused in one line.

What diffusers would compute, and what the artifact then holds:
  loaded (weight w)                 base + w * delta
  fuse_lora(lora_scale=s)           base + s * w * delta      (stays after unload_lora_weights)
  disable_lora                      base                      (enable_lora: back)
  unload_lora_weights / delete      base
"""

from __future__ import annotations

import hashlib
import types
from pathlib import Path
from typing import Any

from aotpack.errors import InputError, one_line

METHODS = ("load_lora_adapter", "set_adapters", "fuse_lora", "unfuse_lora", "unload_lora", "delete_adapters",
           "disable_lora", "enable_lora")


class Adapters:
    """The adapter bookkeeping of one loaded artifact (one LoRA at a time, fused into its constants)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name: str | None = None
        self.lora: Any = None          # the weights.Lora loaded
        self.weight = 1.0
        self.fused: float | None = None
        self.enabled = True
        self.baked: tuple | None = None  # (lora, scale) left fused after unload_lora_weights
        self.count = 0

    def effective(self) -> tuple | None:
        if self.lora is None:
            return self.baked
        if self.fused is not None:
            return self.lora, self.weight * self.fused
        return (self.lora, self.weight) if self.enabled else None

    def sync(self, before: tuple | None) -> None:
        now = self.effective()
        if now != before:
            if now is None:
                self.model.swap_lora(None)
            else:
                self.model.swap_lora(now[0], now[1])
        if self.lora is not None:
            self.model.peft_config = {self.name: {"aotpack": "fused into the compiled constants"}}
        elif "peft_config" in self.model.__dict__:
            del self.model.peft_config  # diffusers lists a model's adapters by this attribute

    def names(self, adapter_names: Any) -> list[str]:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names or [])
        unknown = [n for n in names if n != self.name]
        if unknown:
            raise InputError(f"no LoRA adapter named {one_line(repr(unknown[0]), 60)} is loaded"
                             + (f" (the artifact holds '{self.name}')" if self.name else ""),
                             "load it first with pipe.load_lora_weights(FILE, adapter_name=...)")
        return names


def _state_dict_sha256(state_dict: dict) -> str:
    """What the LoRA swapped in is recorded as when it came as tensors, not a file."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read(model: Any, source: Any, prefix: str | None, kwargs: dict) -> Any:
    """The LoRA diffusers hands over (a state dict its pipeline converted already), or a local file."""
    import diffusers

    from aotpack.builder.weights import lora_from_state_dict, read_lora

    manifest = model.manifest
    component = manifest.recipe.component
    if isinstance(source, (str, Path)):
        file = Path(source) / kwargs["weight_name"] if kwargs.get("weight_name") else Path(source)
        if not file.is_file():
            raise InputError(f"LoRA {one_line(str(source), 120)} is not a file here",
                             "aotpack reads LoRA .safetensors files from this machine: download it first "
                             "(hf download REPO FILE) and pass the file")
        return read_lora(str(file), getattr(diffusers, manifest.recipe.pipeline), component)
    if not isinstance(source, dict):
        raise InputError(f"load_lora_weights got a {type(source).__name__}", "pass a .safetensors file or a state dict")
    mark = f"{prefix}." if prefix else ""
    state_dict = {f"{component}.{k[len(mark):]}": v for k, v in source.items() if k.startswith(mark)}
    alphas = {f"{component}.{k[len(mark):]}": v for k, v in (kwargs.get("network_alphas") or {}).items()
              if k.startswith(mark)}
    name = kwargs.get("adapter_name") or "state dict"
    return lora_from_state_dict(state_dict, alphas, kwargs.get("metadata"), component, path=str(name),
                                sha256=_state_dict_sha256(state_dict))


def load_lora_adapter(self: Any, pretrained_model_name_or_path_or_dict: Any, prefix: str | None = "transformer",
                      hotswap: bool = False, **kwargs: Any) -> None:
    a: Adapters = self._aotpack_adapters
    name = kwargs.get("adapter_name") or f"default_{a.count}"
    if a.lora is not None and not (hotswap and name == a.name):
        raise InputError(f"the artifact holds LoRA '{a.name}'; compiled code holds one weight set, one LoRA at a "
                         "time", "pipe.unload_lora_weights() first (or load with hotswap=True and the same name)")
    if a.baked is not None:
        raise InputError("the artifact holds a LoRA fused in by fuse_lora + unload_lora_weights; another cannot "
                         "be added on top", "load the artifact again to start from its own weights")
    before = a.effective()
    lora = _read(self, pretrained_model_name_or_path_or_dict, prefix, kwargs)
    a.name, a.lora, a.weight, a.fused, a.enabled, a.count = name, lora, 1.0, None, True, a.count + 1
    try:
        a.sync(before)
    except BaseException:
        a.name = a.lora = None
        raise


def set_adapters(self: Any, adapter_names: Any, weights: Any = None) -> None:
    a: Adapters = self._aotpack_adapters
    names = a.names(adapter_names)
    values = weights if isinstance(weights, (list, tuple)) else [weights] * len(names)
    if len(values) != len(names):
        raise InputError(f"{len(names)} adapter name(s) and {len(values)} weight(s)", "give one weight per name")
    if not names:
        raise InputError("set_adapters got no adapter names", "name the loaded adapter")
    value = values[0]
    if isinstance(value, dict):  # per-block weights need the LoRA unfused, per block: not compiled code
        raise InputError("per-block LoRA weights (a dict) cannot be fused into compiled blocks",
                         "pass one number as the adapter's weight")
    before = a.effective()
    from aotpack.builder.weights import lora_scale

    a.weight = 1.0 if value is None else lora_scale(value)
    a.enabled = True
    a.sync(before)


def fuse_lora(self: Any, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names: Any = None) -> None:
    from aotpack.builder.weights import lora_scale as check_scale

    a: Adapters = self._aotpack_adapters
    if adapter_names is not None:
        a.names(adapter_names)
    if a.lora is None:
        return  # diffusers fuses nothing when nothing is loaded
    before = a.effective()
    a.fused = check_scale(lora_scale)
    a.sync(before)


def unfuse_lora(self: Any) -> None:
    a: Adapters = self._aotpack_adapters
    before = a.effective()
    a.fused = None
    a.sync(before)


def unload_lora(self: Any) -> None:
    a: Adapters = self._aotpack_adapters
    before = a.effective()
    if a.lora is not None and a.fused is not None:
        a.baked = before  # diffusers keeps fused weights when the adapters go
    a.name = a.lora = None
    a.fused = None
    a.sync(before)


def delete_adapters(self: Any, adapter_names: Any) -> None:
    self._aotpack_adapters.names(adapter_names)
    unload_lora(self)


def disable_lora(self: Any) -> None:
    a: Adapters = self._aotpack_adapters
    if a.fused is not None:
        raise InputError("the LoRA is fused (fuse_lora): it cannot be switched off", "unfuse_lora() first")
    before = a.effective()
    a.enabled = False
    a.sync(before)


def enable_lora(self: Any) -> None:
    a: Adapters = self._aotpack_adapters
    before = a.effective()
    a.enabled = True
    a.sync(before)


def install(model: Any) -> None:
    """Give a loaded artifact (``AotModule`` or a regional model) diffusers' model-level LoRA methods."""
    model._aotpack_adapters = Adapters(model)
    for name in METHODS:
        setattr(model, name, types.MethodType(globals()[name], model))
