"""The loaded artifact as a drop-in for the diffusers model it replaces.

``AotModule`` is a diffusers ``ModelMixin`` (so ``DiffusionPipeline.from_pretrained(dir, transformer=module)``
accepts it) whose forward checks its inputs against the exported ranges (AOTInductor does not) and calls the
compiled code. The compiled module never runs before its constants are loaded (that crashed the process in
our measurements) and never holds weights twice. Calls may come from many threads; a LoRA swap waits for the
calls in flight and holds new calls until it is done, so no call ever sees two weight sets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import types
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.models.modeling_utils import ModelMixin

from aotpack import _torch_compat as compat
from aotpack.serve.runtime import CudaGraphs, SwapLock  # noqa: F401  (re-exported)
from aotpack.artifact.manifest import CompiledModule, Manifest
from aotpack.artifact import folds
from aotpack.errors import InputError

log = logging.getLogger("aotpack")


def check_to(what: str, dtype: torch.dtype, device: torch.device, args: tuple, kwargs: dict) -> None:
    """Refuse a ``.to()`` that would change the dtype or device compiled code was built for (a pipeline's
    ``pipe.to(torch.bfloat16)`` reaches every component): it would fail at the first step, not here."""
    to_dtype, to_device = kwargs.get("dtype"), kwargs.get("device")
    for a in args:
        if isinstance(a, torch.dtype):
            to_dtype = a
        elif isinstance(a, (str, torch.device)):
            to_device = a
        elif isinstance(a, torch.Tensor):
            to_dtype, to_device = a.dtype, a.device
    if to_dtype is not None and to_dtype != dtype:
        raise InputError(f"{what} is compiled for {str(dtype).replace('torch.', '')}; it cannot be converted to "
                         f"{str(to_dtype).replace('torch.', '')}",
                         f"load the pipeline with dtype=torch.{str(dtype).replace('torch.', '')}, or rebuild the "
                         f"artifact with --dtype {str(to_dtype).replace('torch.', '')}")
    if to_device is not None and torch.device(to_device).type != device.type:
        raise InputError(f"{what} is compiled for {device.type}; it cannot move to {torch.device(to_device).type}",
                         f"build the artifact on a {torch.device(to_device).type} machine")


class _Pinned:
    """Compiled code is tied to its device and dtype: it reports them, ``.to()`` to the same is a no-op and
    ``.to()`` anything else is refused in one line."""

    _dtype: torch.dtype
    _device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, *args: Any, **kwargs: Any):
        check_to(f"this artifact's {type(self).__name__}", self._dtype, self._device, args, kwargs)
        return self


def request_hint(manifest: Manifest):
    req = manifest.request

    def hint(dim: str) -> str:
        if dim == "image_seq":
            return (f"height must be in {list(req.height)} and width in {list(req.width)} (multiples of "
                    f"{req.multiple}), or rebuild with a wider recipe")
        if dim == "batch":
            return "use a batch inside the range, or rebuild with a wider recipe"
        if dim in ("latent_frames", "latent_height", "latent_width", "video_seq"):
            frames = f"frames must be in {list(req.frames)}, " if req.frames else ""
            return (f"{frames}height in {list(req.height)} and width in {list(req.width)} (multiples of "
                    f"{req.multiple}), or rebuild with a wider recipe")
        return "rebuild with a wider range"

    return hint


def swap_lora(target: Any, lora: Any, scale: float, apply: Callable[[dict], None]) -> float:
    """Compute the weights with ``lora`` (a file, or a ``Lora`` already read) fused at ``scale`` (``None``: the
    artifact's own) and hand them to ``apply`` while no call is running; set ``target.lora``; returns the
    seconds it took."""
    from aotpack.builder.weights import Lora, lora_scale
    from aotpack.serve.lora import lora_constants

    scale = lora_scale(scale) if lora is not None else scale  # a NaN or 1e30 scale makes every output NaN
    t0 = time.perf_counter()
    keys = target._aotpack_keys
    source = lora if isinstance(lora, Lora) or lora is None else str(lora)
    new = keys if lora is None else lora_constants(target.manifest, keys, source, float(scale),
                                                   target._aotpack_plan, str(target.manifest.platform.device))
    name = None if lora is None else Path(lora.path if isinstance(lora, Lora) else lora).name
    with target._aotpack_lock.swap():
        apply(new)
        target.lora = None if lora is None else {"file": name, "scale": float(scale)}
    seconds = time.perf_counter() - t0
    log.info("LoRA %s in %.2f s", "removed" if lora is None else f"{name} swapped in", seconds)
    return seconds


def refuse_save(model: Any, *args: Any, **kwargs: Any) -> None:
    raise InputError(f"a compiled artifact cannot be saved as a diffusers model folder (diffusers could not load "
                     f"{type(model).__name__} from it)",
                     f"keep the artifact folder ({model.path}) and load it with aotpack.load or "
                     "aotpack.from_pretrained; save the rest of the pipeline with pipe.transformer set to None")


def attach(model: Any, manifest: Manifest, path: Path, *, keys: dict[str, torch.Tensor], plan: bytes | None,
           signer: str | None, codes: dict | None = None) -> Any:
    """What every loaded artifact offers besides the model itself: ``manifest``, ``path``, ``signer``, ``lora``,
    ``vae_decoder``, ``swap_lora(FILE, scale)`` and diffusers' model-level LoRA methods (a regional model gets
    them as instance attributes)."""
    from aotpack.serve.adapters import install

    model.manifest, model.path, model.signer, model.lora = manifest, path, signer, None
    model.vae_decoder = None
    model._aotpack_keys, model._aotpack_plan = keys, plan
    install(model)  # diffusers' LoRA API (pipe.load_lora_weights, set_adapters, ...) routed to swap_lora
    if codes is not None:  # a regional model is its real class: its own to() and save_pretrained are guarded here
        dtype, device = getattr(torch, manifest.dtype), torch.device(manifest.platform.device)

        def to(self, *args: Any, **kwargs: Any):
            check_to(f"this artifact's {type(self).__name__}", dtype, device, args, kwargs)
            return self

        model.to = types.MethodType(to, model)
        model.save_pretrained = types.MethodType(refuse_save, model)
        from aotpack.serve.regional import apply_weights

        model.swap_lora = types.MethodType(
            lambda self, lora, scale=1.0: swap_lora(self, lora, scale, lambda new: apply_weights(self, codes, new)),
            model)
    return model


_STAND_INS: dict[type, type] = {}


def stand_in_class(class_name: str | None) -> type:
    """``AotModule`` made a subclass of the diffusers class it replaces (``AotFluxTransformer2DModel``), so
    that ``DiffusionPipeline.from_pretrained(dir, transformer=module)`` finds the type its pipeline declares
    instead of warning on every load. Only the name and the type are borrowed: the real class's ``__init__``
    never runs (no weights are made), and everything a pipeline calls is AotModule's own."""
    import diffusers

    real = getattr(diffusers, class_name or "", None)
    if not (isinstance(real, type) and issubclass(real, ModelMixin)) or issubclass(real, AotModule):
        return AotModule
    if real not in _STAND_INS:
        _STAND_INS[real] = type(f"Aot{real.__name__}", (AotModule, real),
                                {"__module__": __name__, "__doc__": AotModule.__doc__, "stands_in_for": real})
    return _STAND_INS[real]


class AotModule(_Pinned, ModelMixin, ConfigMixin):
    """A whole-graph compiled component that behaves like the diffusers model it replaces.

    Keeps the pieces a pipeline reads: ``config``, ``dtype``, ``device``, ``cache_context`` and the forward
    keywords with ``return_dict``. Whole-graph code has no blocks, so diffusers' block-level caches
    (``enable_cache``) cannot hook it: it says so (a regional build keeps the blocks). An instance is of
    ``stand_in_class(...)``: a subclass of the model class it replaces.
    """

    config_name = "config.json"
    stands_in_for: type | None = None

    def __new__(cls, compiled: Any = None, module: Any = None, keys: Any = None, manifest: Manifest | None = None,
                *args: Any, **kwargs: Any):
        if cls is AotModule and manifest is not None:
            cls = stand_in_class(manifest.model.config.get("_class_name"))
        return super().__new__(cls)

    def __init__(self, compiled: Any, module: CompiledModule, keys: dict[str, torch.Tensor], manifest: Manifest,
                 path: Path, *, plan: bytes | None = None, signer: str | None = None,
                 constants: dict[str, torch.Tensor] | None = None) -> None:
        ModelMixin.__init__(self)  # not super(): the stand-in's next class is the real model, never built
        self.register_to_config(**{k: v for k, v in manifest.model.config.items() if not k.startswith("_")})
        self._compiled, self._module = compiled, module
        self._aotpack_lock = SwapLock()
        self._graphs: CudaGraphs | None = None
        attach(self, manifest, path, keys=keys, plan=plan, signer=signer)
        # user_managed: this dict owns what the compiled code reads (``constants``: what the loader loaded); a
        # frozen module keeps the packed constants of its load for the folds a LoRA swap does not touch
        self._loaded: dict[str, torch.Tensor] | None = None
        self._weights = constants if constants is not None else self._constants(keys)
        self._loaded = dict(self._weights) if module.fold else None
        self._dtype = getattr(torch, manifest.dtype)
        self._device = torch.device(manifest.platform.device)
        self._spec = module.inputs
        self._hint = request_hint(manifest)

    def _constants(self, keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The compiled code's constants from ``keys`` (weights-file name -> tensor); a frozen module's folded
        constant is replayed where ``keys`` changed one of its weights (a LoRA swap), else kept as loaded."""
        return folds.swapped(self._module, self._module.instances[0], compat.weight_fqns(self._compiled), keys,
                             self._aotpack_keys, self._loaded)

    def use_cuda_graphs(self, graphs: "CudaGraphs") -> None:
        self._graphs = graphs

    def swap_lora(self, lora: str | os.PathLike | None, scale: float = 1.0) -> float:
        """Swap in weights with the LoRA ``lora`` fused at ``scale`` - no recompile; ``None`` restores the
        artifact's own weights. Returns the seconds it took. Safe while other threads call the module."""

        def apply(new: dict[str, torch.Tensor]) -> None:
            constants = self._constants(new)
            self._compiled.load_constants(constants, check_full_update=True, user_managed=True)
            self._weights = constants
            if self._graphs is not None:
                self._graphs.clear()  # the captured graphs hold the old weights' addresses

        return swap_lora(self, lora, scale, apply)

    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs: Any):
        """Pipelines enter it around each branch of classifier-free guidance (WanPipeline also passes the step,
        sigma and step count); compiled code keeps no cache."""
        yield

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Pipelines reset block caches before a call; a whole graph has none."""

    def enable_cache(self, config: Any) -> None:
        raise InputError("a whole-graph artifact has no blocks for diffusers' caches to hook",
                         "build it with --regional (the loaded model then keeps its blocks)")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        refuse_save(self)

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        """Raise InputError unless every input matches the exported names, dtypes, devices and ranges, and every
        non-tensor argument baked into the compiled code (``img_shapes``, ``num_frames``) has its recorded value."""
        self._spec.check(inputs, self._device, self._hint)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call's arguments by name: positional ones bound by the replaced model's forward signature (Sana
        passes ``hidden_states`` positionally), as the build captured them."""
        if not args:
            return kwargs
        real = type(self).stands_in_for
        if real is None:
            if len(args) > 1:
                raise InputError(f"{len(args)} positional arguments, and this artifact does not know its model's "
                                 "forward signature", "pass the inputs by keyword")
            return {"hidden_states": args[0], **kwargs}
        import inspect

        sig = inspect.signature(real.forward)
        try:
            bound = sig.bind(self, *args, **kwargs)
        except TypeError as e:
            raise InputError(f"{real.__name__}.forward does not take these arguments: {e}",
                             "call it as the pipeline does, by keyword") from None
        names = list(bound.arguments)[1:1 + len(args)]
        return {**dict(zip(names, args)), **kwargs}

    def forward(self, *args: Any, joint_attention_kwargs=None, attention_kwargs=None, return_dict: bool = True,
                **kwargs):
        from aotpack.builder.capture import spread_tuples

        for extra in (joint_attention_kwargs, attention_kwargs):
            if extra and any(k != "scale" or v != 1.0 for k, v in extra.items()):
                raise InputError(f"attention kwargs {sorted(extra)} cannot change compiled code",
                                 "swap a LoRA in with load_into(pipe, artifact, lora=FILE) instead")
        kwargs = spread_tuples(self._bind(args, kwargs))
        self.check_inputs(kwargs)  # None-valued extras (controlnet samples, ...) are allowed and dropped
        # AOTInductor code assumes the strides it was exported with (contiguous) and checks none
        inputs = {n: kwargs[n].contiguous() for n in self._spec.names}
        with self._aotpack_lock.call():
            out = (self._graphs or self._compiled)(inputs)
        if isinstance(out, (list, tuple)):
            out = out[0]
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


class AotVaeDecoder(_Pinned, torch.nn.Module):
    """The VAE's decoder, compiled (``--compile-vae``): stands in for the pipeline's ``vae`` when decoding."""

    def __init__(self, compiled: Any, weights: dict[str, torch.Tensor], module: CompiledModule,
                 manifest: Manifest) -> None:
        super().__init__()
        self._compiled, self._weights, self._module, self._manifest = compiled, weights, module, manifest
        self.config = FrozenDict(module.config or {})
        self._dtype = getattr(torch, module.inputs.tensors[0].dtype)
        self._device = torch.device(manifest.platform.device)
        self._hint = request_hint(manifest)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs: Any):
        self._module.inputs.check({"z": z}, self._device, self._hint)
        out = self._compiled({"z": z.contiguous()})
        out = out[0] if isinstance(out, (list, tuple)) else out
        if not return_dict:
            return (out,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=out)

    def encode(self, *args: Any, **kwargs: Any):
        raise InputError("this artifact's VAE is compiled for decoding only",
                         "load the pipeline's own VAE (without the artifact's vae_decoder) for image-to-image")
