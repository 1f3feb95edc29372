"""``--freeze`` (issue 21, item 3): inductor's freezing in a CPU artifact. Its folded constants (weights transposed
and packed in oneDNN's layout) are recorded at build as steps over the artifact's weights and replayed at load;
the record is data the loader checks, never code: an edited step, an unlisted operation, a wrong shape or a
weight it does not hold is refused before the compiled code holds any constant."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from aotpack import _torch_compat as compat
from aotpack.artifact import folds
from aotpack.artifact import manifest as mf
from aotpack.artifact.files import WEIGHTS
from aotpack.errors import IntegrityError, ManifestError, SchemeError

FROZEN = {"dtype": "bfloat16", "freeze": True, "regional": False}
FROZEN_INT8DQ = {"dtype": "float32", "freeze": True, "regional": False}
BUILDS = {"whole": FROZEN, "regional": {**FROZEN, "regional": True}}
PACK = "mkldnn._reorder_linear_weight.default"


def _recipe(steps, shape, layout="strided", dtype="bfloat16", stride=None) -> dict:
    if stride is None and layout == "strided":
        stride = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    return {"steps": steps, "dtype": dtype, "shape": shape, "stride": stride, "layout": layout}


# ---- the record, without a compile -----------------------------------------------------------------------------

def test_t42_replay_runs_the_recorded_steps_and_checks_what_comes_out():
    w = torch.randn(8, 4, dtype=torch.bfloat16)
    weights = {"a.weight": w}.__getitem__
    steps = [["aten.permute.default", [{"w": "a.weight"}, [1, 0]], {}],
             ["prims.convert_element_type.default", [{"s": 0}, {"dtype": "float32"}], {}]]
    out = folds.replay("c", _recipe(steps, [4, 8], dtype="float32", stride=[1, 4]), weights)
    assert torch.equal(out, w.t().float())
    with pytest.raises(IntegrityError, match=r"comes out float32 \[4, 8\] strided strides \[1, 4\] on cpu, the "
                                             r"compiled code expects float32 \[8, 4\] strided strides \[4, 1\]"):
        folds.replay("c", _recipe(steps, [8, 4], dtype="float32"), weights)
    with pytest.raises(IntegrityError, match=r"expects float32 \[4, 8\] strided strides \[8, 1\]"):  # strides
        folds.replay("c", _recipe(steps, [4, 8], dtype="float32"), weights)
    with pytest.raises(IntegrityError, match="cannot be computed from the weights"):
        folds.replay("c", _recipe([["aten.permute.default", [{"w": "a.weight"}, [2, 0]], {}]], [4, 8]), weights)
    assert folds.inputs({"c": _recipe(steps, [4, 8])}) == {"a.weight"}
    # kwargs: a dict of plain names, whose values may be references (never the dict itself)
    kw = _recipe([["prims.convert_element_type.default", [{"w": "a.weight"}], {"dtype": {"dtype": "float32"}}]],
                 [8, 4], dtype="float32")
    assert not folds.problems({"c": kw}) and torch.equal(folds.replay("c", kw, weights), w.float())
    assert folds.inputs({"c": _recipe([["aten.t.default", [], {"w": "not.a.ref"}]], [1])}) == set()


def test_t42_no_step_allocates_more_than_the_recipe_reads_and_makes():
    """A broadcast, a cat of a cat or a pile of float64 casts passes the record's check (listed operations, plain
    arguments): the dry run on meta tensors refuses it before anything is allocated."""
    w = torch.randn(4096, dtype=torch.bfloat16)
    broadcast = [["aten.reshape.default", [{"w": "w"}, [4096, 1]], {}],
                 ["aten.reshape.default", [{"w": "w"}, [1, 4096]], {}],
                 ["aten.mul.Tensor", [{"s": 0}, {"s": 1}], {}], ["aten.sum.default", [{"s": 2}], {}]]
    doubling = [["aten.cat.default", [[{"w": "w"}, {"w": "w"}]], {}]] + \
               [["aten.cat.default", [[{"s": i}, {"s": i}]], {}] for i in range(40)]
    casts = [["prims.convert_element_type.default", [{"w": "w"}, {"dtype": "float64"}], {}]] * 63 + \
            [["aten.slice.Tensor", [{"w": "w"}, 0, 0, 1], {}]]
    for steps in (broadcast[:3], doubling, casts):
        recipe = _recipe(steps, [1])
        assert not folds.problems({"c": recipe})
        with pytest.raises(IntegrityError, match=r"its steps would hold \d+ bytes to make 2 from weights of 8192"):
            folds.replay("c", recipe, {"w": w}.__getitem__)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_t42_replay_packs_for_this_cpu():
    """A bf16 packing step replays into oneDNN's layout where oneDNN runs bf16; on a CPU where it does not (AVX2),
    the same record is a one-line refusal (a frozen bf16 build made here has no packing step: see below)."""
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    recipe = _recipe([[PACK, [{"w": "w"}, 4], {}]], [16, 32], "mkldnn")
    if not compat.packs_bf16():
        with pytest.raises(IntegrityError, match="folded constant c cannot be computed from the weights"):
            folds.replay("c", recipe, {"w": w}.__getitem__)
        return
    out = folds.replay("c", recipe, {"w": w}.__getitem__)
    assert out.is_mkldnn and out.dtype == torch.bfloat16


def test_t42_an_int8_column_sum_replays_as_the_same_integers_faster():
    """int8dq's GEMM compensation (an int8 weight's sums into int32) replays through an int8 matmul: every result,
    its shape and strides equal aten.sum's, for views, either dim, keepdim or not, extreme values; anything else
    (float, several dims, a sum that could overflow int32) runs aten.sum itself."""
    torch.manual_seed(0)
    extreme = torch.full((64, 24), -128, dtype=torch.int8)
    cases = [torch.randint(-128, 128, (k, n), dtype=torch.int8) for k, n in ((1, 1), (3, 5), (17, 16), (96, 40))]
    column = torch.randint(-128, 128, (40, 1), dtype=torch.int8)    # its transpose: strides (1, 1), which the CPU
    cases += [cases[-1].permute(1, 0), cases[-1][::3, 1::2], extreme, extreme.t(), column, column.t(),  # _int_mm
              cases[-1][:1].expand(5, 40)]                                                         # never writes
    for x in cases:
        for dim, keep in ((0, True), (1, True), (0, False), (1, False), (-1, True), (-2, False)):
            want = torch.ops.aten.sum.dim_IntList(x, [dim], keep, dtype=torch.int32)
            got = folds._int8_sum(x, [dim], keep, dtype=torch.int32)
            assert torch.equal(got, want) and got.stride() == want.stride(), (x.shape, dim, keep)
    steps = [["aten.permute.default", [{"w": "w"}, [1, 0]], {}],
             ["aten.sum.dim_IntList", [{"s": 0}, [0], True], {"dtype": {"dtype": "int32"}}],
             ["aten.mul.Tensor", [{"s": 1}, 128], {}]]
    w = cases[3]
    out = folds.replay("c", _recipe(steps, [1, 96], dtype="int32"), {"w": w}.__getitem__)
    assert torch.equal(out, w.t().sum(0, keepdim=True, dtype=torch.int32) * 128)
    calls = []
    real = torch._int_mm
    big = torch.ones(2**31 // 128, 2, dtype=torch.int8)                 # a column sum could reach 2**31
    try:
        torch._int_mm = lambda *a: calls.append(a) or real(*a)
        folds._int8_sum(torch.ones(4, 4), [0], True, dtype=torch.float32)
        folds._int8_sum(w, [0, 1], True, dtype=torch.int32)
        folds._int8_sum(w, [0], True)                                     # int64 by default: aten.sum
        for x in (column.t(), w[::3, 1::2], w[:1].expand(5, 40)):         # strides the fast path does not take
            folds._int8_sum(x, [0], True, dtype=torch.int32)
        assert torch.equal(folds._int8_sum(big, [0], True, dtype=torch.int32), big.sum(0, True, dtype=torch.int32))
        assert not calls
        folds._int8_sum(w, [0], True, dtype=torch.int32)
        assert len(calls) == 1
        folds.replay("c", _recipe(steps, [1, 96], dtype="int32"), {"w": w}.__getitem__)   # a load takes it
        assert len(calls) == 2
    finally:
        torch._int_mm = real


@pytest.mark.parametrize("fold,problem", [
    ({}, "fold must map constant names to their steps"),
    ({"c": {"steps": [["aten.t.default", [{"w": "a"}], {}]]}}, "must hold steps, dtype, shape, stride and layout"),
    ({"c": _recipe([["aten._to_copy.default", [{"w": "a"}], {"device": "meta"}]], [1])}, "is not an operation"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {"dtype": {"dtype": {"dtype": "x"}}}]], [1])}, "arguments"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {"dtype": ["bfloat16"]}]], [1])}, ""),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {1: 2}]], [1])}, "must be [operation, args, kwargs]"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}, float("nan")], {}]], [1])}, "arguments must be"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}, list(range(65))], {}]], [1])}, "arguments must be"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {}]], [1], stride=[1, 1])}, "names no tensor dtype"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {}]], [1], layout="mkldnn", stride=[1])}, "names no tensor"),
    ({"c": _recipe([["builtins.eval", ["1"], {}]], [1])}, "'builtins.eval' is not an operation"),
    ({"c": _recipe([["aten.empty.memory_format", [[1 << 40]], {}]], [1])}, "is not an operation"),
    ({"c": _recipe([["aten.t.default", [{"s": 0}], {}]], [1])}, "arguments must be weights, earlier steps"),
    ({"c": _recipe([["aten.t.default", [{"w": "a", "s": 0}], {}]], [1])}, "arguments must be"),
    ({"c": _recipe([["aten.t.default", [{"dtype": "object"}], {}]], [1])}, "arguments must be"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {}]], [-1], stride=[1])}, "names no tensor dtype, shape"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {}]], [1], layout="sparse")}, "names no tensor dtype"),
    ({"c": _recipe([["aten.t.default", [{"w": "a"}], {}]] * (folds.MAX_STEPS + 1), [1])}, "must have 1 to"),
    ({"c": _recipe([["aten.t.default", [[[[[[{"w": "a"}]]]]]], {}]], [1])}, "arguments must be"),
])
def test_t42_a_fold_record_that_is_not_plain_listed_steps_is_refused(fold, problem):
    found = folds.problems(fold)  # never an exception of its own: a list of what is wrong
    assert (not found) if not problem else any(problem in p for p in found), found


def test_t42_freeze_is_refused_where_it_cannot_hold():
    from aotpack.builder.schemes import check_freeze

    for args, kwargs, cause in [(("cuda", False), {}, "packs weights for a CPU"),
                                (("cpu", True), {}, "--lora"),
                                (("cpu", False), {"quant": "int8wo"}, "folds its int8 weights back to float"),
                                (("cpu", False), {"quant": "auto"}, "is for --quant none or int8dq, not auto"),
                                (("cpu", False), {"compile_vae": True}, "--compile-vae"),
                                (("cpu", False), {"reuse": True}, "--reuse")]:
        with pytest.raises(SchemeError, match=cause):
            check_freeze(*args, **kwargs)
    check_freeze("cpu", False)
    check_freeze("cpu", False, quant="int8dq")


def test_t42_a_recipe_that_freezes_does_so_only_where_freezing_holds():
    """flux-blocks says ``freeze = true``: its CPU builds of none and int8dq freeze unless told not to; where
    freezing cannot hold (another scheme, a GPU, an option it does not combine with) the default is simply off —
    only an explicit --freeze is refused there."""
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.schemes import freezes_by_default

    r = get_recipe("flux-blocks")
    assert r.freeze and not get_recipe("tiny-flux").freeze
    assert freezes_by_default(r, "cpu", "int8dq") and freezes_by_default(r, "cpu", "none")
    for device, quant, kwargs in [("cpu", "int8wo", {}), ("cpu", "auto", {}), ("cuda", "int8dq", {}),
                                  ("cpu", "int8dq", {"lora": True}), ("cpu", "int8dq", {"reuse": True}),
                                  ("cpu", "none", {"compile_vae": True})]:
        assert not freezes_by_default(r, device, quant, **kwargs), (device, quant, kwargs)
    assert not freezes_by_default(get_recipe("tiny-flux"), "cpu", "int8dq")


# ---- a frozen tiny-flux build ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def frozen(artifacts):
    return artifacts("none", **FROZEN)


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_t42_a_frozen_build_stores_plain_weights_and_matches_eager(artifacts, kind):
    from safetensors import safe_open
    from test_variants import fresh_check

    path = artifacts("none", **BUILDS[kind])
    m = mf.read(path)
    assert m.options.freeze and [x.kind for x in m.modules] == (["block", "block"] if kind == "regional" else
                                                                 ["component"])
    with safe_open(str(path / WEIGHTS), "pt") as f:
        stored = set(f.keys())
    for module in m.modules:
        assert module.fold and all(r["steps"] for r in module.fold.values())
        # oneDNN's packed layout where oneDNN runs bf16 (AVX-512, AMX); on AVX2 freezing only transposes
        assert any(step[0] == PACK for r in module.fold.values() for step in r["steps"]) == compat.packs_bf16()
        assert not stored & {module.key(i, f) for i in module.instances for f in module.fold}  # made, not stored
        assert {module.key(i, w) for i in module.instances for w in folds.inputs(module.fold)} <= stored
        assert module.max_abs_error <= module.tolerance
    from aotpack.artifact.summary import summarize

    assert summarize(m).count("folded constants made from the weights at load") == len(m.modules)
    # a fresh load, through the real pipeline at another size than the export's, against eager diffusers
    result = fresh_check(path, "none")
    assert result["vs_eager_same_scheme"] <= max(x.tolerance for x in m.modules), result


def _constants(module) -> dict[str, dict]:
    """{instance: the constants its compiled code holds} of a loaded whole-graph or regional frozen model."""
    if hasattr(module, "_weights"):
        return {module._module.instances[0]: module._weights}
    component = module.manifest.recipe.component
    return {i: module.get_submodule(i[len(component) + 1:]).forward.constants
            for m in module.manifest.modules for i in m.instances}


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_t42_a_lora_swap_replays_the_folds_it_touches(artifacts, lora_file, kind):
    """A swap fuses the LoRA into the plain weights it touches and packs those again; the rest keep the packed
    constants of the load, whose plain weights were let go (meta tensors in what a swap starts from)."""
    import aotpack
    from test_variants import fresh_check

    path = artifacts("none", **BUILDS[kind])
    module = aotpack.load(path, trusted_keys=[])
    folded = {m.key(i, f) for m in module.manifest.modules for i in m.instances for f in m.fold}
    assert any(v.is_meta for v in module._aotpack_keys.values())
    loaded = {i: dict(c) for i, c in _constants(module).items()}
    assert all(not v.is_meta for c in loaded.values() for v in c.values())

    def changed() -> set:
        return {(i, f) for i, c in _constants(module).items() for f in c if c[f] is not loaded[i][f]}

    module.swap_lora(lora_file, 0.8)
    assert changed() and len(changed()) < len(folded)  # replayed where the LoRA touched, kept elsewhere
    module.swap_lora(None)
    assert not changed()  # the artifact's own packed constants again
    # the swap through the real pipeline, against eager diffusers with the LoRA fused (bf16: the swap fuses in
    # float32, diffusers in bf16; a plain bf16 artifact's swap measured 0.117 against its build's 0.116 bound,
    # the frozen one 0.125), and nearer it than to eager without the LoRA (0.207: the LoRA's own effect)
    result = fresh_check(path, "none", "--lora", lora_file, "--lora-scale", "0.8", "--swap")
    assert result["vs_eager_same_scheme"] <= 1.5 * max(x.tolerance for x in mf.read(path).modules), result
    assert result["vs_eager_same_scheme"] < 0.75 * result["vs_eager_without_lora"], result


def test_t42_a_frozen_int8dq_build_folds_views_and_sums_and_matches_eager(artifacts, lora_file):
    """int8dq frozen: inductor transposes each int8 weight (a view of the stored one, no bytes) and, on a VNNI CPU
    without AMX (torchao's u8 x s8 path), precomputes its column sums for the int8 GEMM; the zero points its
    symmetric activations never read are not stored. A fresh load matches eager int8dq, and a LoRA swap replays
    the folds of the weights it requantizes."""
    from safetensors import safe_open
    from test_variants import fresh_check

    path = artifacts("int8dq", **FROZEN_INT8DQ)
    m = mf.read(path)
    (module,) = m.modules
    assert m.options.freeze and m.scheme.name == "int8dq" and module.fold
    ops = {step[0] for r in module.fold.values() for step in r["steps"]}
    u8s8 = compat.torchao_u8s8()  # VNNI without AMX: column sums; AMX or no VNNI: s8 x s8, transposes only
    assert ("aten.sum.dim_IntList" in ops) == u8s8 and "aten.permute.default" in ops and PACK not in ops, ops
    with safe_open(str(path / WEIGHTS), "pt") as f:
        stored = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert {module.key(module.instances[0], w) for w in folds.inputs(module.fold)} <= set(stored)
    int8 = [k for k in stored if k.endswith("original0")]
    assert int8 and not [k for k in stored if k.endswith("original2")]  # zero points: never read, not stored
    # what the load makes: per output channel an int32 column sum and the float32 scale reshaped; the transposed
    # weights are views of the stored ones
    made = folds.nbytes(module.fold)
    assert (0 < made if u8s8 else 0 <= made) and made <= sum(2 * 4 * s[0] for k, s in stored.items() if k in int8)
    assert module.max_abs_error <= module.tolerance
    result = fresh_check(path, "int8dq")
    assert result["vs_eager_same_scheme"] <= module.tolerance, result
    result = fresh_check(path, "int8dq", "--lora", lora_file, "--lora-scale", "0.8", "--swap")
    assert result["vs_eager_same_scheme"] <= 1.5 * module.tolerance, result
    assert result["vs_eager_same_scheme"] < 0.75 * result["vs_eager_without_lora"], result


def _edited(frozen, tmp_path, edit) -> object:
    dest = shutil.copytree(frozen, tmp_path / "a")
    data = json.loads((dest / "manifest.json").read_text())
    edit(data["modules"][0]["fold"])
    (dest / "manifest.json").write_text(json.dumps(data))
    return dest


def _packed(fold: dict) -> str:
    """A packed constant's name (a transposed one where this CPU does not pack bf16)."""
    return next(n for n, r in fold.items() if r["steps"][-1][0] == (PACK if compat.packs_bf16() else
                                                                       "aten.permute.default"))


@pytest.mark.parametrize("case,error,match", [
    ("op", ManifestError, "is not an operation a folded constant may use"),
    ("shape", IntegrityError, "the compiled code expects"),
    ("weight", IntegrityError, "weights do not match the compiled constants"),
    ("extra", IntegrityError, "folds constants .* the compiled code does not expect"),
    ("dropped", IntegrityError, "weights do not match the compiled constants: unexpected"),
])
def test_t42_an_edited_fold_record_is_refused_before_the_code_holds_constants(frozen, tmp_path, case, error,
                                                                              match, opened):
    import aotpack

    def edit(fold: dict) -> None:
        name = _packed(fold)
        if case == "op":
            fold[name]["steps"][0][0] = "aten.empty.memory_format"
        elif case == "shape":
            fold[name]["shape"] = fold[name]["shape"][::-1] + [1]
            if fold[name].get("stride"):  # a transposed weight's record names its strides: as many as its dims
                fold[name]["stride"] = fold[name]["stride"][::-1] + [1]
        elif case == "weight":
            fold[name]["steps"][0][1][0] = {"w": "component.not_a_weight"}
        elif case == "extra":
            fold["_frozen_param999"] = fold[name]
        else:  # the folded constant's weight rides along unread
            del fold[name]

    path = _edited(frozen, tmp_path, edit)
    with pytest.raises(error, match=match):  # raised where the constants are made, before the code takes any
        aotpack.load(path, trusted_keys=[])
    if case == "op":  # an unlisted operation: refused as the manifest is read, before any code is opened
        assert opened == []


def test_t42_a_farm_refuses_freeze_where_a_job_could_not_build_it():
    """--freeze in a build farm's cell: refused while planning, before a (paid) job starts."""
    from aotpack import farm

    problems = [p.problem for p in farm.plan_farm([
        farm.Cell(recipe="tiny-flux", scheme="none", flavor="h200", repo_id="me/f", options=("--freeze",)),
        farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="cpu-basic", repo_id="me/g", options=("--freeze",)),
        farm.Cell(recipe="tiny-flux", scheme="none", flavor="cpu-basic", repo_id="me/h",
                  options=("--freeze", "--dtype", "bfloat16")),
    ])]
    assert "h200: --freeze packs weights for a CPU" in problems[0], problems
    assert "cpu-basic: --freeze with --quant int8wo: inductor's freezing folds" in problems[1], problems
    assert problems[2] is None, problems


def test_t42_a_farm_names_and_forwards_the_recipes_freeze_default():
    """A flux-blocks cell on a CPU flavor pushes a frozen build whether or not it says --freeze (the recipe's
    default): two such cells clash; --no-freeze is another build, and reaches the job's command line."""
    from aotpack import farm
    from aotpack.farm.cell_options import _build_command, options_from_context

    planned = farm.plan_farm([
        farm.Cell(recipe="flux-blocks", scheme="int8dq", flavor="cpu-basic", repo_id="me/b"),
        farm.Cell(recipe="flux-blocks", scheme="int8dq", flavor="cpu-basic", repo_id="me/b", options=("--freeze",)),
        farm.Cell(recipe="flux-blocks", scheme="int8dq", flavor="cpu-upgrade", repo_id="me/c",
                  options=("--no-freeze",)),
    ])
    assert planned[0].build.startswith("int8dq-frozen-cpu") and planned[0].problem is None, planned[0]
    assert "would both push int8dq-frozen-cpu" in planned[1].problem, planned[1].problem
    assert "frozen" not in planned[2].build and planned[2].problem is None, planned[2]
    for typed in (["--no-freeze"], ["--freeze"], ["--whole-graph"], []):
        ctx = _build_command().make_context("build", ["flux-blocks", *typed])
        assert options_from_context(ctx) == typed


def test_t42_a_regional_swap_that_fails_leaves_every_block_as_it_was(artifacts, lora_file, monkeypatch):
    """The blocks' new constants are all made before any is handed over: a replay that fails part way (here the
    last instance's) leaves every instance on the weights it had, and the module on no LoRA."""
    import aotpack
    from aotpack.serve import regional

    module = aotpack.load(artifacts("none", **BUILDS["regional"]), trusted_keys=[])
    before = {i: dict(c) for i, c in _constants(module).items()}
    last = [m.instances[-1] for m in module.manifest.modules][-1]
    real = regional.folds.swapped

    def failing(m, instance, *a):
        if instance == last:
            raise IntegrityError("folded constant x cannot be computed from the weights", "hint")
        return real(m, instance, *a)

    monkeypatch.setattr(regional.folds, "swapped", failing)
    with pytest.raises(IntegrityError, match="cannot be computed"):
        module.swap_lora(lora_file, 0.8)
    assert all(c[f] is before[i][f] for i, c in _constants(module).items() for f in c) and module.lora is None
