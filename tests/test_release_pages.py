"""A frozen artifact's plain weights, once packed, leave the process's memory (issue 21: the weights not held
twice): ``aligned.release_mapped`` hands their mapped pages back, never a page a live tensor reads, never
anonymous memory."""

from __future__ import annotations

import sys

import pytest
import torch

from aotpack.artifact.aligned import release_mapped

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc: Linux")
MIB = 2**20


def _rss_file() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile")


def test_t42_released_pages_leave_rss_and_read_back_the_same(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    data = {"a": torch.randn(8 * MIB // 4, generator=g), "b": torch.randn(8 * MIB // 4, generator=g),
            "c": torch.randn(1000, generator=g)}
    save_file(data, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(mapped[k], data[k]) for k in data)  # every page read: resident
    before = _rss_file()
    released = release_mapped([mapped["a"], mapped["c"]], [mapped["b"], mapped["a"][-3:]])
    # "a" less its last page (a live view reads it) and the page it may share with "b"; "c" shares its pages
    assert 8 * MIB - 3 * 4096 <= released <= 8 * MIB, released
    assert before - _rss_file() >= released - 64 * 1024
    assert all(torch.equal(mapped[k], data[k]) for k in data)  # read again from the file, unchanged


def test_t42_anonymous_memory_is_never_released():
    t = torch.arange(4 * MIB // 4, dtype=torch.float32)
    assert release_mapped([t, t[::2], torch.empty(0)], []) == 0
    assert torch.equal(t, torch.arange(4 * MIB // 4, dtype=torch.float32))
