"""The artifact inside a diffusers pipeline, as diffusers users reach for it.

``from_pretrained(pipeline_folder_or_repo, artifact)`` returns the ready pipeline: the artifact's compiled
modules in, its load-time options (text-encoder / VAE quantization) applied, the original transformer's
weights never read. ``check_pipeline_dtype`` refuses a pipeline whose other components would feed the compiled
code another dtype (it would fail at step 0, not at load). ``guard`` makes the pipeline's ``to`` and
``save_pretrained`` refuse in one line what compiled code cannot do, before anything is converted or written.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch

from aotpack.errors import InputError


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_pipeline_dtype(pipe: Any, module: Any) -> None:
    """The pipeline's other floating-point components must run in the artifact's dtype: their outputs are
    the compiled code's inputs (text embeddings; latents the VAE decodes)."""
    want = module.dtype
    component = module.manifest.recipe.component
    for name, part in getattr(pipe, "components", {}).items():
        if name == component or not isinstance(part, torch.nn.Module) or part is module.vae_decoder:
            continue
        dtype = next((p.dtype for p in part.parameters() if p.is_floating_point()), None)
        if dtype is not None and dtype != want:
            raise InputError(f"the pipeline's {name} is {_name(dtype)}, the artifact runs {_name(want)}: its "
                             "first step would fail",
                             f"load the pipeline with dtype=torch.{_name(want)} (aotpack.from_pretrained does), "
                             f"or rebuild the artifact with --dtype {_name(dtype)}")


def guard(pipe: Any, module: Any) -> Any:
    """``pipe.to(other dtype or device)`` and ``pipe.save_pretrained`` refuse before touching any component
    (diffusers converts or writes the components one by one: the compiled one would refuse half-way)."""
    from aotpack.serve.module import check_to, refuse_save

    plain_to = pipe.to

    def to(self, *args: Any, **kwargs: Any):
        check_to("this pipeline's transformer (an aotpack artifact)", module.dtype, module.device,
                 tuple(a for a in args if not isinstance(a, bool)), {k: v for k, v in kwargs.items()
                                                                    if k in ("dtype", "device")})
        return plain_to(*args, **kwargs)

    pipe.to = types.MethodType(to, pipe)
    pipe.save_pretrained = types.MethodType(lambda self, *a, **k: refuse_save(module), pipe)
    return pipe


def from_pretrained(pipeline: str | os.PathLike | None, artifact: str | os.PathLike, *,
                    revision: str | None = None, trust: bool = False, token: str | None = None,
                    quant: str | None = None, trusted_keys: Any = None, cuda_graphs: bool = False,
                    lora: str | os.PathLike | None = None, lora_scale: float = 1.0, **pipeline_kwargs: Any) -> Any:
    """The diffusers pipeline at ``pipeline`` (a folder or Hub id; ``None``: the checkpoint the artifact was
    built from) with ``artifact`` (a folder or Hub repo id, with ``revision``) in it, ready to call.

    ``revision``, ``trust``, ``token``, ``quant``, ``trusted_keys``, ``cuda_graphs``: as for ``aotpack.load``.
    Other keywords go to the pipeline class's ``from_pretrained`` (its dtype is the artifact's).
    """
    from aotpack.builder.source import Source, load_pipeline, source_of
    from aotpack.serve.load import assemble, load

    hub = {k: v for k, v in {"revision": revision, "trust": trust, "token": token, "quant": quant}.items() if v}
    module = load(artifact, trusted_keys=trusted_keys, cuda_graphs=cuda_graphs, **hub)
    if lora is not None:
        module.swap_lora(lora, lora_scale)
    manifest = module.manifest
    dtype = pipeline_kwargs.pop("dtype", None) or pipeline_kwargs.pop("torch_dtype", None)
    if dtype is not None and dtype != module.dtype:
        raise InputError(f"dtype={dtype} but the artifact runs {_name(module.dtype)}",
                         "leave dtype out (the artifact's is used), or rebuild with --dtype "
                         f"{_name(dtype) if isinstance(dtype, torch.dtype) else dtype}")
    source = source_of(manifest.model) if pipeline is None else Source(str(pipeline), None, "local", str(pipeline))
    # the compiled decoder replaces the VAE: its weights are never read
    skip = ("vae",) if module.vae_decoder is not None else ()
    pipe = load_pipeline(manifest.recipe, source, dtype=manifest.dtype, with_component=False, skip=skip,
                         **pipeline_kwargs)
    pipe.to(manifest.platform.device)
    check_pipeline_dtype(pipe, module)
    return guard(assemble(pipe, module, remake=True), module)


def load_into(pipe: Any, path: str | os.PathLike, *, lora: str | os.PathLike | None = None, lora_scale: float = 1.0,
              **kwargs: Any) -> Any:
    """Replace the pipeline's component (e.g. ``pipe.transformer``) with the artifact; returns the pipeline.

    ``lora``: a LoRA .safetensors swapped into the compiled module's weights at ``lora_scale`` (no recompile).
    """
    from aotpack.serve.load import assemble, load

    module = load(path, **kwargs)
    if lora is not None:
        module.swap_lora(lora, lora_scale)
    component = module.manifest.recipe.component
    if not hasattr(pipe, component):
        raise InputError(f"{type(pipe).__name__} has no component '{component}'",
                         f"this artifact is for a {module.manifest.recipe.pipeline}")
    check_pipeline_dtype(pipe, module)
    return guard(assemble(pipe, module), module)
