"""``build``: recipe -> load -> capture -> quantize -> export -> compile -> artifact folder."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from pathlib import Path

from aotpack._version import __version__
from aotpack.artifact import files as artifact
from aotpack.artifact import manifest as mf
from aotpack.errors import BuildError, RecipeError
from aotpack.artifact.platform import describe, default_device, tag
from aotpack.builder.recipe import DTYPES, get_recipe
from aotpack.builder.schemes import check_scheme, config_to_json, quantize_named, torchao_config
from aotpack.stages import peak_rss_bytes, stage

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
    plan: str | None = None,
    error_budget: float | None = None,
    reuse: str | os.PathLike | None = None,
    max_autotune: bool = False,
) -> Path:
    """Build an artifact folder and return its path. Every check that needs no model runs first.

    ``lora``: a LoRA .safetensors fused (at ``lora_scale``) into the weights before quantizing.
    ``fuse_qkv``: fuse each attention's q/k/v projections into one linear before quantizing.
    ``quantize_text_encoder`` / ``quantize_vae``: schemes applied to those components when the artifact is
    loaded into its pipeline (they stay eager) - or, for the VAE with ``compile_vae``, compiled in.
    ``compile_vae``: the VAE decoder becomes a second compiled module in the artifact.
    ``quant="auto"``: a per-layer plan (fastest scheme within ``error_budget``), stored as plan.json;
    ``plan``: rebuild from a saved plan.json without timing again (implies ``quant="auto"``).
    ``reuse``: an artifact whose compiled code may be taken instead of compiling, if its compile key (graph,
    shapes, settings, platform) equals this build's - e.g. the same model with other weights or a LoRA.
    """
    r = get_recipe(recipe, variant)
    if plan is not None:
        if quant not in (None, "auto"):
            raise RecipeError(f"--plan and --quant {quant} contradict each other", "leave --quant out with --plan")
        quant = "auto"
    quant = quant or r.default_quant
    device = device or default_device()
    here = describe(device)
    cap = tuple(int(x) for x in here["cuda_capability"].split(".")) if here["cuda_capability"] else None
    plan_data = None
    if quant == "auto":
        from aotpack.builder.plan import read_plan

        scheme = None
        plan_data = read_plan(plan, device, cap) if plan is not None else None
        if error_budget is not None and not 0 <= error_budget < 1:
            raise RecipeError(f"--error-budget {error_budget} must be in [0, 1)", "e.g. --error-budget 0.05")
    else:
        scheme = check_scheme(quant, device, cap)
    dtype = dtype or r.dtype
    if dtype not in DTYPES:
        raise RecipeError(f"unknown dtype '{dtype}'", f"choose one of: {', '.join(DTYPES)}")
    from aotpack.builder.source import resolve_source

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
    if max_autotune:  # recorded only when set: older manifests compare equal
        options["max_autotune"] = True
    reuse_map = _reusable(reuse) if reuse is not None else None
    source = resolve_source(r, model, device)
    final = Path(out) if out else default_out(r.full_name, quant, tag(here), artifacts_dir)
    artifact.check_output(final.absolute(), overwrite=overwrite)

    try:
        return _build(r, quant, scheme, dtype, source, here, final, overwrite, options, lora, lora_scale,
                      plan_data, error_budget, reuse_map)
    except OSError as e:  # disk full, permissions, ...: the partial folder is already gone
        where = f" ({e.filename})" if e.filename else ""
        raise BuildError(f"could not write the artifact: {e.strerror or e}{where}",
                         "free disk space or choose another --out, then build again") from None


def _build(r, quant, scheme, dtype, source, here, final, overwrite, options, lora_path, lora_scale, plan_data,
           error_budget, reuse) -> Path:
    import torch

    from aotpack.builder.source import load_pipeline, torch_dtype
    from aotpack.builder.weights import CheckpointReader, component_folder, materialize, read_lora, skeleton

    timings: dict[str, float] = {}
    config_obj = torchao_config(scheme) if scheme is not None else None
    planner = None
    if quant != "auto" or plan_data is not None:
        from aotpack.builder.plan import linear_quantizer

        quantize_unit = linear_quantizer(quant, plan_data)
    else:
        from aotpack.builder.plan import DEFAULT_BUDGET, Planner

        cap = tuple(int(x) for x in here["cuda_capability"].split(".")) if here["cuda_capability"] else None
        planner = Planner(here["device"], _tokens(r), torch_dtype(dtype), budget=error_budget or DEFAULT_BUDGET,
                          cap=cap)

        def quantize_unit(name, linear):
            quantize_named(linear, planner.choose(name, linear))
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
                        quantize_unit=quantize_unit, lora=lora)
            if quant == "auto":
                from aotpack.builder.plan import PLAN_FILE, check_plan_covers

                linears = {n for n, m in component.named_modules() if isinstance(m, torch.nn.Linear)}
                plan_data = plan_data if plan_data is not None else planner.plan()
                check_plan_covers(plan_data, linears)
                (tmp / PLAN_FILE).write_text(json.dumps(plan_data, indent=1, sort_keys=True) + "\n")
            setattr(pipe, r.component, component)
        with stage("capture", timings):
            from aotpack.builder.capture import capture_inputs

            example, _ = capture_inputs(pipe, r)
        config = json.loads(json.dumps(dict(component.config), default=list))
        vae = pipe.vae if options["compile_vae"] else None
        del pipe  # only the component (and the VAE with --compile-vae) is needed from here on
        from aotpack.builder.export import dynamic_ranges, export_component, tensor_specs, wrap

        wrapper = wrap(component)
        with stage("reference", timings):
            quantized_ref = wrapper(example)
            if quantize_unit is not None:  # torchao subclasses -> plain tensors for export
                from torchao.utils import unwrap_tensor_subclass

                unwrap_tensor_subclass(wrapper)
        with stage("export", timings):
            ep = export_component(wrapper, example, r)
        from aotpack.builder.compile import compile_cached, constant_values, constants_signature, open_package

        metadata = {
            "aotpack.version": __version__,
            "aotpack.recipe": r.full_name,
            "aotpack.scheme": quant,
            "aotpack.constants": constants_signature({**ep.state_dict, **ep.constants}),
        }
        with stage("compile", timings):
            key, compiled_how = compile_cached(ep, tmp / artifact.MODEL, metadata=metadata, reuse=reuse,
                                               max_autotune=options.get("max_autotune", False))
        log.info("model.pt2: %s", compiled_how)
        with stage("save weights", timings):
            from safetensors.torch import save_file

            compiled = open_package(tmp / artifact.MODEL)
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
            modules["vae_decoder"] = _compile_vae(vae, r, options["quantize_vae"], here, tmp, timings,
                                                  options.get("max_autotune", False))
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
                "compile_key": key,
                "compiled": compiled_how,
            },
            "options": options,
            "lora": lora.describe() if lora is not None else None,
            "modules": modules,
            "plan": _plan_summary(plan_data) if plan_data is not None else None,
        }
        (tmp / mf.MANIFEST).write_text(mf.dumps(data))
    for name, entry in data["files"].items():  # hashed just now by this build: the first load need not
        artifact.remember_verified(final / name, entry["sha256"])
    log.info("artifact written to %s", final)
    return final


VAE_MODEL, VAE_WEIGHTS = "vae_decoder.pt2", "vae_decoder.safetensors"


def _reusable(folder: str | os.PathLike) -> dict[str, Path]:
    """{compile key: model.pt2} of a verified artifact (every file's sha256 checked: it is native code)."""
    folder = Path(folder)
    data = mf.read(folder)
    artifact.verify_files(folder, data["files"])
    key = data["build"].get("compile_key")
    if not key:
        raise RecipeError(f"{folder} records no compile key (built by an older aotpack)",
                          "build without --reuse")
    return {key: folder / artifact.MODEL}


def _plan_summary(plan_data: dict) -> dict:
    from aotpack.builder.plan import summary

    return summary(plan_data)


def _tokens(r) -> int:
    """Rows of the activations a linear sees in the recipe's capture call (image or video tokens + text)."""
    cap, m = r.capture, r.multiple
    tokens = (cap["height"] // m) * (cap["width"] // m)
    if r.is_video:
        tokens *= r.latent_frames(cap["frames"])
    return tokens + r.max_sequence_length


def _compile_vae(vae, r, quant, here, tmp: Path, timings: dict, max_autotune: bool = False) -> dict:
    """Export and compile the VAE's decoder (optionally quantized) next to the component; its manifest entry."""
    import torch
    from safetensors.torch import save_file

    from aotpack.builder.compile import compile_cached, constant_values, constants_signature, open_package
    from aotpack.builder.export import decoder_inputs, export_dynamic, tensor_specs, wrap_decoder

    dtype = next(vae.parameters()).dtype
    with stage("vae decoder", timings):
        wrapper = wrap_decoder(vae)
        example, ranges, table = decoder_inputs(vae, r, dtype, here["device"])
        if quant and quantize_named(vae, check_scheme(quant, here["device"]).name):
            from torchao.utils import unwrap_tensor_subclass

            reference = wrapper(example)
            unwrap_tensor_subclass(wrapper)
        else:
            reference = wrapper(example)
        ep = export_dynamic(wrapper, example, ranges, table)
        compile_cached(ep, tmp / VAE_MODEL, metadata={
            "aotpack.version": __version__, "aotpack.module": "vae_decoder",
            "aotpack.constants": constants_signature({**ep.state_dict, **ep.constants})}, max_autotune=max_autotune)
        compiled = open_package(tmp / VAE_MODEL)
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
