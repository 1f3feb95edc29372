"""AOTInductor: compile an ExportedProgram into a .pt2 that holds code only (weights stay outside).

Compiled code depends on the graph, the shapes, the compiler settings and the platform, not on the weights'
values: equal compile keys, interchangeable .pt2 files. A build takes the .pt2 of an earlier compile with its
key instead of compiling, from ``--reuse DIR`` or ``AOTPACK_CACHE/compiled/`` — native code, so each source is
hash-checked as it is copied into the build's private folder, and only that copy is ever opened.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import logging
import shutil
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from aotpack import _torch_compat as compat
from aotpack.artifact.files import VerifiedFiles, thread_sized
from aotpack.artifact.manifest import FileEntry
from aotpack.artifact.platform import Platform, tag
from aotpack.errors import BuildError, IntegrityError, first_line
from aotpack.paths import cache_dir, seal, unseal, write_atomic

log = logging.getLogger("aotpack")
CONSTANTS_KEY = "aotpack.constants"   # .pt2 metadata: {constant: [dtype, shape]}, checked before weights load

# CPU kernels that share out the threads of the box they RUN on, not of the box that built them. Inductor's C++
# code otherwise hard-codes `num_threads(N)` when the build's torch thread count differs from its core count (a
# container, OMP_NUM_THREADS), and it chooses how many loops each kernel parallelizes from the build's thread count
# and the capture's sizes: built on 2 cores at capture batch 2, a kernel over (batch, tokens, hidden) shared only
# the batch loop, so a batch-1 request ran it on one thread (measured, flux-blocks int8dq bf16 at 256x256 on 2
# cores: layer-norm kernels 2x torch.compile's, the forward 1.07x; with these settings 1.00-1.02x). `threads` is
# the count the parallel-depth choice plans for (loops are shared until they give 64 or 128 chunks, or until a
# chunk would be under 512 elements); at run time OpenMP uses the threads the process has. Inductor's C++ templates
# (CPU flex attention; the GEMM templates of max-autotune, refused on CPU) size per-thread scratch by `threads` and
# index it by the run-time thread number: `compile_package` refuses code that holds one, and so does every load
# (``aotpack.artifact.formats.thread_sized``).
CPU_THREADING: dict[str, Any] = {"cpp.dynamic_threads": True, "cpp.threads": 64}


@dataclass(frozen=True)
class Reusable:
    """A compiled .pt2 another artifact holds, with the size and sha256 its manifest recorded when the build
    started; it is hashed again as it is copied (a swap in between is caught)."""

    folder: Path
    code: str
    entry: FileEntry


def compiler_settings(metadata: dict[str, str], *, max_autotune: bool = False, cpu: bool = True,
                      freeze: bool = False) -> dict[str, Any]:
    """The inductor configs of an aotpack compile: weights outside the .so, aotpack's metadata inside; on a CPU the
    kernels' threads left to the serving process (``CPU_THREADING``); ``freeze``: inductor's freezing
    (``compile_frozen``)."""
    configs: dict[str, Any] = {
        # Weights outside the .so: loaded once from safetensors and never held twice.
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.metadata": metadata,
        **(CPU_THREADING if cpu else {}),
    }
    if max_autotune:
        configs["max_autotune"] = True
    if freeze:
        # every constant stays a constant: inductor otherwise writes a 0-d or <= 8-element one (a folded bias) into
        # the code as literal values, which a LoRA swap or another artifact's weights could not change
        configs.update({"freezing": True, "always_keep_tensor_constants": True})
    return configs


def compile_package(ep: Any, path: Path, configs: dict[str, Any]) -> Path:
    """Compile ``ep`` to ``path`` with ``configs``; refused when its CPU code sizes buffers by a thread count."""
    try:
        package = compat.aoti_compile_and_package(ep, path, configs)
    except Exception as e:
        raise BuildError(f"AOTInductor compile failed: {type(e).__name__}: {first_line(e)}",
                         "set AOTPACK_DEBUG=1 for the full trace") from e
    with zipfile.ZipFile(package) as z:
        if thread_sized(z):
            raise BuildError(f"the compiled CPU code sizes per-thread buffers for {configs.get('cpp.threads', 'the')} "
                             "threads (inductor's C++ flex-attention template): a serving process with more threads "
                             "would write past them", "use the model's SDPA attention (diffusers: "
                             "model.set_attention_backend('native')) for a CPU build")
    return package


def compile_frozen(ep: Any, path: Path, configs: dict[str, Any]) -> dict[str, Any]:
    """``compile_package`` with inductor's freezing; returns what it folded ({constant: recipe or Unrecordable},
    ``compat.recording_folds``). Inductor freezes only under ``no_grad``. The recipes are recorded while it
    compiles, so a frozen build always compiles: the compile cache and ``--reuse`` hand over code only."""
    with torch.no_grad(), compat.recording_folds() as folds:
        compile_package(ep, path, configs)
    return dict(folds)


def frozen_constants(ep: Any, fqns: list[str], folds: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(fold: {folded constant: recipe}, the weights the artifact stores) of frozen code that expects ``fqns``:
    the weights it takes as they are and those its folded constants are computed from. Refused when freezing
    computed a constant it did not let aotpack record, or left a weight out of both: the code then holds that
    weight's value (its compile key, its LoRA swaps and ``--reuse`` assume code independent of the weights)."""
    from aotpack.artifact import folds as folding

    state = {**ep.state_dict, **ep.constants}
    fold: dict[str, Any] = {}
    for name in (f for f in fqns if f not in state):
        recipe = folds.get(name)
        bad = [str(recipe or "not recorded")] if not isinstance(recipe, dict) else folding.problems({name: recipe})
        if bad:
            raise BuildError(f"freezing computed constant {name} in a way aotpack cannot replay at load: "
                             f"{first_line(bad[0])}", "leave --freeze out")
        fold[name] = recipe
    stored = folding.stored(fqns, fold)
    unknown = [n for n in stored if n not in state]
    inlined = sorted(set(state) - set(stored) - unread(ep))
    if unknown or inlined:
        what = f"reads {unknown[0]}, which the export does not hold" if unknown else \
            f"put {len(inlined)} weights into the compiled code ({inlined[0]}, ...)"
        raise BuildError(f"freezing {what}", "leave --freeze out")
    return fold, stored


def unread(ep: Any) -> set[str]:
    """The weights ``ep``'s graph takes but never reads (int8dq's zero points: its activations are symmetric), which
    frozen code leaves out of its constants: not stored, and not a sign of weights folded into the code."""
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    return {names[n.name] for n in ep.graph.nodes if n.op == "placeholder" and n.name in names and not n.users}


def compile_key(ep: Any, configs: dict[str, Any], platform: Platform) -> str:
    """What the compiled code depends on: the exported graph and its signature, its inputs' strides, the dynamic
    ranges, the constants' names, dtypes and shapes (not their values), the compiler settings exactly as passed,
    torch, and the platform the build targets."""
    parts = [
        ep.graph_module.code,
        str(ep.graph_signature),
        # the compiled code assumes the strides its inputs were exported with and checks none
        repr([(n.name, tuple(str(s) for s in n.meta["val"].stride())) for n in ep.graph.nodes
              if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.Tensor)]),
        repr(sorted((str(k), str(v)) for k, v in ep.range_constraints.items())),
        constants_signature({**ep.state_dict, **ep.constants}),
        json.dumps(configs, sort_keys=True, default=str),
        torch.__version__,
        tag(platform),
    ]
    return hashlib.sha256("\n\0".join(parts).encode()).hexdigest()


def _cache_paths(key: str) -> tuple[Path, Path]:
    folder = cache_dir() / "compiled"
    return folder / f"{key}.pt2", folder / f"{key}.json"


def _from_cache(key: str, path: Path) -> bool:
    """Copy the cache entry of ``key`` to ``path`` if its sealed record vouches for its bytes; an entry without a
    valid record, or whose bytes differ from it, is removed (it was planted or damaged)."""
    code, record = _cache_paths(key)
    if not code.is_file():
        return False
    try:
        entry = unseal("compiled", record.read_bytes()) if record.is_file() else None
    except OSError:
        entry = None
    if not (isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("size"), int)
            and isinstance(entry.get("sha256"), str)):
        log.warning("compile cache: %s has no valid record; removed", code.name)
        _drop(code, record)
        return False
    try:
        _copy_verified(code.parent, code.name, FileEntry(size=entry["size"], sha256=entry["sha256"]), path)
    except IntegrityError:
        log.warning("compile cache: %s does not match its record; removed", code.name)
        path.unlink(missing_ok=True)
        _drop(code, record)
        return False
    return True


def _drop(*paths: Path) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass


def _copy_verified(folder: Path, name: str, entry: FileEntry, dest: Path) -> None:
    """Copy ``folder/name`` to ``dest``, hashing the bytes as they are copied; IntegrityError if they differ."""
    with VerifiedFiles(folder, {name: entry}) as vf:
        shutil.move(vf.code(name), dest)


def _to_cache(key: str, path: Path) -> None:
    code, record = _cache_paths(key)
    try:
        data = path.read_bytes()
        write_atomic(record, seal("compiled", {"key": key, "size": len(data),
                                               "sha256": hashlib.sha256(data).hexdigest()}))
        write_atomic(code, data)
    except OSError:  # a full or read-only cache only costs the next compile
        pass


def compile_cached(ep: Any, path: Path, *, configs: dict[str, Any], platform: Platform,
                   reuse: dict[str, Reusable] | None = None) -> tuple[str, str]:
    """``compile_package`` unless an identical compile exists; returns (key, where the code came from)."""
    key = compile_key(ep, configs, platform)
    given = (reuse or {}).get(key)
    if given is not None:
        try:
            _copy_verified(given.folder, given.code, given.entry, path)
        except IntegrityError as e:
            raise BuildError(f"--reuse {given.folder}: {e.cause}",
                             "the folder changed since the build started; build again without --reuse") from None
        return key, f"reused from {given.folder}"
    if _from_cache(key, path):
        return key, "compile cache"
    compile_package(ep, path, configs)
    _to_cache(key, path)
    return key, "compiled"


def constants_signature(tensors: dict[str, Any]) -> str:
    """JSON {name: [dtype, shape]} of the compiled constants; stored in the .pt2 and checked at load."""
    return json.dumps({k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in sorted(tensors.items())},
                      separators=(",", ":"))


def constant_values(ep: Any, fqns: list[str]) -> dict[str, Any]:
    """The tensor for each constant the compiled code expects, from the ExportedProgram."""
    sources = {**ep.state_dict, **ep.constants}
    missing = [n for n in fqns if n not in sources]
    if missing:
        raise BuildError(f"compiled code expects constants the export does not hold: {', '.join(missing[:5])}",
                         "this model is not supported yet; set AOTPACK_DEBUG=1 and report it")
    out, seen = {}, set()
    for name in fqns:
        t = sources[name].detach()
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in seen:
            t = t.contiguous().clone()  # safetensors refuses shared or strided storage
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# ---- a crash in compiled code names its module ------------------------------------------------------------------

_CALLERS: dict[str, Callable[[Callable[[], Any]], Any]] = {}


@contextlib.contextmanager
def crash_report() -> Iterator[None]:
    """Python's faulthandler on (all threads, to the process's stderr) for the duration, as it was after: a
    fatal signal in native code (SIGSEGV in AOTInductor code) prints the Python stack before the process dies,
    and a ``named_call`` frame in it names the module that crashed."""
    if faulthandler.is_enabled():  # python -X faulthandler, pytest: already on, and theirs to turn off
        yield
        return
    try:
        faulthandler.enable(file=2, all_threads=True)
    except (OSError, ValueError, RuntimeError):  # no usable stderr: nothing could be printed anyway
        yield
        return
    try:
        yield
    finally:
        faulthandler.disable()


def _first_call(fn: Callable[[], Any]) -> Any:
    return fn()


def named_call(what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, called from a frame whose file name says ``what``: faulthandler's dump of a crash inside
    ``fn`` shows ``File "<aotpack: crashed in compiled WHAT>"``, one line naming the module."""
    caller = _CALLERS.get(what)
    if caller is None:
        label = "".join(c if c.isprintable() and c not in '"\\' else "?" for c in what)[:200]
        code = _first_call.__code__.replace(co_filename=f"<aotpack: crashed in compiled {label}>")
        caller = _CALLERS[what] = types.FunctionType(code, globals(), "first_call")
    return caller(fn)
