"""scripts/gpu_check.py without a GPU: its dry run, its plan, and how it runs steps (no compile, seconds).

The steps that fail here are real subprocesses (``python -c``) or a mocked ``subprocess.Popen``; the plan's own
commands are checked against the real CLI's parser and the library's signatures, not run.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"
PY = sys.executable


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _opts(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{**dict(schemes=None, no_bench=False, budget_scale=1.0), **kw})


H100 = {"cuda": True, "capability": [9, 0], "tag": "cuda-sm90", "pytest": "9"}
A100 = {"cuda": True, "capability": [8, 0], "tag": "cuda-sm80", "pytest": "9"}
TINY = ["tiny-flux-none-bfloat16", "tiny-flux-int8wo-bfloat16", "tiny-flux-int8dq-bfloat16",
        "tiny-flux-fp8dqrow-bfloat16", "tiny-flux-none-float32", "tiny-flux-int8wo-bfloat16-regional"]
PLANNED = ["install wheels", "environment", "prepare", *TINY, "build flux-blocks fp8dqrow", "build flux-blocks none",
           "bench fp8dqrow", "bench none", "gpu tests"]


def _names(phases) -> list[str]:
    return [s.name for steps, _ in phases for s in steps]


def test_dry_run_lists_the_steps_checks_the_prerequisites_and_runs_nothing(tmp_path):
    out = subprocess.run([PY, str(SCRIPT), "--dry-run", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    plan, prereq = out.stdout.split("Prerequisites:")
    assert [re.split(r"\s{2,}", ln.strip())[0] for ln in plan.splitlines()[1:]] == PLANNED, out.stdout
    assert "critical path 490 s of budgets, deadline 510 s" in plan
    for what in ("python", "CUDA", "torch", "diffusers", "torchao", "aotpack", "pytest", "C++ compiler", "disk"):
        assert f" {what}: " in prereq, out.stdout
    assert "FAIL" not in prereq and out.stdout.rstrip().endswith("The plan is sound.")
    assert not (tmp_path / "out").exists()  # a dry run writes nothing under OUT


def test_the_plan_follows_the_gpu_and_fits_the_command_limit(gc, tmp_path):
    assert gc.DEADLINE_S + 60 <= gc.COMMAND_LIMIT_S  # process start, the results and the transfer back
    for info in (H100, A100):
        phases = gc.make_plan(_opts(), info, tmp_path)
        assert gc.critical_path_s(phases) <= gc.DEADLINE_S, info
        names = _names(phases)
        for steps, _ in phases:  # every need comes earlier in the plan
            assert all(n in names[:names.index(s.name)] for s in steps for n in s.needs)
    assert _names(gc.make_plan(_opts(), H100, tmp_path)) == PLANNED
    sm80 = _names(gc.make_plan(_opts(), A100, tmp_path))
    assert "bench int8dq" in sm80 and not any("fp8" in n for n in sm80)  # fp8 needs sm89+
    cpu = gc.make_plan(_opts(schemes="none", no_bench=True, budget_scale=3.0), {"cuda": False}, tmp_path)
    assert _names(cpu) == ["install wheels", "environment", "prepare", "tiny-flux-none-bfloat16",
                           "tiny-flux-none-float32", "gpu tests"]
    assert cpu[0][0][0].budget_s == 3 * 20 and "cuda-graphs" not in cpu[2][0][0].what


class Recorder:
    """A Check whose commands are recorded and answered from ``replies`` (no process is started)."""

    def __init__(self, work, info):
        self.work, self.info, self.site, self.cmds = work, info, work / "site", []

    def command(self, cmd, *, log, end, env=None):
        self.cmds.append((cmd, env))
        if cmd[3:4] == ["inspect"]:
            return json.dumps({"platform": {"device": "cuda"}, "build": {"stages": {"export": 2.0, "compile": 9.0}},
                               "files": {"weights.safetensors": {"size": 2**20}, "model.pt2": {"size": 1}},
                               "modules": [{"max_abs_error": 1e-3, "tolerance": 5e-2}]})
        return "done\n"


def test_every_command_of_the_plan_is_one_the_library_accepts(gc, tmp_path):
    """Each step run against a recorder: its aotpack commands parse with the real CLI, its python -c calls bind
    to the library's signatures; the line a build step gives comes from `aotpack inspect --json`."""
    from aotpack import bench, cli
    from aotpack.builder import tiny

    check, lines = Recorder(tmp_path, H100), {}
    for steps, _ in gc.make_plan(_opts(), H100, tmp_path)[1:]:
        for s in steps:
            lines[s.name] = s.fn(check, time.monotonic() + 60)
    assert lines["tiny-flux-int8wo-bfloat16"].startswith("1.0 MiB; export 2 s, compile 9 s; vs eager 1.0e-03 <= 5.0e-02; run")
    assert "run --cuda-graphs --lora" in lines["tiny-flux-int8wo-bfloat16"]
    seen = set()
    for cmd, env in check.cmds:
        if cmd[:3] == [PY, "-m", "aotpack.cli"]:
            command = cli.cli.commands[cmd[3]]
            command.make_context(cmd[3], list(cmd[4:]), parent=cli.cli.make_context("aotpack", [cmd[3]]))
            seen.add(cmd[3])
        elif cmd[1] == "-c" and "run_bench" in cmd[2]:
            a = json.loads(cmd[3])
            inspect.signature(bench.run_bench).bind("flux-blocks", [a["scheme"]], out=a["out"], images=a["images"],
                                                    dtype=a["dtype"], variants=a["variants"], artifacts_dir=a["artifacts"])
            assert set(a["variants"]) <= set(bench.GPU_VARIANTS) and a["variants"].index("compile") < a["variants"].index("compile+cache")
            seen.add("run_bench")
        elif cmd[1] == "-c" and "random_lora" in cmd[2]:
            assert cmd[4:] == ["tiny-flux", "flux-blocks"] and callable(tiny.ensure_builtin)
            inspect.signature(tiny.random_lora).bind("t", "p", rank=4, seed=5)
            seen.add("prepare")
        else:
            assert cmd[1:3] == ["-m", "pytest"] and "tests/test_gpu.py" in cmd and env["GPU_CHECK_ARTIFACTS"]
            seen.add("pytest")
    assert seen == {"build", "inspect", "run", "run_bench", "prepare", "pytest"}
    # the bench reuses the builds: the folder it looks for is the one the build step wrote
    from aotpack.builder.spec import default_out

    build = next(c for c, _ in check.cmds if c[3:5] == ["build", "flux-blocks"])
    assert build[build.index("--out") + 1] == str(default_out("flux-blocks", build[6], "cuda-sm90", tmp_path / "artifacts"))


def _step(gc, name, code="pass", budget=30.0, **kw):
    def fn(check, end):
        return check.command([PY, "-c", code], log=name, end=end).strip() or "ok"
    return gc.Step(name, name, budget, fn, **kw)


def _check(gc, tmp_path, deadline=60.0):
    return gc.Check(tmp_path / "out", tmp_path / "work", deadline)


def test_a_failing_step_is_one_line_and_the_rest_go_on(gc, tmp_path):
    error = "import sys; print('Error: no such recipe', file=sys.stderr); print('Hint: x', file=sys.stderr); sys.exit(1)"
    steps = [_step(gc, "cli error", error), _step(gc, "traceback", "raise ValueError('bad input\\nsecond line')"),
             _step(gc, "after", "print('fine')"), _step(gc, "dependent", needs=("traceback",)),
             _step(gc, "crash", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"),
             _step(gc, "pytest", "import sys; print('FAILED tests/x.py::y'); print('1 failed, 2 passed in 3.0s'); sys.exit(1)")]
    check = _check(gc, tmp_path)
    results = {r.name: r for r in gc.run_steps(steps, check, parallel=3)}
    assert [results[n].status for n in ("cli error", "traceback", "after", "dependent", "crash")] == \
        ["fail", "fail", "pass", "skip", "fail"]
    assert results["cli error"].detail == "Error: no such recipe"
    assert results["traceback"].detail == "ValueError: bad input"
    assert results["after"].detail == "fine"
    assert results["dependent"].detail == "needs traceback, which failed"
    assert results["crash"].detail == "crashed (SIGSEGV)"
    assert results["pytest"].detail == "1 failed, 2 passed in 3.0s"  # nothing on stderr: its stdout's last line
    assert results["traceback"].log == "failures.log, logs/traceback.log"
    failures = (tmp_path / "out" / "failures.log").read_text()
    assert "==== cli error: Error: no such recipe" in failures and "Hint: x" in failures  # the log's tail
    assert "==== traceback: ValueError: bad input" in failures and "Traceback (most recent call last)" in failures
    text = gc.summary(list(results.values()), header="check")
    assert " FAIL  traceback" in text and "[failures.log, logs/traceback.log]" in text
    assert text.splitlines()[-1] == "1 passed, 4 failed, 1 skipped"


def test_a_step_over_its_budget_is_killed_with_its_children(gc, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            f" open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    check = _check(gc, tmp_path)
    t = time.monotonic()
    [slow, after] = gc.run_steps([_step(gc, "slow", code, budget=2.0), _step(gc, "after")], check)
    assert time.monotonic() - t < 20
    assert (slow.status, slow.detail, after.status) == ("fail", "timed out after 2 s", "pass")
    psutil = pytest.importorskip("psutil")
    try:
        assert psutil.Process(int(pid_file.read_text())).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        pass  # killed and reaped: the compile workers of a timed-out build do not live on


def test_no_step_starts_without_the_time_it_needs(gc, tmp_path):
    check = _check(gc, tmp_path, deadline=gc.MIN_START_S + 5)
    results = gc.run_steps([_step(gc, "quick"), _step(gc, "optional", budget=60, optional=True)], check)
    assert [r.status for r in results] == ["pass", "skip"]
    assert results[1].detail.startswith("no time left")
    late = _check(gc, tmp_path / "late", deadline=gc.MIN_START_S - 1)
    assert gc.run_steps([_step(gc, "late")], late)[0].detail.startswith("no time left")


def test_steps_side_by_side_wait_for_their_needs(gc, tmp_path):
    """a and b run together (they meet at a barrier: no sleeps, so a busy machine cannot make it flaky); c needs a
    and starts only after a finished."""
    meet, order = threading.Barrier(2, timeout=60), []

    def work(name, together=False):
        def fn(check, end):
            order.append(f"{name} start")
            if together:
                meet.wait()  # passes only when both run: a BrokenBarrierError fails the step
            order.append(f"{name} end")
            return "ok"
        return fn

    steps = [gc.Step("a", "", 30, work("a", True)), gc.Step("c", "", 30, work("c"), needs=("a",)),
             gc.Step("b", "", 30, work("b", True))]
    results = gc.run_steps(steps, _check(gc, tmp_path), parallel=3)
    assert [r.status for r in results] == ["pass", "pass", "pass"], results
    assert order.index("c start") > order.index("a end")


def test_a_command_that_cannot_start_is_one_line(gc, tmp_path, monkeypatch):
    def popen(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(gc.subprocess, "Popen", popen)
    [r] = gc.run_steps([_step(gc, "no python")], _check(gc, tmp_path))
    assert (r.status, r.detail) == ("fail", "FileNotFoundError: [Errno 2] No such file or directory")


def _fake_plan(gc, cuda=True):
    def environment(check, end):
        check.info = {"cuda": cuda, "gpu": "NVIDIA H200", "torch": "2.11.0", "python": "3.12"}
        return "probed"

    def bench(check, end):  # what run_bench leaves: its own tables, taken into results.md / .json
        (check.work / "bench" / "none").mkdir(parents=True)
        (check.work / "bench" / "none" / "results.md").write_text("# aotpack bench: flux-blocks\n\n| row |\n")
        (check.work / "bench" / "none" / "results.json").write_text('{"rows": [{"variant": "aotpack"}]}')
        return "benched"

    def make_plan(opts, info, work):
        return [([gc.Step("environment", "", 30, environment)], 1),
                ([_step(gc, "build a", "print('built')"), _step(gc, "build b", "raise SystemExit('Error: no GPU')"),
                  _step(gc, "run b", needs=("build b",))], 4),
                ([gc.Step("bench none", "", 30, bench)], 1)]
    return make_plan


def test_main_writes_the_result_files(gc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gc, "make_plan", _fake_plan(gc))
    out = tmp_path / "out"
    assert gc.main([str(out), "--work", str(tmp_path / "work")]) == 1
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(gc.OUT_FILES) and len(files) <= 8  # what comes back from a lent machine
    summary = (out / "summary.txt").read_text()
    assert summary.splitlines()[0] == "aotpack GPU check - NVIDIA H200, torch 2.11.0"
    assert " FAIL  build b" in summary and "Error: no GPU" in summary and "needs build b, which failed" in summary
    assert summary.splitlines()[-1].startswith("3 passed, 1 failed, 1 skipped - ")
    assert capsys.readouterr().out.strip() == summary.strip()
    data = json.loads((out / "results.json").read_text())
    assert [s["status"] for s in data["check"]["steps"]] == ["pass", "pass", "fail", "skip", "pass"]
    assert data["bench"]["none"]["rows"] == [{"variant": "aotpack"}]
    md = (out / "results.md").read_text()
    assert "| build b | fail |" in md and "## aotpack bench: flux-blocks" in md
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert {"logs/build-a.log", "logs/build-b.log", "bench/none/results.md"} <= set(tar.getnames())
    monkeypatch.setattr(gc, "make_plan", _fake_plan(gc, cuda=False))  # a rerun: only its own results
    assert gc.main([str(out), "--work", str(tmp_path / "work")]) == 2
    assert not any(out.iterdir())


def test_the_wheels_are_installed_only_when_missing(gc, tmp_path, monkeypatch):
    wheels = tmp_path / "repo" / ".whl"
    wheels.mkdir(parents=True)
    for name in ("diffusers-0.42.1-py3-none-any.whl", "diffusers-0.41.0-py3-none-any.whl", "notes.txt",
                 "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "pytest-9.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    assert {k: v.name for k, v in gc.find_wheels(wheels).items()} == {
        "diffusers": "diffusers-0.42.1-py3-none-any.whl", "pytest": "pytest-9.0-py3-none-any.whl",
        "torchao": "torchao-0.18.0-cp310-abi3-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"}
    check = Recorder(tmp_path, {})
    assert gc.step_install(check, time.monotonic() + 5).startswith("already installed: diffusers 0.42.1, torchao 0.18.0")
    monkeypatch.setattr(gc, "REPO", tmp_path / "repo")
    monkeypatch.setattr(gc, "WHEELS", {**gc.WHEELS, "no-such-project": "1.0"})
    with pytest.raises(gc.StepFailed, match=r"^no-such-project 1.0 neither installed nor in .whl/ \(run 'make gpu-wheels'"):
        gc.step_install(check, time.monotonic() + 5)
    (wheels / "no_such_project-1.0-py3-none-any.whl").write_bytes(b"")
    assert gc.step_install(check, time.monotonic() + 5) == f"no-such-project into {check.site}"
    [(cmd, _)] = check.cmds  # pytest is installed here: only the missing project goes in, with --target
    assert cmd[1:4] == ["-m", "pip", "install"] and cmd[cmd.index("--target") + 1] == str(check.site)
    assert [c for c in cmd if c.endswith(".whl")] == [str(wheels / "no_such_project-1.0-py3-none-any.whl")]


def test_summary_fits_one_screen(gc):
    R = gc.Result
    results = [R(f"step {i}", "pass", "x" * 300, 1.5) for i in range(16)]
    results += [R("bench none", "fail", "timed out after 110 s", 110.0, "failures.log, logs/bench-none.log"),
                R("gpu tests", "skip", "no time left (20 s before the deadline)")]
    lines = gc.summary(results, header="aotpack GPU check - H100", footer="431 s").splitlines()
    assert len(lines) <= 24 and all(len(ln) <= 120 for ln in lines)
    assert lines[0] == "aotpack GPU check - H100" and lines[-1] == "16 passed, 1 failed, 1 skipped - 431 s"
    assert any(ln.startswith(" SKIP  gpu tests") for ln in lines)


def test_the_gpu_tests_are_collected_here():
    out = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0 and re.search(r"\b\d+ tests? collected", out.stdout), out.stdout + out.stderr


def test_make_targets_need_no_venv():
    out = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "scripts/gpu_check.py" in out.stdout and "/tmp/x" in out.stdout
    assert "venv" not in out.stdout and "pip install" not in out.stdout  # no `install` prerequisite
    wheels = subprocess.run(["make", "-n", "gpu-wheels"], capture_output=True, text=True, cwd=REPO).stdout
    for flag in ("--no-deps", "--only-binary=:all:", "--python-version 3.12", "--abi abi3", "diffusers==0.42.1",
                 "torchao==0.18.0", "-d .whl"):
        assert flag in wheels, wheels
