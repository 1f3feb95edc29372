"""The CUDA path: the artifact in the real FluxPipeline against eager diffusers, CUDA-graph replay, a LoRA swap
under CUDA graphs, fp8's capability check, GPU memory.

Skipped by capability: no CUDA, no test; the fp8 tests need sm89+ (or, for the refusal, a GPU below it).
scripts/gpu_check.py runs these on a lent GPU (``pytest -m gpu tests/test_gpu.py``) with GPU_CHECK_ARTIFACTS
set to the folder of its tiny-flux builds (``tiny-flux-SCHEME-DTYPE``), which the tests then use instead of
building their own; without it, or for one that is missing there, they build it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CUDA = torch.cuda.is_available()
CAP = torch.cuda.get_device_capability() if CUDA else (0, 0)
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
requires_sm89 = pytest.mark.skipif(CAP < (8, 9), reason="fp8 needs a CUDA GPU of sm89 or newer")
below_sm89 = pytest.mark.skipif(not CUDA or CAP >= (8, 9), reason="needs a CUDA GPU older than sm89")
MAX_SEQ = tomllib.loads((REPO / "recipes" / "tiny-flux.toml").read_text())["shapes"]["max_sequence_length"]
ULP = 2.0 ** -8  # bf16: the graph replays the plain call's kernels, so at most 1 ulp of the output's scale


def built(artifacts, scheme: str, dtype: str) -> Path:
    """tiny-flux in ``scheme`` and ``dtype``: scripts/gpu_check.py's build when it left one, else built here."""
    from aotpack.artifact.files import is_artifact

    shared = Path(os.environ.get("GPU_CHECK_ARTIFACTS", "/nonexistent")) / f"tiny-flux-{scheme}-{dtype}"
    return shared if is_artifact(shared) else artifacts(scheme, dtype=dtype)


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """tiny-flux's pipeline with a wider transformer (hidden 256, 2 + 2 blocks, ~14 MB in bf16): big enough
    that holding its weights twice shows against the allocator's rounding."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from aotpack.builder.tiny import ensure_builtin

    pipe = FluxPipeline.from_pretrained(ensure_builtin("tiny-flux"))
    torch.manual_seed(0)
    pipe.register_modules(transformer=FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[8, 28, 28],
        guidance_embeds=True))
    folder = tmp_path_factory.mktemp("wide-flux")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide(artifacts, wide_folder):
    return artifacts("none", model=str(wide_folder), dtype="bfloat16")


@pytest.fixture(scope="module")
def wide_lora(wide_folder, tmp_path_factory):
    from aotpack.builder.tiny import random_lora

    return random_lora(wide_folder / "transformer", tmp_path_factory.mktemp("lora") / "wide.safetensors")


def captured_inputs(module, folder) -> dict:
    """What the real FluxPipeline passes its transformer (one step at 64x64), captured with a hook."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, transformer=None, dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer = module
    seen: dict = {}
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        pipe("a dog surfing on the moon", height=64, width=64, num_inference_steps=1, max_sequence_length=MAX_SEQ,
             output_type="latent", generator=torch.Generator("cpu").manual_seed(0))
    handle.remove()
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in seen.items()}


def out(module, kwargs) -> torch.Tensor:
    with torch.no_grad():
        return module(**{**kwargs, "return_dict": False})[0].float()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _replay_matches_plain(path, folder) -> None:
    import aotpack

    plain, graphs = aotpack.load(path), aotpack.load(path, cuda_graphs=True)
    kw = captured_inputs(plain, folder)
    want = out(plain, kw)
    tol = ULP * float(want.abs().max())
    first, again = out(graphs, kw), out(graphs, kw)  # the first call captures, the second replays
    assert diff(first, want) <= tol and diff(again, want) <= tol, (diff(first, want), diff(again, want), tol)
    kw2 = {**kw, "hidden_states": kw["hidden_states"] * 0.5 + 0.25}  # same shapes, other values
    want2 = out(plain, kw2)
    assert diff(want2, want) > 10 * tol  # the new values matter ...
    assert diff(out(graphs, kw2), want2) <= tol  # ... and the replay reads them from its static buffers


def latents_tolerance(dtype: str, scheme: str, *, scale: float, rounding: float) -> float:
    """Max |diff| of final latents allowed between the artifact and eager diffusers with the same scheme.

    ``scale``: max |latents| of eager; ``rounding``: max |diff| between eager in ``dtype`` and in float32 (the
    dtype's own error; 0 for float32). Compiled code rounds elsewhere than eager but not worse, so within 3x that;
    at least 8 ulps (bf16) or 256 ulps (fp32: reordered long sums) of the scale. Dynamic activation quantization
    can move an activation across one quantization step (1/127 of a row's max in int8, 2^-4 relative in fp8)."""
    ulps = {"float32": 256 * 2.0 ** -23, "bfloat16": 8 * 2.0 ** -8}[dtype]
    factor, step = {"int8dq": (2.0, 2 / 127), "fp8dqrow": (4.0, 2.0 ** -4)}.get(scheme, (1.0, 0.0))
    return max(max(3 * rounding, ulps * scale) * factor, step * scale)


@requires_cuda
@pytest.mark.parametrize("scheme, dtype", [("none", "bfloat16"), ("int8wo", "bfloat16"), ("int8dq", "bfloat16"),
                                           pytest.param("fp8dqrow", "bfloat16", marks=requires_sm89),
                                           ("none", "float32")])
def test_the_artifact_in_the_pipeline_matches_eager_diffusers(artifacts, scheme, dtype):
    """Final latents of the real FluxPipeline (3 steps at 96x64, not the export's size): the artifact against
    eager diffusers with the same torchao scheme (aotpack's own scheme -> config mapping)."""
    import aotpack
    from diffusers import FluxPipeline

    from aotpack.builder.schemes import quantize_named
    from aotpack.builder.tiny import ensure_builtin

    def pipeline(dt):
        pipe = FluxPipeline.from_pretrained(ensure_builtin("tiny-flux"), dtype=dt).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(pipe) -> torch.Tensor:
        with torch.no_grad():
            return pipe("a dog surfing on the moon", height=96, width=64, num_inference_steps=3, guidance_scale=3.5,
                        max_sequence_length=MAX_SEQ, output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(1)).images.float().cpu()

    pipe = pipeline(getattr(torch, dtype))
    eager = call(pipe)
    rounding = 0.0 if dtype == "float32" else diff(eager, call(pipeline(torch.float32)))
    quantize_named(pipe.transformer, scheme)
    eager_q = call(pipe)
    got = call(aotpack.load_into(pipe, built(artifacts, scheme, dtype)))
    tol = latents_tolerance(dtype, scheme, scale=float(eager.abs().max()), rounding=rounding)
    assert diff(got, eager_q) <= tol, (diff(got, eager_q), tol, rounding)


@requires_cuda
def test_cuda_graph_replay_matches_the_plain_compiled_call(wide, wide_folder):
    _replay_matches_plain(wide, wide_folder)


@requires_cuda
def test_lora_swap_under_cuda_graphs_matches_the_plain_module(wide, wide_folder, wide_lora):
    import aotpack

    plain, graphs = aotpack.load(wide), aotpack.load(wide, cuda_graphs=True)
    kw = captured_inputs(plain, wide_folder)
    before = out(graphs, kw)  # a graph captured with the artifact's own weights
    plain.swap_lora(wide_lora, 0.8)
    graphs.swap_lora(wide_lora, 0.8)
    want, got = out(plain, kw), out(graphs, kw)
    tol = ULP * float(want.abs().max())
    assert diff(got, want) <= tol, (diff(got, want), tol)
    assert diff(got, before) > 10 * tol  # recaptured with the new weights, not the old graph replayed


@requires_cuda
def test_memory_after_load_is_the_weights_once(wide):
    import aotpack

    weights = sum(p.stat().st_size for p in wide.glob("*.safetensors"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    module = aotpack.load(wide)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    held = torch.cuda.memory_allocated() - before
    # safetensors headers and the allocator's 512-byte rounding: well under 2 MiB here; twice would be +14 MB
    assert 0.9 * weights <= held <= peak <= 1.15 * weights + (2 << 20), (held, peak, weights)
    del module


@below_sm89
def test_fp8_is_refused_below_sm89_with_a_clear_error(tmp_path):
    import aotpack

    with pytest.raises(aotpack.AotpackError, match=r"fp8dqrow needs CUDA sm89\+, this GPU is sm\d+") as e:
        aotpack.build("tiny-flux", "fp8dqrow", dtype="bfloat16", out=tmp_path / "fp8")
    assert "int8dq" in e.value.hint
    assert not (tmp_path / "fp8").exists()


@requires_sm89
def test_fp8_artifact_replays_under_cuda_graphs(artifacts):
    from aotpack.builder.tiny import ensure_builtin

    _replay_matches_plain(built(artifacts, "fp8dqrow", "bfloat16"), ensure_builtin("tiny-flux"))
