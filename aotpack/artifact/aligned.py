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
