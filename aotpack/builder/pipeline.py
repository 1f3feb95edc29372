"""``build``: recipe -> load -> reference (capture) -> quantize -> eager -> export -> compile -> save -> verify ->
quant error -> artifact folder.

Each stage is a small function that takes and returns typed values; ``run_build`` strings them together
inside ``atomic_folder`` (the destination is the complete artifact or what was there before). Every module an
artifact compiles (the transformer or its blocks, the VAE decoder: ``aotpack.builder.targets``) goes through the
same ``compile_target`` and ``aotpack.builder.verify``: one compile path.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from aotpack import _torch_compat as compat
from aotpack._version import __version__
from aotpack.artifact.aligned import save_aligned
from aotpack.artifact.files import WEIGHTS, atomic_folder, file_entries, remember_folder
from aotpack.artifact.manifest import SCHEMA_VERSION, BuildInfo, CompiledModule, FileEntry, LoraRef, Manifest, ModelRef, PlanRef, QuantError, RecipeRef, SchemeRef, MANIFEST
from aotpack.builder.capture import Call, capture_inputs, record_call, unflatten_inputs
from aotpack.builder.compile import (CONSTANTS_KEY, compile_cached, compile_frozen, compile_key, compiler_settings,
                                     constant_values, constants_signature, crash_report, frozen_constants)
from aotpack.builder.export import export_fitted
from aotpack.builder.plan import PLAN_FILE, Planner, check_plan_covers, linear_quantizer, summary
from aotpack.builder.schemes import config_to_json, get_scheme, quantize_named, torchao_config
from aotpack.builder.source import component_files, component_folder, hub_commit, load_pipeline, torch_dtype
from aotpack.builder.spec import BuildSpec, default_out, resolve
from aotpack.builder import regional
from aotpack.builder.targets import (Compiled, Quantized, Target, block_targets, component_target, glue_weights,
                                     vae_target)
from aotpack.builder.verify import measure_quant_error, verify
from aotpack.builder.weights import CheckpointReader, Lora, Streamed, materialize, read_lora, skeleton
from aotpack.errors import BuildError
from aotpack.serve import glue
from aotpack.stages import interrupts, peak_rss_bytes, stage

log = logging.getLogger("aotpack")
__all__ = ["build", "run_build", "default_out"]


def build(recipe: str, quant: str | None = None, **kwargs: Any) -> Path:
    """Build an artifact folder and return its path. Every check that needs no model runs first.

    Keyword arguments (all optional): ``out`` (the artifact folder; default artifacts/<recipe>-<scheme>-
    <platform>), ``model`` (a local diffusers folder or Hub id instead of the recipe's checkpoint), ``dtype``,
    ``variant``, ``overwrite``, ``artifacts_dir``, ``device``;
    ``lora`` / ``lora_scale``: a LoRA .safetensors fused into the weights before quantizing;
    ``fuse_qkv``: fuse each attention's q/k/v projections into one linear before quantizing;
    ``quantize_text_encoder`` / ``quantize_vae``: schemes applied to those components when the artifact is
    loaded into its pipeline (they stay eager) - or, for the VAE with ``compile_vae``, compiled in;
    ``compile_vae``: the VAE decoder becomes a second compiled module of the artifact;
    ``quant="auto"``: a per-layer plan (fastest scheme within ``error_budget``), stored as plan.json;
    ``plan``: rebuild from a saved plan.json without timing again (implies ``quant="auto"``);
    ``reuse``: an artifact whose compiled code is taken instead of compiling when the compile keys match;
    ``max_autotune``: let inductor benchmark kernel choices; ``freeze``: inductor's freezing on a CPU (None: the
    recipe's default); ``sign_key``: sign the artifact (EC PEM key).
    """
    spec = resolve(recipe, quant, **kwargs)
    try:
        with interrupts():
            return run_build(spec)
    except OSError as e:  # disk full, permissions, ...: the partial folder is already gone
        where = f" ({e.filename})" if e.filename else ""
        raise BuildError(f"could not write the artifact: {e.strerror or e}{where}",
                         "free disk space or choose another --out, then build again") from None


# ---- stages ---------------------------------------------------------------------------------------------------

@dataclass
class Checkpoint:
    """The component's checkpoint folder as read: its config, its LoRA (if any), and what the manifest records."""

    folder: Path
    config: dict
    lora: Lora | None
    commit: str | None
    files: dict[str, FileEntry]


def read_checkpoint(spec: BuildSpec, pipe: Any) -> Checkpoint:
    r = spec.recipe
    folder = component_folder(spec.source, r.component)
    if not (folder / "config.json").is_file():
        raise BuildError(f"{folder} has no config.json", f"check that the checkpoint is a {r.pipeline} folder")
    lora = read_lora(str(spec.lora.path), type(pipe), r.component, scale=spec.lora.scale) if spec.lora else None
    hub = spec.source.kind == "hub"
    return Checkpoint(folder=folder, config=json.loads((folder / "config.json").read_text()), lora=lora,
                      commit=hub_commit(folder) if hub else None, files={} if hub else component_files(folder))


def stream(spec: BuildSpec, ckpt: Checkpoint, quantize_unit: Any = None) -> torch.nn.Module:
    """The component made on meta and filled weight by weight from its checkpoint (LoRA fused), each linear
    handed to ``quantize_unit`` as soon as it is read: one high-precision weight alive at a time."""
    model = skeleton(ckpt.config, fuse_qkv=spec.options.fuse_qkv)
    with CheckpointReader(ckpt.folder) as reader:
        materialize(model, reader, dtype=torch_dtype(spec.dtype), device=spec.device, quantize_unit=quantize_unit,
                    lora=ckpt.lora)
    return model


def quantize_component(spec: BuildSpec, ckpt: Checkpoint, out: Path) -> Quantized:
    """Stream the component from its checkpoint, each linear quantized as soon as it is read (``--quant auto``:
    a scheme chosen per layer, the plan written to ``out``)."""
    r = spec.recipe
    model = skeleton(ckpt.config, fuse_qkv=spec.options.fuse_qkv)
    classes = regional.block_classes(model, r) if spec.options.regional else []
    planner = None
    schemes = regional.Schemes()
    if spec.quant == "auto" and spec.plan is None:
        planner = Planner(spec.device, _tokens(r), torch_dtype(spec.dtype), budget=spec.error_budget,
                          cap=spec.platform.capability)

        def choose(name: str, linear: Any) -> None:
            quantize_named(linear, planner.choose(name, linear))
    else:
        choose = linear_quantizer(spec.quant, spec.plan)
    quantize_unit: Any = None
    if choose is not None:
        def record(name: str, linear: Any) -> None:
            choose(name, linear)
            if type(linear.weight.data) is not torch.Tensor:  # quantized (a scheme may leave a shape alone)
                schemes.record(name, spec.quant if planner is None and spec.plan is None else
                               (planner.layers[name]["scheme"] if planner else spec.plan["layers"][name]["scheme"]))

        quantize_unit = record
        if classes:  # regional: the blocks only; the parts around them stay eager in the model dtype
            quantize_unit = regional.only_in_blocks(record, sorted(regional.instance_paths(model, classes)))
    model = stream(spec, ckpt, quantize_unit)
    plan = None
    if spec.quant == "auto":
        plan = spec.plan if spec.plan is not None else planner.plan()
        check_plan_covers(plan, {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        (out / PLAN_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return Quantized(model=model, config=json.loads(json.dumps(dict(model.config), default=list)), plan=plan,
                     lora=ckpt.lora, commit=ckpt.commit, files=ckpt.files, schemes=schemes, classes=classes)


def int8_glue(spec: BuildSpec, q: Quantized, rows: dict[str, int], small: dict[str, Any] | None) -> None:
    """Regional, on a CPU with bf16 units: the large linears outside the blocks that saw few rows in the capture
    call get int8 weights (``aotpack.serve.glue``), before the eager pass that the compiled blocks are held to —
    kept only if the model, run at the smallest request, still runs and moves by at most ``glue.TOLERANCE`` (a
    model that reads such a linear's weight dtype, or its parent's parameters, would not)."""
    if not (q.classes and glue.applies(spec.platform, spec.quant, spec.dtype) and small is not None):
        return
    names = glue.chosen(q.model, rows, regional.instance_paths(q.model, q.classes))
    if not names:
        return
    run = lambda: q.model(**unflatten_inputs(small), return_dict=False)[0].float()  # noqa: E731
    before = run()
    originals = glue.pack(q.model, names)
    try:
        after = run()
        moved = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
        problem = "" if moved <= glue.TOLERANCE else f"the output moved by {moved:.3g} of its largest magnitude"
    except Exception as e:  # noqa: BLE001 — any failure means: not this model
        problem = f"{type(e).__name__}: {e}"
    if problem:
        log.warning("int8 weights for the linears around the blocks (%s) left out: %s", ", ".join(names), problem)
        glue.unpack(q.model, originals)
        return
    q.glue_int8 = names


def other_request(r: Any) -> Any:
    """The recipe with its capture call moved to another request inside its bounds: another batch, frame count and
    prompt length, and a height and width that both change, by different ratios (so rows, columns and tokens
    move apart). Dims that cannot move (one allowed size) stay."""
    cap = dict(r.capture)
    step = r.size_step
    heights = [h for h in range(r.height[0], r.height[1] + 1, step) if h != cap["height"]]
    widths = [w for w in range(r.width[0], r.width[1] + 1, step) if w != cap["width"]]
    pick = next(((h, w) for h in heights for w in widths if h * cap["width"] != w * cap["height"]), None)
    if pick:
        cap["height"], cap["width"] = pick
    if r.batch[1] > r.batch[0]:
        cap["batch"] = r.batch[0] if cap.get("batch") != r.batch[0] else r.batch[1]
    if r.is_video and r.frames[1] > r.frames[0]:
        frames = [f for f in range(r.frames[0], r.frames[1] + 1, r.temporal_compression) if f != cap["frames"]]
        cap["frames"] = frames[0] if frames else cap["frames"]
    cap["prompt"] = cap.get("prompt", "a photo") + ", seen from far away at night, in the rain"
    return replace(r, capture=cap)


def compile_target(spec: BuildSpec, t: Target, out: Path, timings: dict[str, float], *, index: int = 1,
                   total: int = 1) -> Compiled:
    """export -> compile (or take matching code from --reuse / the compile cache) -> the constants' values."""
    with stage("export", timings, label=f"export {t.name} ({index} of {total})"):
        ep, t.spec = export_fitted(t.wrapper, t.example, t.spec, t.block_class or t.name)
    metadata = {"aotpack.version": __version__, "aotpack.module": t.name,
                CONSTANTS_KEY: constants_signature({**ep.state_dict, **ep.constants})}
    frozen = spec.options.freeze
    configs = compiler_settings(metadata, max_autotune=spec.options.max_autotune, cpu=spec.device == "cpu",
                                freeze=frozen)
    from aotpack.serve.load import constant_names

    with stage("compile", timings, label=f"compile {t.name} ({index} of {total})"):
        if frozen:  # always compiled: its folded constants are recorded as it compiles
            folds, key, how = compile_frozen(ep, out / t.code, configs), compile_key(ep, configs, spec.platform), \
                "compiled"
        else:
            key, how = _compile(spec, t, ep, out, configs)
        # code shared by instances must not hold one instance's weights: when inductor computed constants from
        # weights into the code, compile again with runtime folding (each instance folds its own at its call)
        shared = _shared(t) and not configs.get(compat.RUNTIME_FOLDING) and not frozen
        taken = set(constant_names(out / t.code)) if shared else set()  # opens the package once
        folded = sorted((set(ep.state_dict) | set(ep.constants)) - taken) if shared else []
        if folded:
            log.warning("%s: the compiler folded %d weights into code its %d instances share (%s, ...); compiling "
                        "again with runtime constant folding", t.name, len(folded), len(t.instances), folded[0])
            configs[compat.RUNTIME_FOLDING] = True
            key, how = compile_cached(ep, out / t.code, configs=configs, platform=spec.platform, reuse=spec.reuse)
    log.info("%s: %s", t.code, how)

    module = CompiledModule(name=t.name, kind=t.kind, code=t.code, weights=WEIGHTS, root=t.root,
                            instances=t.instances, inputs=t.spec, scheme=",".join(sorted(t.schemes)),
                            max_abs_error=0.0, tolerance=0.0, compile_key=key, compiled=how, config=t.config)
    fqns = constant_names(out / t.code)
    if frozen:  # the weights its folded constants come from, stored instead of them
        fold, fqns = frozen_constants(ep, fqns, folds)
        module = replace(module, fold=fold or None)
    if t.members is None:
        values = {module.key(t.instances[0], f): v for f, v in constant_values(ep, fqns).items()}
    else:  # every instance's own weights, under the same compiled names
        values = {module.key(inst, f): v for inst, member in zip(t.instances, t.members)
                  for f, v in regional.instance_state(member, fqns).items()}
    return Compiled(t, replace(module, block_class=t.block_class, output=t.output), values)


def _shared(t: Target) -> bool:
    """Block code several instances share: it must hold no instance's weights."""
    return t.kind == "block" and len(t.instances) > 1


def _compile(spec: BuildSpec, t: Target, ep: Any, out: Path, configs: dict[str, Any]) -> tuple[str, str]:
    """Compile ``t`` (or take its code from --reuse / the compile cache). Quantized block code shared by several
    instances is compiled with runtime constant folding from the start: inductor folds constants it derives from
    quantized weights into the code (every block class of flux-depth int8wo did), and finding that out after a
    plain compile cost a second compile (flux-depth at 512x512: 44 s of compile, half of it wasted). Should that
    compile fail, the plain compile and the check after it decide, as for any other code."""
    if _shared(t) and t.schemes - {"none"} and not configs.get(compat.RUNTIME_FOLDING):
        folding = {**configs, compat.RUNTIME_FOLDING: True}
        try:
            done = compile_cached(ep, out / t.code, configs=folding, platform=spec.platform, reuse=spec.reuse)
        except BuildError as e:
            log.warning("%s: compiling with runtime constant folding failed (%s); compiling without", t.name, e.cause)
        else:
            configs.update(folding)  # what the code was compiled with: the folded-weights check is not needed
            return done
    return compile_cached(ep, out / t.code, configs=configs, platform=spec.platform, reuse=spec.reuse)


def make_manifest(spec: BuildSpec, q: Quantized, modules: list[CompiledModule], out: Path,
                  timings: dict[str, float], quant_error: QuantError | None = None) -> Manifest:
    r, source = spec.recipe, spec.source
    scheme = get_scheme(spec.quant) if spec.quant != "auto" else None
    return Manifest(
        schema_version=SCHEMA_VERSION, aotpack_version=__version__,
        recipe=RecipeRef(r.name, r.variant, r.family, r.pipeline, r.component, data=r.data),
        model=ModelRef(checkpoint=source.checkpoint, revision=source.revision, source=source.kind, config=q.config,
                       commit=q.commit, files=q.files),
        scheme=SchemeRef(spec.quant, config_to_json(torchao_config(scheme)) if scheme else None),
        dtype=spec.dtype, request=_request(r, modules), platform=spec.platform, files=file_entries(out),
        modules=tuple(modules),
        build=BuildInfo(date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), stages=dict(timings),
                        peak_rss_bytes=peak_rss_bytes(), quant_error=quant_error),
        options=spec.options,
        lora=LoraRef(**q.lora.describe()) if q.lora is not None else None,
        plan=PlanRef(**summary(q.plan)) if q.plan is not None else None,
        glue_int8=tuple(q.glue_int8),
    )


def _request(r: Any, modules: list[CompiledModule]) -> Any:
    """The recipe's request bounds, with the batch a module's export fixed (``export_fitted``) as the only one."""
    fixed = {m.inputs.dynamic["batch"][0] for m in modules
             if "batch" in m.inputs.dynamic and m.inputs.dynamic["batch"][0] == m.inputs.dynamic["batch"][1]}
    request = r.request()
    return replace(request, batch=(min(fixed), min(fixed))) if len(fixed) == 1 and request.batch[0] < request.batch[1] \
        else request


@dataclass
class Reference:
    """What the full-precision reference call recorded: the ``Call`` (the component's first inputs and output, the
    final latents); for a regional build each block class's first inputs in that call (``blocks``), the
    component's inputs at the smallest request (``small``: the end-to-end and per-instance checks run there) and,
    without [block_inputs] (a derived recipe), at another request (``second``: it names the blocks' dims)."""

    call: Call
    blocks: dict[str, dict[str, Any]] | None = None
    small: dict[str, Any] | None = None
    second: dict[str, Any] | None = None
    glue_rows: dict[str, int] | None = None    # regional: rows of each linear outside the blocks, first call


def reference(spec: BuildSpec, pipe: Any, ckpt: Checkpoint) -> Reference:
    """One pipeline call with the component streamed in full precision: what reaches the component (it does not
    depend on the component's weights: export captures it), its output on it and the final latents, and for a
    regional build what reaches each block class first. The other requests' inputs stop at the component's first
    call (only the pipeline's encoders run): no second pass of the full-precision weights."""
    r = spec.recipe
    streamed = Streamed(skeleton(ckpt.config, fuse_qkv=spec.options.fuse_qkv), CheckpointReader(ckpt.folder),
                        dtype=torch_dtype(spec.dtype), device=spec.device, lora=ckpt.lora)
    try:
        setattr(pipe, r.component, streamed.model)
        if not spec.options.regional:
            return Reference(record_call(pipe, r))
        classes = regional.block_classes(streamed.model, r)
        paths = regional.instance_paths(streamed.model, classes)
        with regional.first_inputs(streamed.model, classes) as blocks, glue.first_rows(streamed.model, paths) as rows:
            call = record_call(pipe, r)
        low = smallest_request(r)
        small = call.example if low.capture == r.capture else capture_inputs(pipe, low)[0]
        second = capture_inputs(pipe, other_request(r))[0] if not r.block_inputs else None
        return Reference(call, blocks, small, second, dict(rows))
    finally:
        streamed.close()
        setattr(pipe, r.component, None)


def smallest_request(r: Any) -> Any:
    """The recipe with its capture call moved to the smallest size it serves (height, width, frames) at the
    capture's batch and prompt: the batch stays, as the blocks' hand-over at batch > 1 is what an end-to-end check
    is for (a strided slice between blocks was wrong only at batch 2)."""
    cap = dict(r.capture, height=r.height[0], width=r.width[0])
    if r.is_video and cap.get("frames") is not None:
        cap["frames"] = r.frames[0]
    return replace(r, capture=cap)


def run_build(spec: BuildSpec) -> Path:
    """Run every stage of ``spec`` and publish the artifact folder; returns its path."""
    r = spec.recipe
    timings: dict[str, float] = {}
    written: dict[str, Any] = {}  # the files as this build hashed them, remembered under their published paths
    remember = lambda tmp, final: remember_folder(tmp, written["files"], final)  # noqa: E731
    with atomic_folder(spec.out, overwrite=spec.overwrite, before_publish=remember) as tmp, torch.no_grad():
        with stage("load", timings):  # everything but the component, which is streamed below
            pipe = load_pipeline(r, spec.source, dtype=spec.dtype, with_component=False)
            pipe.to(spec.device)
        ckpt = read_checkpoint(spec, pipe)
        with stage("reference", timings):  # full precision, one unit of weights in memory at a time
            ref = reference(spec, pipe, ckpt)
            full, example = ref.call, ref.call.example
        with stage("quantize", timings):
            q = quantize_component(spec, ckpt, tmp)
            int8_glue(spec, q, ref.glue_rows or {}, ref.small)
        setattr(pipe, r.component, q.model)
        with stage("eager", timings):  # the quantized eager outputs each compiled module is held to
            if q.classes:
                targets, end_to_end = block_targets(spec, q, example, ref.blocks, ref.small, ref.second)
            else:
                targets, end_to_end = [component_target(spec, q, example)], None
            ref.blocks = ref.small = ref.second = None
            if spec.options.compile_vae:
                targets.append(vae_target(spec, pipe.vae))
        parts = [compile_target(spec, t, tmp, timings, index=i, total=len(targets)) for i, t in enumerate(targets, 1)]
        with stage("save weights", timings):
            tensors = {k: v for c in parts for k, v in c.constants.items()}
            if q.classes:
                tensors.update(glue_weights(spec, q, targets))
            save_aligned(tensors, tmp / WEIGHTS)  # 64-byte aligned: kernels get them as mapped
            del tensors
        for c in parts:  # the eager model is no longer needed: verify reads the weights file only
            c.constants, c.target.wrapper, c.target.members = {}, None, None
        q.model = None
        setattr(pipe, r.component, None)
        gc.collect()
        manifest = make_manifest(spec, q, [c.module for c in parts], tmp, timings)
        (tmp / MANIFEST).write_text(manifest.dumps())  # errors to come: verify loads the artifact as written
        remember_folder(tmp, manifest.files)
        with stage("verify", timings), crash_report():
            loaded, modules, component_out = verify(spec, tmp, parts, end_to_end)
        with stage("quant error", timings), crash_report():
            quant_error = measure_quant_error(spec, pipe, full, loaded, component_out)
        del parts, targets, end_to_end
        manifest = manifest.replace(modules=tuple(modules))
        log.info("quantized vs full precision: max |diff| %.2e on one forward, %.2e on the final latents",
                 quant_error.forward_max_abs, quant_error.latents_max_abs)
        manifest = manifest.replace(build=BuildInfo(date=manifest.build.date, stages=dict(timings),
                                                    peak_rss_bytes=peak_rss_bytes(), quant_error=quant_error))
        (tmp / MANIFEST).write_text(manifest.dumps())
        if spec.sign_key is not None:
            from aotpack import signing

            with stage("sign", timings):
                signing.sign(tmp, key_path=spec.sign_key)
        written["files"] = manifest.files
    log.info("artifact written to %s", spec.out)
    return spec.out


def _tokens(r: Any) -> int:
    """Rows of the activations a linear sees in the recipe's capture call (image or video tokens + text)."""
    cap, m = r.capture, r.multiple
    tokens = (cap["height"] // m) * (cap["width"] // m)
    if r.is_video:
        tokens *= r.latent_frames(cap["frames"])
    return tokens + r.max_sequence_length
