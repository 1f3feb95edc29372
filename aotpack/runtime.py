"""Load an artifact and drop it into a diffusers pipeline.

The compiled module never runs before its constants are loaded (that crashed the process in our
measurements), never loads weights twice, and checks each call's inputs against the exported ranges
because AOTInductor itself does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import artifact, manifest as mf
from .errors import InputError, IntegrityError, ResourceError

log = logging.getLogger("aotpack")


class AotModule(torch.nn.Module):
    """A compiled component that behaves like the diffusers model it replaces.

    Keeps the pieces a pipeline reads: ``config``, ``dtype``, ``device``, ``cache_context`` and the forward
    keywords with ``return_dict``.
    """

    def __init__(self, compiled: Any, weights: dict[str, torch.Tensor], manifest: dict, path: Path) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self._compiled = compiled
        self._weights = weights  # user_managed constants: this dict owns the memory the compiled code reads
        self.manifest = manifest
        self.path = path
        self.config = FrozenDict(manifest["model"]["config"])
        self._dtype = getattr(torch, manifest["dtype"])
        self._device = torch.device(manifest["platform"]["device"])
        self._specs = manifest["inputs"]["tensors"]
        self._ranges = manifest["inputs"]["dynamic"]
        self._names = [s["name"] for s in self._specs]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' cache hooks have no meaning for compiled code; kept so pipelines can enter it."""
        yield

    def to(self, *args, **kwargs):  # the compiled code is tied to its device and dtype
        return self

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        """Raise InputError unless every input matches the exported names, dtypes, devices and ranges."""
        missing = [n for n in self._names if inputs.get(n) is None]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}", "pass every input the artifact was exported with")
        extra = sorted(k for k, v in inputs.items() if k not in self._names and v is not None)
        if extra:
            raise InputError(f"unexpected input(s): {', '.join(extra)}", "this artifact was exported without them")
        bound: dict[str, int] = {}
        for spec in self._specs:
            name, t = spec["name"], inputs[spec["name"]]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(t).__name__}", "pass a torch.Tensor")
            if str(t.dtype).removeprefix("torch.") != spec["dtype"]:
                raise InputError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}, the artifact expects {spec['dtype']}",
                                 f"cast it, or build with --dtype {str(t.dtype).removeprefix('torch.')}")
            if t.device.type != self._device.type:
                raise InputError(f"{name} is on {t.device.type}, the artifact runs on {self._device.type}",
                                 f"move the inputs (and the pipeline) to {self._device.type}")
            want = spec["shape"]
            if t.dim() != len(want):
                raise InputError(f"{name} has {t.dim()} dims {list(t.shape)}, the artifact expects {len(want)} ({want})",
                                 "check the pipeline and the artifact match")
            for axis, (size, w) in enumerate(zip(t.shape, want)):
                if isinstance(w, int):
                    if size != w:
                        raise InputError(f"{name} dim {axis} is {size}, the artifact was exported with {w}",
                                         "use the recipe's settings (e.g. max_sequence_length) or rebuild")
                    continue
                lo, hi = self._ranges[w]
                if not lo <= size <= hi:
                    raise InputError(f"{name} dim {axis} ({w}) is {size}, outside the artifact's range [{lo}, {hi}]",
                                     _range_hint(w, self.manifest))
                if bound.setdefault(w, size) != size:
                    raise InputError(f"{name} dim {axis} ({w}) is {size} but another input has {bound[w]}",
                                     "inputs disagree on one dynamic size")

    def forward(self, hidden_states=None, joint_attention_kwargs=None, return_dict: bool = True, **kwargs):
        if joint_attention_kwargs and any(k != "scale" or v != 1.0 for k, v in joint_attention_kwargs.items()):
            raise InputError(f"joint_attention_kwargs {sorted(joint_attention_kwargs)} cannot change compiled code",
                             "fuse LoRAs into the weights before building")
        kwargs["hidden_states"] = hidden_states
        self.check_inputs(kwargs)  # None-valued extras (controlnet samples, ...) are allowed and dropped
        out = self._compiled({n: kwargs[n] for n in self._names})
        if isinstance(out, (list, tuple)):
            out = out[0]
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def _range_hint(dim: str, manifest: dict) -> str:
    image = manifest["inputs"].get("image") or {}
    if dim == "image_seq" and image:
        return (f"height must be in {image.get('height')} and width in {image.get('width')} "
                f"(multiples of {image.get('multiple')}), or rebuild with a wider recipe")
    if dim == "batch":
        return "use a batch inside the range, or rebuild with a wider recipe"
    return "rebuild with a wider range"


def _check_memory(nbytes: int) -> None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the package
        return
    available = psutil.virtual_memory().available
    floor = int(os.environ.get("AOTPACK_MEMORY_RESERVE", str(256 << 20)))
    if nbytes + floor > available:
        raise ResourceError(
            f"the weights need {nbytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of memory is available",
            "free memory, or use a smaller quantization scheme",
        )


def _check_constants(compiled: Any, path: Path) -> None:
    """Weights must be exactly the compiled constants, by name, dtype and shape, before they are loaded."""
    from safetensors import safe_open

    expected = set(compiled.get_constant_fqns())
    signature = json.loads(compiled.get_metadata().get("aotpack.constants", "{}"))
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing, extra = sorted(expected - names), sorted(names - expected)
        if missing or extra:
            raise IntegrityError(
                f"weights do not match the compiled constants: missing {missing[:3]}, unexpected {extra[:3]}",
                "the weights file belongs to another build; rebuild or download the artifact again",
            )
        for name in sorted(names):
            sl = f.get_slice(name)
            got = [sl.get_dtype(), list(sl.get_shape())]
            want = signature.get(name)
            if want is not None and (_st_dtype(got[0]) != want[0] or got[1] != want[1]):
                raise IntegrityError(
                    f"weight {name} is {_st_dtype(got[0])} {got[1]}, the compiled code expects {want[0]} {want[1]}",
                    "the weights file belongs to another build; rebuild or download the artifact again",
                )


_ST = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I8": "int8", "U8": "uint8", "I32": "int32",
       "I64": "int64", "I16": "int16", "F64": "float64", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
       "F8_E5M2": "float8_e5m2"}


def _st_dtype(code: str) -> str:
    return _ST.get(code, code)


def load(path: str | os.PathLike, *, revision: str | None = None, trust: bool = False, token: str | None = None,
         quant: str | None = None, verify: bool = True) -> AotModule:
    """Load an artifact folder, or the build of a Hub repo ("owner/name") that fits this machine.

    A repo id needs a pinned ``revision`` (tag or commit) or ``trust=True``: the .pt2 is native code.

    Order matters: manifest → platform check → sha256 of every file → memory estimate → load code →
    check weights against the compiled constants → load constants (zero-copy) → ready.
    """
    from .platform import describe

    t0 = time.perf_counter()
    folder = Path(path)
    if not folder.exists() and _looks_like_repo_id(str(path)):
        from .hub import resolve_for_load

        folder = resolve_for_load(str(path), revision=revision, trust=trust, token=token, quant=quant)
    data = mf.read(folder)
    here = describe(data["platform"]["device"] if data["platform"]["device"] == "cpu" else None)
    mf.check_compatible(data, here)
    if verify:
        artifact.verify_files(folder, data["files"])
    _check_memory(data["files"][artifact.WEIGHTS]["size"])
    from safetensors.torch import load_file

    compiled = torch._inductor.aoti_load_package(str(folder / artifact.MODEL))
    _check_constants(compiled, folder / artifact.WEIGHTS)
    weights = load_file(str(folder / artifact.WEIGHTS), device=data["platform"]["device"])
    # user_managed: the compiled code reads these tensors in place, no second copy.
    compiled.load_constants(weights, check_full_update=True, user_managed=True)
    log.info("loaded %s in %.2f s", folder, time.perf_counter() - t0)
    return AotModule(compiled, weights, data, folder)


def _looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.isabs(text)


def load_into(pipe: Any, path: str | os.PathLike, **kwargs) -> Any:
    """Replace the pipeline's component (e.g. ``pipe.transformer``) with the artifact; returns the pipeline."""
    module = load(path, **kwargs)
    component = module.manifest["recipe"]["component"]
    if not hasattr(pipe, component):
        raise InputError(f"{type(pipe).__name__} has no component '{component}'",
                         f"this artifact is for a {module.manifest['recipe']['pipeline']}")
    setattr(pipe, component, module)
    return pipe
