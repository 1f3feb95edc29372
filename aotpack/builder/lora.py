"""A LoRA as per-weight deltas: read from a file (or a pipeline's ``lora_state_dict``), every value checked.

The file is untrusted input: each matrix, alpha and metadata value is checked here, each refusal one line
naming the key. ``weights.materialize`` adds the deltas to the weights as it reads them.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotpack.errors import InputError, first_line, one_line

# A LoRA scale is a strength: 0-2 in practice, negative to invert a LoRA. Past 100 a delta trained at ~1e-2 is
# larger than the weight itself, and 1e30 overflows every dtype: no output could be meaningful.
MAX_LORA_SCALE = 100.0
_LORA_HINT = "a LoRA holds lora_A [rank, in_features] and lora_B [out_features, rank] per linear: save it again"


def lora_scale(value: Any) -> float:
    """``value`` as a LoRA scale: a finite number with |scale| <= MAX_LORA_SCALE, or InputError."""
    import math

    try:
        scale = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and abs(scale) <= MAX_LORA_SCALE):
        raise InputError(f"LoRA scale {one_line(repr(value), 40)} is not a finite number in "
                         f"[-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]",
                         "use a strength like 0.8 or 1.0 (negative inverts the LoRA)")
    return scale


@dataclass
class Lora:
    """A LoRA as per-weight deltas: ``deltas[name]`` is ``(A, B, scaling)`` with W += scale * scaling * B @ A."""

    path: str
    sha256: str
    scale: float
    deltas: dict[str, tuple[Any, Any, float]] = field(default_factory=dict)

    def modules(self) -> set[str]:
        return {k.rsplit(".", 1)[0] for k in self.deltas}

    def apply(self, name: str, weight: Any) -> Any:
        if name not in self.deltas:
            return weight
        import torch

        a, b, scaling = self.deltas[name]
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * (scaling * self.scale)
        if delta.shape != weight.shape:
            raise InputError(f"LoRA for {name} has shape {list(delta.shape)}, the weight is {list(weight.shape)}",
                             "this LoRA was trained for another model")
        out = (weight.to(torch.float32) + delta).to(weight.dtype)
        if not torch.isfinite(out).all():  # finite inputs can still overflow (huge values or alpha, fp16)
            raise InputError(f"LoRA {Path(self.path).name} at scale {self.scale:g} makes {name} overflow "
                             f"{str(weight.dtype).removeprefix('torch.')}", "use a smaller --lora-scale, or "
                             "check the LoRA's values and alphas")
        return out

    def describe(self) -> dict:
        return {"file": Path(self.path).name, "sha256": self.sha256, "scale": self.scale,
                "modules": len(self.modules())}


def lora_file(path: str | os.PathLike) -> Path:
    """``path`` as a LoRA file aotpack reads: an existing ``.safetensors`` file, or one InputError line."""
    file = Path(path)
    if file.is_dir():
        inside = sorted(p.name for p in file.glob("*.safetensors"))[:3]
        raise InputError(f"LoRA {path} is a folder, not a file",
                         f"pass the .safetensors file inside it ({', '.join(inside)})" if inside
                         else "pass the path of a .safetensors LoRA file")
    if not file.is_file():
        raise InputError(f"LoRA file {path} does not exist", "pass the path of a .safetensors LoRA")
    if file.suffix != ".safetensors":
        raise InputError(f"LoRA file {file.name} is not .safetensors",
                         "aotpack never loads pickled weights; convert the LoRA to safetensors")
    return file


def read_lora(path: str, pipeline_cls: Any, component: str, *, scale: float = 1.0) -> Lora:
    """Read a LoRA file (diffusers/PEFT, kohya, xlabs, ... as the pipeline's ``lora_state_dict`` converts them).

    Scaling follows PEFT as diffusers loads it: alpha / rank, alpha from the file's ``.alpha`` entries or its
    metadata, else the first module's rank (diffusers' default). The file is untrusted input: every matrix,
    alpha and metadata value is checked here, each refusal one line naming the key.
    """
    from aotpack.artifact.files import sha256_file

    scale = lora_scale(scale)
    file = lora_file(path)
    state_dict, alphas, metadata = _lora_state_dict(file, pipeline_cls)
    return lora_from_state_dict(state_dict, alphas, metadata, component, path=str(file), sha256=sha256_file(file),
                                scale=scale)


def lora_from_state_dict(state_dict: dict, alphas: dict | None, metadata: Any, component: str, *, path: str,
                         sha256: str, scale: float = 1.0) -> Lora:
    """A LoRA from what a pipeline's ``lora_state_dict`` returns (keys prefixed with the component's name), as
    ``read_lora`` reads a file and as diffusers' ``load_lora_weights`` hands it to the model. ``path`` names it
    in messages and records; every matrix, alpha and metadata value is checked, each refusal one line."""
    scale = lora_scale(scale)
    name = Path(path).name
    meta = _lora_metadata(metadata, component, name)
    prefix = f"{component}."
    others = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(prefix)})
    if others:
        raise InputError(f"LoRA {name} also changes {', '.join(others)}; aotpack fuses {component} LoRAs only",
                         f"keep only the {component} keys in the file")
    alphas = {**{k: v for k, v in state_dict.items() if k.endswith(".alpha")}, **(alphas or {})}
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                pairs.setdefault(key[len(prefix):-len(marker)], {})[part] = value
    if not pairs:
        raise InputError(f"LoRA {name} holds no lora_A/lora_B weights", "check the file")
    first_rank = None
    lora = Lora(path=path, sha256=sha256, scale=scale)
    for module, ab in pairs.items():
        rank = _lora_pair(name, module, ab)
        first_rank = first_rank or rank
        key = next((k for k in (f"{prefix}{module}.alpha", f"{module}.alpha") if k in alphas), None)
        if key is not None:
            alpha = _lora_number(alphas[key], f"LoRA {name}: {key}")
        else:
            alpha = meta["alpha_pattern"].get(module, meta.get("lora_alpha", first_rank))
        lora.deltas[f"{module}.weight"] = (ab["lora_A"], ab["lora_B"], alpha / rank)
    return lora


def _lora_state_dict(file: Path, pipeline_cls: Any) -> tuple[dict, dict, Any]:
    """(state dict, alphas, metadata) as the pipeline's ``lora_state_dict`` returns them: in that order, alphas
    only where it takes ``return_alphas``."""
    loader = getattr(pipeline_cls, "lora_state_dict", None)
    if loader is None:
        raise InputError(f"{pipeline_cls.__name__} has no LoRA support in diffusers", "build without a LoRA")
    with_alphas = "return_alphas" in inspect.signature(loader).parameters
    try:
        out = loader(str(file), use_safetensors=True, return_lora_metadata=True,
                     **({"return_alphas": True} if with_alphas else {}))
    except Exception as e:
        raise InputError(f"could not read LoRA {file.name}: {first_line(e)}",
                         "pass a LoRA in a format diffusers reads for this pipeline") from None
    out = list(out) if isinstance(out, tuple) else [out]
    state_dict = out[0] if isinstance(out[0], dict) else {}
    alphas = out[1] if with_alphas and len(out) > 1 else None
    metadata = out[2 if with_alphas else 1] if len(out) > (2 if with_alphas else 1) else None
    return state_dict, alphas if isinstance(alphas, dict) else {}, metadata


def _lora_metadata(metadata: Any, component: str, name: str) -> dict:
    """The component's PEFT metadata: ``lora_alpha`` a number, ``alpha_pattern`` {module: number} (always set).
    diffusers writes it flat with the component as prefix (``transformer.lora_alpha``); PEFT writes it plain."""
    hint = "fix or remove the file's lora_adapter_metadata (save the LoRA again)"
    if isinstance(metadata, dict) and any(str(k).startswith(f"{component}.") for k in metadata):
        metadata = {k.removeprefix(f"{component}."): v for k, v in metadata.items()
                    if str(k).startswith(f"{component}.")}
    meta = metadata.get(component, metadata) if isinstance(metadata, dict) else {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except (ValueError, RecursionError):
            raise InputError(f"LoRA {name} has unreadable metadata", "save the LoRA again") from None
    if not isinstance(meta, dict):
        meta = {}
    meta = dict(meta)
    if meta.get("lora_alpha") is None:
        meta.pop("lora_alpha", None)  # null: the default, as PEFT reads it
    else:
        meta["lora_alpha"] = _lora_number(meta["lora_alpha"], f"LoRA {name}: metadata lora_alpha", hint)
    pattern = meta.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise InputError(f"LoRA {name}: metadata alpha_pattern is a {type(pattern).__name__}, not a table of "
                         "module: alpha", hint)
    meta["alpha_pattern"] = {
        str(k): _lora_number(v, f"LoRA {name}: metadata alpha_pattern[{one_line(repr(k), 60)}]", hint)
        for k, v in pattern.items()}
    return meta


def _lora_number(value: Any, what: str, hint: str = _LORA_HINT) -> float:
    """An alpha: a finite number, or a tensor holding one."""
    import math

    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise InputError(f"{what} is a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                             f"{list(value.shape)}, not one number", hint)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} is {one_line(repr(value), 40)}, not a finite number", hint)
    return float(value)


def _lora_pair(name: str, module: str, ab: dict[str, Any]) -> int:
    """Check one module's lora_A [rank, in] and lora_B [out, rank]: matrices of floats, one rank > 0, finite."""
    import torch

    if set(ab) != {"lora_A", "lora_B"}:
        raise InputError(f"LoRA {name}: {module} lacks lora_A or lora_B", "check the file")
    for part, t in ab.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}" if isinstance(t, torch.Tensor) else "?"
            raise InputError(f"LoRA {name}: {module}.{part} is {got}, not a 2-D float matrix", _LORA_HINT)
    rank, rank_b = ab["lora_A"].shape[0], ab["lora_B"].shape[1]
    if rank != rank_b:
        raise InputError(f"LoRA {name}: {module} has lora_A of rank {rank} and lora_B of rank {rank_b}", _LORA_HINT)
    if rank == 0:
        raise InputError(f"LoRA {name}: {module} has rank 0 (empty lora_A and lora_B)", _LORA_HINT)
    for part, t in ab.items():
        if not torch.isfinite(t.to(torch.float32)).all():
            raise InputError(f"LoRA {name}: {module}.{part} holds NaN or infinite values",
                             "the LoRA is damaged (a diverged training run?): use another checkpoint of it")
    return rank

