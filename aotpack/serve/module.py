"""Load an artifact and drop it into a diffusers pipeline.

The compiled module never runs before its constants are loaded (that crashed the process in our
measurements), never loads weights twice, and checks each call's inputs against the exported ranges
because AOTInductor itself does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from aotpack.artifact import files as artifact
from aotpack.artifact import manifest as mf
from aotpack.errors import InputError, IntegrityError, ResourceError

log = logging.getLogger("aotpack")


class _Pinned(torch.nn.Module):
    """Compiled code is tied to its device and dtype: it reports them and ``.to()`` leaves it as it is."""

    _dtype: torch.dtype
    _device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, *args, **kwargs):
        return self


class AotModule(_Pinned):
    """A compiled component that behaves like the diffusers model it replaces.

    Keeps the pieces a pipeline reads: ``config``, ``dtype``, ``device``, ``cache_context`` and the forward
    keywords with ``return_dict``.
    """

    def __init__(self, compiled: Any, weights: dict[str, torch.Tensor], manifest: dict, path: Path) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self._compiled = compiled
        self._weights = weights  # user_managed constants: this dict owns the memory the compiled code reads
        self._base_weights = weights  # the artifact's own weights (file-backed), restored by swap_lora(None)
        self.lora: dict | None = None
        self.vae_decoder: AotVaeDecoder | None = None  # set by load() when the artifact carries one
        self._graphs: CudaGraphs | None = None  # load(..., cuda_graphs=True)
        self.manifest = manifest
        self.path = path
        self.config = FrozenDict(manifest["model"]["config"])
        self._dtype = getattr(torch, manifest["dtype"])
        self._device = torch.device(manifest["platform"]["device"])
        self._names = [t["name"] for t in manifest["inputs"]["tensors"]]

    def swap_lora(self, lora: str | os.PathLike | None, scale: float = 1.0) -> float:
        """Swap in weights with the LoRA ``lora`` fused at ``scale`` - no recompile; ``None`` restores the
        artifact's own weights. Returns the seconds it took.

        The linears the LoRA touches are read again in high precision from the checkpoint the artifact was
        built from, the LoRA is fused, they are quantized with the artifact's scheme (as a build with
        ``--lora`` would), and the compiled module's constants are swapped in one call.
        """
        t0 = time.perf_counter()
        if lora is None:
            new = self._base_weights
        else:
            new = self._lora_weights(str(lora), float(scale))
        self._compiled.load_constants(new, check_full_update=True, user_managed=True)
        self._weights = new
        if self._graphs is not None:
            self._graphs.clear()
        self.lora = None if lora is None else {"file": Path(lora).name, "scale": float(scale)}
        seconds = time.perf_counter() - t0
        log.info("LoRA %s in %.2f s", "removed" if lora is None else f"{Path(lora).name} swapped in", seconds)
        return seconds

    def _lora_weights(self, path: str, scale: float) -> dict[str, torch.Tensor]:
        import diffusers

        from aotpack.builder.plan import linear_quantizer
        from aotpack.builder.source import source_of, torch_dtype
        from aotpack.builder.weights import CheckpointReader, component_folder, materialize, read_lora, skeleton, touched_modules

        m = self.manifest
        if m.get("lora"):
            raise InputError(f"this artifact was built with LoRA {m['lora']['file']} fused in",
                             "build without --lora to swap LoRAs at load time")
        component = m["recipe"]["component"]
        source = source_of(m)
        folder = component_folder(source.location, component, kind=source.kind, revision=source.revision)
        lora = read_lora(path, getattr(diffusers, m["recipe"]["pipeline"]), component, scale=scale)
        model = skeleton(dict(m["model"]["config"]), fuse_qkv=(m.get("options") or {}).get("fuse_qkv", False))
        # as the build did: the artifact's scheme, or each layer's scheme from its --quant auto plan
        plan = json.loads((self.path / m["plan"]["file"]).read_text()) if m.get("plan") else None
        quantize_unit = linear_quantizer(m["scheme"]["name"], plan)
        only = touched_modules(model, lora)
        with torch.no_grad():
            materialize(model, CheckpointReader(folder), dtype=torch_dtype(m["dtype"]), device=str(self._device),
                        quantize_unit=quantize_unit, lora=lora, only=only)
        new = dict(self._base_weights)
        replaced = 0
        for module_name in sorted(only):
            leaf = model.get_submodule(module_name)
            if quantize_unit is not None:
                from torchao.utils import unwrap_tensor_subclass

                holder = torch.nn.Module()  # unwrap_tensor_subclass works on a module's children
                holder.add_module("leaf", leaf)
                unwrap_tensor_subclass(holder)
            fresh = {f"component.{module_name}.{k}": v for k, v in leaf.state_dict().items()}
            held = [n for n in new if n.startswith(f"component.{module_name}.")]
            for name in held:  # every constant of the module gets its new value (unused ones were compiled away)
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

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' cache hooks have no meaning for compiled code; kept so pipelines can enter it."""
        yield

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        """Raise InputError unless every input matches the exported names, dtypes, devices and ranges."""
        check_tensors(inputs, self.manifest["inputs"], self._device, self.manifest)

    def forward(self, hidden_states=None, joint_attention_kwargs=None, attention_kwargs=None, return_dict: bool = True,
                **kwargs):
        for extra in (joint_attention_kwargs, attention_kwargs):
            if extra and any(k != "scale" or v != 1.0 for k, v in extra.items()):
                raise InputError(f"attention kwargs {sorted(extra)} cannot change compiled code",
                                 "swap a LoRA in with load_into(pipe, artifact, lora=FILE) instead")
        from aotpack.builder.capture import spread_tuples

        kwargs = spread_tuples({"hidden_states": hidden_states, **kwargs})
        self.check_inputs(kwargs)  # None-valued extras (controlnet samples, ...) are allowed and dropped
        run = self._graphs or self._compiled
        out = run({n: kwargs[n] for n in self._names})
        if isinstance(out, (list, tuple)):
            out = out[0]
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


class CudaGraphs:
    """Replays the compiled module as CUDA graphs, one per input signature (names, shapes, dtypes), so that
    a step costs one launch instead of one per kernel. Inputs are copied into the graph's static buffers and
    outputs cloned out. Written for GPUs and untested on them here (the CI machines have none)."""

    def __init__(self, compiled: Any, max_graphs: int = 8) -> None:
        self.compiled, self.max_graphs = compiled, max_graphs
        self.graphs: dict[tuple, tuple[Any, dict, Any]] = {}

    def clear(self) -> None:  # after load_constants: the graphs hold the old weights' addresses
        self.graphs.clear()

    def __call__(self, inputs: dict[str, torch.Tensor]) -> Any:
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items())
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return self.compiled(inputs)  # a shape seen too late to capture: plain replay-free call
            static = {k: v.clone() for k, v in inputs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # warm up outside the capture (allocations, lazy init)
                    self.compiled(static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.compiled(static)
            entry = self.graphs[key] = (graph, static, out)
        graph, static, out = entry
        for k, v in inputs.items():
            static[k].copy_(v)
        graph.replay()
        return [o.clone() for o in out] if isinstance(out, (list, tuple)) else out.clone()


class AotVaeDecoder(_Pinned):
    """The VAE's decoder, compiled (``--compile-vae``): stands in for the pipeline's ``vae`` when decoding."""

    def __init__(self, compiled: Any, weights: dict[str, torch.Tensor], spec: dict, manifest: dict) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self._compiled, self._weights, self._spec, self._manifest = compiled, weights, spec, manifest
        self.config = FrozenDict(spec["config"])
        self._dtype = getattr(torch, spec["inputs"]["tensors"][0]["dtype"])
        self._device = torch.device(manifest["platform"]["device"])

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs):
        check_tensors({"z": z}, self._spec["inputs"], self._device, self._manifest)
        out = self._compiled({"z": z})
        out = out[0] if isinstance(out, (list, tuple)) else out
        if not return_dict:
            return (out,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=out)

    def encode(self, *args, **kwargs):
        raise InputError("this artifact's VAE is compiled for decoding only",
                         "load the pipeline's own VAE (without the artifact's vae_decoder) for image-to-image")


def check_tensors(inputs: dict[str, Any], spec: dict, device: torch.device, manifest: dict) -> None:
    """Raise InputError unless every input matches the exported names, dtypes, devices and ranges.

    AOTInductor does not check shapes itself: a wrong size would read out of bounds.
    """
    names = [t["name"] for t in spec["tensors"]]
    missing = [n for n in names if inputs.get(n) is None]
    if missing:
        raise InputError(f"missing input(s): {', '.join(missing)}", "pass every input the artifact was exported with")
    extra = sorted(k for k, v in inputs.items() if k not in names and v is not None)
    if extra:
        raise InputError(f"unexpected input(s): {', '.join(extra)}", "this artifact was exported without them")
    bound: dict[str, int] = {}
    for ts in spec["tensors"]:
        name, t = ts["name"], inputs[ts["name"]]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{name} must be a tensor, got {type(t).__name__}", "pass a torch.Tensor")
        if str(t.dtype).removeprefix("torch.") != ts["dtype"]:
            raise InputError(f"{name} has dtype {str(t.dtype).removeprefix('torch.')}, the artifact expects {ts['dtype']}",
                             f"cast it, or build with --dtype {str(t.dtype).removeprefix('torch.')}")
        if t.device.type != device.type:
            raise InputError(f"{name} is on {t.device.type}, the artifact runs on {device.type}",
                             f"move the inputs (and the pipeline) to {device.type}")
        want = ts["shape"]
        if t.dim() != len(want):
            raise InputError(f"{name} has {t.dim()} dims {list(t.shape)}, the artifact expects {len(want)} ({want})",
                             "check the pipeline and the artifact match")
        for axis, (size, w) in enumerate(zip(t.shape, want)):
            if isinstance(w, int):
                if size != w:
                    raise InputError(f"{name} dim {axis} is {size}, the artifact was exported with {w}",
                                     "use the recipe's settings (e.g. max_sequence_length) or rebuild")
                continue
            lo, hi, *step = spec["dynamic"][w]
            if not lo <= size <= hi:
                raise InputError(f"{name} dim {axis} ({w}) is {size}, outside the artifact's range [{lo}, {hi}]",
                                 _range_hint(w, manifest))
            if step and size % step[0]:
                raise InputError(f"{name} dim {axis} ({w}) is {size}, not a multiple of {step[0]}",
                                 _range_hint(w, manifest))
            if bound.setdefault(w, size) != size:
                raise InputError(f"{name} dim {axis} ({w}) is {size} but another input has {bound[w]}",
                                 "inputs disagree on one dynamic size")
    # Export cannot tie e.g. the rotary table's length to frames x rows x columns; the compiled code would
    # read out of bounds, so the tie is checked here.
    for rel in spec.get("relations") or []:
        if rel["dim"] in bound and all(d in bound for d in rel["product"]):
            want = 1
            for d in rel["product"]:
                want *= bound[d]
            want //= rel["divisor"]
            if bound[rel["dim"]] != want:
                raise InputError(
                    f"{rel['dim']} is {bound[rel['dim']]} but {' x '.join(rel['product'])} / {rel['divisor']} "
                    f"is {want}", "inputs disagree (e.g. rotary embeddings made for another size)")


def _range_hint(dim: str, manifest: dict) -> str:
    image = manifest["inputs"].get("image") or {}
    if dim == "image_seq" and image:
        return (f"height must be in {image.get('height')} and width in {image.get('width')} "
                f"(multiples of {image.get('multiple')}), or rebuild with a wider recipe")
    if dim == "batch":
        return "use a batch inside the range, or rebuild with a wider recipe"
    if dim in ("latent_frames", "latent_height", "latent_width", "video_seq") and image:
        frames = f"frames must be in {image['frames']}, " if image.get("frames") else ""
        return (f"{frames}height in {image.get('height')} and width in {image.get('width')} "
                f"(multiples of {image.get('multiple')}), or rebuild with a wider recipe")
    return "rebuild with a wider range"


def _check_memory(nbytes: int) -> None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the package
        return
    available = psutil.virtual_memory().available
    floor = int(os.environ.get("AOTPACK_MEMORY_RESERVE", str(256 << 20)))
    if nbytes + floor > available:
        raise ResourceError(
            f"the weights need {nbytes / 2**30:.2f} GiB but only {available / 2**30:.2f} GiB of memory is available",
            "free memory, or use a smaller quantization scheme",
        )


def _check_constants(compiled: Any, path: Path) -> None:
    """Weights must be exactly the compiled constants, by name, dtype and shape, before they are loaded."""
    from safetensors import safe_open

    expected = set(compiled.get_constant_fqns())
    signature = json.loads(compiled.get_metadata().get("aotpack.constants", "{}"))
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        missing, extra = sorted(expected - names), sorted(names - expected)
        if missing or extra:
            raise IntegrityError(
                f"weights do not match the compiled constants: missing {missing[:3]}, unexpected {extra[:3]}",
                "the weights file belongs to another build; rebuild or download the artifact again",
            )
        for name in sorted(names):
            sl = f.get_slice(name)
            got = [sl.get_dtype(), list(sl.get_shape())]
            want = signature.get(name)
            if want is not None and (_st_dtype(got[0]) != want[0] or got[1] != want[1]):
                raise IntegrityError(
                    f"weight {name} is {_st_dtype(got[0])} {got[1]}, the compiled code expects {want[0]} {want[1]}",
                    "the weights file belongs to another build; rebuild or download the artifact again",
                )


def _st_dtype(code: str) -> str:
    return artifact.SAFETENSORS_DTYPES.get(code, code)


def load(path: str | os.PathLike, *, revision: str | None = None, trust: bool = False, token: str | None = None,
         quant: str | None = None, verify: bool = True, cuda_graphs: bool = False) -> AotModule:
    """Load an artifact folder, or the build of a Hub repo ("owner/name") that fits this machine.

    ``cuda_graphs``: replay the compiled module as CUDA graphs (CUDA artifacts only).

    A repo id needs a pinned ``revision`` (tag or commit) or ``trust=True``: the .pt2 is native code.

    Order matters: manifest → platform check → sha256 of every file → memory estimate → load code →
    check weights against the compiled constants → load constants (zero-copy) → ready.
    """
    from aotpack.artifact.platform import describe

    t0 = time.perf_counter()
    folder = Path(path)
    if not folder.exists() and _looks_like_repo_id(str(path)):
        from aotpack.hub import resolve_for_load

        folder = resolve_for_load(str(path), revision=revision, trust=trust, token=token, quant=quant)
    data = mf.read(folder)
    if cuda_graphs and data["platform"]["device"] != "cuda":
        raise InputError(f"cuda_graphs needs a CUDA artifact; this one runs on {data['platform']['device']}",
                         "leave cuda_graphs out, or build the artifact on a GPU machine")
    here = describe(data["platform"]["device"] if data["platform"]["device"] == "cpu" else None, probe_isa=False)
    mf.check_compatible(data, here)
    if verify:
        artifact.verify_files(folder, data["files"])
    modules = data.get("modules") or {}
    _check_memory(sum(data["files"][m["weights"]]["size"] for m in modules.values())
                  + data["files"][artifact.WEIGHTS]["size"])
    device = data["platform"]["device"]
    module = AotModule(*_load_compiled(folder, artifact.MODEL, artifact.WEIGHTS, device), data, folder)
    if cuda_graphs:
        module._graphs = CudaGraphs(module._compiled)
    if "vae_decoder" in modules:
        m = modules["vae_decoder"]
        module.vae_decoder = AotVaeDecoder(*_load_compiled(folder, m["model"], m["weights"], device), m, data)
    log.info("loaded %s in %.2f s", folder, time.perf_counter() - t0)
    return module


def _load_compiled(folder: Path, model: str, weights_file: str, device: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Load one compiled module and its weights; the weights are checked against its constants first."""
    from safetensors.torch import load_file

    from aotpack.builder.compile import open_package

    compiled = open_package(folder / model)
    _check_constants(compiled, folder / weights_file)
    weights = load_file(str(folder / weights_file), device=device)
    # user_managed: the compiled code reads these tensors in place, no second copy.
    compiled.load_constants(weights, check_full_update=True, user_managed=True)
    return compiled, weights


def assemble(pipe, module, *, remake: bool = False):
    """Put the artifact's modules into ``pipe`` and apply its load-time options; returns the pipeline.

    ``remake``: the pipeline was loaded without its VAE; it is made again from its components, so that what
    its constructor derives from the VAE's config (scale factors, processors) is right."""
    from aotpack.builder.schemes import quantize_named

    data = module.manifest
    options = data.get("options") or {}
    component = data["recipe"]["component"]
    for key, targets in (("quantize_text_encoder", [n for n in pipe.components if n.startswith("text_encoder")]),
                         ("quantize_vae", [] if module.vae_decoder is not None else ["vae"])):
        if options.get(key):
            for target in targets:
                if getattr(pipe, target, None) is not None:
                    quantize_named(getattr(pipe, target), options[key])
    if module.vae_decoder is not None and remake:
        fresh = type(pipe)(**{**pipe.components, component: module, "vae": module.vae_decoder})
        fresh.set_progress_bar_config(disable=True)
        return fresh
    setattr(pipe, component, module)
    if module.vae_decoder is not None:
        pipe.vae = module.vae_decoder
    return pipe


def _looks_like_repo_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not os.path.isabs(text)


def load_into(pipe: Any, path: str | os.PathLike, *, lora: str | os.PathLike | None = None, lora_scale: float = 1.0,
              **kwargs) -> Any:
    """Replace the pipeline's component (e.g. ``pipe.transformer``) with the artifact; returns the pipeline.

    ``lora``: a LoRA .safetensors swapped into the compiled module's weights at ``lora_scale`` (no recompile).
    """
    module = load(path, **kwargs)
    if lora is not None:
        module.swap_lora(lora, lora_scale)
    component = module.manifest["recipe"]["component"]
    if not hasattr(pipe, component):
        raise InputError(f"{type(pipe).__name__} has no component '{component}'",
                         f"this artifact is for a {module.manifest['recipe']['pipeline']}")
    return assemble(pipe, module)
