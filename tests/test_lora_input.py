"""LoRA files and scales are untrusted input: every matrix, alpha and metadata value is checked when the file is
read, and the scale where it enters (build, swap_lora); each refusal is one InputError line naming the key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import aotpack
from aotpack.builder.weights import MAX_LORA_SCALE, lora_scale, read_lora
from aotpack.errors import InputError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tensors of a random rank-4 tiny-flux LoRA (diffusers/PEFT layout)."""
    from aotpack.builder.tiny import ensure_builtin, random_lora

    path = random_lora(ensure_builtin("tiny-flux") / "transformer", tmp_path_factory.mktemp("lora") / "good.safetensors")
    return load_file(str(path))


def _first(tensors: dict) -> tuple[str, str, str]:
    """(lora_A key, lora_B key, module name) of the file's first module."""
    a = sorted(k for k in tensors if k.endswith(".lora_A.weight"))[0]
    return a, a.replace("lora_A", "lora_B"), a.removeprefix("transformer.").removesuffix(".lora_A.weight")


def _read(tmp_path: Path, tensors: dict, metadata: dict | None = None, scale: float = 1.0):
    import diffusers

    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=None if metadata is None else
              {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)})
    return read_lora(str(path), diffusers.FluxPipeline, "transformer", scale=scale)


def _damage(tensors: dict, case: str) -> tuple[dict, dict | None]:
    a, b, _ = _first(tensors)
    t = {k: v.clone() for k, v in tensors.items()}
    meta = None
    if case == "ranks differ":
        t[a] = t[a][:3]
    elif case == "rank 0":
        t[a], t[b] = t[a][:0], t[b][:, :0]
    elif case == "1-D lora_A":
        t[a] = t[a][0]
    elif case == "integer lora_B":
        t[b] = t[b].to(torch.int32)
    elif case in ("NaN", "inf"):
        t[a][0, 0] = math.nan if case == "NaN" else math.inf
    elif case == "2-element alpha":
        t[a.replace(".lora_A.weight", ".alpha")] = torch.tensor([1.0, 2.0])
    elif case == "NaN alpha":
        t[a.replace(".lora_A.weight", ".alpha")] = torch.tensor(math.nan)
    elif case == "lora_alpha abc":
        meta = {"lora_alpha": "abc", "r": 4}
    elif case == "alpha_pattern list":
        meta = {"lora_alpha": 4, "alpha_pattern": [1, 2], "r": 4}
    elif case == "alpha_pattern value":
        meta = {"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"x": [1]}}
    return t, meta


DAMAGE = {
    "ranks differ": "has lora_A of rank 3 and lora_B of rank 4",
    "rank 0": "has rank 0",
    "1-D lora_A": r"lora_A is float32 \[\d+\], not a 2-D float matrix",
    "integer lora_B": r"lora_B is int32 \[\d+, 4\], not a 2-D float matrix",
    "NaN": "lora_A holds NaN or infinite values",
    "inf": "lora_A holds NaN or infinite values",
    "2-element alpha": r"\.alpha is a float32 tensor of shape \[2\], not one number",
    "NaN alpha": r"\.alpha is nan, not a finite number",
    "lora_alpha abc": "metadata lora_alpha is 'abc', not a finite number",
    "alpha_pattern list": "metadata alpha_pattern is a list, not a table of module: alpha",
    "alpha_pattern value": r"metadata alpha_pattern\['x'\] is \[1\], not a finite number",
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_t31_a_damaged_lora_file_is_one_input_error(tmp_path, good, case):
    tensors, meta = _damage(good, case)
    with pytest.raises(InputError, match=DAMAGE[case]) as e:
        _read(tmp_path, tensors, meta)
    assert e.value.cause.startswith("LoRA lora.safetensors: ") and "\n" not in e.value.cause and e.value.hint
    if case not in ("lora_alpha abc", "alpha_pattern list", "alpha_pattern value"):
        assert _first(good)[2] in e.value.cause  # names the module


def test_t31_alphas_from_metadata_as_diffusers_writes_them(tmp_path, good):
    """diffusers saves a pipeline LoRA's PEFT config flat with the component as prefix."""
    _, _, module = _first(good)
    lora = _read(tmp_path, good, {"transformer.lora_alpha": 8, "transformer.r": 4,
                                  "transformer.alpha_pattern": {module: 2}})
    scalings = {name: d[2] for name, d in lora.deltas.items()}
    assert scalings.pop(f"{module}.weight") == 0.5 and set(scalings.values()) == {2.0}
    assert set(d[2] for d in _read(tmp_path, good, {"lora_alpha": 12, "r": 4}).deltas.values()) == {3.0}


def test_t31_lora_values_that_overflow_the_weight_are_refused(tmp_path, good):
    a, b, module = _first(good)
    lora = _read(tmp_path, {**good, a: good[a] * 1e20, b: good[b] * 1e20})  # finite, but B @ A is not
    weight = torch.zeros(good[b].shape[0], good[a].shape[1], dtype=torch.bfloat16)
    with pytest.raises(InputError, match=f"at scale 1 makes {module}.weight overflow bfloat16"):
        lora.apply(f"{module}.weight", weight)
    fp16 = _read(tmp_path, good, scale=MAX_LORA_SCALE)  # fine in float32, beyond float16's 65504
    fp16.deltas = {k: (v[0] * 100, v[1] * 100, v[2]) for k, v in fp16.deltas.items()}
    with pytest.raises(InputError, match="overflow float16"):
        fp16.apply(f"{module}.weight", weight.half())


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, 1e30, -101.0, "abc", None, True])
def test_t31_a_lora_scale_that_is_not_a_sane_number_is_refused(tmp_path, good, scale):
    with pytest.raises(InputError, match=r"LoRA scale .* is not a finite number in \[-100, 100\]") as e:
        lora_scale(scale)
    assert "\n" not in e.value.cause and e.value.hint
    with pytest.raises(InputError, match="LoRA scale"):
        _read(tmp_path, good, scale=scale)


def test_t31_a_lora_scale_in_range_is_kept():
    assert [lora_scale(s) for s in (0, -1, 0.8, "0.5", MAX_LORA_SCALE)] == [0.0, -1.0, 0.8, 0.5, 100.0]


def test_t31_build_refuses_a_bad_lora_scale_before_loading_a_model(tmp_path, good, monkeypatch):
    from aotpack.builder import pipeline

    def _loaded(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline, "read_checkpoint", _loaded)
    path = tmp_path / "lora.safetensors"
    save_file(good, str(path))
    for scale in (math.nan, 1e30):
        with pytest.raises(InputError, match="LoRA scale"):
            aotpack.build("tiny-flux", "none", lora=path, lora_scale=scale, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_t31_swap_lora_refuses_a_bad_scale(artifacts, lora_file):
    module = aotpack.load(artifacts("int8wo"))
    for scale in (math.nan, 1e30, -1e3):
        with pytest.raises(InputError, match="LoRA scale"):
            module.swap_lora(lora_file, scale)
    assert module.lora is None  # nothing was swapped in
