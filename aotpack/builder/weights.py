"""Stream a component's weights from its safetensors files, one weight at a time.

A build never holds the whole component in high precision: the model is made on the meta device, then its
weights are read from disk one by one; each gets its LoRA delta (and, for fused projections, is concatenated)
in high precision, and each linear is quantized before the next is read. Peak memory is the quantized weights
plus one high-precision weight.

The same code makes new weights for a LoRA swap at load time (only the linears the LoRA touches), so the
swapped constants are exactly what a build with that LoRA would have produced.

Here: the meta skeleton, ``materialize`` and ``Streamed``. The reader (``checkpoint``) and the LoRA deltas
(``lora``) are beside this module; their names are re-exported here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator

from aotpack.builder.checkpoint import CheckpointReader
from aotpack.builder.lora import MAX_LORA_SCALE, Lora, lora_file, lora_from_state_dict, lora_scale, read_lora
from aotpack.errors import BuildError, InputError

__all__ = [
    "FUSED", "Streamed", "materialize", "skeleton", "touched_modules", "units",
    # re-exported: checkpoint, lora
    "CheckpointReader", "Lora", "MAX_LORA_SCALE", "lora_file", "lora_from_state_dict", "lora_scale", "read_lora",
]

log = logging.getLogger("aotpack")

# Fused projections as data: the fused parameter and the parameters it concatenates (diffusers'
# ``fuse_projections``), so a fused model can be filled straight from an unfused checkpoint.
FUSED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


def skeleton(config: dict, *, fuse_qkv: bool = False) -> Any:
    """The component built from its config on the meta device (buffers are real: they are not all saved)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if cls is None:
        raise BuildError(f"diffusers has no model class {config.get('_class_name')!r}", "upgrade diffusers")
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    if fuse_qkv:
        if not hasattr(model, "fuse_qkv_projections"):
            raise InputError(f"{cls.__name__} cannot fuse its attention projections", "build without --fuse-qkv")
        model.fuse_qkv_projections()  # on meta: only the structure (and the attention processors) change
    return model.eval()


def units(model: Any) -> Iterator[tuple[str, Any]]:
    """(prefix, module) for each unit streamed at once: every block of a ModuleList, every other child. The
    root's own parameters (Wan's, LTX's and Sana's ``scale_shift_table``) are not a unit: ``materialize`` fills
    them under the name ``""`` and ``Streamed`` keeps them (they are small)."""
    import torch

    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, block in enumerate(child):
                yield f"{name}.{i}.", block
        else:
            yield f"{name}.", child


def _direct(module: Any) -> bool:
    """Whether ``module`` holds parameters or buffers of its own (not only in its children)."""
    return any(True for _ in module.named_parameters(recurse=False)) or \
        any(True for _ in module.named_buffers(recurse=False))


def _keep_fp32(model: Any, name: str) -> bool:
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    return any(k in name.split(".") for k in keep)


def _value(model: Any, reader: CheckpointReader, name: str, *, dtype: Any, lora: Lora | None) -> Any:
    """The weight ``name`` in high precision with its LoRA delta: read, or concatenated from the parts of a
    fused projection (each part carrying its own delta)."""
    import torch

    module, _, leaf = name.rpartition(".")
    parent, _, attr = module.rpartition(".")
    if name in reader:
        t = reader.get(name)
    elif attr in FUSED and leaf in ("weight", "bias"):
        parts = [f"{parent}.{p}.{leaf}" if parent else f"{p}.{leaf}" for p in FUSED[attr]]
        t = torch.cat([_value(model, reader, p, dtype=dtype, lora=lora) for p in parts])
        return t  # each part already carries its LoRA delta
    else:
        raise BuildError(f"the checkpoint has no weight {name}",
                         "the checkpoint does not match the recipe's model class")
    t = t.to(torch.float32 if _keep_fp32(model, name) else dtype)
    return lora.apply(name, t) if lora is not None else t


def _check_lora_targets(model: Any, lora: Lora) -> None:
    """Refuse a LoRA that names weights the model lacks (neither its own nor inside a fused projection)."""
    names = {n for n, _ in model.named_parameters()}
    unknown = sorted(k for k in lora.deltas if k not in names and k.rsplit(".", 1)[0] not in _unfused(model))
    if unknown:
        raise InputError(f"LoRA {Path(lora.path).name} targets weights this model does not have: {unknown[:3]}",
                         "this LoRA was trained for another model")


def materialize(
    model: Any,
    reader: CheckpointReader,
    *,
    dtype: Any,
    device: str,
    quantize_unit: Callable[[str, Any], None] | None = None,  # (name, nn.Linear) once the linear is filled
    lora: Lora | None = None,
    only: set[str] | None = None,
) -> list[str]:
    """Fill ``model``'s meta parameters from ``reader``, quantizing each linear as soon as it is read.

    ``only``: names of the modules to fill (a LoRA swap); the others stay on meta. Returns the modules filled.
    The order of reading, fusing, adding the LoRA and quantizing is what keeps one high-precision weight alive
    at a time, so it stays in this one function (reading a weight is ``_value``).
    """
    import torch

    def fill(module: Any, base: str) -> None:
        for leaf, param in list(module.named_parameters(recurse=False)):
            t = _value(model, reader, base + leaf, dtype=dtype, lora=lora).to(device)
            if t.shape != param.shape:
                raise BuildError(f"checkpoint weight {base + leaf} is {list(t.shape)}, the model expects "
                                 f"{list(param.shape)}", "the checkpoint does not match its config")
            setattr(module, leaf, torch.nn.Parameter(t, requires_grad=False))
        for leaf, buf in list(module.named_buffers(recurse=False)):
            if base + leaf in reader:
                buf = reader.get(base + leaf)
            if buf.is_floating_point() and not _keep_fp32(model, base + leaf):
                buf = buf.to(dtype)
            setattr(module, leaf, buf.to(device))
        if quantize_unit is not None and isinstance(module, torch.nn.Linear):
            quantize_unit(base.rstrip("."), module)
        done.append(base.rstrip("."))

    done: list[str] = []
    if _direct(model) and (only is None or "" in only):  # the root's own parameters
        fill(model, "")
    for prefix, unit in units(model):
        root = prefix.rstrip(".")
        if only is not None and not any(n == root or n.startswith(prefix) for n in only):
            continue  # none of this unit is asked for: not even its modules are looked at
        # Leaf by leaf: each linear is quantized as soon as it is read, so at most one high-precision
        # weight is alive at a time (fused projections and LoRA deltas are made from the reader per weight).
        for local, module in unit.named_modules():
            base = prefix + (f"{local}." if local else "")
            if _direct(module) and (only is None or base.rstrip(".") in only):
                fill(module, base)
    if lora is not None:
        _check_lora_targets(model, lora)
    return done


class Streamed:
    """A model that reads its weights unit by unit as it runs: a forward pre-hook fills a unit (a block, or
    another child) from the checkpoint just before it runs, a forward hook puts it back on meta after. The
    full-precision reference of a build costs one unit of memory, not the whole model (at the price of reading
    the weights again at each forward, from the page cache)."""

    def __init__(self, model: Any, reader: CheckpointReader, *, dtype: Any, device: str, lora: Lora | None) -> None:
        self.model, self.reader = model, reader
        self._fill_args = {"dtype": dtype, "device": device, "lora": lora}
        self._handles = []
        if _direct(model):  # the root's own parameters stay filled: no hook runs before the root's forward
            materialize(model, reader, only={""}, **self._fill_args)
        for prefix, unit in units(model):
            names = {prefix + n if n else prefix.rstrip(".") for n, _ in unit.named_modules()}
            names = {n.rstrip(".") for n in names}
            self._handles.append(unit.register_forward_pre_hook(lambda m, a, names=names: self._fill(names)))
            self._handles.append(unit.register_forward_hook(lambda m, a, o: self._empty(m)))

    def _fill(self, names: set[str]) -> None:
        materialize(self.model, self.reader, only=names, **self._fill_args)

    @staticmethod
    def _empty(unit: Any) -> None:
        import torch

        for module in unit.modules():
            for leaf, p in list(module.named_parameters(recurse=False)):
                setattr(module, leaf, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                         requires_grad=False))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self.reader.close()


def _unfused(model: Any) -> set[str]:
    """Module names whose weights live on inside a fused projection."""
    out = set()
    for name, module in model.named_modules():
        for fused, parts in FUSED.items():
            if getattr(module, fused, None) is not None:
                out.update(f"{name}.{p}" if name else p for p in parts)
    return out


def touched_modules(model: Any, lora: Lora) -> set[str]:
    """The modules whose weights a LoRA changes: its targets, or the fused projections that hold them."""
    names = dict(model.named_modules())
    out = set()
    for key in lora.deltas:
        module = key.rsplit(".", 1)[0]
        parent, _, attr = module.rpartition(".")
        fused = [f"{parent}.{f}" if parent else f for f, parts in FUSED.items()
                 if attr in parts and getattr(names.get(parent), f, None) is not None]
        if module not in names and not fused:
            raise InputError(f"LoRA {Path(lora.path).name} targets {key}, which this model does not have",
                             "this LoRA was trained for another model")
        out.update(fused or [module])
    return out
