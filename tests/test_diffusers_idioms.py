"""The round trips a diffusers user reaches for, with real diffusers calls: each works, or refuses in one line
before anything is converted, written or run."""

from __future__ import annotations

import logging

import pytest
import torch

import aotpack
from aotpack.builder.tiny import ensure_builtin
from aotpack.errors import InputError

CALL = {"prompt": "a cat", "height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 32,
        "output_type": "latent"}


def latents(pipe, seed: int = 0) -> torch.Tensor:
    return pipe(**CALL, generator=torch.Generator("cpu").manual_seed(seed)).images


def folder():
    return ensure_builtin("tiny-flux")


@pytest.fixture
def diffusers_warnings():
    """What diffusers logs at warning level while the test runs."""
    import diffusers.utils.logging as dlog

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, logger, level = Keep(logging.WARNING), dlog.get_logger("diffusers"), dlog.get_verbosity()
    logger.addHandler(handler)
    dlog.set_verbosity_warning()
    yield records
    logger.removeHandler(handler)
    dlog.set_verbosity(level)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_the_usual_idiom_takes_the_artifact_without_a_type_warning(artifacts, diffusers_warnings, regional):
    from diffusers import DiffusionPipeline, FluxTransformer2DModel

    path = artifacts("int8wo", regional=True) if regional else artifacts("int8wo")
    module = aotpack.load(path)
    assert isinstance(module, FluxTransformer2DModel)  # a stand-in of the class the pipeline declares
    pipe = DiffusionPipeline.from_pretrained(folder(), transformer=module)
    assert not [w for w in diffusers_warnings if "Expected types" in w], diffusers_warnings
    ready = aotpack.from_pretrained(folder(), path)
    assert torch.equal(latents(pipe), latents(ready))


def test_from_pretrained_carries_the_whole_artifact(artifacts, lora_file):
    from aotpack.serve.module import AotVaeDecoder

    # the artifact with a compiled VAE and a quantized text encoder (shared with the variants' tests)
    path = artifacts("int8wo", lora=str(lora_file), fuse_qkv=True, quantize_text_encoder="int8wo",
                     compile_vae=True, lora_scale=0.8)
    pipe = aotpack.from_pretrained(None, path)  # None: the checkpoint the artifact was built from
    assert isinstance(pipe.vae, AotVaeDecoder)
    linear = next(m for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear))
    assert type(linear.weight) not in (torch.nn.Parameter, torch.Tensor)  # a torchao quantized tensor
    image = pipe(**{**CALL, "output_type": "pt"}, generator=torch.Generator("cpu").manual_seed(0)).images
    assert image.shape[-2:] == (64, 64) and torch.isfinite(image).all()


def test_a_dtype_the_artifact_was_not_built_for_is_refused_at_once(artifacts):
    from diffusers import FluxPipeline

    path = artifacts("int8wo")  # float32
    pipe = aotpack.from_pretrained(folder(), path)
    with pytest.raises(InputError, match="compiled for float32; it cannot be converted to bfloat16") as e:
        pipe.to(torch.bfloat16)
    assert "--dtype bfloat16" in e.value.hint
    assert pipe.text_encoder.dtype == torch.float32  # refused before any component was converted
    module = aotpack.load(path)
    with pytest.raises(InputError, match="cannot be converted to bfloat16"):
        module.to(dtype=torch.bfloat16)
    assert module.to("cpu") is module and module.to(torch.float32) is module
    bf16 = FluxPipeline.from_pretrained(folder(), transformer=None, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="the pipeline's .* is bfloat16, the artifact runs float32"):
        aotpack.load_into(bf16, path)
    with pytest.raises(InputError, match="dtype=torch.bfloat16 but the artifact runs float32"):
        aotpack.from_pretrained(folder(), path, dtype=torch.bfloat16)


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_save_pretrained_refuses_before_writing(artifacts, tmp_path, regional):
    path = artifacts("int8wo", regional=True) if regional else artifacts("int8wo")
    pipe = aotpack.from_pretrained(folder(), path)
    with pytest.raises(InputError, match="cannot be saved as a diffusers model folder") as e:
        pipe.save_pretrained(tmp_path / "saved")
    assert str(path) in e.value.hint
    assert not (tmp_path / "saved").exists()
    with pytest.raises(InputError, match="cannot be saved as a diffusers model folder"):
        pipe.transformer.save_pretrained(tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_diffusers_lora_api_is_routed_to_the_swap(artifacts, lora_file):
    """pipe.load_lora_weights / set_adapters / fuse_lora / unload_lora_weights / disable_lora / delete_adapters
    give bit for bit what swap_lora gives (itself checked against eager diffusers in test_variants.py)."""
    path = artifacts("int8wo")
    ref = aotpack.from_pretrained(folder(), path)
    base = latents(ref)
    ref.transformer.swap_lora(lora_file, 1.0)
    full = latents(ref)
    ref.transformer.swap_lora(lora_file, 0.5)
    half = latents(ref)
    assert not torch.equal(full, base) and not torch.equal(half, full)

    pipe = aotpack.from_pretrained(folder(), path)
    pipe.load_lora_weights(lora_file, adapter_name="style")
    assert torch.equal(latents(pipe), full) and pipe.get_list_adapters() == {"transformer": ["style"]}
    pipe.set_adapters("style", 0.5)
    assert torch.equal(latents(pipe), half)
    pipe.fuse_lora(lora_scale=2.0)  # 2 x 0.5
    assert torch.equal(latents(pipe), full)
    pipe.unload_lora_weights()  # fused weights stay, as diffusers keeps them
    assert torch.equal(latents(pipe), full) and pipe.get_list_adapters() == {}
    with pytest.raises(InputError, match="fused in by fuse_lora"):
        pipe.load_lora_weights(lora_file)

    pipe = aotpack.from_pretrained(folder(), path)
    pipe.load_lora_weights(lora_file, adapter_name="a")
    pipe.disable_lora()
    assert torch.equal(latents(pipe), base)
    pipe.enable_lora()
    assert torch.equal(latents(pipe), full)
    with pytest.raises(InputError, match="holds LoRA 'a'; compiled code holds one weight set"):
        pipe.load_lora_weights(lora_file, adapter_name="b")
    pipe.delete_adapters("a")
    assert torch.equal(latents(pipe), base)
    pipe.unload_lora_weights()
    assert torch.equal(latents(pipe), base)


def test_a_damaged_lora_through_diffusers_is_one_line(artifacts, lora_file, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(lora_file))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:-1]  # rank of A no longer that of B
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad))
    pipe = aotpack.from_pretrained(folder(), artifacts("int8wo"))
    with pytest.raises(InputError, match="has lora_A of rank 3 and lora_B of rank 4"):
        pipe.load_lora_weights(bad)
    assert pipe.transformer.lora is None and pipe.get_list_adapters() == {}


def test_diffusers_lora_api_on_a_regional_artifact(artifacts, lora_file):
    """A regional model is its real class: diffusers' loader walks its linears before it reaches the model (it
    once met empty nn.Linear modules: 'Linear' object has no attribute 'weight')."""
    path = artifacts("int8wo", regional=True)
    ref = aotpack.from_pretrained(folder(), path)
    base = latents(ref)
    ref.transformer.swap_lora(lora_file, 0.5)
    half = latents(ref)
    pipe = aotpack.from_pretrained(folder(), path)
    pipe.load_lora_weights(lora_file, adapter_name="style")
    pipe.set_adapters("style", 0.5)
    assert torch.equal(latents(pipe), half) and not torch.equal(half, base)
    pipe.unload_lora_weights()
    assert torch.equal(latents(pipe), base)


def test_the_python_api_quiets_torchao_import_noise_and_keeps_it_under_debug():
    """torchao's missing-CUDA-kernel lines and torch's pytree deprecations at import say nothing to a user of the
    Python API; AOTPACK_DEBUG=1 shows them again (and a bare torchao import, without aotpack, is left alone)."""
    import os
    import subprocess
    import sys

    code = "import aotpack; aotpack.build; import torchao.quantization"
    noise = ("Failed to load", "register_constant")
    env = {k: v for k, v in os.environ.items() if k != "AOTPACK_DEBUG"}
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "AOTPACK_DEBUG": "1"}, timeout=300)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr[-500:]
    assert not any(n in quiet.stderr for n in noise), quiet.stderr[-800:]
    if not any(n in loud.stderr for n in noise):
        pytest.skip("this torchao prints no import noise here (a build with every kernel)")
