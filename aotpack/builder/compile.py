"""AOTInductor: compile an ExportedProgram into a .pt2 that holds code only (weights stay outside)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aotpack.errors import BuildError, first_line

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


def compile_key(ep: Any, configs: dict[str, Any]) -> str:
    """What the compiled code depends on: the exported graph and its signature, the dynamic ranges, the
    constants' names, dtypes and shapes (not their values: they stay outside the code), the compiler's
    settings, torch and the CPU/GPU it targets. Equal keys, interchangeable .pt2 files."""
    import hashlib

    import torch

    from aotpack.artifact.platform import describe, tag

    parts = [
        ep.graph_module.code,
        str(ep.graph_signature),
        repr(sorted((str(k), str(v)) for k, v in ep.range_constraints.items())),
        constants_signature({**ep.state_dict, **ep.constants}),
        json.dumps(configs, sort_keys=True, default=str),
        torch.__version__,
        tag(describe()),
    ]
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()


def compile_cached(ep: Any, path: Path, *, metadata: dict[str, str], max_autotune: bool = False,
                   reuse: dict[str, Path] | None = None) -> tuple[str, str]:
    """``compile_package`` unless an identical compile exists; returns (key, where it came from).

    Looks in ``reuse`` ({key: .pt2} of verified artifacts, e.g. a pulled build) and then in
    ``AOTPACK_CACHE/compiled/``; a fresh compile is stored there. Rebuilding with other weights of the same
    architecture (a LoRA, a fine-tune) then costs no compile: weights are not part of the code.
    """
    import shutil

    from aotpack.paths import cache_dir

    configs = {"package_constants_in_so": False, "metadata": metadata, "max_autotune": max_autotune}
    key = compile_key(ep, configs)
    cached = cache_dir() / "compiled" / f"{key}.pt2"
    given = (reuse or {}).get(key)
    for source, label in ((given, f"reused from {given.parent if given else ''}"), (cached, "compile cache")):
        if source is not None and source.is_file():
            shutil.copyfile(source, path)
            return key, label
    compile_package(ep, path, metadata=metadata, max_autotune=max_autotune)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, cached)
    except OSError:  # a full or read-only cache only costs the next compile
        pass
    return key, "compiled"


def open_package(path: str | Path) -> Any:
    """Open a .pt2's compiled model (no constants yet: they come from weights.safetensors).

    Like ``torch._inductor.aoti_load_package``, minus its device-information check, which only logs a warning
    and to get there has inductor compile and run CPU-ISA test programs: 1 s on a warm compiler cache and
    6 s on a cold one, the dominant cost of a cold start. aotpack checks the platform from the manifest
    (CPU flags, GPU capability, versions) before it opens the package.
    """
    import torch

    try:
        from torch.export.pt2_archive._package import AOTICompiledModel

        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except (ImportError, AttributeError):  # another torch: the public loader
        return torch._inductor.aoti_load_package(str(path))
    return AOTICompiledModel(loader)


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
