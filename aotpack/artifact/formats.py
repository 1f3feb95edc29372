"""The two formats an artifact's files come in, checked before anything maps or unpacks them: a .safetensors
header (``read_safetensors_header``: bounds, dtypes, sizes, no overlap) and a .pt2 zip (``check_package``: no
entry outside its folder, no link, no zip bomb, no CPU code whose buffers are sized for a thread count).
``aotpack.artifact.files`` re-exports every name here.
"""

from __future__ import annotations

import json
import os
import re
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from aotpack.errors import IntegrityError, one_line

# safetensors header dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_MAX_HEADER = 100 << 20

# Inductor's C++ templates (CPU flex attention; max-autotune's GEMM templates) allocate per-thread scratch for the
# thread count they were compiled for and index it by the thread number at run time: a process with more threads
# writes past it. Their code declares that count as `int64_t num_thread = 64;` (`num_threads = N;` in the GEMMs).
THREAD_SIZED = re.compile(rb"\bnum_threads? = \d+;")


def thread_sized(z: zipfile.ZipFile) -> str | None:
    """The name of the first C++ file in the package ``z`` that holds thread-sized buffers, or None."""
    for n in z.namelist():
        if n.endswith(".cpp") and b"num_thread" in (code := z.read(n)) and THREAD_SIZED.search(code):
            return n  # (the substring first: the pattern alone took 3.3 ms over flux-blocks' 0.5 MB of C++)
    return None


@dataclass(frozen=True)
class TensorEntry:
    dtype: str          # torch dtype name
    shape: tuple[int, ...]
    offset: int         # from the start of the file
    nbytes: int


def read_safetensors_header(fd: int, size: int, name: str, error: type = IntegrityError) -> dict[str, TensorEntry]:
    """The tensors a .safetensors file declares, checked before anything maps it: a header length inside the
    file, known dtypes, offsets inside the data and not overlapping, and sizes that match the shapes."""
    head = os.pread(fd, 8, 0)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER):
        raise error(f"{name} is not a safetensors file", "download or save it again")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (ValueError, RecursionError):
        raise error(f"{name} has a broken safetensors header", "download or save it again") from None
    if not isinstance(header, dict):
        raise error(f"{name} has a broken safetensors header", "download or save it again")
    header.pop("__metadata__", None)
    data = size - 8 - n
    out: dict[str, TensorEntry] = {}
    spans = []
    for key, e in header.items():
        ok = isinstance(e, dict) and e.get("dtype") in SAFETENSORS_DTYPES and isinstance(e.get("shape"), list) \
            and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list) \
            and len(e["data_offsets"]) == 2 and all(type(v) is int for v in e["data_offsets"])
        if ok:
            lo, hi = e["data_offsets"]
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            count = 1
            for d in e["shape"]:
                count *= d
            ok = 0 <= lo <= hi <= data and hi - lo == count * _ITEMSIZE[dtype]
        if not ok:
            raise error(f"{name}: tensor {one_line(str(key), 80)} is out of bounds, of an unknown dtype or of the "
                        "wrong size", "download or save it again")
        out[key] = TensorEntry(dtype, tuple(e["shape"]), 8 + n + lo, hi - lo)
        spans.append((lo, hi, key))
    spans.sort()
    for (lo1, hi1, k1), (lo2, hi2, k2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise error(f"{name}: tensors {one_line(str(k1), 60)} and {one_line(str(k2), 60)} overlap",
                        "download or save it again")
    return out


def check_package(path: Path, name: str) -> None:
    """A .pt2 is a zip the loader extracts: no absolute or '..' entry names, no links, a total size that is not
    far beyond the archive's own (AOTInductor stores its files uncompressed; a zip bomb is refused), and no C++
    code with buffers sized for a thread count (``thread_sized``: an older build's, or anyone's)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            total = 0
            for info in z.infolist():
                parts = info.filename.replace("\\", "/").split("/")
                if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                    raise IntegrityError(f"{name} holds an entry named {one_line(info.filename, 80)!r} outside "
                                         "its folder", "do not load this artifact")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise IntegrityError(f"{name} holds a link ({one_line(info.filename, 80)})",
                                         "do not load this artifact")
                total += info.file_size
            if total <= 2 * size + (16 << 20) and (held := thread_sized(z)):  # read only what is not a bomb
                raise IntegrityError(f"{name} holds CPU code with per-thread buffers sized for a fixed thread count "
                                     f"({one_line(held, 80)}: inductor's C++ flex-attention or GEMM template): a "
                                     "process with more threads would write past them",
                                     "rebuild it with SDPA attention (diffusers: "
                                     "model.set_attention_backend('native'))")
    except zipfile.BadZipFile:
        raise IntegrityError(f"{name} is not an AOTInductor package (not a zip)", "do not load this artifact") from None
    if total > 2 * size + (16 << 20):
        raise IntegrityError(f"{name} would unpack to {total >> 20} MiB from {size >> 20} MiB (a zip bomb?)",
                             "do not load this artifact")
