"""Stream a component's weights from its safetensors files, one weight at a time.

A build never holds the whole component in high precision: the model is made on the meta device, then its
weights are read from disk one by one; each gets its LoRA delta (and, for fused projections, is concatenated)
in high precision, and each linear is quantized before the next is read. Peak memory is the quantized weights
plus one high-precision weight.

The same code makes new weights for a LoRA swap at load time (only the linears the LoRA touches), so the
swapped constants are exactly what a build with that LoRA would have produced.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from aotpack.artifact.files import read_safetensors_header
from aotpack.errors import BuildError, InputError, first_line, one_line

log = logging.getLogger("aotpack")

# Fused projections as data: the fused parameter and the parameters it concatenates (diffusers'
# ``fuse_projections``), so a fused model can be filled straight from an unfused checkpoint.
FUSED = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
}


class _SafetensorsFile:
    """One .safetensors file read tensor by tensor with ``pread`` into fresh memory.

    Not ``safe_open``: its memory map leaves every byte read resident in this process (counted in RSS) until
    the file is closed, which is exactly the peak a weight-by-weight build avoids. Measured on this repo's
    2-core box (AVX-512 VNNI), every tensor of flux-blocks' transformer (2 GB of fp32) read one at a time and
    kept as an int8 copy, page cache warm, fresh process each: ``safe_open`` peak RSS 2752 MiB in 0.2 s, this
    reader 946 MiB in 1.7 s. 1.8 GB less at the peak for 1.5 s per 2 GB read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self.entries = read_safetensors_header(self._fd, os.fstat(self._fd).st_size, path.name, BuildError)
        except BaseException:
            os.close(self._fd)
            raise

    def get(self, key: str) -> Any:
        import torch

        e = self.entries[key]
        buf = bytearray(e.nbytes)
        view, done = memoryview(buf), 0
        while done < e.nbytes:
            got = os.preadv(self._fd, [view[done:]], e.offset + done)
            if got <= 0:
                raise BuildError(f"{self.path.name} ends early", "download the checkpoint again")
            done += got
        dtype = getattr(torch, e.dtype)
        t = torch.frombuffer(buf, dtype=dtype) if e.nbytes else torch.empty(0, dtype=dtype)
        return t.reshape(e.shape)

    def close(self) -> None:
        os.close(self._fd)


class CheckpointReader:
    """Tensors of one component folder's safetensors files, read one at a time (never pickles)."""

    def __init__(self, folder: Path, files: list[str | Path] | None = None) -> None:
        """``files``: the paths to read (default: every .safetensors file of ``folder``), e.g. verified open
        files (/proc/self/fd/N) so that the bytes read are the bytes that were hashed."""
        self.folder = folder
        paths = [Path(p) for p in files] if files is not None else sorted(folder.glob("*.safetensors"))
        if not paths:
            pickled = sorted(p.name for p in folder.glob("*.bin"))
            raise BuildError(
                f"{folder} holds no safetensors weights" + (f" (only pickled {pickled[0]})" if pickled else ""),
                "aotpack reads weights from safetensors only; convert the checkpoint with save_pretrained",
            )
        self._where: dict[str, _SafetensorsFile] = {}
        self._files = []
        try:
            for path in paths:
                self._files.append(_SafetensorsFile(path))
        except BaseException:
            self.close()
            raise
        for f in self._files:
            for key in f.entries:
                self._where[key] = f

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Any:
        return self._where[key].get(key)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# A LoRA scale is a strength: 0-2 in practice, negative to invert a LoRA. Past 100 a delta trained at ~1e-2 is
# larger than the weight itself, and 1e30 overflows every dtype: no output could be meaningful.
MAX_LORA_SCALE = 100.0
_LORA_HINT = "a LoRA holds lora_A [rank, in_features] and lora_B [out_features, rank] per linear: save it again"


def lora_scale(value: Any) -> float:
    """``value`` as a LoRA scale: a finite number with |scale| <= MAX_LORA_SCALE, or InputError."""
    import math

    try:
        scale = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and abs(scale) <= MAX_LORA_SCALE):
        raise InputError(f"LoRA scale {one_line(repr(value), 40)} is not a finite number in "
                         f"[-{MAX_LORA_SCALE:g}, {MAX_LORA_SCALE:g}]",
                         "use a strength like 0.8 or 1.0 (negative inverts the LoRA)")
    return scale


@dataclass
class Lora:
    """A LoRA as per-weight deltas: ``deltas[name]`` is ``(A, B, scaling)`` with W += scale * scaling * B @ A."""

    path: str
    sha256: str
    scale: float
    deltas: dict[str, tuple[Any, Any, float]] = field(default_factory=dict)

    def modules(self) -> set[str]:
        return {k.rsplit(".", 1)[0] for k in self.deltas}

    def apply(self, name: str, weight: Any) -> Any:
        if name not in self.deltas:
            return weight
        import torch

        a, b, scaling = self.deltas[name]
        delta = (b.to(torch.float32) @ a.to(torch.float32)) * (scaling * self.scale)
        if delta.shape != weight.shape:
            raise InputError(f"LoRA for {name} has shape {list(delta.shape)}, the weight is {list(weight.shape)}",
                             "this LoRA was trained for another model")
        out = (weight.to(torch.float32) + delta).to(weight.dtype)
        if not torch.isfinite(out).all():  # finite inputs can still overflow (huge values or alpha, fp16)
            raise InputError(f"LoRA {Path(self.path).name} at scale {self.scale:g} makes {name} overflow "
                             f"{str(weight.dtype).removeprefix('torch.')}", "use a smaller --lora-scale, or "
                             "check the LoRA's values and alphas")
        return out

    def describe(self) -> dict:
        return {"file": Path(self.path).name, "sha256": self.sha256, "scale": self.scale,
                "modules": len(self.modules())}


def lora_file(path: str | os.PathLike) -> Path:
    """``path`` as a LoRA file aotpack reads: an existing ``.safetensors`` file, or one InputError line."""
    file = Path(path)
    if file.is_dir():
        inside = sorted(p.name for p in file.glob("*.safetensors"))[:3]
        raise InputError(f"LoRA {path} is a folder, not a file",
                         f"pass the .safetensors file inside it ({', '.join(inside)})" if inside
                         else "pass the path of a .safetensors LoRA file")
    if not file.is_file():
        raise InputError(f"LoRA file {path} does not exist", "pass the path of a .safetensors LoRA")
    if file.suffix != ".safetensors":
        raise InputError(f"LoRA file {file.name} is not .safetensors",
                         "aotpack never loads pickled weights; convert the LoRA to safetensors")
    return file


def read_lora(path: str, pipeline_cls: Any, component: str, *, scale: float = 1.0) -> Lora:
    """Read a LoRA file (diffusers/PEFT, kohya, xlabs, ... as the pipeline's ``lora_state_dict`` converts them).

    Scaling follows PEFT as diffusers loads it: alpha / rank, alpha from the file's ``.alpha`` entries or its
    metadata, else the first module's rank (diffusers' default). The file is untrusted input: every matrix,
    alpha and metadata value is checked here, each refusal one line naming the key.
    """
    from aotpack.artifact.files import sha256_file

    scale = lora_scale(scale)
    file = lora_file(path)
    state_dict, alphas, metadata = _lora_state_dict(file, pipeline_cls)
    return lora_from_state_dict(state_dict, alphas, metadata, component, path=str(file), sha256=sha256_file(file),
                                scale=scale)


def lora_from_state_dict(state_dict: dict, alphas: dict | None, metadata: Any, component: str, *, path: str,
                         sha256: str, scale: float = 1.0) -> Lora:
    """A LoRA from what a pipeline's ``lora_state_dict`` returns (keys prefixed with the component's name), as
    ``read_lora`` reads a file and as diffusers' ``load_lora_weights`` hands it to the model. ``path`` names it
    in messages and records; every matrix, alpha and metadata value is checked, each refusal one line."""
    scale = lora_scale(scale)
    name = Path(path).name
    meta = _lora_metadata(metadata, component, name)
    prefix = f"{component}."
    others = sorted({k.split(".", 1)[0] for k in state_dict if not k.startswith(prefix)})
    if others:
        raise InputError(f"LoRA {name} also changes {', '.join(others)}; aotpack fuses {component} LoRAs only",
                         f"keep only the {component} keys in the file")
    alphas = {**{k: v for k, v in state_dict.items() if k.endswith(".alpha")}, **(alphas or {})}
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                pairs.setdefault(key[len(prefix):-len(marker)], {})[part] = value
    if not pairs:
        raise InputError(f"LoRA {name} holds no lora_A/lora_B weights", "check the file")
    first_rank = None
    lora = Lora(path=path, sha256=sha256, scale=scale)
    for module, ab in pairs.items():
        rank = _lora_pair(name, module, ab)
        first_rank = first_rank or rank
        key = next((k for k in (f"{prefix}{module}.alpha", f"{module}.alpha") if k in alphas), None)
        if key is not None:
            alpha = _lora_number(alphas[key], f"LoRA {name}: {key}")
        else:
            alpha = meta["alpha_pattern"].get(module, meta.get("lora_alpha", first_rank))
        lora.deltas[f"{module}.weight"] = (ab["lora_A"], ab["lora_B"], alpha / rank)
    return lora


def _lora_state_dict(file: Path, pipeline_cls: Any) -> tuple[dict, dict, Any]:
    """(state dict, alphas, metadata) as the pipeline's ``lora_state_dict`` returns them: in that order, alphas
    only where it takes ``return_alphas``."""
    loader = getattr(pipeline_cls, "lora_state_dict", None)
    if loader is None:
        raise InputError(f"{pipeline_cls.__name__} has no LoRA support in diffusers", "build without a LoRA")
    with_alphas = "return_alphas" in inspect.signature(loader).parameters
    try:
        out = loader(str(file), use_safetensors=True, return_lora_metadata=True,
                     **({"return_alphas": True} if with_alphas else {}))
    except Exception as e:
        raise InputError(f"could not read LoRA {file.name}: {first_line(e)}",
                         "pass a LoRA in a format diffusers reads for this pipeline") from None
    out = list(out) if isinstance(out, tuple) else [out]
    state_dict = out[0] if isinstance(out[0], dict) else {}
    alphas = out[1] if with_alphas and len(out) > 1 else None
    metadata = out[2 if with_alphas else 1] if len(out) > (2 if with_alphas else 1) else None
    return state_dict, alphas if isinstance(alphas, dict) else {}, metadata


def _lora_metadata(metadata: Any, component: str, name: str) -> dict:
    """The component's PEFT metadata: ``lora_alpha`` a number, ``alpha_pattern`` {module: number} (always set).
    diffusers writes it flat with the component as prefix (``transformer.lora_alpha``); PEFT writes it plain."""
    hint = "fix or remove the file's lora_adapter_metadata (save the LoRA again)"
    if isinstance(metadata, dict) and any(str(k).startswith(f"{component}.") for k in metadata):
        metadata = {k.removeprefix(f"{component}."): v for k, v in metadata.items()
                    if str(k).startswith(f"{component}.")}
    meta = metadata.get(component, metadata) if isinstance(metadata, dict) else {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except (ValueError, RecursionError):
            raise InputError(f"LoRA {name} has unreadable metadata", "save the LoRA again") from None
    if not isinstance(meta, dict):
        meta = {}
    meta = dict(meta)
    if meta.get("lora_alpha") is None:
        meta.pop("lora_alpha", None)  # null: the default, as PEFT reads it
    else:
        meta["lora_alpha"] = _lora_number(meta["lora_alpha"], f"LoRA {name}: metadata lora_alpha", hint)
    pattern = meta.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise InputError(f"LoRA {name}: metadata alpha_pattern is a {type(pattern).__name__}, not a table of "
                         "module: alpha", hint)
    meta["alpha_pattern"] = {
        str(k): _lora_number(v, f"LoRA {name}: metadata alpha_pattern[{one_line(repr(k), 60)}]", hint)
        for k, v in pattern.items()}
    return meta


def _lora_number(value: Any, what: str, hint: str = _LORA_HINT) -> float:
    """An alpha: a finite number, or a tensor holding one."""
    import math

    import torch

    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise InputError(f"{what} is a {str(value.dtype).removeprefix('torch.')} tensor of shape "
                             f"{list(value.shape)}, not one number", hint)
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{what} is {one_line(repr(value), 40)}, not a finite number", hint)
    return float(value)


def _lora_pair(name: str, module: str, ab: dict[str, Any]) -> int:
    """Check one module's lora_A [rank, in] and lora_B [out, rank]: matrices of floats, one rank > 0, finite."""
    import torch

    if set(ab) != {"lora_A", "lora_B"}:
        raise InputError(f"LoRA {name}: {module} lacks lora_A or lora_B", "check the file")
    for part, t in ab.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            got = f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}" if isinstance(t, torch.Tensor) else "?"
            raise InputError(f"LoRA {name}: {module}.{part} is {got}, not a 2-D float matrix", _LORA_HINT)
    rank, rank_b = ab["lora_A"].shape[0], ab["lora_B"].shape[1]
    if rank != rank_b:
        raise InputError(f"LoRA {name}: {module} has lora_A of rank {rank} and lora_B of rank {rank_b}", _LORA_HINT)
    if rank == 0:
        raise InputError(f"LoRA {name}: {module} has rank 0 (empty lora_A and lora_B)", _LORA_HINT)
    for part, t in ab.items():
        if not torch.isfinite(t.to(torch.float32)).all():
            raise InputError(f"LoRA {name}: {module}.{part} holds NaN or infinite values",
                             "the LoRA is damaged (a diverged training run?): use another checkpoint of it")
    return rank


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
    (~60 lines: the order of reading, fusing, adding the LoRA and quantizing is what keeps one high-precision
    weight alive at a time, so it stays in one place.)
    """
    import torch

    def value(name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        parent, _, attr = module.rpartition(".")
        if name in reader:
            t = reader.get(name)
        elif attr in FUSED and leaf in ("weight", "bias"):
            parts = [f"{parent}.{p}.{leaf}" if parent else f"{p}.{leaf}" for p in FUSED[attr]]
            t = torch.cat([value(p) for p in parts])
            return t  # each part already carries its LoRA delta
        else:
            raise BuildError(f"the checkpoint has no weight {name}",
                             "the checkpoint does not match the recipe's model class")
        t = t.to(torch.float32 if _keep_fp32(model, name) else dtype)
        return lora.apply(name, t) if lora is not None else t

    def fill(module: Any, base: str) -> None:
        for leaf, param in list(module.named_parameters(recurse=False)):
            t = value(base + leaf).to(device)
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
        # Leaf by leaf: each linear is quantized as soon as it is read, so at most one high-precision
        # weight is alive at a time (fused projections and LoRA deltas are made from the reader per weight).
        for local, module in unit.named_modules():
            base = prefix + (f"{local}." if local else "")
            if _direct(module) and (only is None or base.rstrip(".") in only):
                fill(module, base)
    if lora is not None:
        names = {n for n, _ in model.named_parameters()}
        unknown = sorted(k for k in lora.deltas if k not in names and k.rsplit(".", 1)[0] not in _unfused(model))
        if unknown:
            raise InputError(f"LoRA {Path(lora.path).name} targets weights this model does not have: {unknown[:3]}",
                             "this LoRA was trained for another model")
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
