"""New constants for a LoRA swapped into a loaded artifact: the weights a build with ``--lora`` would make.

The linears the LoRA touches are read again in high precision from the checkpoint the artifact was built
from — at the commit the build read (Hub), or after checking the sha256 the manifest recorded of each file
(local and builtin folders) — the LoRA is fused, each linear is quantized with the artifact's scheme (or its
layer's scheme from the plan), and only those constants are replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aotpack._torch_compat import unwrap_tensor_subclass
from aotpack.artifact.files import VerifiedFiles
from aotpack.artifact.manifest import Manifest
from aotpack.builder.export import COMPONENT_ROOT
from aotpack.builder.plan import linear_quantizer
from aotpack.builder.regional import only_in_blocks
from aotpack.builder.source import component_folder, source_of, torch_dtype
from aotpack.builder.weights import CheckpointReader, Lora, materialize, read_lora, skeleton, touched_modules
from aotpack.errors import InputError, IntegrityError, ManifestError
from aotpack.serve.glue import Int8Linear


def _read_touched(manifest: Manifest, model: Any, only: set[str], lora: Any, quantize_unit: Any, device: str) -> None:
    source = source_of(manifest.model)
    folder = component_folder(source, manifest.recipe.component)
    if source.kind == "hub" or not manifest.model.files:  # pinned by commit (or an artifact from aotpack 0.1)
        with CheckpointReader(folder) as reader:
            materialize(model, reader, dtype=torch_dtype(manifest.dtype), device=device,
                        quantize_unit=quantize_unit, lora=lora, only=only)
        return
    try:
        files = VerifiedFiles(folder, manifest.model.files)
    except (OSError, ManifestError):
        raise IntegrityError(f"the checkpoint this artifact was built from is gone ({folder})",
                             "a LoRA swap re-reads its high-precision weights: restore it, or rebuild with --lora")
    with files:
        try:
            paths = [files.data(name) for name in sorted(manifest.model.files)]
        except IntegrityError as e:
            raise IntegrityError(f"the checkpoint this artifact was built from changed: {e.cause}",
                                 "a LoRA swap needs the exact weights the artifact was built from; rebuild "
                                 "with --lora instead") from None
        with CheckpointReader(folder, paths) as reader:
            materialize(model, reader, dtype=torch_dtype(manifest.dtype), device=device,
                        quantize_unit=quantize_unit, lora=lora, only=only)


def lora_constants(manifest: Manifest, base: dict[str, torch.Tensor], lora: "str | Lora", scale: float,
                   plan: bytes | None, device: str) -> dict[str, torch.Tensor]:
    """``base`` (weights-file name -> tensor) with every weight of the linears the LoRA touches replaced.
    ``lora``: a file, or a ``Lora`` already read (diffusers' ``load_lora_weights`` hands over its state dict)."""
    import dataclasses

    import diffusers

    if manifest.lora is not None:
        raise InputError(f"this artifact was built with LoRA {manifest.lora.file} fused in",
                         "build without --lora to swap LoRAs at load time")
    component = manifest.recipe.component
    if isinstance(lora, Lora):
        lora = dataclasses.replace(lora, scale=scale)
    else:
        lora = read_lora(lora, getattr(diffusers, manifest.recipe.pipeline), component, scale=scale)
    path = lora.path
    model = skeleton(dict(manifest.model.config), fuse_qkv=manifest.options.fuse_qkv)
    # as the build did: the artifact's scheme, or each layer's scheme from its --quant auto plan; a regional
    # build quantized only its blocks
    quantize_unit = linear_quantizer(manifest.scheme.name, json.loads(plan) if plan is not None else None)
    if quantize_unit is not None and manifest.options.regional:
        quantize_unit = only_in_blocks(quantize_unit, [i[len(component) + 1:] for m in manifest.modules
                                                       if m.kind == "block" for i in m.instances])
    only = touched_modules(model, lora)
    with torch.no_grad():
        _read_touched(manifest, model, only, lora, quantize_unit, device)
    new = dict(base)
    replaced = 0
    for module_name in sorted(only):
        leaf = model.get_submodule(module_name)
        if quantize_unit is not None:
            holder = torch.nn.Module()  # unwrap_tensor_subclass works on a module's children
            holder.add_module("leaf", leaf)
            unwrap_tensor_subclass(holder)
        if module_name in manifest.glue_int8:  # as the build made it (aotpack.serve.glue)
            leaf = Int8Linear.of(leaf)
        # schema 1 named the weights by the compiled constants (component.*), schema 2 by the pipeline's names
        prefix = f"{component if manifest.schema_version >= 2 else COMPONENT_ROOT}.{module_name}."
        fresh = {prefix + k: v for k, v in leaf.state_dict().items()}
        for name in [n for n in new if n.startswith(prefix)]:
            # every constant of the module gets its new value (unused ones were compiled away)
            value, old = fresh.get(name), new[name]
            if value is None or old.dtype != value.dtype or old.shape != value.shape:
                got = "nothing" if value is None else f"{value.dtype} {list(value.shape)}"
                raise InputError(f"the LoRA swap makes {got} for {name}, the artifact holds {old.dtype} "
                                 f"{list(old.shape)}", "rebuild the artifact with this aotpack")
            new[name] = value.detach().contiguous()
            replaced += 1
    if not replaced:
        raise InputError(f"LoRA {Path(path).name} changes none of the artifact's weights",
                         "this LoRA was trained for another model")
    return new
