"""Tiny random pipelines of other diffusers families, built offline from configs with a fixed seed.

The configs follow diffusers' own tests (``get_dummy_components`` in tests/pipelines/<family>/), with the
tokenizers built from in-memory vocabularies instead of Hub files, so a box with no network builds them. Like
tiny.py's builtins each one is saved with ``save_pretrained`` under ``cache_dir()/builtin/<name>`` and used through
``from_pretrained``. ``FAMILIES[name].calls()`` gives the pipeline calls the tests and the recipe-free capture use:
one axis changed at a time (size, then frames), so a capture can tell which axes move and which move together.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aotpack.builder.tiny import _CHARS, _clip, _t5, save_builtin

# Printable ASCII without the whitespace that sentencepiece-style tokenizers fold into "\u2581".
_ASCII = [c for c in string.printable if not c.isspace()]


def _piece_vocab(specials: list[str]) -> dict[str, int]:
    """A sentencepiece-style vocabulary (``\u2581`` marks a word start): specials, then every printable character."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for tok in ["\u2581"] + _ASCII + ["\u2581" + c for c in _ASCII]:
        vocab.setdefault(tok, len(vocab))
    return vocab


def _with_prefix(tokenizer, prefix: str, n: int):
    """Make ``prefix`` encode to exactly ``n`` tokens, counting the ones the tokenizer adds itself.

    Qwen-Image and HunyuanVideo drop a fixed number of tokens (their template's length in the real tokenizer) from
    the front of every encoded prompt. With a character-level tokenizer the template is far longer: what is dropped
    would be part of the template, and the prompt would be truncated away. As in BPE training, adjacent pieces are
    merged into added tokens (a pair whose text occurs once in the prefix first, shortest first) until the count is
    ``n``: a unique added token only matches there, so each merge removes one token.
    """
    known = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()), key=len, reverse=True)
    pieces, i = [], 0  # the prefix as characters, the tokenizer's own special tokens kept whole
    while i < len(prefix):
        hit = next((t for t in known if t and prefix.startswith(t, i)), None)
        pieces.append((hit or prefix[i], hit is not None))
        i += len(hit or prefix[i])
    while len(tokenizer(prefix).input_ids) > n:
        pairs = [(pieces[i][0] + pieces[i + 1][0], i) for i in range(len(pieces) - 1)
                 if not pieces[i][1] and not pieces[i + 1][1]]
        if not pairs:
            break
        text, i = min(pairs, key=lambda p: (prefix.count(p[0]) > 1, len(p[0]), p[1]))
        pieces[i:i + 2] = [(text, False)]
        tokenizer.add_tokens([text])
    got = len(tokenizer(prefix).input_ids)
    if got != n:
        raise RuntimeError(f"tiny tokenizer: template prefix is {got} tokens, not {n}")
    return tokenizer


def _qwen_tokenizer(chat_template: str | None = None):
    """A byte-level Qwen2 tokenizer: the 256 byte symbols as the vocabulary (no merges) and Qwen's specials."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=2048)
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                          "<think>", "</think>"], special_tokens=True)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _flux_vae(cls_name: str = "AutoencoderKL", latent_channels: int = 1, blocks: int = 2, **extra):
    import diffusers

    return getattr(diffusers, cls_name)(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=(4,) * blocks, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, **extra)


def _tiny_sd3(seed: int = 0):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    # caption_projection/joint dims = T5's width; the two CLIPs' hidden states (16 + 16) are padded up to it.
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=32, pooled_projection_dim=32, out_channels=4)
    tokenizer, text_encoder = _clip(16, 16, intermediate=37, with_projection=True)
    tokenizer_2, text_encoder_2 = _clip(16, 16, intermediate=37, with_projection=True)
    tokenizer_3, text_encoder_3 = _t5()
    vae = _flux_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3)


def _tiny_wan(seed: int = 0):
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
                            + [("\u2581" + c, -1.0) for c in _CHARS] + [(c, -2.0) for c in _CHARS],
                            extra_ids=0, model_max_length=512)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_heads=4,
                                               num_layers=2, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=transformer)


_QWEN_IMAGE_PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                      "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")


def _tiny_qwenimage(seed: int = 0):
    import torch
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer = _with_prefix(_qwen_tokenizer(), _QWEN_IMAGE_PREFIX, 34)  # the pipeline drops the first 34 tokens
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "bos_token_id": ids("<|endoftext|>"),
                     "eos_token_id": ids("<|im_end|>")},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), vision_token_id=ids("<|image_pad|>"),
        image_token_id=ids("<|image_pad|>"))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)


def _tiny_ltx(seed: int = 0):
    import torch
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=2, caption_channels=32)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1), spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False), decoder_inject_noise=(False,) * 5,
        upsample_residual=(False,) * 4, upsample_factor=(1, 1, 1, 1), timestep_conditioning=False, patch_size=1,
        patch_size_t=1, encoder_causal=True, decoder_causal=False)
    tokenizer, text_encoder = _t5()
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                       tokenizer=tokenizer, transformer=transformer)


def _tiny_hunyuanvideo(seed: int = 0):
    import torch
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import LlamaConfig, LlamaModel, LlamaTokenizer

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        act_fn="silu", norm_num_groups=4, scaling_factor=0.476986, spatial_compression_ratio=8,
        temporal_compression_ratio=4, mid_block_add_attention=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = LlamaTokenizer(vocab=_piece_vocab(specials), merges=[], pad_token="<pad>", padding_side="right")
    tokenizer.add_tokens(specials[4:], special_tokens=True)
    prefix = DEFAULT_PROMPT_TEMPLATE["template"].split("{}")[0]
    tokenizer = _with_prefix(tokenizer, prefix, DEFAULT_PROMPT_TEMPLATE["crop_start"])
    text_encoder = LlamaModel(LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, hidden_size=16,
                                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=3,
                                          vocab_size=len(tokenizer), hidden_act="gelu"))
    tokenizer_2, text_encoder_2 = _clip(8, 32, intermediate=37)
    return HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
                                tokenizer_2=tokenizer_2)


def _tiny_chroma(seed: int = 0):
    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=[4, 4, 8], approximator_hidden_dim=32,
                                           approximator_layers=1, approximator_num_channels=16)
    tokenizer, text_encoder = _t5()
    vae = _flux_vae(shift_factor=0.0609, scaling_factor=1.5035)
    return ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


# Qwen3's chat template, cut to what Flux2KleinPipeline uses (one user turn, no thinking).
_QWEN3_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
               "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def _tiny_flux2_klein(seed: int = 0):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from diffusers import Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    # The pipeline stacks hidden states 9, 18 and 27 by default: 27 layers of width 16 keep that call unchanged.
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                          attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                          timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                          guidance_embeds=False)
    tokenizer = _qwen_tokenizer(_QWEN3_CHAT)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(intermediate_size=16, hidden_size=16, num_hidden_layers=27,
                                                num_attention_heads=2, num_key_value_heads=2,
                                                vocab_size=len(tokenizer), max_position_embeddings=1024))
    vae = _flux_vae("AutoencoderKLFlux2")
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, transformer=transformer)


def _tiny_flux_kontext(seed: int = 0):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    tokenizer, text_encoder = _clip(intermediate=37)
    tokenizer_2, text_encoder_2 = _t5()
    vae = _flux_vae(shift_factor=0.0609, scaling_factor=1.5035)
    return FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
                               tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                               transformer=transformer)


def _tiny_sana(seed: int = 0):
    import torch
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=32)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407)
    tokenizer = GemmaTokenizer(vocab=_piece_vocab(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]), merges=[])
    text_encoder = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64,
                                            max_position_embeddings=8192, num_attention_heads=2, num_hidden_layers=1,
                                            num_key_value_heads=2, vocab_size=len(tokenizer),
                                            attn_implementation="eager"))
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


@dataclass(frozen=True)
class Family:
    """One tiny family: its builder, the pipeline's default tiny call, and the sizes/frames that call accepts."""

    name: str
    pipeline: str                      # the diffusers pipeline class the saved folder names
    build: Callable[[], Any]
    base: dict                         # the default call without size: prompt, steps, guidance, ...
    sizes: tuple                       # two (height, width) the pipeline accepts
    frames: tuple = ()                 # two num_frames for video families
    latent: Callable[[int, int, int], tuple] = field(default=lambda h, w, f: ())  # latent shape, batch 1

    def calls(self) -> list[dict]:
        """The default call at the first size (and frame count), then with only the size changed, then (video)
        with only the frames changed. Fresh dicts: callers add a generator or change a value freely."""
        picks = [(self.sizes[0], self.frames[:1]), (self.sizes[1], self.frames[:1])]
        if self.frames:
            picks.append((self.sizes[0], self.frames[1:2]))
        out = []
        for (h, w), f in picks:
            call = {**self.base, "height": h, "width": w, **({"num_frames": f[0]} if f else {})}
            if "max_area" in call:  # Kontext resizes to max_area's pixel count, not to height x width
                call["max_area"] = h * w
            if "image" in call:  # an editing pipeline's input image: made fresh, at the requested size
                from PIL import Image
                call["image"] = Image.new("RGB", (w, h), (120, 80, 40))
            out.append(call)
        return out


_COMMON = {"prompt": "dance monkey", "num_inference_steps": 2}
FAMILIES = {f.name: f for f in [
    Family("tiny-sd3", "StableDiffusion3Pipeline", _tiny_sd3,
           {**_COMMON, "guidance_scale": 5.0, "max_sequence_length": 16}, ((32, 32), (32, 48)),
           latent=lambda h, w, f: (1, 4, h // 2, w // 2)),
    Family("tiny-wan", "WanPipeline", _tiny_wan,
           {**_COMMON, "guidance_scale": 6.0, "max_sequence_length": 16}, ((16, 16), (32, 48)), (9, 13),
           latent=lambda h, w, f: (1, 16, (f - 1) // 4 + 1, h // 8, w // 8)),
    Family("tiny-qwenimage", "QwenImagePipeline", _tiny_qwenimage,
           {**_COMMON, "true_cfg_scale": 1.0, "max_sequence_length": 64}, ((32, 32), (32, 48)),
           latent=lambda h, w, f: (1, (h // 8) * (w // 8), 16)),
    Family("tiny-ltx", "LTXPipeline", _tiny_ltx,
           {**_COMMON, "guidance_scale": 3.0, "max_sequence_length": 16}, ((32, 32), (32, 64)), (9, 17),
           latent=lambda h, w, f: (1, ((f - 1) // 4 + 1) * (h // 4) * (w // 4), 8)),
    Family("tiny-hunyuanvideo", "HunyuanVideoPipeline", _tiny_hunyuanvideo,
           {**_COMMON, "guidance_scale": 4.5, "max_sequence_length": 16}, ((16, 16), (32, 48)), (9, 13),
           latent=lambda h, w, f: (1, 4, (f - 1) // 4 + 1, h // 8, w // 8)),
    Family("tiny-chroma", "ChromaPipeline", _tiny_chroma,
           {**_COMMON, "guidance_scale": 5.0, "max_sequence_length": 16}, ((16, 16), (16, 32)),
           latent=lambda h, w, f: (1, (h // 4) * (w // 4), 4)),
    Family("tiny-flux2-klein", "Flux2KleinPipeline", _tiny_flux2_klein,
           {**_COMMON, "guidance_scale": 4.0, "max_sequence_length": 32}, ((16, 16), (16, 32)),
           latent=lambda h, w, f: (1, 1, h // 2, w // 2)),
    Family("tiny-flux-kontext", "FluxKontextPipeline", _tiny_flux_kontext,
           {**_COMMON, "guidance_scale": 2.5, "max_sequence_length": 16, "image": None, "max_area": None,
            "_auto_resize": False},
           ((16, 16), (16, 32)), latent=lambda h, w, f: (1, (h // 4) * (w // 4), 4)),
    Family("tiny-sana", "SanaPipeline", _tiny_sana,
           {**_COMMON, "guidance_scale": 4.5, "max_sequence_length": 16, "use_resolution_binning": False},
           ((32, 32), (32, 64)), latent=lambda h, w, f: (1, 4, h // 2, w // 2)),
]}


def ensure_family(name: str) -> Path:
    """The saved folder of tiny family ``name``, built on first use (atomically, as tiny.ensure_builtin does)."""
    from aotpack.errors import RecipeError

    if name not in FAMILIES:
        raise RecipeError(f"unknown tiny family '{name}'", f"families: {', '.join(FAMILIES)}")
    return save_builtin(name, FAMILIES[name].build)
