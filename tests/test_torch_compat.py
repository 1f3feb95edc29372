"""Each private torch/torchao surface of aotpack/_torch_compat.py against the public path or the contract aotpack
relies on: a torch upgrade that changes one of them fails here, not in a user's serving process."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from aotpack import _torch_compat as compat
from aotpack.artifact import manifest as mf
from aotpack.artifact.files import MODEL, WEIGHTS


def test_isa_table_is_derived_from_inductor_and_names_the_cpuinfo_flags():
    table = compat.isa_cpu_flags()
    assert table["avx2"] == {"avx2", "fma", "f16c"}
    assert {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= table["avx512"]
    assert table["avx512_vnni"] == table["avx512"] | {"avx512_vnni"}
    assert {"amx_tile", "amx_bf16", "amx_int8", "avx512_vnni"} <= table["amx_tile"]


def test_the_probed_isa_is_one_inductor_supports():
    assert compat.pick_isa() in compat.supported_isas()


def test_unwrap_tensor_subclass_leaves_plain_tensors():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(32, 32))
    quantize_(model, Int8WeightOnlyConfig())
    assert type(model[0].weight.data) is not torch.Tensor
    compat.unwrap_tensor_subclass(model)
    assert all(type(v) is torch.Tensor for v in model.state_dict().values())


def test_open_package_matches_the_public_loader(artifacts):
    """The private loader (no ISA probe) and torch._inductor.aoti_load_package run the same code the same way."""
    from safetensors.torch import load_file

    path = artifacts("int8wo")
    manifest = mf.read(path)
    module = manifest.component
    weights = load_file(str(path / WEIGHTS))
    constants = {f: weights[module.key(module.instances[0], f)]
                 for f in compat.weight_fqns(compat.open_package(path / MODEL))}
    g = torch.Generator().manual_seed(0)
    sizes = module.inputs.sizes(lambda name, rng: rng[0] if name == "batch" else rng[1] // 2)
    x = {t.name: torch.randn([sizes[d] if isinstance(d, str) else d for d in t.shape], generator=g)
         for t in module.inputs.tensors}
    outs = []
    for opener in (compat.open_package, lambda p: torch._inductor.aoti_load_package(str(p))):
        compiled = opener(path / MODEL)
        assert sorted(compat.weight_fqns(compiled)) == sorted(constants)
        assert compiled.get_metadata()["aotpack.module"] == "transformer"
        compiled.load_constants(constants, check_full_update=True, user_managed=True)
        out = compiled(x)
        outs.append(out[0] if isinstance(out, (list, tuple)) else out)
    assert torch.equal(outs[0], outs[1])


def test_input_names_are_the_order_the_compiled_code_reads_its_dict_in(artifacts):
    """``input_names`` reads the package's exported call spec; the runner feeds a dict's values in the dict's
    own order, so the same tensors in another order give another (wrong) result and no error."""
    path = artifacts("none")
    module = mf.read(path).component
    compiled = torch._inductor.aoti_load_package(str(path / MODEL))
    assert compat.input_names(compiled) == list(module.inputs.names)  # the order the manifest records
    assert compat.input_names(object()) is None  # not a package: no order, no crash
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS))
    compiled.load_constants({f: weights[module.key(module.instances[0], f)] for f in compat.weight_fqns(compiled)},
                            check_full_update=True, user_managed=True)
    g = torch.Generator().manual_seed(0)
    sizes = module.inputs.sizes(lambda name, rng: rng[0] if name == "batch" else rng[1] // 2)
    x = {t.name: torch.randn([sizes[d] if isinstance(d, str) else d for d in t.shape], generator=g)
         for t in module.inputs.tensors}
    names = list(x)
    shuffled = {n: x[n] for n in names[1:] + names[:1]}
    with torch.no_grad():
        want = compiled(x)[0]
        try:
            got = compiled(shuffled)[0]
        except RuntimeError:  # the wrong tensor in a slot may also fail inside the code
            got = None
    assert got is None or not torch.equal(got, want)  # why every call builds its dict in the spec's order


def test_open_package_falls_back_loudly_when_the_private_loader_changes(artifacts, monkeypatch, caplog):
    real = torch._C._aoti.AOTIModelPackageLoader
    calls = []

    class Changed:  # the first call (aotpack's private path) fails as a changed signature would
        load_metadata_from_package = staticmethod(real.load_metadata_from_package)

        def __new__(cls, *args, **kwargs):
            calls.append(args)
            if len(calls) == 1:
                raise TypeError("__init__(): incompatible constructor arguments")
            return real(*args, **kwargs)

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", Changed)
    with caplog.at_level(logging.WARNING, logger="aotpack"):
        compiled = compat.open_package(artifacts("int8wo") / MODEL)
    assert compiled.get_constant_fqns() and len(calls) >= 2
    assert "using the public loader" in caplog.text


def _broken_package(path):
    """A zip laid out like a .pt2 whose library is not one: torch's loader extracts it, then fails."""
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/archive_format", "pt2")
        z.writestr("model/data/aotinductor/model/x.cpp", "int x;")
        z.writestr("model/data/aotinductor/model/x.so", "not a shared library")
    return path


def _fresh_tmpdir(tmp_path, monkeypatch):
    compat.preload()  # inductor makes its cache folder in the temp folder when first imported: not a leftover
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)  # Python caches its choice: make it choose again
    return tmp


def test_t35_a_package_that_fails_to_load_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    bad = _broken_package(tmp_path / "bad.pt2")
    tmp = _fresh_tmpdir(tmp_path, monkeypatch)
    for _ in range(2):
        try:
            compat.open_package(bad)
        except Exception:  # torch's own error; aotpack's loader turns it into its own line
            pass
        else:
            raise AssertionError("a broken package loaded")
    assert os.listdir(tmp) == []
    assert os.environ["TMPDIR"] == str(tmp)  # restored after the load


def test_t35_the_public_loader_fallback_also_leaves_nothing(tmp_path, monkeypatch):
    bad = _broken_package(tmp_path / "bad.pt2")
    tmp = _fresh_tmpdir(tmp_path, monkeypatch)
    real, calls = torch._C._aoti.AOTIModelPackageLoader, []

    def changed(*args):  # aotpack's private call fails as a changed signature would; the public one is real
        calls.append(args)
        if len(calls) == 1:
            raise TypeError("__init__(): incompatible constructor arguments")
        return real(*args)

    monkeypatch.setattr(torch._C._aoti, "AOTIModelPackageLoader", changed)
    try:
        compat.open_package(bad)
    except Exception:
        pass
    assert len(calls) == 2 and os.listdir(tmp) == []


def test_t35_a_loaded_package_takes_its_extraction_folder_with_it(artifacts, tmp_path, monkeypatch):
    import gc

    path = artifacts("int8wo") / MODEL
    tmp = _fresh_tmpdir(tmp_path, monkeypatch)
    compiled = compat.open_package(path)
    assert compiled.get_constant_fqns() and len(os.listdir(tmp)) == 1  # the model's own folder while it lives
    del compiled
    gc.collect()
    assert os.listdir(tmp) == []


class _Folds(torch.nn.Module):
    """A bias inductor folds into the code (a constant computed from a weight) unless folding runs at run time."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(8, 8)
        self.b = torch.nn.Parameter(torch.randn(8, 3))

    def forward(self, x):
        return self.lin(x) * 2 + self.b.t().unsqueeze(0).sum(1, keepdim=True)


@pytest.mark.slow  # two small AOTInductor compiles
def test_runtime_folding_keeps_every_weight_a_constant_and_refolds_after_a_swap(tmp_path):
    """What regional builds and LoRA swaps rely on: with RUNTIME_FOLDING every weight is a loadable constant
    (weight_fqns), the folded ones carry FOLDED_PREFIX and are not asked for by a full update, and swapping in
    another instance's weights gives that instance's output. Without it, torch bakes a weight into the code."""
    a, b, x = _Folds(0).eval(), _Folds(1).eval(), torch.randn(3, 8)
    ep = torch.export.export(a, (x,))
    plain = compat.open_package(compat.aoti_compile_and_package(
        ep, tmp_path / "plain.pt2", {"aot_inductor.package_constants_in_so": False}))
    params = {n for n, _ in a.named_parameters()}
    baked = params - set(compat.weight_fqns(plain))
    code = compat.open_package(compat.aoti_compile_and_package(
        ep, tmp_path / "fold.pt2", {"aot_inductor.package_constants_in_so": False, compat.RUNTIME_FOLDING: True}))
    assert set(compat.weight_fqns(code)) == params
    assert all(f.startswith(compat.FOLDED_PREFIX) for f in set(code.get_constant_fqns()) - params)
    for model in (a, b, a):
        state = {f: model.state_dict()[f].contiguous() for f in compat.weight_fqns(code)}
        code.load_constants(state, check_full_update=True, user_managed=True)
        assert torch.allclose(code(x)[0] if isinstance(code(x), (list, tuple)) else code(x), model(x), atol=1e-5)
    print(f"weights baked into the code without runtime folding: {sorted(baked)}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_weight_mm_is_the_dequantized_matmul(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g).to(dtype)
    w = torch.randint(-127, 128, (48, 128), dtype=torch.int8, generator=g)
    scales = (torch.rand(48, generator=g) / 100).to(dtype)
    got = compat.int8_weight_mm(x, w, scales)
    want = x.float() @ (w.float() * scales.float()[:, None]).T
    assert got.dtype == dtype and got.shape == (3, 48)
    assert float((got.float() - want).abs().max() / want.abs().max()) < 1e-2


def test_int8_weight_mm_refuses_what_crashed_the_kernel_before_calling_it():
    # K = 100 killed the process inside aten._weight_int8pack_mm (SIGSEGV, torch 2.13 CPU): never reaches it
    with pytest.raises(ValueError, match="multiple of 64"):
        compat.int8_weight_mm(torch.randn(2, 100), torch.zeros(32, 100, dtype=torch.int8), torch.ones(32))
    with pytest.raises(ValueError, match="int8 weight"):
        compat.int8_weight_mm(torch.randn(2, 64), torch.zeros(32, 64), torch.ones(32))


@pytest.mark.slow
def test_recording_folds_writes_down_every_constant_freezing_computes(tmp_path):
    """``recording_folds`` wraps inductor's ``replace_node_with_constant``: every constant the frozen code expects
    that no weight is named after has a recipe, and the recipes replayed give the code what it computes with
    (output equal to eager in bf16 rounding, packed in oneDNN's layout where oneDNN runs bf16)."""
    from aotpack.artifact import folds

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(self.a(x)))

    model = Two().to(torch.bfloat16).eval()
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), strict=False)
        with compat.recording_folds() as recorded:
            package = compat.aoti_compile_and_package(ep, tmp_path / "m.pt2", {
                "freezing": True, "aot_inductor.package_constants_in_so": False})
        compiled = compat.open_package(package)
        state = dict(ep.state_dict)
        fqns = compat.weight_fqns(compiled)
        frozen = [f for f in fqns if f not in state]
        assert frozen and all(isinstance(recorded.get(f), dict) for f in frozen), (fqns, recorded)
        assert not folds.problems({f: recorded[f] for f in frozen})
        constants = {f: state[f] if f in state else folds.replay(f, recorded[f], state.__getitem__) for f in fqns}
        assert any(c.is_mkldnn for c in constants.values()) == compat.packs_bf16()  # AVX2: transposes only
        compiled.load_constants(constants, check_full_update=True, user_managed=True)
        out, want = compiled(x), model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert torch.allclose(out.float(), want.float(), atol=0.05, rtol=0.05)


@pytest.mark.slow  # two small AOTInductor compiles
@pytest.mark.parametrize("amx", [True, False], ids=["s8s8-amx", "u8s8-vnni"])
def test_a_frozen_int8dq_linear_keeps_int_mm_and_replayable_folds(tmp_path, monkeypatch, amx):
    """torchao traces int8dq's matmul as s8s8 on an AMX CPU and as u8s8 with a column-sum compensation on a VNNI one
    (``torchao.kernel.intmm._int_scaled_matmul_cpu``), so a CI box sees only one: both are traced here. Inductor's
    freezing has a rewrite of the s8s8 form to oneDNN's ``qlinear`` (``_register_smooth_quant_int_mm_pattern``),
    which torch.compile takes (2.3x slower on an AMX box) and the exported graph does not: export's
    ``_assert_tensor_metadata`` checks give the pattern's middle nodes a second user. Should a torch drop them, a
    frozen int8dq build would fold through ``onednn.qlinear_prepack``, which aotpack does not replay: this fails."""
    import zipfile

    import torchao.kernel.intmm as intmm
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from aotpack.artifact import folds

    monkeypatch.setattr(intmm, "_cpu_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(intmm, "_cpu_is_vnni_supported", lambda: True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    compat.unwrap_tensor_subclass(model)  # as a build exports it: plain int8 weights and scales
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), strict=False)
        with compat.recording_folds() as recorded:
            package = compat.aoti_compile_and_package(ep, tmp_path / "m.pt2", {
                "freezing": True, "aot_inductor.package_constants_in_so": False,
                "always_keep_tensor_constants": True})
        with zipfile.ZipFile(package) as z:
            code = "".join(z.read(n).decode() for n in z.namelist() if n.endswith(".cpp"))
        assert "qlinear" not in code and code.count("_int_mm") >= 2
        compiled = compat.open_package(package)
        state = {**ep.state_dict, **ep.constants}
        fqns = compat.weight_fqns(compiled)
        frozen = {f: recorded.get(f) for f in fqns if f not in state}
        assert frozen and not folds.problems(frozen), frozen
        sums = [r for r in frozen.values() if any(s[0] == "aten.sum.dim_IntList" for s in r["steps"])]
        assert len(sums) == (0 if amx else 2)
        compiled.load_constants({f: state[f] if f in state else folds.replay(f, frozen[f], state.__getitem__)
                                 for f in fqns}, check_full_update=True, user_managed=True)
        out, want = compiled(x), model(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert torch.allclose(out, want, atol=1e-4, rtol=1e-4)


def test_what_this_cpu_packs_and_traces_is_what_the_helpers_say():
    """``packs_bf16``: oneDNN's bf16 weight packing runs here exactly when it says; ``torchao_u8s8``: torchao's int8
    matmul on this CPU computes a column-sum compensation exactly when it says (a frozen int8dq build folds it)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torchao.kernel.intmm import int_scaled_matmul

    w = torch.randn(16, 32, dtype=torch.bfloat16)
    try:
        torch.ops.mkldnn._reorder_linear_weight(w, 4)
        packed = True
    except RuntimeError:
        packed = False
    assert compat.packs_bf16() == packed
    a, b = torch.randint(-128, 128, (4, 32), dtype=torch.int8), torch.randint(-128, 128, (32, 16), dtype=torch.int8)
    graph = make_fx(int_scaled_matmul)(a, b, torch.ones(4, 1))
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert any("sum" in o for o in ops) == compat.torchao_u8s8(), ops
