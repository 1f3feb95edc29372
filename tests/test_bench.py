"""aotpack bench on tiny-flux (few variants, so that it stays quick): real fresh processes, real files."""

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from aotpack.artifact import platform
from aotpack.bench import BUILD_COLUMNS, COLUMNS, has_repeated_blocks, run_bench

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory, artifacts):
    """``build_only`` on tiny-flux, whole and regional, into a folder that already holds a row of an earlier run
    (another recipe, same platform); the bench test then reuses these two artifacts: two builds in all."""
    from aotpack.bench import machine

    root = tmp_path_factory.mktemp("bench")
    out, arts = root / "builds", root / "arts"
    out.mkdir()
    earlier = {"recipe": "flux-depth-shallow", "blocks": "1+1", "quant": "int8wo", "dtype": "float32",
               "mode": "whole", "modules": 1, "export_s": 7.8, "compile_s": 60.0, "total_s": 80.0, "wall_s": 90.0,
               "pt2_bytes": 2 << 20, "weights_bytes": 16 << 20, "peak_rss_bytes": 1 << 30, "code": "compiled",
               "date": "", "path": "x"}
    (out / "builds.json").write_text(json.dumps({"machine": machine(), "builds": [earlier]}))
    # cold_builds=False: the session's compile cache, which the shared artifacts fill (the figures are not kept;
    # a real bench compiles cold: test_a_bench_build_starts_from_an_empty_compile_cache)
    artifacts("int8wo"), artifacts("int8wo", regional=True)
    run_bench("tiny-flux", ["int8wo"], out=out, regional=True, build_only=True, artifacts_dir=arts, cold_builds=False)
    return out, arts


def test_build_only_writes_the_build_table_and_gathers_runs(built):
    out, arts = built
    assert not (out / "results.md").exists()  # nothing ran
    rows = list(csv.DictReader((out / "builds.csv").open()))
    assert list(rows[0]) == BUILD_COLUMNS
    assert [(r["recipe"], r["mode"]) for r in rows] == [("flux-depth-shallow", "whole"), ("tiny-flux", "whole"),
                                                         ("tiny-flux", "regional")]
    whole, regional = rows[1:]
    assert whole["blocks"] == regional["blocks"] == "1+1"
    assert whole["modules"] == "1" and regional["modules"] == "2"  # one compiled module per block class
    for r in (whole, regional):
        assert r["code"] in ("compiled", "compile cache")
        assert 0 < float(r["export_s"]) and 0 <= float(r["compile_s"]) < float(r["total_s"]) <= float(r["wall_s"])
        assert float(r["pt2_mib"]) > 0 and float(r["peak_rss_gib"]) > 0
    md = (out / "builds.md").read_text()
    assert "| tiny-flux | 1+1 | int8wo |" in md and "compile regional / whole" in md and "Machine:" in md
    from aotpack.artifact.platform import describe, tag

    name = f"tiny-flux-int8wo-{tag(describe())}"
    assert sorted(p.name for p in arts.iterdir()) == [name, f"{name}-regional"]


def test_bench_writes_table_csv_json_and_plot(built, tmp_path):
    _, arts = built
    out = run_bench("tiny-flux", ["int8wo"], out=tmp_path / "res", steps=2, images=1,
                    variants=("eager", "aotpack", "aotpack-regional"), artifacts_dir=arts)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["variant"] for r in rows] == ["eager", "aotpack", "aotpack-regional"]
    assert list(rows[0]) == COLUMNS
    for r in rows:
        assert r["ckpt_id"] == "builtin:tiny-flux" and r["quantization"] == "int8wo"
        assert 0 < float(r["cold_start"]) <= float(r["first_image"])
        assert float(r["inference_memory"]) >= float(r["model_memory"]) > 0
    eager, whole, regional = rows
    assert eager["build_compile"] == eager["pt2"] == ""  # no artifact behind eager
    for r in (whole, regional):  # from each artifact's own manifest
        assert 0 < float(r["build_export"]) and 0 <= float(r["build_compile"]) < float(r["build_total"])
        assert float(r["pt2"]) > 0
    assert whole["pt2"] != regional["pt2"]
    md = (out / "results.md").read_text()
    assert "| ckpt_id | batch_size | fuse | compile | compile_vae | quantization | sparsify |" in md
    assert "Machine:" in md and "## Targets" in md and "## Artifact load" in md and "## Builds" in md
    assert "forward regional / whole (<= 1.02) | cold start regional / whole |" in md
    target = next(ln for ln in md.splitlines() if ln.startswith("| int8wo |") and "n/a" in ln)
    assert target.count("n/a") == 2  # no compile rows; the regional ratios are there
    cells = [c.strip() for c in target.strip("|").split("|")]
    assert cells[5].endswith((" met", " missed")) and cells[3].split(" ")[-1] in ("met", "missed")  # marked
    assert "| int8wo regional |" in md and "(existed)" in md  # its own load row; the artifacts were reused
    data = json.loads((out / "results.json").read_text())
    arts_json = {a["mode"]: a for a in data["artifacts"]}
    assert set(arts_json) == {"whole", "regional"} and arts_json["regional"]["modules"] == 2
    assert arts_json["regional"]["path"].endswith("-regional") and arts_json["whole"]["wall_s"] is None
    assert data["builds"] == {} and set(data["loads"]) == {"int8wo", "int8wo regional"}
    assert (out / "results.png").stat().st_size > 1000
    # the matmul bound: the machine's rate per dtype, the eager row's linear FLOPs, each row's share
    assert set(data["machine"]["matmul_gflops"]) >= {"float32", "bfloat16"}
    assert eager["variant"] == "eager" and data["rows"][0]["linear_flops"] > 0
    assert all(r["linear_flops"] is None for r in data["rows"][1:])  # counted once, on eager
    bound = md.split("## Matmul bound", 1)[1].split("##", 1)[0]
    assert "float32" in bound and "GFLOP/s" in bound
    assert [ln.split("|")[2].strip() for ln in bound.splitlines() if ln.startswith("| int8wo |")] == \
        ["eager", "aotpack", "aotpack-regional"]


def test_regional_is_the_default_where_the_model_has_repeated_blocks():
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.source import Source, resolve_source

    flux = get_recipe("tiny-flux")
    assert has_repeated_blocks(flux, resolve_source(flux))  # FluxTransformer2DModel._repeated_blocks
    hub = Source("black-forest-labs/FLUX.1-dev", None, "hub", "black-forest-labs/FLUX.1-dev")
    assert has_repeated_blocks(get_recipe("flux"), hub)  # from the pipeline's signature: nothing downloaded
    assert has_repeated_blocks(get_recipe("tiny-cogvideox"), hub)  # the recipe names its blocks


def test_a_bench_build_starts_from_an_empty_compile_cache(tmp_path, monkeypatch):
    """What the build table measures is a cold compile: the build's own process, an empty AOTPACK_CACHE (but the
    builtin pipelines) and an empty inductor cache."""
    import subprocess

    from aotpack import bench

    seen = {}

    def fake_run(cmd, **kwargs):
        cache = Path(kwargs["env"]["AOTPACK_CACHE"])
        seen.update(cmd=cmd, cache=sorted(p.name for p in cache.iterdir()),
                    inductor=kwargs["env"]["TORCHINDUCTOR_CACHE_DIR"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop here"):
        bench.build_artifact("tiny-flux", "int8wo", tmp_path / "a", regional=True)
    assert seen["cache"] == ["builtin"] and "--regional" in seen["cmd"] and "aotpack-bench-build-" in seen["inductor"]


def test_targets_are_marked_met_or_missed():
    from aotpack.bench import _target

    assert _target("0.21", 0.25) == "0.21 met" and _target("1.31", 1.02) == "1.31 missed"
    assert _target("1.02", 1.02) == "1.02 met" and _target("n/a", 1.0) == "n/a"


def test_the_forward_target_is_against_the_fastest_torch_compile_variant():
    from aotpack.bench.bound import bound_table, rate_dtype
    from aotpack.bench.results import _targets_table

    def row(variant, forward, **kw):
        return {"quant": "int8dq", "variant": variant, "forward_s": forward, "cold_start_s": 5.0, "dtype": "float32",
                **kw}

    rows = [row("eager", 1.2, linear_flops=int(150e9)), row("compile", 0.165), row("compile+freezing", 0.150),
            row("compile+cache", 0.170), row("aotpack", 0.160)]
    line = next(ln for ln in _targets_table(rows, {}) if ln.startswith("| int8dq |"))
    assert "1.07 missed (compile+freezing)" in line  # 0.160 / 0.150, not / 0.165
    table = bound_table(rows, {"float32": 150.0, "int8": 1000.0})
    assert rate_dtype("int8dq", "float32") == "int8" and rate_dtype("int8wo", "bfloat16") == "bfloat16"
    aot = next(ln for ln in table if "| aotpack |" in ln)
    assert "| int8 | 0.160 | 150.0 | 938 | 94% |" in aot  # 150 GFLOP in 0.16 s against 1000 GFLOP/s
    assert bound_table(rows, {}) == []  # no rates measured: no section


def test_a_dtype_with_no_fast_kernel_is_timed_on_a_sliver_of_rows_within_the_budget(monkeypatch):
    """The matmul bound costs seconds on any box: a dtype whose full call would pass SLOW_CALL_S is timed on
    PROBE_ROWS rows, and each dtype for at most BUDGET_S after two timed calls (an AVX2-only box once spent ~10
    minutes here: bf16 at 0.45 GFLOP/s, 21 s a call, best of 10, twice)."""
    import torch

    from aotpack.bench import bound

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(torch, "matmul", lambda a, b: calls.append((str(a.dtype), a.shape[0])))
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(("int8", a.shape[0])))
    seconds = {}
    monkeypatch.setattr(bound, "_timed", lambda run, sync: (run(), seconds[calls[-1][0]])[1])
    seconds.update({"torch.float32": 1e-4, "torch.bfloat16": 1.5, "int8": 0.05})
    rates = bound.matmul_rates("cpu", repeats=10)
    per = {d: [rows for dt, rows in calls if dt == d] for d in seconds}
    assert per["torch.float32"] == [bound.PROBE_ROWS] * 2 + [bound.M] * 10  # fast: the full shape, ten calls
    assert per["torch.bfloat16"] == [bound.PROBE_ROWS] * 4  # 16 x 1.5 s would pass 0.2 s: two probes, two calls
    assert per["int8"] == [bound.PROBE_ROWS] * 2 + [bound.PROBE_ROWS] * 10  # 0.8 s a full call; 0.05 s each fits
    flop = 2 * bound.K * bound.N
    assert rates["float32"] == pytest.approx(flop * bound.M / 1e-4 / 1e9)
    assert rates["bfloat16"] == pytest.approx(flop * bound.PROBE_ROWS / 1.5 / 1e9)


def test_the_plan_is_printed_before_anything_runs_with_an_estimate_from_the_last_run(tmp_path, capsys):
    import json

    from aotpack.bench import print_plan

    built = tmp_path / "built"
    built.mkdir()
    (built / "manifest.json").write_text("{}")
    paths = {("none", False): built, ("int8wo", False): tmp_path / "missing"}
    print_plan(tmp_path, "tiny-flux", ["none", "int8wo"], ("eager", "aotpack"), {"aotpack": False},
               lambda q, r: paths[(q, r)], 2)
    err = capsys.readouterr().err
    assert "2 scheme(s) (none, int8wo) x 2 variants (eager, aotpack) = 4 runs" in err
    assert "builds first: int8wo" in err and "no earlier run" in err
    rows = [{"quant": "none", "variant": "eager", "cold_start_s": 30.0, "image_s": 10.0},
            {"quant": "other", "variant": "eager", "cold_start_s": 999.0, "image_s": 1.0}]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    print_plan(tmp_path, "tiny-flux", ["none"], ("eager",), {"aotpack": False}, lambda q, r: built, 2)
    assert "about 1 min of runs" in capsys.readouterr().err  # 30 + 3 x 10 s


def test_interleaved_forwards_run_every_artifact_in_one_process_and_mark_the_target(built):
    """The forward target measured where the box's drift cancels: every variant once a round, one process."""
    from aotpack.bench.interleaved import interleaved
    from aotpack.bench.results import interleaved_table

    _, arts = built
    paths = sorted(str(p) for p in arts.iterdir())  # tiny-flux int8wo: whole, regional
    res = interleaved(paths, compile_rows=False, rounds=2)
    assert [r["variant"] for r in res["rows"]] == ["aotpack", "aotpack-regional"]
    assert all(0 < r["min_s"] <= r["median_s"] for r in res["rows"]) and res["what"] == "tiny-flux int8wo float32"
    fake = {"rows": [{"variant": "aotpack", "median_s": 0.162, "min_s": 0.156},
                     {"variant": "compile", "median_s": 0.159, "min_s": 0.155},
                     {"variant": "compile+freezing", "median_s": 0.161, "min_s": 0.155},
                     {"variant": "aotpack-regional", "median_s": 0.170, "min_s": 0.160}]}
    table = interleaved_table({"int8dq": fake})
    assert any(ln.startswith("| int8dq | aotpack |") and ln.endswith("| 1.02 missed | 1.00 |") for ln in table), table
    assert any(ln.startswith("| int8dq | aotpack-regional |") and ln.endswith("| 1.07 | 1.05 missed |")
               for ln in table), table   # regional held to the whole graph, measured in the same rounds
    last = interleaved_table({"int8wo": res})[-1]  # no torch.compile row: nothing to hold the whole graph to
    assert last.startswith("| int8wo | aotpack-regional | ") and "| n/a |" in last
    assert last.endswith((" met |", " missed |")), last
    assert interleaved_table({}) == []


def test_the_interleaved_run_loads_artifacts_under_the_trust_policy(built, tmp_path, monkeypatch):
    """A bench is no way around AOTPACK_TRUSTED_KEYS: with a key required, an unsigned artifact is refused
    before its code is opened, as any load refuses it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from aotpack.bench.interleaved import interleaved
    from aotpack.errors import SignatureError

    pub = tmp_path / "builder.pub"
    pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    monkeypatch.setenv("AOTPACK_TRUSTED_KEYS", str(pub))
    _, arts = built
    with pytest.raises(SignatureError, match="is not signed, and trusted keys are required"):
        interleaved(sorted(str(p) for p in arts.iterdir()), compile_rows=False, rounds=1)


def test_the_compile_matrix_holds_the_default_artifact_to_every_torch_compile_variant(built):
    """bench --compile-matrix: the artifact and torch.compile rows in one process (here one dtype, one scheme, one
    mode: a compile of tiny-flux), each with its forward error against the float32 eager model; a variant inductor
    cannot compile is a row with its error, not a crash."""
    from aotpack.bench.interleaved import matrix
    from aotpack.bench.results import matrix_table

    _, arts = built
    whole = next(str(p) for p in arts.iterdir() if not p.name.endswith("-regional"))
    res = matrix(whole, rounds=2, dtypes=("float32",), schemes=("int8wo", "none"), modes=("default",))
    assert [(r["variant"], r["mode"]) for r in res["rows"]] == [
        ("aotpack", "artifact"), ("compile float32 int8wo", "default"), ("compile float32 none", "default")]
    assert all(0 < r["min_s"] <= r["median_s"] for r in res["rows"])
    art, int8wo, none = (r["error"] for r in res["rows"])
    assert none < 1e-4 < art  # unquantized: the reference itself, up to the compiler's rounding; int8wo is not
    assert abs(art - int8wo) <= 0.25 * art  # the same scheme in the same dtype: the same error, compiled either way
    table = matrix_table(res)
    assert any(ln.startswith("Target: the default artifact at most the fastest torch.compile variant (")
               for ln in table), table
    assert any(ln.startswith("Target: the default artifact at most the fastest as accurate (error <= 1.25 x the "
                             "artifact's) (compile float32 ") for ln in table), table
    with pytest.raises(ValueError, match="dtype float32 is not among"):
        matrix(whole, rounds=1, dtypes=("bfloat16",), schemes=(), modes=("default",))
    fake = {"what": "flux-blocks int8dq float32", "rounds": 2, "threads": 2, "rows": [
        {"variant": "aotpack", "dtype": "float32", "scheme": "int8dq", "mode": "artifact", "median_s": 0.30,
         "min_s": 0.29, "error": 0.004},
        {"variant": "compile bfloat16 none", "dtype": "bfloat16", "scheme": "none", "mode": "default",
         "median_s": 0.33, "min_s": 0.31, "error": 0.015},
        {"variant": "compile float32 int8dq", "dtype": "float32", "scheme": "int8dq", "mode": "default",
         "median_s": 0.31, "min_s": 0.30, "error": 0.0045},
        {"variant": "compile bfloat16 none +max-autotune+freezing", "dtype": "bfloat16", "scheme": "none",
         "mode": "max-autotune+freezing", "fails": "InductorError: IndexError"}]}
    table = matrix_table(fake)
    assert "variant (compile float32 int8dq): 0.97 met." in "\n".join(table)
    assert table[-1].startswith("| compile bfloat16 none +max-autotune+freezing | bfloat16 | none | "
                                "max-autotune+freezing | fails: InductorError: IndexError |"), table[-1]
    assert table[-4].endswith("| 0.40% |") and table[-2].endswith("| 0.45% |"), table
    fake["rows"][1]["median_s"] = 0.25  # faster, and 4x less accurate: the first target only
    text = "\n".join(matrix_table(fake))
    assert "variant (compile bfloat16 none): 1.20 missed." in text
    assert "artifact's) (compile float32 int8dq): 0.97 met." in text
    fake["rows"][0]["error"], fake["rows"][2]["error"] = 1e-7, 8e-7  # unquantized fp32: rounding, not a 8x worse
    assert "artifact's) (compile float32 int8dq): 0.97 met." in "\n".join(matrix_table(fake))
    # another artifact (the frozen bf16 build): a line of its own, and never taken for a torch.compile variant
    fake["rows"].insert(1, {"variant": "aotpack bfloat16 none --freeze", "dtype": "bfloat16", "scheme": "none",
                            "mode": "artifact", "median_s": 0.20, "min_s": 0.19, "error": 0.005})
    text = "\n".join(matrix_table(fake))
    assert "Another artifact, aotpack bfloat16 none --freeze: 0.80x the fastest torch.compile variant " \
           "(compile bfloat16 none)." in text and "variant (compile bfloat16 none): 1.20 missed." in text
    del fake["rows"][0]["error"]
    assert "artifact's): n/a (the artifact's error not measured)." in "\n".join(matrix_table(fake))
    assert matrix_table({}) == []


def test_the_compile_matrix_builds_its_default_only_when_missing_and_records_it_once(built, monkeypatch):
    """The matrix's artifact is the recipe's default scheme: a scheme the bench already ran is not built or put
    in the build table again; another one is recorded (here it exists: reused, not built)."""
    from aotpack.bench import run
    from aotpack.builder.recipe import get_recipe

    _, arts = built
    whole = next(p for p in arts.iterdir() if not p.name.endswith("-regional"))
    recipe = get_recipe("tiny-flux")
    monkeypatch.setattr(run, "spawn", lambda kind, args, env=None: {"rows": [], "kind": kind, "path": args["path"],
                                                                    "others": args["others"]})
    frozen: list = []

    def build_artifact(name, quant, out, **k):  # only the frozen builds are missing
        from aotpack.artifact.platform import describe, tag

        assert (k["extra"], k["regional"]) == (("--freeze",), False)
        short = {"bfloat16": "-bf16", "float32": ""}[k["dtype"]]  # tiny-flux's own dtype is float32
        assert out.name == f"tiny-flux-{quant}-{tag(describe())}-frozen{short}", out  # as `aotpack build` names it
        frozen.append((quant, k["dtype"], out))

    monkeypatch.setattr(run, "build_artifact", build_artifact)
    here = platform.describe()
    zen4 = dataclasses.replace(here, cpu_flags=("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"))
    monkeypatch.setattr(platform, "describe", lambda *a, **k: zen4)  # bf16 and int8 units: every candidate runs
    build = {"variant": None, "dtypes": {recipe.default_quant: "float32"}, "cold": False}
    records: list[dict] = []
    r = run._matrix(recipe, recipe.default_quant, lambda q, regional: whole, {}, records, False, **build)
    assert r["kind"] == "matrix" and r["path"] == str(whole) and [x["path"] for x in records] == [str(whole)]
    assert [f[:2] for f in frozen] == list(run.FROZEN)  # the default (unfrozen int8wo) is none of them
    assert r["others"] == [str(f[2]) for f in frozen] and all(f[2].parent == whole.parent for f in frozen)
    run._matrix(recipe, recipe.default_quant, lambda q, regional: whole, {}, records, False, **build)
    assert len(records) == 1  # already in the table: not recorded twice
    # a CPU with AVX2 only: bf16 runs widened to fp32, int8 matmuls without oneDNN; no such artifact is built
    monkeypatch.setattr(platform, "describe", lambda *a, **k: dataclasses.replace(here, cpu_flags=("avx2", "fma")))
    frozen.clear()
    r = run._matrix(recipe, recipe.default_quant, lambda q, regional: whole, {}, records, False, **build)
    assert r["others"] == [] and frozen == []


def test_a_matrix_row_many_times_slower_than_the_fastest_runs_no_rounds():
    """int8 matmuls on a CPU without int8 units run ~25x slower: such a row is timed in its first calls, not in
    every round, and the table says so; the others, and the default artifact however slow, run every round."""
    import time

    from aotpack.bench.interleaved import _rounds
    from aotpack.bench.results import matrix_table

    calls = {"fast": 0, "slow": 0}

    def run(name, seconds):
        def f():
            calls[name] += 1
            time.sleep(seconds)
        return f

    times = _rounds({"fast": run("fast", 0.002), "slow": run("slow", 0.05)}, 4, prune=3.0)
    assert calls == {"fast": 7, "slow": 3} and times["slow"]["pruned"] and "pruned" not in times["fast"]
    assert times["slow"]["median_s"] >= 0.05 > times["fast"]["median_s"]
    assert _rounds({"fast": run("fast", 0.002), "slow": run("slow", 0.05)}, 4)["slow"].get("pruned") is None
    assert calls["slow"] == 3 + 6  # no prune: every round
    kept = _rounds({"fast": run("fast", 0.002), "slow": run("slow", 0.05)}, 4, prune=3.0, keep=("slow",))
    assert "pruned" not in kept["slow"] and calls["slow"] == 9 + 7
    rows = [{"variant": "aotpack", "dtype": "float32", "scheme": "none", "mode": "artifact", "median_s": 1.0,
             "min_s": 0.9, "error": 1e-7},
            {"variant": "compile float32 int8dq", "dtype": "float32", "scheme": "int8dq", "mode": "default",
             "median_s": 25.0, "min_s": 25.0, "pruned": True, "error": 0.01}]
    text = "\n".join(matrix_table({"what": "x", "rounds": 4, "threads": 2, "rows": rows}))
    assert "| compile float32 int8dq | float32 | int8dq | default | 25.0000 (first calls) | | 25.00 | 1.00% |" in text
    assert "A row marked (first calls) took over 3x the fastest row's in the faster of two timed first calls" in text
