"""Weights whose bytes start on 64-byte boundaries, as compiled kernels expect of the tensors they are handed.

A loaded artifact hands its compiled code tensors mapped straight from the weights file (no copy). torch's own
allocator returns 64-byte aligned memory, and some kernels rely on it: aten's ``_weight_int8pack_mm`` (what
inductor lowers a bf16 int8 weight-only linear to) reads the int8 weight with aligned 16-byte loads on AVX-512,
and dies with SIGSEGV on a weight at an address 8 mod 16 (measured on an AMD EPYC with AVX512-BF16: every
bf16 int8wo artifact crashed at its first call). safetensors' own writer aligns tensors to 8 bytes only, and its
format allows no holes between tensors. So ``save_aligned`` writes the same format with the header padded (JSON
allows trailing spaces; safetensors pads the same way) so that the data starts on a 64-byte boundary, and the
tensors whose sizes are multiples of 64 first: each of those starts aligned. ``aligned`` copies, at load, the few
tensors that still do not (odd sizes at the end; files written before), so a kernel never sees one.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any, Mapping

from aotpack.artifact.formats import SAFETENSORS_DTYPES

log = logging.getLogger("aotpack")
ALIGN = 64
_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()} | {"complex64": "C64"}  # rotary tables


def save_aligned(tensors: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``tensors`` as a safetensors file (any safetensors reader loads it) in which every tensor whose size
    is a multiple of 64 bytes starts on a 64-byte boundary of the file; the data starts on one."""
    import torch

    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGN != 0, k))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _CODES:
            raise ValueError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        header[name] = {"dtype": _CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                f.write(memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def aligned(tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` with every CPU tensor that does not start on a 64-byte boundary replaced by an aligned copy
    (torch's allocator aligns to 64); the others, mapped from the file, stay as they are (no copy)."""
    moved = 0
    out = {}
    for name, t in tensors.items():
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % ALIGN:
            t = t.clone()
            moved += t.nbytes
        out[name] = t
    if moved:
        log.debug("copied %.1f MiB of weights to 64-byte aligned memory", moved / 2**20)
    return out


# ---- letting go of the pages of weights nothing reads any more ---------------------------------------------------

_MADV_DONTNEED = 4  # Linux


def _span(t: Any) -> tuple[int, int]:
    """The bytes [start, end) a CPU tensor reads (a view: from its first to its last element)."""
    if not t.numel():
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _file_mappings() -> list[tuple[int, int]]:
    """This process's mappings of files ([start, end) from /proc/self/maps: those with an inode)."""
    out = []
    try:
        lines = open("/proc/self/maps").read().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[4] != "0":
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def release_mapped(dropped: list[Any], live: list[Any]) -> int:
    """Hand back to the kernel the pages of ``dropped`` tensors (weights mapped from a weights file that nothing
    reads any more: a frozen artifact's plain weights once packed) that hold no byte of a ``live`` tensor
    (``madvise(MADV_DONTNEED)``: a clean page of a file mapping leaves this process's RSS and stays in the page
    cache; read again, it is mapped again from the file). Only pages inside file mappings: anonymous memory (an
    aligned copy) is freed with its tensor, and this would zero it. Returns the bytes released (0 off Linux)."""
    import ctypes
    import mmap
    import sys

    import torch

    if not sys.platform.startswith("linux") or not dropped:
        return 0
    page = mmap.PAGESIZE
    # a oneDNN-packed constant owns its memory (a copy), and a GPU or meta tensor maps no file page
    dropped, live = ([t for t in ts if t.device.type == "cpu" and t.layout == torch.strided] for ts in (dropped, live))
    busy = _merged([(s // page * page, -(-e // page) * page) for s, e in map(_span, live) if e > s])
    files = _file_mappings()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for t in dropped:
        start, end = _span(t)
        for lo, hi in _free_pieces(-(-start // page) * page, end // page * page, busy):
            for flo, fhi in files:
                a, b = max(lo, flo), min(hi, fhi)
                if b > a and libc.madvise(a, b - a, _MADV_DONTNEED) == 0:
                    released += b - a
    return released


def _free_pieces(lo: int, hi: int, busy: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) less the ``busy`` ranges (disjoint, sorted)."""
    import bisect

    pieces = []
    for s, e in busy[max(0, bisect.bisect_right(busy, (lo, lo)) - 1):]:
        if s >= hi:
            break
        if e <= lo:
            continue
        if s > lo:
            pieces.append((lo, s))
        lo = max(lo, e)
    if hi > lo:
        pieces.append((lo, hi))
    return pieces


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out
