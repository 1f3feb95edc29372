"""The compiled CPU code shares out the threads of the box it runs on: not the build box's thread count, not the
capture's batch (aotpack/builder/compile.py, CPU_THREADING)."""

from __future__ import annotations

import zipfile

import pytest
import torch

from aotpack import _torch_compat as compat
from aotpack.builder.compile import compile_package, compiler_settings


class Modulated(torch.nn.Module):
    """A per-sample modulation over (batch, tokens, hidden): the shape of a diffusion block's adaLN glue, whose
    kernel keeps the batch and token loops apart."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x * (1 + scale[:, None, :]) + scale[:, None, :])


def _kernel_source(package) -> str:
    with zipfile.ZipFile(package) as z:
        return "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".cpp"))


@pytest.mark.slow  # one small AOTInductor compile
def test_cpu_kernels_share_the_threads_of_the_box_they_run_on(tmp_path):
    batch, seq = torch.export.Dim("batch", min=1, max=4), torch.export.Dim("seq", min=2, max=1024)
    x, scale = torch.randn(2, 512, 256), torch.randn(2, 256)  # captured at batch 2, as recipes capture
    ep = torch.export.export(Modulated(), (x, scale), dynamic_shapes=({0: batch, 1: seq}, {0: batch}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a build whose thread count is not its core count (a container, OMP_NUM_THREADS)
    try:
        package = compile_package(ep, tmp_path / "m.pt2", compiler_settings({}))
    finally:
        torch.set_num_threads(before)
    source = _kernel_source(package)
    assert "omp parallel" in source
    assert "num_threads(" not in source  # no thread count of the build box baked in
    assert "collapse(2)" in source  # batch and token loops shared together: a batch-1 request uses every thread
    compiled = compat.open_package(package)
    x1, s1 = torch.randn(1, 40, 256), torch.randn(1, 256)  # a batch-1 request on all of this box's threads
    out = compiled(x1, s1)
    assert torch.allclose(out, Modulated()(x1, s1), atol=1e-5)


class FlexAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v)


@pytest.mark.slow  # one small AOTInductor compile
def test_cpu_code_with_buffers_sized_for_a_thread_count_is_refused(tmp_path):
    """Inductor's C++ flex-attention template allocates scratch for `cpp.threads` threads and indexes it by the
    run-time thread number: with the threads left to the serving process, a bigger box would write past it."""
    from aotpack.errors import BuildError

    q = torch.randn(1, 2, 128, 64)
    ep = torch.export.export(FlexAttention(), (q, q, q))
    with pytest.raises(BuildError, match="sizes per-thread buffers for 64 threads") as e:
        compile_package(ep, tmp_path / "m.pt2", compiler_settings({}))
    assert "set_attention_backend('native')" in e.value.hint


def test_gpu_builds_leave_inductor_threading_alone():
    assert "cpp.threads" in compiler_settings({}) and "cpp.threads" not in compiler_settings({}, cpu=False)
