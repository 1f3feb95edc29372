"""AOTInductor: compile an ExportedProgram into a .pt2 that holds code only (weights stay outside)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BuildError, first_line

CONSTANTS_KEY = "aotpack.constants"


def compile_package(ep: Any, path: Path, *, metadata: dict[str, str], max_autotune: bool = False) -> Path:
    """Compile ``ep`` to ``path``; the weights are not packaged (they go to weights.safetensors)."""
    import torch

    configs: dict[str, Any] = {
        # Weights outside the .so: loaded once from safetensors and never held twice.
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.metadata": metadata,
    }
    if max_autotune:
        configs["max_autotune"] = True
    try:
        out = torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs)
    except Exception as e:
        first = first_line(e)
        raise BuildError(f"AOTInductor compile failed: {type(e).__name__}: {first[:300]}",
                         "set AOTPACK_DEBUG=1 for the full trace") from e
    return Path(out)


def constants_signature(tensors: dict[str, Any]) -> str:
    """JSON {name: [dtype, shape]} of the compiled constants; stored in the .pt2 and checked at load."""
    return json.dumps({k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sorted(tensors.items())},
                      separators=(",", ":"))


def constant_values(ep: Any, fqns: list[str]) -> dict[str, Any]:
    """The tensor for each constant the compiled code expects, from the ExportedProgram."""
    sources = {**ep.state_dict, **ep.constants}
    missing = [n for n in fqns if n not in sources]
    if missing:
        raise BuildError(f"compiled code expects constants the export does not hold: {', '.join(missing[:5])}",
                         "this model is not supported yet; set AOTPACK_DEBUG=1 and report it")
    out, seen = {}, set()
    for name in fqns:
        t = sources[name].detach()
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in seen:
            t = t.contiguous().clone()  # safetensors refuses shared or strided storage
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out
