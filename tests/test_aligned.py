"""Weights reach compiled kernels 64-byte aligned (aotpack/artifact/aligned.py).

The crash this guards against: a bf16 int8wo artifact died with SIGSEGV at its first call on an AVX512-BF16 CPU
(AMD EPYC), in aten's ``_weight_int8pack_mm``, on an aligned 16-byte load of an int8 weight mapped from a
safetensors file at an address 8 mod 16 (safetensors aligns to 8 only). tests/test_regional_dtypes.py builds that
artifact (it crashed there before this file's writer); here the writer and the loader's copy are checked alone."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from aotpack.artifact.aligned import ALIGN, aligned, save_aligned
from aotpack.artifact.formats import read_safetensors_header


def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randint(-127, 127, (192, 32), dtype=torch.int8, generator=g),     # 6144 B: aligned
        "b.scale": torch.rand(192, generator=g),                                            # 768 B: aligned
        "c.bias": torch.rand(7, generator=g).to(torch.bfloat16),                           # 14 B: odd size
        "d.w": torch.rand(64, 64, generator=g).to(torch.bfloat16),                         # aligned
        "e.flag": torch.tensor(True),                                                      # 0-d
        "f.empty": torch.empty(0, 3),
        "g.fp8": torch.rand(16, 4, generator=g).to(torch.float8_e4m3fn),                   # 64 B
        "h.t": torch.rand(8, 16, generator=g).t(),                                         # not contiguous
    }


def test_the_file_is_safetensors_and_every_64_byte_sized_tensor_starts_aligned(tmp_path):
    tensors = sample()
    path = tmp_path / "w.safetensors"
    save_aligned(tensors, path)
    loaded = load_file(str(path))  # safetensors' own reader, mapping the file
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else loaded[name],
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t), name
        if t.numel() and (t.numel() * t.element_size()) % ALIGN == 0:
            assert loaded[name].data_ptr() % ALIGN == 0, name
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert (8 + length) % ALIGN == 0 and json.loads(raw[8:8 + length])  # padded with spaces, still JSON
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
    fd = os.open(path, os.O_RDONLY)
    try:  # aotpack's own header check, what a load runs before mapping
        assert set(read_safetensors_header(fd, len(raw), "w.safetensors")) == set(tensors)
    finally:
        os.close(fd)


def test_the_loader_copies_only_what_is_not_aligned(tmp_path):
    path = tmp_path / "w.safetensors"
    save_aligned(sample(), path)
    mapped = load_file(str(path))
    out = aligned(mapped)
    for name, t in out.items():
        assert not t.numel() or t.data_ptr() % ALIGN == 0, name
        assert torch.equal(t.float(), mapped[name].float())
        if mapped[name].numel() and mapped[name].data_ptr() % ALIGN == 0:
            assert t.data_ptr() == mapped[name].data_ptr()  # aligned already: the mapping itself, no copy
    assert any(mapped[n].data_ptr() % ALIGN for n in mapped if mapped[n].numel())  # the odd-sized one was copied


def test_a_tensor_safetensors_cannot_store_is_refused(tmp_path):
    with pytest.raises(ValueError, match="complex128"):
        save_aligned({"x": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "w.safetensors")
    save_aligned({"x": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")  # rotary tables (Qwen-Image)
    assert torch.equal(load_file(str(tmp_path / "c.safetensors"))["x"], torch.ones(2, dtype=torch.complex64))
