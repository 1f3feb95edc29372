"""scripts/gpu_check.py without a GPU: its dry run, and its pure helpers (no compile, seconds)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import threading

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _opts(**kw) -> argparse.Namespace:
    defaults = dict(dtype="bfloat16", schemes=None, bench_recipe="flux-blocks", images=2, no_bench=False,
                    no_tests=False, parallel=8, allow_cpu=False, budget_scale=1.0, no_fp32=False)
    return argparse.Namespace(**{**defaults, **kw})


TINY = ("none", "int8wo", "int8dq", "fp8dqrow", "none float32")
PLANNED = ["install wheels", "environment", "prepare tiny-flux", "prepare flux-blocks",
           *[f"build tiny-flux {s}" for s in TINY], "build flux-blocks fp8dqrow", "build flux-blocks none",
           *[f"tiny-flux {s}" for s in TINY], "bench fp8dqrow", "bench none", "gpu tests", "results"]


def test_dry_run_lists_the_steps_checks_the_prerequisites_and_exits_0(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", str(tmp_path / "out"), "--work",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    listed = [re.split(r"\s{2,}", ln.strip())[0] for ln in out.stdout.split("Prerequisites:")[0].splitlines()[1:]]
    assert listed == PLANNED, out.stdout
    prereq = out.stdout.split("Prerequisites:")[1]
    for what in ("python", "torch", "CUDA", "diffusers", "torchao", "aotpack", "C++ compiler", "disk"):
        assert f" {what}: " in prereq, out.stdout
    assert "FAIL" not in prereq and out.stdout.rstrip().endswith("The plan is sound.")
    assert not any((tmp_path / "out").glob("results.*"))  # a dry run runs nothing


def test_tolerance_follows_the_dtype_its_rounding_and_the_scheme(gc):
    tol = gc.tolerance
    # no measured rounding: the floor, 8 ulps of bf16 of the scale
    assert tol("bfloat16", "none", scale=4.0) == pytest.approx(8 * 2 ** -8 * 4.0)
    # eager bf16 lands 0.1 from eager fp32: the artifact may land up to 3x that from eager bf16
    assert tol("bfloat16", "none", scale=4.0, rounding=0.1) == pytest.approx(0.3)
    assert tol("bfloat16", "int8wo", scale=4.0, rounding=0.1) == pytest.approx(0.3)
    assert tol("bfloat16", "int8dq", scale=4.0, rounding=0.1) == pytest.approx(0.6)
    assert tol("bfloat16", "fp8dqrow", scale=4.0, rounding=0.1) == pytest.approx(1.2)
    # fp32 matches the CPU tests' bounds at a latent scale of ~4: none ~1e-4, int8dq 5e-2
    assert tol("float32", "none", scale=4.0) == pytest.approx(1.2e-4, rel=0.05)
    assert 0.05 <= tol("float32", "int8dq", scale=4.0) <= 0.07
    assert gc.replay_tolerance("bfloat16", 4.0) < tol("bfloat16", "none", scale=4.0)
    with pytest.raises(ValueError, match="no tolerance for dtype 'int8'"):
        tol("int8", "none", scale=1.0)


def test_fp8_only_on_sm89_and_up(gc):
    assert gc.schemes_for("cuda", (9, 0)) == ["none", "int8wo", "int8dq", "fp8dqrow"]
    assert gc.schemes_for("cuda", (8, 9))[-1] == "fp8dqrow"
    assert gc.schemes_for("cuda", (8, 0)) == ["none", "int8wo", "int8dq"]
    assert gc.schemes_for("cpu", None) == ["none", "int8wo", "int8dq"]
    assert gc.best_scheme("cuda", (9, 0)) == "fp8dqrow"
    assert gc.best_scheme("cuda", (8, 6)) == "int8dq"


def test_the_default_plan_fits_the_command_limit(gc, tmp_path):
    for cap in ((9, 0), (8, 0)):
        steps = gc.first_steps() + gc.make_plan(_opts(), "cuda", cap, tmp_path)
        assert gc.plan_problems(steps, gc.DEADLINE_S) == [], cap
        assert gc.DEADLINE_S + gc.MARGIN_S <= gc.COMMAND_LIMIT_S
    names = [s.name for s in gc.first_steps() + gc.make_plan(_opts(), "cuda", (8, 0), tmp_path)]
    assert "bench int8dq" in names and not any("fp8" in n for n in names)
    names = [s.name for s in gc.make_plan(_opts(no_fp32=True, no_bench=True, no_tests=True, budget_scale=3.0),
                                          "cpu", None, tmp_path)]
    assert names == ["prepare tiny-flux", *[f"build tiny-flux {s}" for s in ("none", "int8wo", "int8dq")],
                     *[f"tiny-flux {s}" for s in ("none", "int8wo", "int8dq")], "results"]
    assert gc.make_plan(_opts(budget_scale=3.0), "cpu", None, tmp_path)[0].budget_s == 3 * 40


def _step(gc, name, budget=1.0, fn=None, **kw):
    return gc.Step(name, name, budget, fn or (lambda run, clock: ("pass", "ok", {})), **kw)


def test_critical_path_and_plan_problems(gc):
    steps = [_step(gc, "a", 10), _step(gc, "b", 20, needs=("a",)), _step(gc, "c", 5),
             _step(gc, "x", 30, needs=("c",), exclusive=True), _step(gc, "t", 999, optional=True),
             _step(gc, "r", 5, exclusive=True)]
    assert gc.critical_path_s(steps) == 10 + 20 + 30 + 5  # x waits for b; the optional step does not count
    assert gc.plan_problems(steps, 65) == []
    problems = gc.plan_problems(steps + [_step(gc, "y", 1, needs=("nowhere",))], 60, limit_s=100)
    assert any("over the 60 s deadline" in p for p in problems)
    assert any("margin is over the 100 s command limit" in p for p in problems)
    assert any("'y' needs 'nowhere'" in p for p in problems)


def _run(gc, tmp_path, deadline=60.0):
    return gc.Run(tmp_path / "out", tmp_path / "work", deadline, _opts())


def test_a_step_that_raises_is_reported_and_the_next_still_runs(gc, tmp_path):
    def boom(run, clock):
        raise ValueError("bad input\nsecond line")

    def child(run, clock):
        run.child("no-such-kind", {}, budget=clock.left(), log="child")
        return "pass", "unreachable", {}

    def returns_fail(run, clock):
        return "fail", "latents differ by 1.0", {"_log": str(run.logs / "mine.log")}

    run = _run(gc, tmp_path)
    steps = [_step(gc, "boom", fn=boom), _step(gc, "after"), _step(gc, "dependent", needs=("boom",)),
             _step(gc, "child", 30, fn=child), _step(gc, "returns fail", fn=returns_fail)]
    results = {r.name: r for r in gc.run_steps(steps, run, parallel=2)}
    assert [results[n].status for n in ("boom", "after", "dependent", "child", "returns fail")] == \
        ["fail", "pass", "skip", "fail", "fail"]
    assert results["boom"].detail == "ValueError: bad input"
    assert results["dependent"].detail == "needs boom, which failed"
    assert results["child"].detail.startswith("KeyError")  # the child's traceback, last line
    assert results["boom"].log.startswith("failures.log") and "boom.traceback.txt" in results["boom"].log
    failures = (tmp_path / "out" / "failures.log").read_text()
    assert "==== boom: ValueError: bad input" in failures and "second line" in failures
    assert "==== child: KeyError" in failures and "==== returns fail: latents differ by 1.0" in failures
    text = gc.summary(list(results.values()), header="check")
    assert " FAIL  boom" in text and "[traceback: failures.log, boom.traceback.txt]" in text
    assert text.splitlines()[-1] == "1 passed, 3 failed, 1 skipped"


def test_an_exclusive_step_runs_alone(gc, tmp_path):
    """a and b run together (they meet at a barrier), x runs with nothing else, c after it; no sleeps, so a busy
    machine cannot make it flaky."""
    lock, running, seen = threading.Lock(), set(), {}
    meet = threading.Barrier(2, timeout=60)

    def work(name, together=False):
        def fn(run, clock):
            with lock:
                running.add(name)
                seen[name] = set(running)
            if together:
                meet.wait()  # passes only when both are running: a BrokenBarrierError fails the step
            with lock:
                seen[name] |= running
                running.discard(name)
            return "pass", "", {}
        return fn

    steps = [_step(gc, "a", fn=work("a", True)), _step(gc, "b", fn=work("b", True)),
             _step(gc, "x", fn=work("x"), exclusive=True), _step(gc, "c", fn=work("c"))]
    run = _run(gc, tmp_path)
    gc.run_steps(steps, run, parallel=4)
    assert all(run.results[n].status == "pass" for n in "abxc")  # a and b met, so they ran together
    assert seen["x"] == {"x"} and seen["c"] == {"c"}


def test_no_step_starts_past_the_deadline_but_the_results(gc, tmp_path):
    run = _run(gc, tmp_path, deadline=gc.RESULTS_RESERVE_S + gc.MIN_START_S - 1)
    steps = [_step(gc, "late"), _step(gc, "results", always=True, exclusive=True)]
    results = {r.name: r for r in gc.run_steps(steps, run)}
    assert results["late"].status == "skip" and results["late"].detail.startswith("no time left")
    assert results["results"].status == "pass"


def test_summary_fits_one_screen(gc):
    R = gc.Result
    results = [R(f"step {i}", "pass", "x" * 300, 1.5) for i in range(18)]
    results += [R("bench none", "fail", "compile: timed out", 110.0, "failures.log, bench.log"),
                R("gpu tests", "skip", "no time left (20 s before the deadline)")]
    text = gc.summary(results, header="aotpack GPU check - H100", footer="431 s")
    lines = text.splitlines()
    assert len(lines) <= 24 and all(len(ln) <= 120 for ln in lines)
    assert lines[0] == "aotpack GPU check - H100"
    assert any(ln.startswith(" SKIP  gpu tests") and "-" in ln for ln in lines)
    assert lines[-1] == "18 passed, 1 failed, 1 skipped - 431 s"


def test_judge_tiny(gc):
    ok = {"eager": {"scale": 2.0, "rounding": 0.02}, "artifact": {"ok": True, "diff": 0.01, "tol": 0.06},
          "graphs": {"ok": True, "diff": 0.0, "tol": 0.008},
          "lora": {"ok": True, "diff": 0.02, "tol": 0.06, "without_lora": 0.3}}
    status, detail, _ = gc._judge_tiny(ok, {}, None)
    assert status == "pass", detail
    assert detail == "artifact 1.0e-02/6.0e-02, graphs 0.0e+00/8.0e-03, lora 2.0e-02/6.0e-02 (scale 2.00, 2.0e-02 from fp32)"
    broken = {**ok, "graphs": {"ok": False, "error": "RuntimeError: operation not permitted when stream is capturing"}}
    status, detail, _ = gc._judge_tiny(broken, {"single_threaded": {"graphs": {"ok": True}, "lora": {"ok": True}}}, None)
    assert status == "fail" and detail.startswith("graphs: RuntimeError: operation not permitted")
    assert detail.endswith("with the single-threaded runner: graphs pass")
    far = {**ok, "artifact": {"ok": False, "diff": 0.5, "tol": 0.06}}
    assert gc._judge_tiny(far, {}, None)[1].startswith("artifact differs by 5.00e-01 > 6.00e-02")
    noop = {**ok, "lora": {**ok["lora"], "without_lora": 0.01}}  # no nearer the LoRA than without: did nothing
    assert "the LoRA swap did not move the artifact" in gc._judge_tiny(noop, {}, None)[1]
    assert gc._judge_tiny({"eager": {}}, {}, gc.ChildFailed("tiny crashed (SIGSEGV)"))[1] == "tiny crashed (SIGSEGV)"


def test_manifest_facts_reads_schema_1_and_2(gc, tmp_path):
    common = {"dtype": "bfloat16", "scheme": {"name": "int8wo", "torchao_config": {"x": 1}},
              "platform": {"device": "cuda"}, "model": {"checkpoint": "builtin:tiny-flux"}}
    v1 = {**common, "inputs": {"max_sequence_length": 32}, "files": {"weights.safetensors": {"size": 10}},
          "build": {"stages": {"compile": 3.0}, "max_abs_error": 0.1, "compiled": "compiled"}, "modules": {}}
    v2 = {**common, "request": {"max_sequence_length": 32}, "files": {"w.safetensors": {"size": 10}},
          "build": {"stages": {"compile": 3.0}},
          "modules": [{"kind": "component", "weights": "w.safetensors", "max_abs_error": 0.1, "compiled": "compiled"}]}
    for data in (v1, v2):
        (tmp_path / "manifest.json").write_text(json.dumps(data))
        facts = gc.manifest_facts(tmp_path)
        assert (facts["max_sequence_length"], facts["weights_bytes"], facts["max_abs_error"], facts["device"],
                facts["compiled"]) == (32, 10, 0.1, "cuda", "compiled")


def test_wheels_are_found_by_name_and_pinned_version(gc, tmp_path):
    info = gc.wheel_info("torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl")
    assert info["name"] == "torchao" and info["version"] == "0.18.0"
    assert ("cp310", "abi3", "manylinux_2_28_x86_64") in info["tags"]
    assert gc.wheel_info("notes.txt") is None
    for name in ("diffusers-0.42.1-py3-none-any.whl", "diffusers-0.41.0-py3-none-any.whl",
                 "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    assert {k: v.name for k, v in gc.find_wheels(tmp_path).items()} == {
        "diffusers": "diffusers-0.42.1-py3-none-any.whl",
        "torchao": "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"}
    assert gc.wheel_fits({("py3", "none", "any")}, {("py3", "none", "any"), ("cp312", "cp312", "linux")}) is True
    assert gc.wheel_fits({("cp313", "cp313", "x")}, {("py3", "none", "any")}) is False


def test_make_targets_need_no_venv():
    out = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "scripts/gpu_check.py" in out.stdout and "/tmp/x" in out.stdout
    assert "venv" not in out.stdout and "pip install" not in out.stdout  # no `install` prerequisite
    wheels = subprocess.run(["make", "-n", "gpu-wheels"], capture_output=True, text=True, cwd=REPO).stdout
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--implementation cp", "--abi abi3",
                 "--platform manylinux_2_28_x86_64", "diffusers==0.42.1", "torchao==0.18.0", "-d .whl"):
        assert flag in wheels, wheels
