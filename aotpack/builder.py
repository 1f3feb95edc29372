"""``build``: recipe -> load -> capture -> quantize -> export -> compile -> artifact folder."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path

from . import __version__
from . import artifact, manifest as mf
from .errors import BuildError, RecipeError
from .platform import describe, default_device, tag
from .recipe import DTYPES, get_recipe
from .schemes import check_scheme, config_to_json, quantize, torchao_config
from .stages import peak_rss_bytes, stage

log = logging.getLogger("aotpack")


def default_out(recipe_name: str, quant: str, platform_tag: str, artifacts_dir: str | os.PathLike = "artifacts") -> Path:
    return Path(artifacts_dir) / f"{recipe_name}-{quant}-{platform_tag}"


def build(
    recipe: str,
    quant: str | None = None,
    *,
    out: str | os.PathLike | None = None,
    model: str | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    overwrite: bool = False,
    artifacts_dir: str | os.PathLike = "artifacts",
    device: str | None = None,
) -> Path:
    """Build an artifact folder and return its path. Every check that needs no model runs first."""
    r = get_recipe(recipe, variant)
    quant = quant or r.default_quant
    device = device or default_device()
    here = describe(device)
    cap = tuple(int(x) for x in here["cuda_capability"].split(".")) if here["cuda_capability"] else None
    scheme = check_scheme(quant, device, cap)
    dtype = dtype or r.dtype
    if dtype not in DTYPES:
        raise RecipeError(f"unknown dtype '{dtype}'", f"choose one of: {', '.join(DTYPES)}")
    from .models import resolve_source

    source = resolve_source(r, model, device)
    final = Path(out) if out else default_out(r.full_name, quant, tag(here), artifacts_dir)
    artifact.check_output(final.absolute(), overwrite=overwrite)

    try:
        return _build(r, quant, scheme, dtype, source, here, final, overwrite)
    except OSError as e:  # disk full, permissions, ...: the partial folder is already gone
        where = f" ({e.filename})" if e.filename else ""
        raise BuildError(f"could not write the artifact: {e.strerror or e}{where}",
                         "free disk space or choose another --out, then build again") from None


def _build(r, quant, scheme, dtype, source, here, final, overwrite) -> Path:
    import torch

    from .models import load_pipeline

    timings: dict[str, float] = {}
    with artifact.atomic_folder(final, overwrite=overwrite) as tmp, torch.no_grad():
        with stage("load", timings):
            pipe = load_pipeline(r, source, dtype=dtype)
            pipe.to(here["device"])
        with stage("capture", timings):
            from .capture import capture_inputs

            example, _ = capture_inputs(pipe, r)
        component = getattr(pipe, r.component)
        config = json.loads(json.dumps(dict(component.config), default=list))
        del pipe  # only the component is needed from here on
        from .export import dynamic_ranges, export_component, tensor_specs, wrap

        wrapper = wrap(component)
        reference = wrapper(example)
        config_obj = torchao_config(scheme)
        with stage("quantize", timings):
            if config_obj is not None:
                quantize(component, scheme, config_obj)
            quantized_ref = wrapper(example)
            if config_obj is not None:
                from torchao.utils import unwrap_tensor_subclass

                unwrap_tensor_subclass(wrapper)
        with stage("export", timings):
            ep = export_component(wrapper, example, r)
        from .compile import compile_package, constant_values, constants_signature

        metadata = {
            "aotpack.version": __version__,
            "aotpack.recipe": r.full_name,
            "aotpack.scheme": quant,
            "aotpack.constants": constants_signature({**ep.state_dict, **ep.constants}),
        }
        with stage("compile", timings):
            compile_package(ep, tmp / artifact.MODEL, metadata=metadata)
        with stage("save weights", timings):
            from safetensors.torch import save_file

            compiled = torch._inductor.aoti_load_package(str(tmp / artifact.MODEL))
            constants = constant_values(ep, compiled.get_constant_fqns())
            save_file(constants, str(tmp / artifact.WEIGHTS))
        with stage("verify", timings):
            compiled.load_constants(constants, check_full_update=True, user_managed=True)
            got = compiled(example)
            got = got[0] if isinstance(got, (list, tuple)) else got
            max_abs_error = float((got - quantized_ref).abs().max())
            quant_error = float((quantized_ref - reference).abs().max())
        log.info("compiled vs eager max |diff| %.2e; quantized vs unquantized max |diff| %.2e",
                 max_abs_error, quant_error)
        data = {
            "schema_version": mf.SCHEMA_VERSION,
            "aotpack_version": __version__,
            "recipe": {"name": r.name, "variant": r.variant, "family": r.family, "pipeline": r.pipeline,
                       "component": r.component},
            "model": {"checkpoint": source.checkpoint, "revision": source.revision, "source": source.kind,
                      "config": config},
            "scheme": {"name": quant, "torchao_config": config_to_json(config_obj)},
            "dtype": dtype,
            "inputs": {
                "tensors": tensor_specs(example, r),
                "dynamic": dynamic_ranges(r),
                "image": {"height": list(r.height), "width": list(r.width), "multiple": r.multiple},
                "max_sequence_length": r.max_sequence_length,
            },
            "platform": dict(here),
            "files": artifact.file_entries(tmp),
            "build": {
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "stages": timings,
                "peak_rss_bytes": peak_rss_bytes(),
                "max_abs_error": max_abs_error,
                "quant_abs_error": quant_error,
            },
        }
        (tmp / mf.MANIFEST).write_text(mf.dumps(data))
    log.info("artifact written to %s", final)
    return final
