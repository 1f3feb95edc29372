"""Issue 21: the compute dtype follows the machine. ``--dtype auto`` (and a recipe's ``dtype = "auto"``) builds
bf16 where the CPU has bf16 matrix units (AMX, AVX512-BF16) or the GPU bf16 tensor cores, fp32 on a CPU without
them (bf16 there runs widened to fp32, several times slower); the dtype is part of the build's name and of the
plan, and a pull prefers the build in the dtype this machine computes fastest.

No compile here: ``run_build`` is replaced by a recorder, so what is checked is the resolved request."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from aotpack.artifact import platform as plat
from aotpack.artifact.platform import Platform, compute_dtype
from aotpack.builder import pipeline, spec as spec_mod
from aotpack.cli import cli

BASE = dict(device="cpu", arch="x86_64", isa="avx2", cuda_capability=None, gpu_name=None, torch="2.13.0+cpu",
            torchao="0.18.0", diffusers="0.42.1", python="3.11.7")

AVX2 = Platform(cpu_flags=("avx2", "fma", "f16c"), **BASE)
AVX512 = ("avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni")
ZEN4 = Platform(cpu_flags=AVX512 + ("avx512_bf16",), **{**BASE, "isa": "avx512_vnni"})
SPR = Platform(cpu_flags=AVX512 + ("avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"), **{**BASE, "isa": "amx_tile"})
CASCADE = Platform(cpu_flags=AVX512, **{**BASE, "isa": "avx512_vnni"})


def gpu(cap: str) -> Platform:
    return Platform(cpu_flags=(), **{**BASE, "device": "cuda", "isa": None, "cuda_capability": cap})


@pytest.mark.parametrize("here,dtype,why", [
    (AVX2, "float32", "no bf16 matrix units"),
    (CASCADE, "float32", "no bf16 matrix units"),   # AVX-512 and VNNI, but no bf16 dot products
    (ZEN4, "bfloat16", "avx512_bf16"),
    (SPR, "bfloat16", "amx_bf16, avx512_bf16"),
    (gpu("9.0"), "bfloat16", "bf16 tensor cores"),
    (gpu("7.5"), "float16", "no bf16"),
], ids=["avx2", "avx512-no-bf16", "avx512-bf16", "amx", "sm90", "sm75"])
def test_compute_dtype_follows_the_matrix_units(here, dtype, why):
    chosen, reason = compute_dtype(here)
    assert chosen == dtype and why in reason
    assert compute_dtype(dataclasses.asdict(here)) == (chosen, reason)  # the Hub index's JSON form too


@pytest.fixture
def built(monkeypatch):
    """The BuildSpec a build would run, recorded instead of run."""
    seen = []

    def record(spec):
        seen.append(spec)
        return spec.out

    monkeypatch.setattr(pipeline, "run_build", record)
    return seen


def on(monkeypatch, here: Platform) -> None:
    monkeypatch.setattr(spec_mod, "describe", lambda device=None, **kw: here)


@pytest.mark.parametrize("here,dtype,suffix", [(AVX2, "float32", ""), (ZEN4, "bfloat16", "-bf16")],
                         ids=["avx2", "avx512-bf16"])
def test_dtype_auto_resolves_per_machine_and_names_the_build(here, dtype, suffix, monkeypatch, tmp_path, built):
    on(monkeypatch, here)
    monkeypatch.chdir(tmp_path)  # the default folder: artifacts/ here
    result = CliRunner().invoke(cli, ["build", "tiny-flux", "--dtype", "auto"])
    assert result.exit_code == 0, result.output
    (spec,) = built
    assert spec.dtype == dtype
    # tiny-flux's own dtype is float32: a bf16 build is another build, with its own folder (and Hub name)
    assert spec.out.name == f"tiny-flux-int8wo-{plat.tag(here)}{suffix}"


def test_a_recipe_may_ask_for_the_machines_dtype(monkeypatch, tmp_path, built):
    from aotpack.builder.recipe import get_recipe

    from aotpack.builder.recipe_parse import parse_recipe

    assert get_recipe("flux-blocks").dtype == "auto"  # the CPU bench recipe: each box gets its fastest dtype
    # the same kind of recipe at tiny size (flux-blocks' 2 GB checkpoint would be written just to be resolved)
    auto = parse_recipe({**get_recipe("tiny-flux").data, "name": "tiny-flux-auto", "dtype": "auto"})
    for here, dtype, name in ((AVX2, "float32", "fp32"), (ZEN4, "bfloat16", "bf16")):
        on(monkeypatch, here)
        spec = spec_mod.resolve(auto, "none", artifacts_dir=tmp_path)
        assert spec.dtype == dtype and spec.out.name.endswith(f"-{name}")  # named: it differs between boxes


def test_a_plan_keeps_the_dtype_it_was_measured_in(monkeypatch, tmp_path, built):
    import torch

    from aotpack.builder.plan import Planner

    planner = Planner("cpu", 4, torch.bfloat16, repeats=1)
    planner.choose("blocks.0.proj", torch.nn.Linear(32, 32).to(torch.bfloat16))
    written = planner.plan()
    assert written["dtype"] == "bfloat16"
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(written))
    on(monkeypatch, AVX2)
    assert spec_mod.resolve("tiny-flux", plan=path, artifacts_dir=tmp_path).dtype == "bfloat16"  # not the box's
    result = CliRunner().invoke(cli, ["build", "tiny-flux", "--plan", str(path), "--dtype", "float32",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "the plan was measured in bfloat16, not --dtype float32" in result.output
    assert "Traceback" not in result.output
    path.write_text(json.dumps({**written, "dtype": "float64"}))
    result = CliRunner().invoke(cli, ["build", "tiny-flux", "--plan", str(path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "'dtype' must be one of float32, bfloat16, float16" in result.output


def test_a_pull_prefers_the_build_in_the_dtype_this_machine_computes_fastest():
    from aotpack.hub import choose_build

    def entry(platform: Platform, dtype: str, size: int) -> dict:
        return {"scheme": "int8wo", "dtype": dtype, "size": size, "platform": dataclasses.asdict(platform)}

    # one repo, both built on the same kind of box (the same platform tag): bf16 is the smaller build
    index = {"builds": {"int8wo-fp32-cpu": entry(ZEN4, "float32", 600), "int8wo-bf16-cpu": entry(ZEN4, "bfloat16", 400)}}
    no_bf16 = CASCADE  # the same ISA tag, no bf16 units
    assert choose_build(index, dataclasses.asdict(ZEN4)) == "int8wo-bf16-cpu"
    assert choose_build(index, dataclasses.asdict(no_bf16)) == "int8wo-fp32-cpu"  # not the smallest: the fastest


def test_int8_matmuls_stay_in_float32_on_cpu(monkeypatch, tmp_path, built):
    """int8dq multiplies in int8: float32 carries the rest faster and closer than bf16 (measured, see
    platform.INT8_MATMUL); flux-blocks' default scheme is int8dq where the CPU has int8 units, built in fp32."""
    assert compute_dtype(ZEN4, "int8dq")[0] == compute_dtype(AVX2, "int8dq")[0] == "float32"
    assert compute_dtype(ZEN4, "int8wo")[0] == "bfloat16" and compute_dtype(gpu("9.0"), "int8dq")[0] == "bfloat16"
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.recipe_parse import parse_recipe

    on(monkeypatch, ZEN4)
    # flux-blocks' own fields on tiny-flux's checkpoint (its 2 GB one would be written just to be resolved)
    blocks = parse_recipe({**get_recipe("flux-blocks").data, "checkpoint": "builtin:tiny-flux"})
    spec = spec_mod.resolve(blocks, artifacts_dir=tmp_path)
    assert (spec.quant, spec.dtype) == ("int8dq", "float32") and spec.out.name.endswith("-fp32")


def test_the_pull_preference_follows_the_scheme_too():
    """int8dq is built in float32 by `--dtype auto` on any CPU: a pull on a bf16 box prefers that build of it."""
    from aotpack.hub import choose_build

    def entry(dtype: str, size: int) -> dict:
        return {"scheme": "int8dq", "dtype": dtype, "size": size, "platform": dataclasses.asdict(ZEN4)}

    index = {"builds": {"int8dq-cpu": entry("float32", 600), "int8dq-bf16-cpu": entry("bfloat16", 400)}}
    assert choose_build(index, dataclasses.asdict(ZEN4)) == "int8dq-cpu"


def test_a_hostile_dtype_in_the_index_neither_crashes_the_choice_nor_wins_it():
    from aotpack.hub import choose_build

    good = {"scheme": "none", "dtype": "bfloat16", "size": 900, "platform": dataclasses.asdict(ZEN4)}
    for hostile in ({"x": 1}, ["bfloat16"], None, 7, "bfloat16\n"):
        index = {"builds": {"a-good": good, "b-odd": {**good, "dtype": hostile, "size": 1}}}
        assert choose_build(index, dataclasses.asdict(ZEN4)) == "a-good"


VNNI_ONLY = Platform(cpu_flags=("avx2", "fma", "f16c", "avx_vnni"), **BASE)  # Alder Lake and later: AVX-VNNI


@pytest.mark.parametrize("here,slow", [(AVX2, True), (CASCADE, False), (ZEN4, False), (SPR, False),
                                       (VNNI_ONLY, True), (gpu("9.0"), False)],
                         ids=["avx2", "avx512-vnni", "avx512-bf16", "amx", "avx-vnni", "sm90"])
def test_int8_matmuls_are_slow_only_on_a_cpu_without_int8_units(here, slow):
    """Measured on an AVX2-only AMD EPYC: torch runs int8 matmuls there without oneDNN, ~25x slower than fp32;
    torch takes oneDNN for them only with AVX512-VNNI (``torch.cpu._is_vnni_supported``), so AVX-VNNI alone is
    slow too."""
    why = plat.slow_scheme(here.device, here.cpu_flags, "int8dq")
    assert (why is not None) == slow and (not slow or "without oneDNN" in why)
    assert all(plat.slow_scheme(here.device, here.cpu_flags, s) is None for s in ("none", "int8wo", "auto", None))


def test_the_int8_rule_is_torchs_own_on_this_cpu():
    """On this machine: int8dq is slow by aotpack's flags exactly where torch (and torchao, which asks it) finds no
    VNNI or AMX to run int8 matmuls on."""
    import torch

    here = plat.slow_scheme("cpu", plat.cpu_flags(), "int8dq") is None
    assert here == (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def test_a_recipe_default_slow_here_gives_way_to_its_next_choice(monkeypatch, tmp_path, built, caplog):
    """flux-blocks' default_quant is ["int8dq", "none"]: int8 matmuls where the CPU has int8 units, float32 none
    on one without (int8dq there ran ~25x slower than float32). A user who names --quant int8dq gets it, warned."""
    import logging

    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.recipe_parse import parse_recipe

    caplog.set_level(logging.INFO, logger="aotpack")
    blocks = parse_recipe({**get_recipe("flux-blocks").data, "checkpoint": "builtin:tiny-flux"})
    assert (blocks.default_quant, blocks.default_quants) == ("int8dq", ("int8dq", "none"))
    on(monkeypatch, AVX2)
    spec = spec_mod.resolve(blocks, artifacts_dir=tmp_path)
    assert (spec.quant, spec.dtype) == ("none", "float32") and "-none-" in spec.out.name
    assert "--quant none: the recipe's default int8dq is slow here (int8dq multiplies in int8" in caplog.text
    caplog.clear()
    assert spec_mod.resolve(blocks, "int8dq", artifacts_dir=tmp_path).quant == "int8dq"  # asked for: built
    assert "--quant int8dq: int8dq multiplies in int8" in caplog.text and "--quant none runs faster here" in caplog.text
    for here in (ZEN4, SPR, CASCADE):
        on(monkeypatch, here)
        assert spec_mod.resolve(blocks, artifacts_dir=tmp_path).quant == "int8dq"
    tiny = get_recipe("tiny-flux")  # one name: the default on every box
    assert tiny.default_for("cpu", AVX2.cpu_flags) == ("int8wo", None)
    only_slow = parse_recipe({**tiny.data, "default_quant": ["int8dq"]})
    assert only_slow.default_for("cpu", AVX2.cpu_flags) == ("int8dq", None)  # nothing else named: the first
    on(monkeypatch, AVX2)
    caplog.clear()
    assert spec_mod.resolve(only_slow, artifacts_dir=tmp_path).quant == "int8dq"
    assert "--quant int8dq: int8dq multiplies in int8" in caplog.text  # warned as if asked for


@pytest.mark.parametrize("here", [AVX2, VNNI_ONLY, CASCADE, ZEN4, SPR],
                         ids=["avx2", "avx-vnni", "avx512-vnni", "avx512-bf16", "amx"])
def test_a_recipe_freezes_float32_none_on_every_cpu_kind(monkeypatch, tmp_path, here):
    """A recipe's ``freeze = true`` freezes float32 none on every CPU, AVX2-only ones included: there its
    oneDNN-packed weights ran 1.34x faster a forward than the unfrozen artifact's plain GEMM on one AMD EPYC (Zen 3,
    20 interleaved rounds) and within 3 % of it on another; --no-freeze builds it unfrozen. The bench names (and
    finds) the artifact the build makes."""
    from aotpack.bench.run import _artifact_path
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.recipe_parse import parse_recipe
    from aotpack.builder.schemes import freezes_by_default

    blocks = parse_recipe({**get_recipe("flux-blocks").data, "checkpoint": "builtin:tiny-flux"})
    for quant in ("none", "int8dq"):
        assert freezes_by_default(blocks, "cpu", quant)
    assert not freezes_by_default(blocks, "cpu", "int8wo") and not freezes_by_default(blocks, "cuda", "none")
    on(monkeypatch, here)
    for dtype in ("float32", "bfloat16"):
        spec = spec_mod.resolve(blocks, "none", dtype=dtype, artifacts_dir=tmp_path)
        assert spec.options.freeze and "-frozen" in spec.out.name
        assert _artifact_path(blocks, "none", here, tmp_path, blocks.regional, dtype) == spec.out
    assert not spec_mod.resolve(blocks, "none", dtype="float32", freeze=False, artifacts_dir=tmp_path).options.freeze


def test_default_quant_is_a_name_or_a_list_of_distinct_names():
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.recipe_parse import parse_recipe
    from aotpack.errors import RecipeError

    base = get_recipe("tiny-flux").data
    for bad in ([], ["int8dq", "int8dq"], [1], ["int8dq", ""], "", None, {"int8dq": 1}):
        with pytest.raises(RecipeError, match="'default_quant' must be a scheme's name, or a list of distinct"):
            parse_recipe({**base, "default_quant": bad})
    with pytest.raises(RecipeError, match="default_quant names an unknown scheme 'nnoe'"):
        parse_recipe({**base, "default_quant": ["int8dq", "nnoe"]})  # a fallback only some boxes would reach
    r = parse_recipe({**base, "default_quant": ["int8dq", "int8wo"]})
    assert r.default_for("cpu", AVX2.cpu_flags)[0] == "int8wo" and r.default_for("cpu", ZEN4.cpu_flags)[0] == "int8dq"
    with pytest.raises(ValueError, match="is not the first of"):
        dataclasses.replace(r, default_quant="none")  # the two fields cannot disagree
    assert dataclasses.replace(r, default_quant="none", default_quants=()).default_quants == ("none",)


def test_a_pull_on_a_cpu_without_int8_units_passes_over_the_int8dq_build():
    from aotpack.hub import choose_build

    def entry(scheme: str, size: int) -> dict:
        return {"scheme": scheme, "dtype": "float32", "size": size, "platform": dataclasses.asdict(AVX2)}

    index = {"builds": {"int8dq-cpu": entry("int8dq", 500), "none-cpu": entry("none", 2000)}}
    assert choose_build(index, dataclasses.asdict(AVX2)) == "none-cpu"  # not the smallest: ~25x faster here
    assert choose_build(index, dataclasses.asdict(AVX2), quant="int8dq") == "int8dq-cpu"  # asked for
    assert choose_build(index, dataclasses.asdict(VNNI_ONLY)) == "none-cpu"  # AVX-VNNI: torch does not use it
    # AVX-512 without VNNI (Skylake-X): an AVX2 box's none build over its own platform's int8dq build
    skx = Platform(cpu_flags=AVX512[:-1], **{**BASE, "isa": "avx512"})
    index = {"builds": {"int8dq-skx": {**entry("int8dq", 500), "platform": dataclasses.asdict(skx)},
                        "none-avx2": entry("none", 2000)}}
    assert plat.tag(skx) != plat.tag(AVX2) and choose_build(index, dataclasses.asdict(skx)) == "none-avx2"


def test_quant_auto_does_not_time_int8dq_where_the_cpu_has_no_int8_units():
    from aotpack.builder.plan import candidates

    names = {f: [s.name for s in candidates("cpu", flags=p.cpu_flags)] for f, p in (("avx2", AVX2), ("vnni", CASCADE))}
    assert "int8dq" not in names["avx2"] and "int8dq" in names["vnni"]
    assert set(names["vnni"]) - set(names["avx2"]) == {"int8dq"} and "int8wo" in names["avx2"]
