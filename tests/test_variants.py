"""The second model family (tiny-cogvideox, video), LoRA without recompiling, and the build options
(--fuse-qkv, --quantize-text-encoder, --compile-vae, --lora), each against eager diffusers."""

import json

import pytest
import torch

import aotpack
from aotpack.artifact import manifest as mf
from aotpack.artifact.manifest import Options
from aotpack.errors import InputError

from conftest import run_cli

pytestmark = pytest.mark.slow


def fresh_check(*args: str) -> dict:
    """tests/fresh_check.py's comparison, in this process (test_end_to_end runs it in fresh ones)."""
    from fresh_check import compare

    return compare([str(a) for a in args])


# ---- CogVideoX: video, dynamic frames and size ---------------------------------------------------------

def test_tiny_cogvideox_matches_eager_at_other_frames_and_size(artifacts):
    path = artifacts("int8wo", recipe="tiny-cogvideox")
    m = mf.read(path)
    assert m.recipe.pipeline == "CogVideoXPipeline"
    assert set(m.component.inputs.dynamic) == {"batch", "latent_frames", "latent_height", "latent_width", "video_seq"}
    assert m.component.inputs.relations[0].dim == "video_seq"
    # exported at 9 frames 64x64; checked at 13 frames 96x64
    result = fresh_check(path, "int8wo")
    assert result["shape"][1] == 4  # (13 - 1) / 4 + 1 latent frames
    assert result["vs_eager_same_scheme"] <= 1e-3, result
    assert result["vs_eager_unquantized"] > result["vs_eager_same_scheme"], result


def test_tiny_cogvideox_runs_to_a_video(artifacts, tmp_path):
    from PIL import Image

    path = artifacts("int8wo", recipe="tiny-cogvideox")
    gif = tmp_path / "v.gif"
    res = run_cli("run", str(path), "--prompt", "a dog", "--frames", "17", "--height", "32", "--width", "128",
                  "--steps", "2", "--out", str(gif))
    assert res.returncode == 0, res.stderr
    with Image.open(gif) as im:
        assert im.n_frames == 17 and im.size == (128, 32)
    mp4 = aotpack.run(path, prompt="a dog", steps=2, out=tmp_path / "v.mp4")  # the library call, in-process
    import imageio.v2 as imageio

    frames = imageio.mimread(str(mp4))
    assert len(frames) == 9 and frames[0].shape == (64, 96, 3)  # the recipe's run settings


def test_default_output_is_a_video_and_gif_without_an_mp4_writer(artifacts, tmp_path, monkeypatch):
    import aotpack.serve.run as run_mod

    path = artifacts("int8wo", recipe="tiny-cogvideox")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run_mod, "mp4_writer_available", lambda: False)
    out = run_mod.run(path, prompt="a dog", steps=1)
    assert out.name == "out.gif" and out.is_file()
    with pytest.raises(InputError, match="no mp4 writer"):
        run_mod.run(path, prompt="a dog", steps=1, out=tmp_path / "x.mp4")


def test_rotary_table_of_another_size_is_refused(artifacts):
    module = aotpack.load(artifacts("int8wo", recipe="tiny-cogvideox"))
    cfg = module.config
    hidden = torch.randn(2, 3, cfg.in_channels, 8, 8)  # 3 frames x 4 x 4 tokens = 48
    kwargs = dict(hidden_states=hidden, encoder_hidden_states=torch.randn(2, 16, cfg.text_embed_dim),
                  timestep=torch.tensor([10, 10]))
    rot = (torch.randn(48, cfg.attention_head_dim), torch.randn(48, cfg.attention_head_dim))
    assert module(**kwargs, image_rotary_emb=rot, return_dict=False)[0].shape == hidden.shape
    short = (rot[0][:32], rot[1][:32])
    with pytest.raises(InputError, match="video_seq is 32 but latent_frames x latent_height x latent_width / 4 is 48"):
        module(**kwargs, image_rotary_emb=short)
    with pytest.raises(InputError, match="not a multiple of 2"):
        module(**{**kwargs, "hidden_states": torch.randn(2, 3, cfg.in_channels, 7, 8)}, image_rotary_emb=rot)


# ---- LoRA -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["none", "int8wo"])
def test_lora_swapped_at_load_matches_eager_diffusers_with_the_lora_fused(artifacts, lora_file, scheme):
    result = fresh_check(artifacts(scheme), scheme, "--lora", lora_file, "--lora-scale", 0.8, "--swap")
    tolerance = {"none": 1e-4, "int8wo": 1e-3}[scheme]
    assert result["vs_eager_same_scheme"] <= tolerance, result
    assert result["vs_eager_without_lora"] > 100 * tolerance, result  # the LoRA really changed the output


def test_lora_swap_needs_no_recompile_and_can_be_undone(artifacts, lora_file):
    module = aotpack.load(artifacts("int8wo"))
    x = _flux_inputs(module)
    base = module(**x, return_dict=False)[0]
    compiled = module._compiled
    seconds = module.swap_lora(lora_file, 0.8)
    with_lora = module(**x, return_dict=False)[0]
    assert module._compiled is compiled and seconds < 30
    assert (with_lora - base).abs().max() > 1e-2
    module.swap_lora(lora_file, 0.0)  # scale 0: the artifact's own weights again
    assert torch.equal(module(**x, return_dict=False)[0], base)
    module.swap_lora(lora_file, 0.8)
    module.swap_lora(None)
    assert torch.equal(module(**x, return_dict=False)[0], base)


def _flux_inputs(module, batch=2, seq=16):
    cfg = module.config
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, seq, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 32, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
                img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(32, 3))


# ---- build options, all in one build: --lora --fuse-qkv --quantize-text-encoder --compile-vae ------------

OPTIONS = dict(fuse_qkv=True, quantize_text_encoder="int8wo", compile_vae=True, lora_scale=0.8)


def test_build_options_match_eager_diffusers(artifacts, lora_file):
    path = artifacts("int8wo", lora=str(lora_file), **OPTIONS)
    m = mf.read(path)
    assert m.options == Options(fuse_qkv=True, quantize_text_encoder="int8wo", compile_vae=True)
    assert m.lora.file == "style.safetensors" and m.lora.scale == 0.8
    # one weights file shared by both compiled modules, keyed by the pipeline's own names
    assert set(m.files) == {"model.pt2", "vae_decoder.pt2", "weights.safetensors"}
    assert [x.kind for x in m.modules] == ["component", "vae_decoder"]
    from safetensors import safe_open

    with safe_open(str(path / "weights.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vae.decoder.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    assert any(".attn.to_qkv." in k for k in keys) and not any(".attn.to_q." in k for k in keys)
    # decoded images: fused LoRA + fused projections + int8 text encoders + compiled VAE, against eager
    result = fresh_check(path, "int8wo", "--lora", lora_file, "--lora-scale", 0.8, "--decode")
    assert result["shape"][1:] == [3, 96, 64]
    assert result["vs_eager_same_scheme"] <= 1e-3, result
    assert result["vs_eager_without_lora"] > 0.1, result


def test_a_build_with_a_lora_refuses_a_second_lora_at_load(artifacts, lora_file):
    module = aotpack.load(artifacts("int8wo", lora=str(lora_file), **OPTIONS))
    with pytest.raises(InputError, match="was built with LoRA style.safetensors fused in"):
        module.swap_lora(lora_file)


def test_run_with_a_compiled_vae_never_reads_the_vae_weights(artifacts, lora_file, tmp_path, monkeypatch):
    """The serving path loads the pipeline without transformer and VAE; the artifact brings both."""
    from diffusers import AutoencoderKL

    path = artifacts("int8wo", lora=str(lora_file), **OPTIONS)  # the build reads the VAE; serving must not

    def forbidden(*a, **k):
        raise AssertionError("the eager VAE was loaded")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(forbidden))
    from aotpack.serve.run import run

    out = run(path, prompt="a dog", steps=2, out=tmp_path / "a.png")
    from PIL import Image

    assert Image.open(out).size == (128, 128)


# ---- --quant auto and --plan --------------------------------------------------------------------------------

def test_quant_auto_records_a_plan_and_a_rebuild_from_it_is_identical(artifacts, tmp_path):
    path = artifacts("auto", error_budget=0.05)
    m = mf.read(path)
    assert m.scheme.name == "auto" and "plan.json" in m.files
    plan = json.loads((path / "plan.json").read_text())
    layers = m.plan.layers
    assert layers and set(layers) == set(plan["layers"])
    assert all(v["scheme"] in ("none", "int8wo", "int8dq", "fp8wo") for v in plan["layers"].values())
    assert all(v["error"] <= 0.05 for v in plan["layers"].values())
    assert sum(m.plan.counts.values()) == len(layers)
    # the plan is also torchao's own FqnToConfig: applied with quantize_ alone, it gives the same layers
    from torchao.core.config import config_from_dict
    from torchao.quantization import FqnToConfig

    fqn = config_from_dict(plan["torchao"])
    assert isinstance(fqn, FqnToConfig) and set(fqn.fqn_to_config) == set(layers)
    # the budget decides: nothing may exceed it, and with budget 0 every layer stays unquantized
    assert plan["timings"] and all("none" in t for t in plan["timings"].values())
    again = aotpack.build("tiny-flux", plan=str(path / "plan.json"), out=tmp_path / "again")
    redo = mf.read(again)
    assert redo.plan.layers == layers
    assert redo.files["weights.safetensors"].sha256 == m.files["weights.safetensors"].sha256
    result = fresh_check(again, "none")  # against unquantized eager: within the budget's reach
    assert result["vs_eager_unquantized"] < 0.1 * max(1.0, result["scale"]), result


def test_a_rebuild_with_other_weights_reuses_the_compiled_code(artifacts, lora_file, tmp_path):
    """Weights live outside the code: the same graph with a LoRA fused needs no compile (--reuse)."""
    base = artifacts("int8wo")
    out = aotpack.build("tiny-flux", "int8wo", lora=str(lora_file), lora_scale=0.8, reuse=base,
                        out=tmp_path / "styled")
    m = mf.read(out)
    assert m.component.compiled == f"reused from {base}"
    assert m.component.compile_key == mf.read(base).component.compile_key
    assert m.build.stages["compile"] < 1.0
    result = fresh_check(out, "int8wo", "--lora", lora_file, "--lora-scale", 0.8)
    assert result["vs_eager_same_scheme"] <= 1e-3, result
