"""The linears around a regional artifact's compiled blocks that get int8 weights (aotpack/serve/glue.py): which
ones the build picks, what they compute, what the loader accepts, and a regional build that uses them end to end
(against eager diffusers with the same linears made int8, a LoRA swap that touches one, an edited manifest)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import aotpack
from aotpack.errors import IntegrityError, ManifestError
from aotpack.serve import glue


def _linear(k: int, n: int, dtype=torch.float32, bias=True) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 40])   # 40: above KERNEL_ROWS, the dequantizing path
def test_an_int8_linear_computes_the_linear_within_int8_weight_error(dtype, rows):
    linear = _linear(256, 96, dtype)
    q = glue.Int8Linear.of(linear)
    assert q.weight.dtype == torch.int8 and q.scale.dtype == dtype and q.bias.dtype == dtype
    x = torch.randn(2, rows, 256).to(dtype)
    with torch.no_grad():
        got, want = q(x), linear(x)
        dequantized = torch.nn.functional.linear(x.float(), q.weight.float() * q.scale.float()[:, None],
                                                 q.bias.float())
    assert got.dtype == dtype and got.shape == want.shape
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert 0 < err < 2e-2, err   # int8 weights: not the linear, but close to it
    assert float((got.float() - dequantized).abs().max() / dequantized.abs().max()) < 1e-2


def test_an_int8_linear_without_bias_and_its_state_dict():
    q = glue.Int8Linear.of(_linear(128, 32, bias=False))
    assert set(q.state_dict()) == {"weight", "scale"}
    assert q(torch.randn(1, 128)).shape == (1, 32)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(256, 512)      # one row per sample: chosen
        self.tokens = torch.nn.Linear(256, 512)     # many rows: not
        self.small = torch.nn.Linear(64, 8)         # a small weight: not
        self.odd = torch.nn.Linear(100, 4096)       # an inner size the kernel cannot take: not
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(256, 512))])  # inside a block: not

    def forward(self, x: torch.Tensor, seq: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
        return self.embed(x).sum() + self.tokens(seq).sum() + self.small(x[..., :64]).sum() + \
            self.odd(odd).sum() + self.blocks[0](x).sum()


def test_the_build_picks_the_large_few_row_linears_outside_the_blocks(monkeypatch):
    monkeypatch.setattr(glue, "MIN_WEIGHT", 256 * 512)
    model = _Toy()
    with glue.first_rows(model, {"blocks.0"}) as rows, torch.no_grad():
        model(torch.randn(2, 256), torch.randn(2, 64, 256), torch.randn(2, 100))
    assert rows == {"embed": 2, "tokens": 128, "small": 2, "odd": 2}   # the block's linear is not watched
    assert glue.chosen(model, rows, {"blocks.0"}) == ["embed"]
    model(torch.randn(1, 256), torch.randn(1, 3, 256), torch.randn(1, 100))  # the hooks are gone
    assert rows == {"embed": 2, "tokens": 128, "small": 2, "odd": 2}
    glue.pack(model, ["embed"])
    assert isinstance(model.embed, glue.Int8Linear) and model.embed.weight.dtype == torch.int8


@pytest.mark.parametrize("name", ["blocks.0.0", "odd", "nothing", "blocks", ""])
def test_the_loader_refuses_a_listed_module_it_would_not_have_built(name):
    with torch.device("meta"):
        model = _Toy()
    with pytest.raises(ManifestError, match="not a linear outside the blocks"):
        glue.place(model, (name,), {"blocks.0"}, torch.float32)


def test_the_loader_places_empty_int8_linears():
    with torch.device("meta"):
        model = _Toy()
    glue.place(model, ("embed",), {"blocks.0"}, torch.bfloat16)
    assert isinstance(model.embed, glue.Int8Linear) and model.embed.weight.is_meta
    assert model.embed.scale.dtype == torch.bfloat16


def test_int8_glue_applies_to_quantized_cpu_builds_with_bf16_units():
    box = lambda *flags, device="cpu": SimpleNamespace(device=device, cpu_flags=flags)  # noqa: E731
    assert glue.applies(box("avx2", "avx512f", "amx_bf16"), "int8dq", "float32")
    assert glue.applies(box("avx2", "avx512f", "avx512_bf16"), "int8wo", "bfloat16")
    assert not glue.applies(box("avx2", "avx512f", "avx512_bf16"), "none", "float32")  # full precision asked for
    assert not glue.applies(box("avx2", "avx512f", "amx_bf16"), "int8dq", "float16")   # the kernel is slow there
    assert not glue.applies(box("avx2", "fma"), "int8dq", "float32")                    # bf16 would run widened
    assert not glue.applies(box(device="cuda"), "int8dq", "bfloat16")


class _Reads(torch.nn.Module):
    """A model whose forward reads a glue linear's weight dtype (as some diffusers models do): int8 weights there
    would cast its input to int8."""

    def __init__(self, reads: bool) -> None:
        super().__init__()
        self.reads = reads
        self.embed = torch.nn.Linear(256, 512)
        self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(512, 512))])

    def forward(self, x: torch.Tensor, return_dict: bool = False) -> tuple:
        h = self.embed(x.to(self.embed.weight.dtype) if self.reads else x)
        return (self.blocks[0](h),)


@pytest.mark.parametrize("reads", [False, True])
def test_the_build_keeps_int8_glue_only_where_the_model_still_runs_as_before(monkeypatch, reads, caplog):
    from aotpack.builder.pipeline import int8_glue

    monkeypatch.setattr(glue, "MIN_WEIGHT", 1)
    box = SimpleNamespace(device="cpu", cpu_flags=("amx_bf16",))
    q = SimpleNamespace(model=_Reads(reads), classes=["Sequential"], glue_int8=[])
    with torch.no_grad():
        int8_glue(SimpleNamespace(platform=box, quant="int8wo", dtype="float32"), q, {"embed": 2},
                  {"x": torch.randn(2, 256)})
    if reads:
        assert q.glue_int8 == [] and type(q.model.embed) is torch.nn.Linear   # put back, with a warning
        assert "left out" in caplog.text and "embed" in caplog.text
    else:
        assert q.glue_int8 == ["embed"] and isinstance(q.model.embed, glue.Int8Linear)


# ---- end to end: a regional tiny-flux build whose time embedders get int8 weights -------------------------------

PACKED = ["time_text_embed.guidance_embedder.linear_1", "time_text_embed.timestep_embedder.linear_1"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """tiny-flux's glue is far below MIN_WEIGHT and a CI box may lack bf16 units: both are lifted for this build
    (the blocks come from the compile cache the other regional builds filled)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(glue, "MIN_WEIGHT", 0)
    mp.setattr(glue, "applies", lambda platform, quant, dtype: quant != "none")
    try:
        return aotpack.build("tiny-flux", "int8wo", regional=True, out=tmp_path_factory.mktemp("glue") / "a")
    finally:
        mp.undo()


@pytest.mark.slow
def test_a_regional_build_with_int8_glue_matches_eager_diffusers_with_the_same(packed):
    from safetensors import safe_open

    from aotpack.artifact import manifest as mf
    from test_variants import fresh_check

    m = mf.read(packed)
    assert list(m.glue_int8) == PACKED
    with safe_open(str(packed / "weights.safetensors"), framework="pt") as f:
        assert f.get_tensor(f"transformer.{PACKED[0]}.weight").dtype == torch.int8
        assert f"transformer.{PACKED[0]}.scale" in set(f.keys())
    model = aotpack.load(packed)
    assert all(isinstance(model.get_submodule(n), glue.Int8Linear) for n in PACKED)
    result = fresh_check(packed, "int8wo")   # eager: blocks quantized, and the same linears made int8
    assert result["vs_eager_same_scheme"] <= 1e-3, result


@pytest.mark.slow
def test_a_lora_that_touches_an_int8_glue_linear_swaps_in_as_the_build_would(packed, tmp_path):
    from safetensors.torch import save_file

    from test_variants import fresh_check

    g = torch.Generator().manual_seed(3)
    name = f"transformer.{PACKED[1]}"
    tensors = {}  # that linear only: what changes comes through it
    tensors[f"{name}.lora_A.weight"] = torch.randn(4, 256, generator=g) * 0.3
    tensors[f"{name}.lora_B.weight"] = torch.randn(32, 4, generator=g) * 0.3
    save_file(tensors, str(tmp_path / "glue.safetensors"))
    result = fresh_check(packed, "int8wo", "--lora", tmp_path / "glue.safetensors", "--lora-scale", 0.8, "--swap")
    assert result["vs_eager_same_scheme"] <= 1e-3, result
    assert result["vs_eager_without_lora"] > 0.1, result


@pytest.mark.slow
def test_a_manifest_that_lists_a_block_linear_is_refused(packed, tmp_path):
    import shutil

    from test_faults import edit_manifest

    bad = shutil.copytree(packed, tmp_path / "bad")
    edit_manifest(bad, lambda d: d["glue_int8"].append("transformer_blocks.0.attn.to_q"))
    with pytest.raises(ManifestError, match="glue_int8 names transformer_blocks.0.attn.to_q, which is not a linear"):
        aotpack.load(bad)
    assert json.loads((packed / "manifest.json").read_text())["glue_int8"] == PACKED
    # the list dropped (the int8 weights then meet float linears): refused at the weights check, before any call
    none = shutil.copytree(packed, tmp_path / "none")
    edit_manifest(none, lambda d: d.pop("glue_int8"))
    with pytest.raises(IntegrityError, match=r"is int8 \[32, 256\], the model expects float32 \[32, 256\]"):
        aotpack.load(none)
    from aotpack.artifact import manifest as mf

    data = json.loads((packed / "manifest.json").read_text())
    with pytest.raises(ManifestError, match="glue_int8 must list distinct linear names"):
        mf.validate({**data, "glue_int8": PACKED + PACKED[:1]})
