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


def _resident(path) -> int:
    """Bytes of ``path``'s mappings resident in this process (/proc/self/smaps): nothing else moves it."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's first line
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1]) * 1024
    return total


def test_t42_released_pages_leave_rss_and_read_back_the_same(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    data = {"a": torch.randn(8 * MIB // 4, generator=g), "b": torch.randn(8 * MIB // 4, generator=g),
            "c": torch.randn(1000, generator=g)}
    save_file(data, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(mapped[k], data[k]) for k in data)  # every page read: resident
    before = _resident(tmp_path / "w.safetensors")
    assert before >= 16 * MIB
    released = release_mapped([mapped["a"], mapped["c"]], [mapped["b"], mapped["a"][-3:]])
    # "a" less its last page (a live view reads it) and the page it may share with "b"; "c" shares its pages
    assert 8 * MIB - 3 * 4096 <= released <= 8 * MIB, released
    assert before - _resident(tmp_path / "w.safetensors") == released
    assert all(torch.equal(mapped[k], data[k]) for k in data)  # read again from the file, unchanged


def test_t42_anonymous_memory_is_never_released():
    t = torch.arange(4 * MIB // 4, dtype=torch.float32)
    assert release_mapped([t, t[::2], torch.empty(0)], []) == 0
    assert torch.equal(t, torch.arange(4 * MIB // 4, dtype=torch.float32))


def test_t42_a_released_page_read_again_after_the_file_is_swapped_is_the_verified_one(tmp_path):
    """An attacker who renames other bytes over the weights file after the load: a released page comes back from
    the file the process mapped (the old inode), never from the new one."""
    import os

    from safetensors.torch import load_file, save_file

    data = {"a": torch.full((4 * MIB // 4,), 1.5), "b": torch.full((4 * MIB // 4,), 2.5)}
    path = tmp_path / "w.safetensors"
    save_file(data, path)
    mapped = load_file(path)
    assert torch.equal(mapped["a"], data["a"])
    assert release_mapped([mapped["a"]], [mapped["b"]]) > 0
    save_file({k: -v for k, v in data.items()}, tmp_path / "evil.safetensors")
    os.replace(tmp_path / "evil.safetensors", path)
    assert torch.equal(mapped["a"], data["a"]) and torch.equal(mapped["b"], data["b"])


def test_t42_a_frozen_model_keeps_its_outputs_when_its_weights_file_is_swapped_after_load(artifacts, tmp_path):
    """A frozen artifact loaded (its plain weights' pages handed back), then its weights file replaced by rename
    with other bytes: the loaded model runs as before, and a new load refuses the folder."""
    import os

    from safetensors.torch import load_file, save_file
    from test_trust import flux_inputs

    import aotpack
    from aotpack.artifact.files import WEIGHTS
    from aotpack.errors import IntegrityError

    path = artifacts.copy("none", tmp_path / "a", dtype="bfloat16", freeze=True, regional=False)
    module = aotpack.load(path, trusted_keys=[])
    bf16 = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "txt_ids", "img_ids"}
    x = {k: v.to(torch.bfloat16) if k in bf16 else v for k, v in flux_inputs(module).items()}
    with torch.no_grad():
        before = module(**x, return_dict=False)[0]
        evil = {k: (v.float() * -1).to(v.dtype) if v.is_floating_point() else v
                for k, v in load_file(path / WEIGHTS).items()}
        save_file(evil, tmp_path / "evil.safetensors")
        os.replace(tmp_path / "evil.safetensors", path / WEIGHTS)
        assert torch.equal(module(**x, return_dict=False)[0], before)
    with pytest.raises(IntegrityError):
        aotpack.load(path, trusted_keys=[])
