"""Tiny random pipelines built offline from configs with a fixed seed (the demo and test default).

The pipeline is saved with ``save_pretrained`` and always loaded back with ``from_pretrained``, so the real
loading path runs even without network. Same seed, same weights: every machine builds identical models.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from aotpack.paths import cache_dir

_CHARS = "abcdefghijklmnopqrstuvwxyz"


def _tiny_flux(seed: int = 0, **transformer_overrides):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _clip()
    tokenizer_2, text_encoder_2 = _t5()  # after CLIP: same random stream as before
    transformer = FluxTransformer2DModel(**{
        **dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
               guidance_embeds=True),
        **transformer_overrides,
    })
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035, sample_size=64,
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


def _flux_blocks(seed: int = 0):
    """Real-width Flux blocks (hidden 3072 = 24 heads x 128, one double + one single block, ~0.5B params)
    inside the tiny pipeline: the size at which speed and memory figures tell the truth on a CPU."""
    return _tiny_flux(seed, num_attention_heads=24, attention_head_dim=128, axes_dims_rope=[16, 56, 56])


def _flux_depth(seed: int = 0, double: int = 19, single: int = 38):
    """FLUX.1's depth (19 double + 38 single blocks) at a narrow width (2 heads x 128 = hidden 256, FLUX.1's
    rotary axes) inside the tiny pipeline: depth is what makes builds slow, and this measures it in minutes."""
    return _tiny_flux(seed, num_layers=double, num_single_layers=single, num_attention_heads=2,
                      attention_head_dim=128, axes_dims_rope=[16, 56, 56])


def _flux_depth_1x1(seed: int = 0):
    """flux-depth's width at 1 double + 1 single block: the other end of the depth-scaling measurement."""
    return _flux_depth(seed, double=1, single=1)


def _clip(hidden: int = 32, projection: int = 32, *, intermediate: int = 64, with_projection: bool = False):
    """A character-level CLIP tokenizer (built from an in-memory vocabulary: no download, the real tokenizer
    class) and a 2-layer CLIP text model (``WithProjection`` for SD3)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for tok in list(_CHARS) + [c + "</w>" for c in _CHARS]:
        vocab.setdefault(tok, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                            intermediate_size=intermediate, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=len(vocab), projection_dim=projection, max_position_embeddings=77)
    return tokenizer, (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _t5(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    t5_vocab += [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS]
    tokenizer = T5Tokenizer(vocab=t5_vocab, extra_ids=0, model_max_length=512)
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
        relative_attention_num_buckets=8,
    ))
    return tokenizer, encoder


def _tiny_cogvideox(seed: int = 0):
    """A tiny CogVideoXPipeline in the layout of CogVideoX-5b (rotary position embeddings, so frames and size can
    be dynamic): T5 text encoder, 3-D VAE with 8x spatial and 4x temporal compression, DDIM scheduler."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = _t5()
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())


BUILDERS = {"tiny-flux": _tiny_flux, "flux-blocks": _flux_blocks, "flux-depth": _flux_depth,
            "flux-depth-1x1": _flux_depth_1x1, "tiny-cogvideox": _tiny_cogvideox}


def ensure_builtin(name: str) -> Path:
    """The saved folder of builtin pipeline ``name``, built on first use (atomically) and reused after."""
    from aotpack.errors import RecipeError

    if name not in BUILDERS:
        raise RecipeError(f"unknown builtin model '{name}'", f"builtins: {', '.join(BUILDERS)}")
    return save_builtin(name, BUILDERS[name])


def save_builtin(name: str, make) -> Path:
    """``make()``'s pipeline saved as ``AOTPACK_CACHE/builtin/NAME`` (atomically, by rename) on first use."""
    final = cache_dir() / "builtin" / name
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=final.parent))
    try:
        make().save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def random_lora(transformer_folder: Path, path: Path, *, rank: int = 4, seed: int = 5) -> Path:
    """A random rank-``rank`` LoRA in the diffusers/PEFT layout (no alphas: scaling 1) for the attention and
    feed-forward linears of a saved Flux transformer: what the tests and the GPU check swap in."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(next(Path(transformer_folder).glob("*.safetensors"))), framework="pt") as f:
        for key in f.keys():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and any(t in name for t in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                     "attn.to_out.0", "ff.net.2", "proj_mlp")):
                out_f, in_f = f.get_slice(key).get_shape()
                tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.3
                tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.3
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return Path(path)
