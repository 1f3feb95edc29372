"""Load an artifact: from a folder (or a Hub repo id) to compiled modules with their weights, ready to call.

Order matters, and nothing native runs before the last step that can be checked first:
manifest (read once) -> signature (when keys are required) -> platform -> every file opened once and hashed
(code copied to a private folder as it is hashed; weights kept open) -> memory -> open the code -> the
weights' names, dtypes and shapes against the compiled constants -> load the weights (zero-copy) -> ready.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from aotpack import _torch_compat as compat
from aotpack.signing import check_signature, trusted_keys_from_env  # noqa: F401  (load's own names too)
from aotpack.artifact import folds
from aotpack.artifact import manifest as mf
from aotpack.artifact.files import VerifiedFiles
from aotpack.artifact.manifest import CompiledModule, Manifest
from aotpack.artifact.platform import describe
from aotpack.builder.compile import CONSTANTS_KEY
from aotpack.errors import ConfigError, InputError, IntegrityError, ManifestError, ResourceError, one_line
from aotpack.serve.module import AotModule, AotVaeDecoder, CudaGraphs, attach, request_hint

log = logging.getLogger("aotpack")
MEMORY_RESERVE_ENV = "AOTPACK_MEMORY_RESERVE"


def resolve_location(path: str | os.PathLike, **hub_kwargs: Any) -> tuple[Path, Any]:
    """The artifact folder ``path`` names (a local folder, or the build of a Hub repo id that fits this machine)
    and, for a pulled build, what was pulled (``hub.Pulled``): the loader checks the bytes it opens against it.
    A folder in aotpack's Hub cache is a pulled build, by path too: without the sealed record of its pull it is
    refused (``hub.pulled_identity``).

    A path that exists, starts with '.', '/' or '~', or whose first part exists here, is a path and is never
    looked up on the Hub; only an 'owner/name' that is none of these is a repo id."""
    text = str(path)
    folder = Path(text).expanduser()
    if folder.exists():
        given = sorted(k for k, v in hub_kwargs.items() if v)
        if given:  # a folder here named like a repo id must not silently win over what was asked of the Hub
            raise InputError(f"{one_line(text)} is a folder here; {', '.join(given)} apply to Hub repo ids only",
                             f"leave {', '.join(given)} out, or run from where no folder has that name")
        from aotpack.hub import pulled_identity

        return folder, pulled_identity(folder)
    first = text.split("/", 1)[0]
    is_path = text.startswith((".", "/", "~")) or os.path.isabs(text) or text.count("/") != 1 \
        or (first and Path(first).exists())
    if is_path:
        raise ManifestError(f"no artifact at {one_line(text)}",
                            "no such folder here (a path is never looked up on the Hub); check the path")
    from aotpack.errors import HubError
    from aotpack.hub import resolve_for_load

    try:
        return resolve_for_load(text, **hub_kwargs)
    except HubError as e:
        raise HubError(f"{one_line(text)} is no folder here, and as a Hub repo: {e.cause}", e.hint) from None


def memory_reserve() -> int:
    """``AOTPACK_MEMORY_RESERVE``: bytes to keep free when loading (default 256 MiB)."""
    text = os.environ.get(MEMORY_RESERVE_ENV, "")
    if not text:
        return 256 << 20
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{MEMORY_RESERVE_ENV}={one_line(text, 40)} is not a number of bytes",
                          f"set {MEMORY_RESERVE_ENV} to an integer >= 0 (e.g. 268435456), or unset it")
    return value


def check_memory(nbytes: int) -> None:
    import psutil

    available = psutil.virtual_memory().available
    if nbytes + memory_reserve() > available:
        raise ResourceError(
            f"the weights need {nbytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of memory is available",
            "free memory, or use a smaller quantization scheme")


def constant_names(code: Path) -> list[str]:
    """The constants a compiled package expects (opens it: call only on code that was verified or just built)."""
    return compat.weight_fqns(compat.open_package(code))


def stored_names(compiled: Any, module: CompiledModule) -> list[str]:
    """The constants a compiled module takes from its weights file: the ones its code expects, where a frozen
    build folded some (``module.fold``) the weights those are computed from instead."""
    return folds.stored(compat.weight_fqns(compiled), module.fold)


def _check_constants(compiled: Any, module: CompiledModule, weights: dict[str, torch.Tensor], instance: str) -> None:
    """The weights must be exactly the compiled constants, by name, dtype and shape, before they are loaded.
    Fails closed: a package without aotpack's constants signature is refused."""
    import json

    hint = "the weights file belongs to another build; rebuild or download the artifact again"
    raw = compiled.get_metadata().get(CONSTANTS_KEY)
    try:
        signature = json.loads(raw) if raw else None
    except ValueError:
        signature = None
    if not isinstance(signature, dict):
        raise IntegrityError(f"{module.code} carries no constants signature (not built by aotpack)",
                             "do not load this artifact; rebuild it with aotpack")
    expected = stored_names(compiled, module)
    names = {f: module.key(instance, f) for f in expected}
    missing = sorted(k for k in names.values() if k not in weights)
    unsigned = sorted(f for f in expected if f not in signature)
    unused = sorted(set(module.fold or ()) - set(compat.weight_fqns(compiled)))
    if unused:
        raise IntegrityError(f"the manifest folds constants {unused[:3]} the compiled code does not expect", hint)
    if missing or unsigned:
        raise IntegrityError(f"weights do not match the compiled constants: missing {missing[:3]}"
                             + (f", unsigned {unsigned[:3]}" if unsigned else ""), hint)
    for fqn, key in names.items():
        t, want = weights[key], signature[fqn]
        got = [str(t.dtype).removeprefix("torch."), list(t.shape)]
        if got != list(want):
            raise IntegrityError(f"weight {key} is {got[0]} {got[1]}, the compiled code expects {want[0]} {want[1]}",
                                 hint)


def check_input_order(compiled: Any, module: CompiledModule) -> None:
    """The manifest's inputs must be the compiled code's, in its order: every call builds its dict in the
    manifest's order, and the code reads values by position (AOTInductor checks neither names nor shapes)."""
    names, listed = compat.input_names(compiled), list(module.inputs.names)
    if names != listed:
        code = "takes no dict of inputs" if names is None else f"takes {_names(names)}"
        raise IntegrityError(f"{module.code} {code}; the manifest lists {_names(listed)}",
                             "the manifest was edited or belongs to another build; rebuild the artifact, or "
                             "download it again")


def _names(names: list[str]) -> str:
    shown = ", ".join(one_line(n, 40) for n in names[:8])
    return f"[{shown}{', ...' if len(names) > 8 else ''}]"


def instance_constants(compiled: Any, module: CompiledModule, weights: dict[str, torch.Tensor],
                       instance: str) -> dict[str, torch.Tensor]:
    """{constant name: tensor} of one instance of ``module``, checked against the compiled constants first; a
    folded constant is computed from the weights by its recorded steps (``aotpack.artifact.folds``)."""
    _check_constants(compiled, module, weights, instance)
    return folds.swapped(module, instance, compat.weight_fqns(compiled), weights)


def open_compiled(code: Path, module: CompiledModule, weights: dict[str, torch.Tensor], instance: str) -> Any:
    """Open one compiled module and load ``instance``'s weights into it (checked first; zero-copy)."""
    compiled = compat.open_package(code)
    # user_managed: the compiled code reads these tensors in place, no second copy.
    compiled.load_constants(instance_constants(compiled, module, weights, instance), check_full_update=True,
                            user_managed=True)
    return compiled


def unread(module: CompiledModule, constants: dict[str, torch.Tensor]) -> set[str]:
    """The weights-file names a frozen module's code never reads, only its one-weight folds do (every instance):
    what a LoRA swap starts from holds them as meta tensors — name, dtype and shape: a swap replaces those it
    touches and their folds are replayed, the rest keep the packed constants made at load (``constants``: the
    first instance's) — so that a weight and its packed copy are not both held. A fold of several weights (q, k,
    v concatenated) keeps its weights: a swap may touch only some of them."""
    if not module.fold:
        return set()
    direct = {f for f in constants if f not in module.fold}
    several = {w for recipe in module.fold.values() if len(read := folds.inputs({"": recipe})) > 1 for w in read}
    names = folds.inputs(module.fold) - direct - several
    return {module.key(instance, w) for instance in module.instances for w in names}


def _check_weights_cover(manifest: Manifest, weights: dict[str, dict[str, torch.Tensor]],
                         compiled: dict[str, Any]) -> None:
    """Every tensor of a weights file belongs to some module instance, or (regional) to the eager parts around
    the blocks, which the model itself checks when it takes them: nothing unexpected rides along."""
    from aotpack.serve.regional import glue_keys

    for file, tensors in weights.items():
        used = {m.key(inst, f) for m in manifest.modules if m.weights == file
                for inst in m.instances for f in stored_names(compiled[m.name], m)}
        if manifest.options.regional:
            used |= glue_keys(manifest, tensors)
        extra = sorted(set(tensors) - used)
        if extra:
            raise IntegrityError(f"weights do not match the compiled constants: unexpected {extra[:3]}",
                                 "the weights file belongs to another build; rebuild or download it again")


def _open_verified(folder: Path, pulled: Any, keys: list, *, cuda_graphs: bool
                   ) -> tuple[Manifest, Any, dict[str, dict[str, torch.Tensor]], dict[str, Any], Any]:
    """(manifest, signer, weights by file, opened packages by module, plan) of the artifact in ``folder``: each
    step checked before the next, in the order the module docstring gives, up to opening the code (no constants
    loaded yet)."""
    from safetensors.torch import load_file

    from aotpack.artifact.aligned import aligned

    from aotpack import signing

    # the folder is opened once: the manifest, the signature and every file come from it, whatever is renamed
    # a pulled build (by repo id or by path): the manifest and signature read here must be the pulled ones, and
    # the manifest pins every other file, so a folder changed after the pull loads nothing
    with VerifiedFiles(folder) as files:
        data = files.manifest_bytes()
        signature = files.small_file(signing.SIGNATURE, signing.MAX_SIGNATURE_BYTES) \
            if keys or pulled is not None else None
        if pulled is not None:
            signature = pulled.check(data, signature)
        manifest = mf.parse(data)
        files.files = manifest.files
        signer = check_signature(signature, data, manifest, keys, folder) if keys else None
        if cuda_graphs and manifest.platform.device != "cuda":
            raise InputError(f"cuda_graphs needs a CUDA artifact; this one runs on {manifest.platform.device}",
                             "leave cuda_graphs out, or build the artifact on a GPU machine")
        device = manifest.platform.device
        mf.check_compatible(manifest, describe(device if device == "cpu" else None, probe_isa=False))
        files.check_all()
        # a frozen module packs its folded constants while every weight is still held
        check_memory(manifest.weights_bytes() + sum(folds.nbytes(m.fold) * len(m.instances) for m in manifest.modules))
        # mapped from the verified bytes; a tensor not 64-byte aligned (files of older builds) gets an aligned copy
        weights = {name: aligned(load_file(files.data(name), device=device))
                   for name in {m.weights for m in manifest.modules}}
        opened = {m.name: compat.open_package(files.code(m.code), single_threaded=cuda_graphs)
                  for m in manifest.modules}
        _check_weights_cover(manifest, weights, opened)
        for m in manifest.modules:
            check_input_order(opened[m.name], m)
        plan = files.read(manifest.plan.file) if manifest.plan is not None and manifest.plan.file in manifest.files \
            else None
    return manifest, signer, weights, opened, plan


def load(path: str | os.PathLike, *, revision: str | None = None, trust: bool = False, token: str | None = None,
         quant: str | None = None, cuda_graphs: bool = False, trusted_keys: Sequence | None = None,
         refresh_pins: bool = False) -> AotModule:
    """Load an artifact folder, or the build of a Hub repo ("owner/name") that fits this machine.

    ``trusted_keys``: public keys (paths, PEM bytes or key objects) one of which must have signed the artifact
    (default: the ``AOTPACK_TRUSTED_KEYS`` variable; ``[]`` requires none). ``cuda_graphs``: replay the compiled
    module as CUDA graphs (CUDA artifacts only). A repo id needs a pinned ``revision`` (tag or commit) or
    ``trust=True``: the .pt2 is native code.
    """
    t0 = time.perf_counter()
    keys = trusted_keys_from_env() if trusted_keys is None else list(trusted_keys)
    hub = {"revision": revision, "trust": trust, "token": token, "quant": quant, "refresh_pins": refresh_pins}
    folder, pulled = resolve_location(path, **{k: v for k, v in hub.items() if v})
    manifest, signer, weights, opened, plan = _open_verified(folder, pulled, keys, cuda_graphs=cuda_graphs)
    device = manifest.platform.device

    made: list[dict[str, torch.Tensor]] = []  # every instance's constants, as the compiled code holds them

    def constants_of(m: CompiledModule, instance: str) -> dict[str, torch.Tensor]:
        made.append(instance_constants(opened[m.name], m, weights[m.weights], instance))
        return made[-1]

    loaded = {}
    for m in manifest.modules:  # no compiled module is ever callable before it holds constants
        loaded[m.name] = constants_of(m, m.instances[0])
        opened[m.name].load_constants(loaded[m.name], check_full_update=True, user_managed=True)
    component = [m for m in manifest.modules if m.kind in ("component", "block")]
    metas = set().union(*(unread(m, loaded[m.name]) for m in component))
    keys = {k: v.to("meta") if k in metas else v for m in component for k, v in weights[m.weights].items()}
    hint = request_hint(manifest)
    if manifest.options.regional:
        from aotpack.serve.regional import build_model

        def first_or_own(m: CompiledModule, instance: str) -> dict[str, torch.Tensor]:  # each instance made once
            return loaded[m.name] if instance == m.instances[0] else constants_of(m, instance)

        module, codes = build_model(manifest, weights, opened, first_or_own, device, hint, cuda_graphs=cuda_graphs)
        attach(module, manifest, folder, keys=keys, plan=plan, signer=signer, codes=codes)
    else:
        main = manifest.component
        module = AotModule(opened[main.name], main, keys, manifest, folder, plan=plan, signer=signer,
                           constants=loaded[main.name])
        if cuda_graphs:
            module.use_cuda_graphs(CudaGraphs(module._compiled))
    vae = manifest.module("vae_decoder")
    if vae is not None:
        module.vae_decoder = AotVaeDecoder(opened[vae.name], loaded[vae.name], vae, manifest)
    _let_go(weights, metas, made)
    log.info("loaded %s in %.2f s", folder, time.perf_counter() - t0)
    return module


def _let_go(weights: dict[str, dict[str, torch.Tensor]], unread_names: set[str],
            made: list[dict[str, torch.Tensor]]) -> None:
    """The mapped pages of the weights only folds read (packed now: ``unread``) leave this process's memory, but
    for any page a weight or constant still in use shares (a frozen artifact's plain weights are not held beside
    their packed copies: 1 GiB less RSS for flux-blocks bf16)."""
    from aotpack.artifact.aligned import release_mapped

    dropped = [t for file in weights.values() for k, t in file.items() if k in unread_names]
    live = [t for file in weights.values() for k, t in file.items() if k not in unread_names] + \
        [t for c in made for t in c.values()]
    if dropped:
        log.debug("let go of %.1f MiB of packed weights' plain pages", release_mapped(dropped, live) / 2**20)


def assemble(pipe: Any, module: AotModule, *, remake: bool = False) -> Any:
    """Put the artifact's modules into ``pipe`` and apply its load-time options; returns the pipeline.

    ``remake``: the pipeline was loaded without its VAE; it is made again from its components, so that what
    its constructor derives from the VAE's config (scale factors, processors) is right."""
    from aotpack.builder.schemes import quantize_named

    manifest = module.manifest
    options = manifest.options
    component = manifest.recipe.component
    sides = (("quantize_text_encoder", options.quantize_text_encoder,
              [n for n in pipe.components if n.startswith("text_encoder")]),
             ("quantize_vae", options.quantize_vae, [] if module.vae_decoder is not None else ["vae"]))
    for _, scheme, targets in sides:
        if scheme:
            for target in targets:
                if getattr(pipe, target, None) is not None:
                    quantize_named(getattr(pipe, target), scheme)
    if module.vae_decoder is not None and remake:
        fresh = type(pipe)(**{**pipe.components, component: module, "vae": module.vae_decoder})
        fresh.set_progress_bar_config(disable=True)
        return fresh
    setattr(pipe, component, module)
    if module.vae_decoder is not None:
        pipe.vae = module.vae_decoder
    return pipe
