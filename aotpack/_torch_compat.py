"""Every private torch / torchao surface aotpack touches, fenced in one file.

Each function here has a test in tests/test_torch_compat.py that compares it with the public path (or checks
the private contract it relies on), so that a torch upgrade which changes one of them fails a test rather than
a user. Nothing else in aotpack imports ``torch._*`` or writes a module's ``_parameters``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("aotpack")

# gcc's names for the few x86 features whose /proc/cpuinfo flag is spelled differently
_CPUINFO_ALIASES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16"}


# ---- AOTInductor ------------------------------------------------------------------------------------------------

def aoti_compile_and_package(ep: Any, path: Path, configs: dict[str, Any]) -> Path:
    """``torch._inductor.aoti_compile_and_package``: the documented entry point, under a private namespace."""
    import torch._inductor

    return Path(torch._inductor.aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs))


# AOTInductor names a constant it computed from weights (a permuted bias, ...) with this prefix; with
# RUNTIME_FOLDING it is computed again from the weights loaded, at the next call (load_constants marks it stale)
FOLDED_PREFIX = "_FOLDED_CONST_"
RUNTIME_FOLDING = "aot_inductor.use_runtime_constant_folding"


def weight_fqns(compiled: Any) -> list[str]:
    """The constants a compiled package takes from its weights: ``get_constant_fqns()`` without the ones it
    folds itself (those are never loaded, and ``load_constants(check_full_update=True)`` does not ask for them)."""
    return [f for f in compiled.get_constant_fqns() if not f.startswith(FOLDED_PREFIX)]


def input_names(compiled: Any) -> list[str] | None:
    """The names of the dict a compiled package takes, in the order its code reads them (its exported input spec:
    the runner feeds a dict's values in the dict's own order, so a call in another order feeds wrong tensors);
    ``None`` when the package takes no single dict (not an aotpack package)."""
    import json

    try:
        spec = json.loads(compiled.loader.get_call_spec()[0])[1]
        first = spec["children_spec"][0]["children_spec"][0]  # (args, kwargs) -> args -> the one dict
        if first.get("type") != "builtins.dict":
            return None
        names = json.loads(first["context"])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def preload() -> None:
    """Import what ``open_package`` needs (a serving process has it imported before it loads: the bench counts
    that as process start, not load time)."""
    from torch.export.pt2_archive import _package  # noqa: F401


def open_package(path: str | Path, *, single_threaded: bool = False) -> Any:
    """Open a .pt2's compiled model (no constants yet: they come from the weights file).

    Like ``torch._inductor.aoti_load_package``, minus its device-information check, which only logs a warning
    and to get there has inductor compile and run CPU-ISA test programs: 1 s on a warm compiler cache and
    6 s on a cold one, the dominant cost of a cold start. aotpack checks the platform from the manifest
    before it opens the package. If the private loader is gone or its signature changed, the public loader
    is used and a warning says so (the load is then slower, never wrong). ``single_threaded``: the runner
    for CUDA graph capture (the default one queries a CUDA event on every call, which capture forbids).
    Either loader extracts the package into a folder of ours (``_extracting``): nothing is left behind.
    """
    try:
        import torch
        from torch.export.pt2_archive._package import AOTICompiledModel

        make = torch._C._aoti.AOTIModelPackageLoader
        # (package path, model name, run single threaded, number of runners, device index)
        return _extracting(lambda: AOTICompiledModel(make(str(path), "model", single_threaded, 1, -1)))
    except (ImportError, AttributeError, TypeError) as e:
        log.warning("torch's AOTInductor package loader changed (%s: %s); using the public loader",
                    type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
    import torch._inductor

    return _extracting(lambda: torch._inductor.aoti_load_package(str(path), run_single_threaded=single_threaded))


_EXTRACT_LOCK = threading.Lock()


def _extracting(open_model: Callable[[], Any]) -> Any:
    """Run torch's package loader with TMPDIR pointing at a fresh folder of ours, and remove that folder when
    the load fails or the model is gone. The loader (C++) extracts the package into a ``mkdtemp`` folder of
    TMPDIR that only its destructor removes: a package that fails to load (a bad library, a missing file)
    leaves it behind, and the folder cannot be told from a concurrent load's by its name. Inside our own
    folder it needs no name: everything there is this load's. The lock keeps concurrent loads of this process
    from swapping TMPDIR under one another; Python's own temp folder is chosen (and cached) before it changes."""
    import shutil
    import tempfile
    import weakref

    box = tempfile.mkdtemp(prefix="aotpack-load-")  # mode 0700, made by this process
    try:
        with _EXTRACT_LOCK:
            before = os.environ.get("TMPDIR")
            os.environ["TMPDIR"] = box
            try:
                model = open_model()
            finally:
                if before is None:
                    os.environ.pop("TMPDIR", None)
                else:
                    os.environ["TMPDIR"] = before
    except BaseException:
        shutil.rmtree(box, ignore_errors=True)
        raise
    # the loader reads its extracted files (CUDA kernels) while the model lives; the folder goes with it
    weakref.finalize(model, shutil.rmtree, box, True)
    return model


# ---- CPU ISAs ---------------------------------------------------------------------------------------------------

def _isa_name(isa: Any) -> str:
    # inductor's str() of an ISA lists the base and its extensions ('avx512 avx512_vnni'); the last word
    # names the class uniquely and makes a plain folder name.
    return str(isa).split()[-1]


def pick_isa() -> str:
    """The vector ISA inductor generates code for on this CPU ('avx512_vnni', 'avx2', ..., 'none').
    Runs inductor's probe, which compiles test programs: seconds on a cold compiler cache (builds only)."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return _isa_name(isa) if isa else "none"


def supported_isas() -> list[str]:
    """The ISAs inductor finds usable here (runs its probe)."""
    from torch._inductor import cpu_vec_isa

    return [_isa_name(i) for i in cpu_vec_isa.valid_vec_isa_list()] + ["none"]


def isa_cpu_flags() -> dict[str, set[str]]:
    """{ISA name: the /proc/cpuinfo flags its code needs}, for inductor's x86 ISAs, derived from the compiler
    flags inductor builds each with (``-mavx512f -mavx512vnni ...``). No probe: a load checks these flags."""
    from torch._inductor import cpu_vec_isa

    out = {}
    for isa in cpu_vec_isa.supported_vec_isa_list:
        flags = str(getattr(isa, "_arch_flags", "") or "").split()
        need = {_CPUINFO_ALIASES.get(f[2:].replace("-", "_"), f[2:].replace("-", "_"))
                for f in flags if f.startswith("-m")}
        if need and all(f.startswith(("avx", "amx", "fma", "f16c")) for f in need):
            out[_isa_name(isa)] = need
    return out


def packs_bf16() -> bool:
    """Whether oneDNN packs and multiplies bf16 here (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT). Inductor's freezing packs bf16 linear weights only where it does; elsewhere (AVX2) a frozen
    bf16 build's folds are transposes, and replaying a packing step fails."""
    import torch

    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# ---- torchao --------------------------------------------------------------------------------------------------------

def torchao_u8s8() -> bool:
    """Whether torchao traces int8dq's CPU matmul as u8 x s8 with a column-sum compensation (VNNI without AMX,
    ``torchao.kernel.intmm._int_scaled_matmul_cpu``), else as s8 x s8: a frozen int8dq build folds those sums."""
    from torchao.kernel import intmm
    from torchao.utils import torch_version_at_least

    return (not intmm._cpu_is_amx_tile_supported() and intmm._cpu_is_vnni_supported()
            and torch_version_at_least("2.12.0.dev"))


def unwrap_tensor_subclass(module: Any) -> Any:
    """torchao tensor subclasses -> plain tensors plus parametrizations, so that export sees plain tensors and
    the state dict holds exactly the compiled constants (``torchao.utils.unwrap_tensor_subclass``)."""
    from torchao.utils import unwrap_tensor_subclass as unwrap

    return unwrap(module)


# ---- eager kernels ----------------------------------------------------------------------------------------------

# ``aten._weight_int8pack_mm`` (the CPU kernel of int8 weight-only matmuls) read past its weight and crashed the
# process (SIGSEGV, torch 2.13 CPU) for inner sizes that are not a multiple of 8 (100 and 257 crashed, 8 ... 4096
# in steps of 8 ran): aotpack asks for a multiple of 64, which every large linear of a diffusers model is.
INT8_MM_MULTIPLE = 64


def int8_weight_mm(x: Any, weight: Any, scales: Any) -> Any:
    """``x @ (weight * scales[:, None]).T`` for a 2-D ``x`` (bf16, fp16 or fp32), an int8 ``weight`` [N, K] and
    per-row ``scales`` [N] in ``x``'s dtype: ``aten._weight_int8pack_mm``, which reads the int8 weight as it is
    (a quarter of fp32's bytes) instead of widening it first."""
    import torch

    if weight.dtype != torch.int8 or weight.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"int8_weight_mm takes x [M, K] and an int8 weight [N, K], got {tuple(x.shape)} and "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if weight.shape[1] % INT8_MM_MULTIPLE:
        raise ValueError(f"int8_weight_mm needs an inner size that is a multiple of {INT8_MM_MULTIPLE}, got "
                         f"{weight.shape[1]}")
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight.contiguous(), scales.to(x.dtype).contiguous())


# ---- inductor's freezing: the constants it folds from weights, as steps over the weights' names ----------------

class Unrecordable(Exception):
    """A folded constant whose computation cannot be written down as steps over named weights."""


@contextlib.contextmanager
def recording_folds() -> Iterator[dict[str, Any]]:
    """While compiling with ``freezing``: {constant name: recipe} for every constant inductor's freezing computes
    from the weights (``_frozen_paramN``: a transposed weight, q/k/v weights concatenated, oneDNN's packed layout).
    A recipe is the format ``aotpack.artifact.folds`` reads: ``{"steps": [[op, args, kwargs], ...], "dtype",
    "shape", "stride", "layout"}``, the last step the constant; an argument ``{"w": name}`` is a weight by its
    constant name, ``{"s": i}`` step i's result, ``{"dtype": d}`` a dtype. A constant folded through anything
    else is ``Unrecordable`` (its recipe is that exception): a build that needs it refuses. Private: wraps ``torch._inductor.constant_folding.replace_node_with_constant``, which
    every fold of inductor's ``constant_fold`` calls with the node it replaces, still in its graph. The patch is
    process-wide and not re-entrant: one compile at a time (a build compiles one module after another)."""
    import torch._inductor.constant_folding as folding
    import torch._inductor.freezing as freezing

    folds: dict[str, Any] = {}
    original, lifted = folding.replace_node_with_constant, freezing.replace_node_with_constant

    def recording(gm, node, constant=None, name=None):
        try:
            recipe: Any = _recipe(gm, node, constant, folds)
        except Unrecordable as e:
            recipe = e
        label = node.name
        original(gm, node, constant, name)
        new = next((n for n in gm.graph.nodes if n.name == label and n.op in ("get_attr", "placeholder")), None)
        if new is not None:
            folds[str(new.target)] = recipe

    def params(gm, node, constant=None, name=None):  # aot_autograd lifted weights: no name to refer to
        lifted(gm, node, constant, name)
        new = next((n for n in gm.graph.nodes if n.name == node.name), None)
        if new is not None:
            folds[str(new.target)] = Unrecordable(f"a weight inductor took as a graph input ({node.name})")

    folding.replace_node_with_constant, freezing.replace_node_with_constant = recording, params
    try:
        yield folds
    finally:
        folding.replace_node_with_constant, freezing.replace_node_with_constant = original, lifted


def _recipe(gm: Any, node: Any, constant: Any, folds: dict[str, Any]) -> dict[str, Any]:
    import torch

    if not isinstance(constant, torch.Tensor):
        raise Unrecordable(f"{node.name} folds to no tensor")
    steps: list[list] = []
    done: dict[Any, dict] = {}

    def ref(n: Any) -> dict:
        if n in done:
            return done[n]
        if n.op == "get_attr":
            earlier = folds.get(str(n.target))
            if isinstance(earlier, Unrecordable):
                raise earlier
            if earlier is None:
                out = {"w": str(n.target)}
            else:  # a constant folded before: its steps, renumbered
                base = len(steps)
                steps.extend([op, _renumber(a, base), {key: _renumber(v, base) for key, v in k.items()}]
                             for op, a, k in earlier["steps"])
                out = {"s": len(steps) - 1}
        elif n.op == "call_function" and isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            args, kwargs = _arg(n.args, ref), {str(k): _arg(v, ref) for k, v in n.kwargs.items()}
            steps.append([_op_name(n.target), args, kwargs])
            out = {"s": len(steps) - 1}
        else:
            raise Unrecordable(f"{node.name} folds through {n.op} {n.target}")
        done[n] = out
        return out

    ref(node)
    packed = constant.is_mkldnn
    return {"steps": steps, "dtype": str(constant.dtype).removeprefix("torch."), "shape": list(constant.shape),
            "stride": None if packed else list(constant.stride()), "layout": "mkldnn" if packed else "strided"}


def _op_name(op: Any) -> str:
    """``aten.permute.default`` for ``torch.ops.aten.permute.default``; a packet of one overload (inductor's
    freezing calls ``torch.ops.mkldnn._reorder_linear_weight``) by that overload."""
    import torch

    if isinstance(op, torch._ops.OpOverloadPacket):
        if op.overloads() != ["default"]:
            raise Unrecordable(f"a folded constant calls {op} with overloads {op.overloads()}")
        op = op.default
    return f"{op.namespace}.{op._schema.name.split('::', 1)[1]}.{op._overloadname}"


def _arg(a: Any, ref: Callable[[Any], dict]) -> Any:
    import torch

    if isinstance(a, torch.fx.Node):
        return ref(a)
    if isinstance(a, (list, tuple)):
        return [_arg(x, ref) for x in a]
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    raise Unrecordable(f"a folded constant takes {type(a).__name__} {a!r:.40}")


def _renumber(a: Any, base: int) -> Any:
    """An argument of an earlier fold's step, its step references moved by ``base`` (its steps now follow others)."""
    if isinstance(a, dict):
        return {"s": a["s"] + base} if set(a) == {"s"} else a
    if isinstance(a, list):
        return [_renumber(x, base) for x in a]
    return a
