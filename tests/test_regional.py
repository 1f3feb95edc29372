"""Regional builds (each repeated block class compiled once) and the diffusers idioms a loaded artifact must
fit: the real model class, DiffusionPipeline.from_pretrained(..., transformer=...), enable_cache, LoRA swaps,
a text length below the recipe's maximum."""

from __future__ import annotations

import pytest
import torch

import aotpack
from aotpack.artifact import manifest as mf
from aotpack.errors import InputError

from conftest import run_cli
from test_variants import fresh_check

pytestmark = pytest.mark.slow


def _blocks(model):
    return list(model.transformer_blocks) + list(model.single_transformer_blocks)


def test_regional_tiny_flux_is_the_real_class_and_matches_eager(artifacts):
    from diffusers import FluxTransformer2DModel

    path = artifacts("int8wo", regional=True)
    m = mf.read(path)
    assert m.options.regional and [x.kind for x in m.modules] == ["block", "block"]
    assert {x.block_class for x in m.modules} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    assert sorted(f for f in m.files if f.endswith(".pt2")) == ["FluxSingleTransformerBlock.pt2",
                                                                 "FluxTransformerBlock.pt2"]
    assert all(x.max_abs_error <= x.tolerance for x in m.modules)
    model = aotpack.load(path)
    assert type(model) is FluxTransformer2DModel and model.manifest == m
    assert not any(p.is_meta for p in model.parameters())
    result = fresh_check(path, "int8wo")  # the real pipeline, against eager diffusers with its blocks quantized
    assert result["vs_eager_same_scheme"] <= 1e-3, result
    assert result["vs_eager_unquantized"] > result["vs_eager_same_scheme"], result
    res = run_cli("inspect", str(path))
    assert "FluxSingleTransformerBlock (block)" in res.stdout and "transformer.single_transformer_blocks.0" in res.stdout


def test_first_block_cache_on_compiled_blocks_matches_eager_and_skips_blocks(artifacts):
    from diffusers import FluxPipeline
    from diffusers.hooks import FirstBlockCacheConfig

    from aotpack.builder.schemes import quantize_named
    from aotpack.builder.tiny import ensure_builtin

    folder = ensure_builtin("tiny-flux")
    model = aotpack.load(artifacts("int8wo", regional=True))
    pipe = FluxPipeline.from_pretrained(folder, transformer=model)
    eager = FluxPipeline.from_pretrained(folder)
    for p in (pipe, eager):
        p.set_progress_bar_config(disable=True)
    for block in _blocks(eager.transformer):
        quantize_named(block, "int8wo")
    calls = []
    for block in _blocks(model):  # count the compiled blocks' calls (installed before the cache, as a user would)
        inner = block.forward
        block.forward = lambda *a, _inner=inner, **k: (calls.append(1), _inner(*a, **k))[1]

    def latents(p):
        return p("a dog", height=64, width=64, num_inference_steps=8, output_type="latent", max_sequence_length=24,
                 generator=torch.Generator().manual_seed(0)).images

    plain = latents(pipe)
    assert len(calls) == 16 and float((plain - latents(eager)).abs().max()) <= 1e-3
    calls.clear()
    for p in (model, eager.transformer):
        p.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    cached, cached_eager = latents(pipe), latents(eager)
    assert len(calls) < 16, len(calls)  # blocks were skipped
    assert float((cached - cached_eager).abs().max()) <= 1e-3
    assert float((cached - plain).abs().max()) > 1e-3  # the cache really changed the computation


@pytest.mark.parametrize("regional", [False, True])
def test_diffusion_pipeline_from_pretrained_takes_the_artifact(artifacts, regional):
    """The usual way to hand a pipeline a component, with a text length below the recipe's maximum."""
    from diffusers import DiffusionPipeline

    from aotpack.builder.tiny import ensure_builtin

    module = aotpack.load(artifacts("int8wo", **({"regional": True} if regional else {})))
    pipe = DiffusionPipeline.from_pretrained(ensure_builtin("tiny-flux"), transformer=module)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a dog", height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape[0] == 1 and torch.isfinite(out).all()
    if not regional:
        with pytest.raises(InputError, match="has no blocks for diffusers' caches"):
            module.enable_cache(object())


def test_regional_lora_swap_matches_eager_diffusers(artifacts, lora_file):
    result = fresh_check(artifacts("int8wo", regional=True), "int8wo", "--lora", lora_file, "--lora-scale", 0.8,
                         "--swap")
    assert result["vs_eager_same_scheme"] <= 1e-3, result
    assert result["vs_eager_without_lora"] > 0.1, result


def test_regional_tiny_cogvideox(artifacts):
    path = artifacts("int8wo", recipe="tiny-cogvideox", regional=True)
    m = mf.read(path)
    assert [(x.kind, x.block_class, len(x.instances)) for x in m.modules] == [("block", "CogVideoXBlock", 2)]
    result = fresh_check(path, "int8wo")  # 13 frames 96x64: other frames and size than the capture
    assert result["vs_eager_same_scheme"] <= 1e-3, result


def test_a_regional_rebuild_takes_every_block_from_the_compile_cache(artifacts, tmp_path):
    artifacts("int8wo", regional=True)
    again = aotpack.build("tiny-flux", "int8wo", regional=True, out=tmp_path / "again")
    assert {x.compiled for x in mf.read(again).modules} == {"compile cache"}


def test_block_overhead_script_times_every_block_call(artifacts, capsys):
    """scripts/block_overhead.py (the README's per-block call figures): every block call of the timed pipeline
    call is counted, and the compiled call is part of the block call."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("block_overhead", REPO / "scripts" / "block_overhead.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = artifacts("int8wo", regional=True)
    row = script.measure(str(path), steps=2)
    assert row["block calls"] == 2 * 2  # one double + one single block per step
    assert 0 < row["ms compiled call"] < row["ms per block call"] and 0 < row["swap ms per call"]
    from aotpack.serve import regional
    assert regional.CompiledBlock.__call__.__qualname__ == "CompiledBlock.__call__"  # put back
    with pytest.raises(SystemExit, match="not a regional artifact"):
        script.measure(str(artifacts("int8wo")), steps=1)
