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
    lora: str | None = None,
    lora_scale: float = 1.0,
    fuse_qkv: bool = False,
    quantize_text_encoder: str | None = None,
    quantize_vae: str | None = None,
    compile_vae: bool = False,
) -> Path:
    """Build an artifact folder and return its path. Every check that needs no model runs first.

    ``lora``: a LoRA .safetensors fused (at ``lora_scale``) into the weights before quantizing.
    ``fuse_qkv``: fuse each attention's q/k/v projections into one linear before quantizing.
    ``quantize_text_encoder`` / ``quantize_vae``: schemes applied to those components when the artifact is
    loaded into its pipeline (they stay eager) - or, for the VAE with ``compile_vae``, compiled in.
    ``compile_vae``: the VAE decoder becomes a second compiled module in the artifact.
    """
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

    for what, side in (("--quantize-text-encoder", quantize_text_encoder), ("--quantize-vae", quantize_vae)):
        if side is not None:
            try:
                check_scheme(side, device, cap)
            except Exception as e:
                raise type(e)(f"{what}: {e.cause}", e.hint) from None
    if lora is not None:
        if not Path(lora).is_file():
            raise RecipeError(f"LoRA file {lora} does not exist", "pass the path of a .safetensors LoRA")
        if not Path(lora).name.endswith(".safetensors"):
            raise RecipeError(f"LoRA file {Path(lora).name} is not .safetensors",
                              "aotpack never loads pickled weights; convert the LoRA to safetensors")
    if compile_vae and r.is_video:
        raise RecipeError(f"--compile-vae is not available for {r.full_name}: the video VAE decodes frames in a "
                          "Python loop that export fixes to one frame count",
                          "leave --compile-vae out (the VAE then runs eager)")
    options = {"fuse_qkv": bool(fuse_qkv), "quantize_text_encoder": quantize_text_encoder,
               "quantize_vae": quantize_vae, "compile_vae": bool(compile_vae)}
    source = resolve_source(r, model, device)
    final = Path(out) if out else default_out(r.full_name, quant, tag(here), artifacts_dir)
    artifact.check_output(final.absolute(), overwrite=overwrite)

    try:
        return _build(r, quant, scheme, dtype, source, here, final, overwrite, options, lora, lora_scale)
    except OSError as e:  # disk full, permissions, ...: the partial folder is already gone
        where = f" ({e.filename})" if e.filename else ""
        raise BuildError(f"could not write the artifact: {e.strerror or e}{where}",
                         "free disk space or choose another --out, then build again") from None


def _build(r, quant, scheme, dtype, source, here, final, overwrite, options, lora_path, lora_scale) -> Path:
    import torch

    from .models import load_pipeline, torch_dtype
    from .weights import CheckpointReader, component_folder, materialize, read_lora, skeleton

    timings: dict[str, float] = {}
    config_obj = torchao_config(scheme)
    with artifact.atomic_folder(final, overwrite=overwrite) as tmp, torch.no_grad():
        with stage("load", timings):  # everything but the component, which is streamed below
            pipe = load_pipeline(r, source, dtype=dtype, with_component=False)
            pipe.to(here["device"])
        lora = None
        with stage("quantize", timings):  # read, fuse and quantize the component block by block
            folder = component_folder(source.location, r.component, kind=source.kind, revision=source.revision)
            if not (folder / "config.json").is_file():
                raise BuildError(f"{folder} has no config.json", f"check that the checkpoint is a {r.pipeline} folder")
            component = skeleton(json.loads((folder / "config.json").read_text()), fuse_qkv=options["fuse_qkv"])
            if lora_path is not None:
                lora = read_lora(lora_path, type(pipe), r.component, scale=lora_scale)
            materialize(component, CheckpointReader(folder), dtype=torch_dtype(dtype), device=here["device"],
                        quantize_unit=(lambda unit: quantize(unit, scheme, config_obj)) if config_obj else None,
                        lora=lora)
            setattr(pipe, r.component, component)
        with stage("capture", timings):
            from .capture import capture_inputs

            example, _ = capture_inputs(pipe, r)
        config = json.loads(json.dumps(dict(component.config), default=list))
        vae = pipe.vae if options["compile_vae"] else None
        del pipe  # only the component (and the VAE with --compile-vae) is needed from here on
        from .export import dynamic_ranges, export_component, tensor_specs, wrap

        wrapper = wrap(component)
        with stage("reference", timings):
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
        log.info("compiled vs eager max |diff| %.2e", max_abs_error)
        modules = {}
        if vae is not None:
            del compiled, constants
            modules["vae_decoder"] = _compile_vae(vae, r, options["quantize_vae"], here, tmp, timings)
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
                "image": {"height": list(r.height), "width": list(r.width), "multiple": r.multiple,
                          **({"frames": list(r.frames), "output": "video"} if r.is_video else {})},
                "relations": r.relations(),
                "max_sequence_length": r.max_sequence_length,
            },
            "platform": dict(here),
            "files": artifact.file_entries(tmp),
            "build": {
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "stages": timings,
                "peak_rss_bytes": peak_rss_bytes(),
                "max_abs_error": max_abs_error,
                # the unquantized component is never whole in memory, so its output is not known here
                "quant_abs_error": None,
            },
            "options": options,
            "lora": lora.describe() if lora is not None else None,
            "modules": modules,
        }
        (tmp / mf.MANIFEST).write_text(mf.dumps(data))
    log.info("artifact written to %s", final)
    return final


VAE_MODEL, VAE_WEIGHTS = "vae_decoder.pt2", "vae_decoder.safetensors"


def _compile_vae(vae, r, quant, here, tmp: Path, timings: dict) -> dict:
    """Export and compile the VAE's decoder (optionally quantized) next to the component; its manifest entry."""
    import torch
    from safetensors.torch import save_file

    from .compile import compile_package, constant_values, constants_signature
    from .export import decoder_inputs, export_dynamic, tensor_specs, wrap_decoder

    dtype = next(vae.parameters()).dtype
    with stage("vae decoder", timings):
        wrapper = wrap_decoder(vae)
        example, ranges, table = decoder_inputs(vae, r, dtype, here["device"])
        if quant and quant != "none":
            scheme = check_scheme(quant, here["device"])
            quantize(vae, scheme, torchao_config(scheme))
            from torchao.utils import unwrap_tensor_subclass

            reference = wrapper(example)
            unwrap_tensor_subclass(wrapper)
        else:
            reference = wrapper(example)
        ep = export_dynamic(wrapper, example, ranges, table)
        compile_package(ep, tmp / VAE_MODEL, metadata={
            "aotpack.version": __version__, "aotpack.module": "vae_decoder",
            "aotpack.constants": constants_signature({**ep.state_dict, **ep.constants})})
        compiled = torch._inductor.aoti_load_package(str(tmp / VAE_MODEL))
        constants = constant_values(ep, compiled.get_constant_fqns())
        save_file(constants, str(tmp / VAE_WEIGHTS))
        compiled.load_constants(constants, check_full_update=True, user_managed=True)
        got = compiled(example)
        got = got[0] if isinstance(got, (list, tuple)) else got
        error = float((got - reference).abs().max())
    log.info("vae decoder: compiled vs eager max |diff| %.2e", error)
    return {
        "component": "vae", "model": VAE_MODEL, "weights": VAE_WEIGHTS, "scheme": quant or "none",
        "config": json.loads(json.dumps(dict(vae.config), default=list)),
        "inputs": {"tensors": tensor_specs(example, None, table), "dynamic": ranges},
        "max_abs_error": error,
    }
