"""A regional artifact at load: the model's real diffusers class, made on the meta device, whose blocks' forwards
run the compiled code.

The parts outside the blocks get their weights from the artifact (eager, in the model dtype); each block instance
keeps its class and its place in the model, and gets an instance attribute ``forward`` that checks its inputs,
swaps its own constants into the one compiled module of its class and runs it. So what diffusers hooks at block
level (``enable_cache(FirstBlockCacheConfig(...))``, ...) keeps working: enable it after loading.
"""

from __future__ import annotations

import inspect
import threading
import types
from typing import Any, Callable

import torch

from aotpack import _torch_compat as compat
from aotpack.artifact import folds
from aotpack.artifact.manifest import CompiledModule, InputSpec, Manifest
from aotpack.serve import glue as int8
from aotpack.serve.glue import inside
from aotpack.serve.runtime import CudaGraphs, SwapLock
from aotpack.builder.capture import spread_tuples
from aotpack.errors import InputError, IntegrityError, ManifestError, one_line


class SharedCode:
    """One compiled block shared by all instances of its class. A call swaps the instance's constants in (a
    pointer update, ~0.01 ms) and runs, under a lock: the compiled call releases the GIL, and two threads
    swapping into one module would otherwise run with each other's weights (measured: 158 of 300 calls).

    With ``graphs`` (CUDA), each instance gets its own CUDA graphs, captured right after its constants were
    swapped in: a graph keeps the pointers it was captured with, so a replay needs no swap, and a weight swap
    (LoRA) drops them all (``forget``)."""

    def __init__(self, compiled: Any, graphs: bool = False) -> None:
        self.compiled = compiled
        self.current: str | None = None
        self._lock = threading.Lock()
        self._graphs: dict[str, Any] | None = {} if graphs else None

    def _swap(self, instance: str, constants: dict[str, torch.Tensor]) -> None:
        if self.current != instance:
            self.compiled.load_constants(constants, check_full_update=True, user_managed=True)
            self.current = instance

    def run(self, instance: str, constants: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor]) -> list:
        with self._lock:
            if self._graphs is not None:
                graphs = self._graphs.get(instance)
                if graphs is None:
                    graphs = self._graphs[instance] = CudaGraphs(
                        lambda x, i=instance, c=constants: (self._swap(i, c), self.compiled(x))[1])
                return graphs(inputs)
            self._swap(instance, constants)
            return self.compiled(inputs)

    def forget(self) -> None:
        """After a weight swap: the next call loads its constants (and captures its graphs) again."""
        with self._lock:
            self.current = None
            if self._graphs is not None:
                self._graphs.clear()


class CompiledBlock:
    """What a block instance's ``forward`` becomes: the block's own arguments in (positional ones bound by its
    forward's signature, the non-tensor ones checked against those baked in), its own output form out."""

    def __init__(self, code: SharedCode, instance: str, constants: dict[str, torch.Tensor], spec: InputSpec,
                 device: torch.device, hint: Callable[[str], str], signature: inspect.Signature | None = None,
                 output: str = "") -> None:
        self.code, self.instance, self.constants, self.spec = code, instance, constants, spec
        self.device, self.hint, self.signature, self.output = device, hint, signature, output
        self.loaded: dict[str, torch.Tensor] | None = None  # a frozen block: its constants as loaded

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            if self.signature is None:
                raise InputError("a compiled block takes keyword arguments only", "call it as the model does")
            try:
                named = self.signature.bind(*args, **kwargs).arguments
            except TypeError as e:
                raise InputError(f"a compiled block was called with arguments its forward does not take: {e}",
                                 "call it as the model does") from None
            kwargs = dict(named)
        kwargs.pop("return_dict", None)
        for key in ("joint_attention_kwargs", "attention_kwargs"):
            extra = kwargs.pop(key, None)
            if extra and any(k != "scale" or v != 1.0 for k, v in extra.items()):
                raise InputError(f"attention kwargs {sorted(extra)} cannot change compiled code",
                                 "swap a LoRA in with load_into(pipe, artifact, lora=FILE) instead")
        inputs = spread_tuples(kwargs)
        self.spec.check(inputs, self.device, self.hint)
        # AOTInductor code assumes the strides it was exported with: the blocks hand each other slices
        run = {n: inputs[n].contiguous() for n in self.spec.names}
        return shaped(self.code.run(self.instance, self.constants, run), self.output)


def shaped(outs: list, output: str) -> Any:
    """The compiled block's tensors in the form its eager forward returns (``CompiledModule.output``)."""
    if output == "tensor":
        return outs[0]
    if not output:
        return tuple(outs)
    it = iter(outs)
    return tuple(None if part == "none" else next(it) for part in output.split(","))


def build_model(manifest: Manifest, weights: dict[str, dict[str, torch.Tensor]], opened: dict[str, Any],
                constants_of: Callable[[CompiledModule, str], dict[str, torch.Tensor]], device: str,
                hint: Callable[[str], str], *, cuda_graphs: bool = False) -> tuple[Any, dict[str, SharedCode]]:
    """The diffusers model with its blocks running the compiled code; returns it and the shared code by module."""
    from aotpack.builder.weights import skeleton

    component = manifest.recipe.component
    model = skeleton(dict(manifest.model.config), fuse_qkv=manifest.options.fuse_qkv)
    blocks = [m for m in manifest.modules if m.kind == "block"]
    check_instances(manifest, model)
    block_paths = {inst[len(component) + 1:] for m in blocks for inst in m.instances}
    tensors = weights[blocks[0].weights]
    # the linears the build gave int8 weights become int8 linears first: the weights are checked against those
    int8.place(model, manifest.glue_int8, block_paths, getattr(torch, manifest.dtype))
    glue = {k[len(component) + 1:]: tensors[k] for k in glue_keys(manifest, tensors)}
    check_glue(manifest, model, glue)
    missing, unexpected = model.load_state_dict(glue, strict=False, assign=True)
    outside = sorted(k for k in missing if not inside(k, block_paths))
    if unexpected or outside:
        raise IntegrityError(f"weights do not match the model outside its blocks: missing {outside[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}", "rebuild the artifact, or download it again")
    lock = SwapLock()
    codes: dict[str, SharedCode] = {}
    for m in blocks:
        code = codes[m.name] = SharedCode(opened[m.name], graphs=cuda_graphs)
        for instance in m.instances:
            block = model.get_submodule(instance[len(component) + 1:])
            block.forward = CompiledBlock(code, instance, constants_of(m, instance), m.inputs, torch.device(device),
                                          hint, inspect.signature(block.forward), m.output)
            if m.fold:  # what a LoRA swap keeps of a frozen block: the packed constants it does not touch
                block.forward.loaded = dict(block.forward.constants)
            # the weights live in the compiled module's constants now; the block keeps its class, its place and
            # its forward (what diffusers hooks), and no children: an empty nn.Linear would break what walks the
            # model's linears (diffusers' LoRA loader reads every linear's weight before routing to the model)
            for name in [n for n, p in block.named_parameters(recurse=False)]:
                delattr(block, name)
            for name in [n for n, b in block.named_buffers(recurse=False) if b.is_meta]:
                delattr(block, name)
            block._modules.clear()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise IntegrityError(f"the artifact has no weights for {left[:3]}", "rebuild the artifact with this aotpack")
    model.eval()
    model._aotpack_lock = lock
    model.forward = types.MethodType(_locked_forward, model)
    return model, codes


_EDITED = "the manifest was edited or belongs to another model; rebuild the artifact, or download it again"


def check_instances(manifest: Manifest, model: Any) -> None:
    """Every block instance the manifest lists is a module of the model, of the class its code was compiled
    for, and listed once: checked before any weight is placed or compiled code is called."""
    component = manifest.recipe.component
    blocks = [m for m in manifest.modules if m.kind == "block"]
    if not blocks:
        raise ManifestError("a regional manifest lists no compiled block", _EDITED)
    seen: set[str] = set()
    for m in blocks:
        for instance in m.instances:
            path = instance[len(component) + 1:] if instance.startswith(component + ".") else ""
            try:
                block = model.get_submodule(path) if path else None
            except AttributeError:
                block = None
            if block is None or block is model:
                raise ManifestError(f"module {one_line(m.name, 80)} lists instance {one_line(instance, 120)}, which "
                                    f"the {type(model).__name__} does not have", _EDITED)
            if type(block).__name__ != m.block_class:
                raise ManifestError(f"{one_line(instance, 120)} is a {type(block).__name__}, the artifact compiled "
                                    f"a {one_line(str(m.block_class), 80)}", _EDITED)
            if instance in seen:
                raise ManifestError(f"instance {one_line(instance, 120)} is listed twice", _EDITED)
            seen.add(instance)


def check_glue(manifest: Manifest, model: Any, glue: dict[str, torch.Tensor]) -> None:
    """The weights outside the blocks run eager: each must have the shape of the model's tensor and the model's
    dtype (a float64 weight would load, and fail at the first call)."""
    expected = dict(model.state_dict(keep_vars=True))
    dtype = getattr(torch, manifest.dtype, None)
    for name, t in sorted(glue.items()):
        want = expected.get(name)
        if want is None:
            continue  # an unexpected name: the load that follows names it
        want_dtype = dtype if want.is_floating_point() and isinstance(dtype, torch.dtype) else want.dtype
        if tuple(t.shape) != tuple(want.shape) or t.dtype != want_dtype:
            got = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"
            need = f"{str(want_dtype).removeprefix('torch.')} {list(want.shape)}"
            raise IntegrityError(f"weight {manifest.recipe.component}.{one_line(name, 120)} is {got}, the model "
                                 f"expects {need}", "the weights file belongs to another build; rebuild the "
                                 "artifact, or download it again")


def glue_keys(manifest: Manifest, tensors: dict[str, Any]) -> set[str]:
    """The weights of the component that lie outside its compiled blocks (they run eager)."""
    component = manifest.recipe.component
    paths = {inst[len(component) + 1:] for m in manifest.modules if m.kind == "block" for inst in m.instances}
    return {k for k in tensors if k.startswith(component + ".") and not inside(k[len(component) + 1:], paths)}


def _locked_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The model's own forward, as one call that a LoRA swap never splits."""
    with self._aotpack_lock.call():
        return type(self).forward(self, *args, **kwargs)


def apply_weights(model: Any, codes: dict[str, SharedCode], keys: dict[str, torch.Tensor]) -> None:
    """Point every block instance, and the eager parts, at the weights ``keys`` (a LoRA swap or its undo).
    The caller holds the model's swap lock: no call is running."""
    manifest = model.manifest
    component = manifest.recipe.component
    blocks = [m for m in manifest.modules if m.kind == "block"]
    new = {}  # every instance's first, then assigned: a replay that fails leaves the model as it was
    for m in blocks:
        fqns = compat.weight_fqns(codes[m.name].compiled)
        for instance in m.instances:
            block = model.get_submodule(instance[len(component) + 1:])
            # a frozen block replays the folds whose weights ``keys`` changes and keeps the rest as loaded
            new[instance] = (block, folds.swapped(m, instance, fqns, keys, model._aotpack_keys, block.forward.loaded))
    for block, constants in new.values():
        block.forward.constants = constants
    for m in blocks:
        codes[m.name].forget()
    model.load_state_dict({k[len(component) + 1:]: keys[k] for k in glue_keys(manifest, keys)}, strict=False,
                          assign=True)
