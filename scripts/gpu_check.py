#!/usr/bin/env python3
"""One prepared check of aotpack's GPU path, for a lent H100/H200 (issue #13).

    python3 scripts/gpu_check.py OUT             # the whole check (a CUDA machine; ~8 minutes on an H100)
    python3 scripts/gpu_check.py --dry-run OUT   # list the steps and check the prerequisites (any machine)
    OUT=DIR make gpu-check                       # the same, through make (no venv, no network needed)

Steps (each in its own processes, with its own time budget; one failure is one line and the rest go on):
  install wheels   diffusers and torchao from .whl/ into WORK/site (``pip install --target``), if missing
  environment      python, torch, CUDA, diffusers, torchao, aotpack from the working tree, compilers, disk
  prepare, build   tiny-flux in bf16 with none, int8wo, int8dq (+ fp8dqrow on sm89+) and the real-width
                   flux-blocks with none and the best fp8/int8 scheme, built concurrently
  tiny-flux S      the real FluxPipeline, artifact vs eager diffusers + the same torchao scheme (final
                   latents), with and without ``cuda_graphs=True``, and a LoRA swapped in under CUDA graphs;
                   also ``none`` in float32, where rounding hides nothing (the sharp check)
  bench S          flux-blocks in bf16: eager, torch.compile, compile + portable cache, aotpack, aotpack
                   with CUDA graphs; each alone on the machine, in a fresh process
  gpu tests        ``pytest -m gpu tests/test_gpu.py``, when time is left
  results          OUT/results.md + results.json (the bench's format), summary.txt, failures.log, logs.tar.gz

aotpack runs from the working tree (PYTHONPATH=repo root): its pyproject asks for torch>=2.13 and the GPU
machines have torch 2.11, so what breaks there is reported rather than refused at install time. Only
the files under OUT come back from a lent machine (at most 8): logs go to WORK and are packed at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent
WHEELS = {"diffusers": "0.42.1", "torchao": "0.18.0"}   # what `make gpu-wheels` puts in .whl/
COMMAND_LIMIT_S = 600          # the lent machine's limit for one command
MARGIN_S = 60                  # process start, the final report, the transfer back
DEADLINE_S = 510               # all steps, results included
RESULTS_RESERVE_S = 15         # kept back from the steps for the results
MIN_START_S = 10               # a step is not started with less than this left
MIN_FREE_DISK_GB = 10          # flux-blocks checkpoint (2.2 GB fp32) + two artifacts + compiler caches
LORA_SCALE = 0.8
PROTO = "@gpu-check "          # prefix of the result lines a child prints on stdout
# The bench rows in the order the bench writes them; a fresh process each.
BENCH_VARIANTS = ("eager", "compile", "compile+cache", "aotpack", "aotpack+graphs")


# ---- plan and outcome ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    name: str
    what: str
    budget_s: float
    fn: Callable[["Run", "Clock"], tuple[str, str, dict]]
    needs: tuple[str, ...] = ()
    exclusive: bool = False    # runs alone: timings are measured in it, and it waits for what comes before
    optional: bool = False     # started only when its whole budget is left
    always: bool = False       # started whatever the deadline (the results)
    share: bool = False        # may take an even share of the time left instead of its budget (the benches)


@dataclasses.dataclass
class Result:
    name: str
    status: str                # "pass", "fail" or "skip"
    detail: str
    seconds: float = 0.0
    log: str | None = None     # where its traceback or output was saved
    data: dict = dataclasses.field(default_factory=dict)


class ChildFailed(Exception):
    """A child process exited badly; ``cause`` is one line, ``log`` where its output was saved."""

    def __init__(self, cause: str, log: str | None = None) -> None:
        super().__init__(cause)
        self.cause, self.log = cause, log


class Clock:
    """Seconds left to one step: its own budget, and never past the run's deadline (less what the results
    need, for every step but the results)."""

    def __init__(self, run: "Run", budget_s: float, reserve_s: float = RESULTS_RESERVE_S) -> None:
        self.run, self.end, self.reserve = run, time.monotonic() + budget_s, reserve_s

    def left(self) -> float:
        return min(self.end - time.monotonic(), self.run.left() - self.reserve)


# ---- pure helpers (tests/test_gpu_check.py) -------------------------------------------------------------------

# Units in the last place of each dtype (1 + ulp is the next number after 1).
ULP = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -10}
# A floor, in ulps of the latents' scale: fp32 compiled code reorders long sums (the CPU tests see <= 1e-4 at
# scale ~4, ~200 ulps); bf16/fp16 round the latents themselves at every Euler step.
ULPS = {"float32": 256, "bfloat16": 8, "float16": 8}
# Compiled code rounds at other places than eager, but not worse: each is within the dtype's own rounding
# error of the float32 result, so within 2x that of each other; 3x leaves a margin.
ROUNDING_FACTOR = 3.0
# Dynamic activation quantization rounds activations at every call: a rounding difference upstream can move
# one across a quantization step (1/127 of a row's max for int8, 2^-4 relative for float8 e4m3). Both widen
# the bound: x factor, and at least STEP x scale (the CPU tests' int8dq bound is 5e-2 at scale ~4).
SCHEME_FACTOR = {"int8dq": 2.0, "fp8dq": 4.0, "fp8dqrow": 4.0}
STEP = {"int8dq": 2 / 127, "fp8dq": 2.0 ** -4, "fp8dqrow": 2.0 ** -4}


def tolerance(dtype: str, scheme: str, *, scale: float, rounding: float = 0.0) -> float:
    """Max |diff| of the final latents allowed between the artifact and eager diffusers with the same scheme.

    ``scale``: max |latents| of eager, unquantized; ``rounding``: max |diff| between eager in ``dtype`` and
    eager in float32 on the same call (0 for float32): the error the dtype itself makes. For the tiny random
    model in bf16 that is ~3% of the scale, a quarter of what the transformer adds to the noise: a bf16 check
    catches garbage, wrong weights and a missing LoRA, not a subtle error; the float32 check is the sharp one.
    """
    if dtype not in ULP:
        raise ValueError(f"no tolerance for dtype {dtype!r}; known: {', '.join(ULP)}")
    bound = max(ROUNDING_FACTOR * rounding, ULPS[dtype] * ULP[dtype] * scale) * SCHEME_FACTOR.get(scheme, 1.0)
    return max(bound, STEP.get(scheme, 0.0) * scale)


def replay_tolerance(dtype: str, scale: float) -> float:
    """CUDA graphs replay the very kernels of the plain call: identical bits expected; 4 ulps of the scale
    allowed (one flipped rounding of the latents is 1-2 ulps; stale inputs or weights are far more)."""
    return 4 * ULP[dtype] * scale


def schemes_for(device: str, capability: tuple[int, int] | None) -> list[str]:
    """The tiny-flux schemes to check: fp8 dynamic needs CUDA sm89+."""
    out = ["none", "int8wo", "int8dq"]
    if device == "cuda" and capability is not None and tuple(capability) >= (8, 9):
        out.append("fp8dqrow")
    return out


def best_scheme(device: str, capability: tuple[int, int] | None) -> str:
    """The fp8/int8 scheme the bench compares with ``none``: fp8 per-row where the GPU has fp8 tensor cores."""
    return "fp8dqrow" if "fp8dqrow" in schemes_for(device, capability) else "int8dq"


def critical_path_s(steps: list[Step]) -> float:
    """Seconds the plan takes when every step uses its whole budget: steps start when their needs are done;
    an exclusive step waits for everything before it and holds back what follows. Optional steps excluded."""
    finish: dict[str, float] = {}
    barrier = 0.0
    for s in steps:
        if s.optional:
            continue
        start = max([barrier] + [finish.get(n, 0.0) for n in s.needs])
        if s.exclusive:
            start = max([start] + list(finish.values()))
        finish[s.name] = start + s.budget_s
        if s.exclusive:
            barrier = finish[s.name]
    return max(finish.values(), default=0.0)


def plan_problems(steps: list[Step], deadline_s: float, limit_s: float = COMMAND_LIMIT_S) -> list[str]:
    """Why the plan would not fit the lent machine's command limit; empty when it does."""
    out = []
    if deadline_s + MARGIN_S > limit_s:
        out.append(f"deadline {deadline_s:.0f} s + {MARGIN_S} s margin is over the {limit_s:.0f} s command limit")
    path = critical_path_s(steps)
    if path > deadline_s:
        out.append(f"the steps' budgets need {path:.0f} s on their critical path, over the {deadline_s:.0f} s deadline")
    names = {s.name for s in steps}
    for s in steps:
        out += [f"step '{s.name}' needs '{n}', which is not in the plan" for n in s.needs if n not in names]
    return out


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def first_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:limit]


def summary(results: list[Result], *, header: str = "", footer: str = "", width: int = 120) -> str:
    """One screen: a line per step (PASS / FAIL / SKIP, seconds, one line of detail; a failure says where its
    traceback is), then the counts."""
    lines = [header] if header else []
    name_w = max([len(r.name) for r in results] + [10])
    for r in results:
        secs = f"{r.seconds:6.1f} s" if r.status != "skip" else "     -  "
        detail = r.detail + (f"  [traceback: {r.log}]" if r.status == "fail" and r.log else "")
        line = f" {r.status.upper():<4}  {r.name:<{name_w}}  {secs}  {detail}"
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    counts = {k: sum(r.status == k for r in results) for k in ("pass", "fail", "skip")}
    lines.append(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
                 + (f" - {footer}" if footer else ""))
    return "\n".join(lines)


def wheel_info(filename: str) -> dict | None:
    """Name, version and tags of a wheel file name (PEP 427); None for anything else."""
    m = re.match(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$",
                 filename)
    if not m:
        return None
    return {"name": m["name"].lower().replace("_", "-"), "version": m["version"],
            "tags": {(py, abi, plat) for py in m["py"].split(".") for abi in m["abi"].split(".")
                     for plat in m["plat"].split(".")}}


def wheel_fits(tags: set, here: set | None) -> bool | None:
    """Whether a wheel installs on this interpreter (None when ``packaging`` is not there to tell)."""
    return None if here is None else bool(tags & here)


def _here_tags() -> set | None:
    try:
        from packaging import tags
    except ImportError:
        return None
    return {(t.interpreter, t.abi, t.platform) for t in tags.sys_tags()}


def find_wheels(folder: Path) -> dict[str, Path]:
    """The pinned wheels present in ``folder``, by project name."""
    out = {}
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        info = wheel_info(path.name)
        if info and WHEELS.get(info["name"]) == info["version"]:
            out[info["name"]] = path
    return out


# ---- the run: children, the scheduler ----------------------------------------------------------------------

class Run:
    """One check: where things go, the environment of the child processes, the deadline."""

    def __init__(self, out: Path, work: Path, deadline_s: float, opts: argparse.Namespace) -> None:
        self.out, self.work, self.opts = out, work, opts
        self.logs = work / "logs"
        for d in (out, work, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.site = work / "site"
        self.t0 = time.monotonic()
        self.deadline = self.t0 + deadline_s
        self.results: dict[str, Result] = {}
        self._lock = threading.Lock()
        self.env = {
            **os.environ,
            # the installed wheels, then aotpack from the working tree (not pip-installed: it pins torch>=2.13)
            "PYTHONPATH": os.pathsep.join([str(self.site), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
            "AOTPACK_CACHE": str(work / "cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
            "HF_HOME": str(work / "hf"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def child(self, kind: str, args: dict, *, budget: float, log: str, env: dict | None = None,
              timed: bool = False) -> list[dict]:
        """Run ``--child kind`` in a fresh process (its own process group, killed whole on timeout); returns
        the result lines it printed. Its stdout and stderr are saved to WORK/logs/<log>.log."""
        timeout = max(1.0, min(budget, self.left()))
        path = self.logs / f"{slug(log)}.log"
        if timed:  # bench: the child's clock starts now, as aotpack.bench does
            args = {**args, "t0": time.time()}
        cmd = [sys.executable, str(SCRIPT), "--child", kind, json.dumps(args)]
        with open(path, "w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
                                    env={**self.env, **(env or {})}, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                stdout, _ = proc.communicate()
                _append(path, stdout)
                lines = _parse(stdout)
                if {"_done": True} in lines:  # finished, then hung on its way out (compile workers, ...)
                    return [ln for ln in lines if "_done" not in ln]
                raise ChildFailed(f"{kind} timed out after {timeout:.0f} s", str(path)) from None
        stderr = path.read_text(errors="replace")
        _append(path, stdout)
        lines = [ln for ln in _parse(stdout) if "_done" not in ln]
        if proc.returncode != 0:
            if proc.returncode < 0:
                cause = f"{kind} crashed ({signal.Signals(-proc.returncode).name})"
            else:  # a traceback's last line names the exception
                tail = [ln for ln in stderr.splitlines() if ln.strip()]
                cause = tail[-1].strip()[:200] if tail else f"{kind} exited with {proc.returncode}"
            raise ChildFailed(cause, str(path))
        return lines

    def record_failure(self, name: str, cause: str, log: str | None) -> None:
        """Append the failure and the end of its log to OUT/failures.log at once (it survives a kill)."""
        tail = ""
        if log and Path(log).is_file():  # the end of stderr, where a traceback is (stdout comes after it)
            text = Path(log).read_text(errors="replace").split("\n---- stdout\n", 1)[0]
            tail = "\n".join(text.splitlines()[-60:])
        with self._lock, open(self.out / "failures.log", "a") as fh:
            fh.write(f"==== {name}: {cause}\n---- {log or '(no log)'} (last 60 lines)\n{tail}\n\n")


def _parse(stdout: str | None) -> list[dict]:
    return [json.loads(ln[len(PROTO):]) for ln in (stdout or "").splitlines() if ln.startswith(PROTO)]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _append(path: Path, text: str | None) -> None:
    if text:
        with open(path, "a") as fh:
            fh.write("\n---- stdout\n" + text)


def execute(step: Step, run: Run, budget_s: float | None = None) -> Result:
    """Run one step; whatever it raises becomes a failed Result with its traceback saved. A failure (raised
    or returned) goes to OUT/failures.log at once."""
    t0 = time.monotonic()
    clock = Clock(run, budget_s or step.budget_s, 0.0 if step.always else RESULTS_RESERVE_S)
    try:
        status, detail, data = step.fn(run, clock)
        result = Result(step.name, status, detail, time.monotonic() - t0, data.pop("_log", None), data)
        if status != "fail":
            return result
    except ChildFailed as e:
        result = Result(step.name, "fail", e.cause, time.monotonic() - t0, e.log)
    except Exception as e:
        path = run.logs / f"{slug(step.name)}.traceback.txt"
        path.write_text(traceback.format_exc())
        result = Result(step.name, "fail", f"{type(e).__name__}: {first_line(str(e))}", time.monotonic() - t0,
                        str(path))
    run.record_failure(step.name, result.detail, result.log)
    result.log = f"failures.log, {Path(result.log).name}" if result.log else "failures.log"
    return result


def run_steps(steps: list[Step], run: Run, *, parallel: int = 6, progress: Callable[[Result], None] | None = None
              ) -> list[Result]:
    """Run ``steps``: each starts once its needs passed (skipped when one did not), up to ``parallel`` at a
    time; an exclusive step waits for the steps before it, runs alone and holds back the steps after it; no
    step but an ``always`` one starts past the deadline."""
    pending = list(steps)
    names = {s.name for s in steps}
    running: dict[cf.Future, Step] = {}

    def finish(result: Result) -> None:
        run.results[result.name] = result
        if progress:
            progress(result)

    def skip(s: Step, why: str) -> None:
        pending.remove(s)
        finish(Result(s.name, "skip", why))

    with cf.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while pending or running:
            for s in list(pending):
                blocked = [n for n in s.needs if n in run.results and run.results[n].status != "pass"]
                if blocked:
                    how = "failed" if run.results[blocked[0]].status == "fail" else "was skipped"
                    skip(s, f"needs {blocked[0]}, which {how}")
                    continue
                unknown = [n for n in s.needs if n not in run.results and n not in names]
                if unknown:
                    skip(s, f"needs {unknown[0]}, which is not in the plan")
                    continue
                if (s.exclusive and running) or any(r.exclusive for r in running.values()) or len(running) >= parallel:
                    break
                if not all(n in run.results for n in s.needs):
                    if s.exclusive:
                        break
                    continue
                left = run.left() - (0 if s.always else RESULTS_RESERVE_S)
                if not s.always and (left < MIN_START_S or (s.optional and left < s.budget_s)):
                    skip(s, f"no time left ({max(left, 0):.0f} s before the deadline)")
                    continue
                budget = s.budget_s
                if s.share:  # the time the steps before it left unused, shared with the steps like it
                    budget = max(budget, left / sum(p.share for p in pending))
                pending.remove(s)
                running[pool.submit(execute, s, run, budget)] = s
                if s.exclusive:
                    break
            if not running:
                if pending:  # nothing can start and nothing runs: a need that never comes
                    for s in list(pending):
                        skip(s, "could not be scheduled")
                continue
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in done:
                running.pop(fut)
                finish(fut.result())
    return [run.results[s.name] for s in steps if s.name in run.results]


# ---- aotpack internals this script touches (aotpack/ is being restructured: they are all here) ---------------

def _aotpack_from_tree() -> None:
    """Make aotpack importable from the working tree as an installed one is.

    ``aotpack.recipes`` is the repo's recipes/ folder only through the pyproject's package-dir mapping; from a
    plain checkout on PYTHONPATH, ``recipes_dir()`` falls back to aotpack/recipes, which does not exist since
    the move to aotpack/builder/ (no recipe would be found). Register the folder under that name."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        import aotpack.recipes  # noqa: F401  (the editable install maps it)
    except ModuleNotFoundError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("aotpack.recipes", REPO / "recipes" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "recipes")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["aotpack.recipes"] = module
        spec.loader.exec_module(module)
        os.environ["GPU_CHECK_RECIPES_SHIM"] = "1"


def _builtin(name: str) -> Path:
    from aotpack.builder.tiny import ensure_builtin  # internal

    return ensure_builtin(name.split(":", 1)[-1])


def _recipe(name: str):
    from aotpack.builder.recipe import get_recipe  # internal

    return get_recipe(name)


def manifest_facts(folder: str | Path) -> dict:
    """The few manifest facts this check needs, read from manifest.json in schema 1 (one component, top-level
    ``inputs``) or schema 2 (a list of ``modules``, ``request``); ``aotpack.inspect`` validates, this reads."""
    m = json.loads((Path(folder) / "manifest.json").read_text())
    modules = m.get("modules") if isinstance(m.get("modules"), list) else []
    comp = next((x for x in modules if x.get("kind") == "component"), modules[0] if modules else {})
    build = m.get("build") or {}
    weights = comp.get("weights", "weights.safetensors")
    return {
        "dtype": m["dtype"], "scheme": m["scheme"]["name"], "torchao_config": m["scheme"].get("torchao_config"),
        "device": m["platform"]["device"], "platform": m["platform"], "checkpoint": m["model"]["checkpoint"],
        "max_sequence_length": (m.get("request") or m.get("inputs") or {}).get("max_sequence_length"),
        "weights_bytes": m["files"][weights]["size"], "stages": build.get("stages") or {},
        "max_abs_error": build.get("max_abs_error", comp.get("max_abs_error")),
        "compiled": build.get("compiled", comp.get("compiled")),
    }


def _patch(name: str, homes: tuple[str, ...], make: Callable[[Any], Any]) -> None:
    """Replace aotpack's function ``name`` by ``make(original)`` in every aotpack module that holds it.

    ``homes``: the modules it has lived in (aotpack/ is being restructured); the users known today are
    imported first, so that a ``from X import name`` done at import time is patched too."""
    import importlib

    for user in ("aotpack.serve.load", "aotpack.serve.module", "aotpack.serve.run", "aotpack.bench"):
        try:
            importlib.import_module(user)
        except ImportError:
            pass
    original = None
    for home in homes:
        try:
            original = getattr(importlib.import_module(home), name, None)
        except ImportError:
            continue
        if original is not None:
            break
    if original is None:
        raise RuntimeError(f"aotpack has no {name} in {', '.join(homes)}: update scripts/gpu_check.py")
    new = make(original)
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("aotpack") and getattr(module, name, None) is original:
            setattr(module, name, new)


def _patch_single_threaded() -> None:
    """Open packages with AOTInductor's single-threaded runner, which skips the per-run CUDA event that the
    default runner records and queries (a query is illegal while a CUDA graph is being captured)."""
    def make(_original):
        import torch
        from torch.export.pt2_archive._package import AOTICompiledModel

        # (package path, model name, run single threaded, number of runners, device index)
        return lambda path: AOTICompiledModel(torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1))

    _patch("open_package", ("aotpack._torch_compat", "aotpack.builder.compile"), make)


def _patch_bench_graphs() -> None:
    """aotpack.bench's worker loads the artifact with ``pipeline_for(path)``; give it ``cuda_graphs=True``."""
    import functools

    _patch("pipeline_for", ("aotpack.serve.run",), lambda f: functools.partial(f, cuda_graphs=True))


# ---- children: one process each -------------------------------------------------------------------------------

def emit(obj: dict) -> None:
    print(PROTO + json.dumps(obj, default=str), flush=True)


def child_env(a: dict) -> None:
    """Versions, devices and toolchain, as the steps will see them; imports everything they import."""
    import importlib
    import logging

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    import torch

    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    info["cuda_runtime"] = torch.version.cuda
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            warnings.append(f"{record.name}: {first_line(record.getMessage())}")

    logging.getLogger().addHandler(Keep(logging.WARNING))
    for name in ("triton", "diffusers", "torchao", "transformers", "huggingface_hub", "accelerate", "safetensors",
                 "psutil", "peft", "PIL", "click", "packaging"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as e:  # reported, not fatal here: the steps that need it will say so
            info[name] = None
            info.setdefault("import_errors", {})[name] = f"{type(e).__name__}: {first_line(str(e))}"
    try:
        _aotpack_from_tree()
        import aotpack
        from aotpack.builder.recipe import list_recipes  # internal

        info["aotpack"] = aotpack.__version__
        info["aotpack_file"] = aotpack.__file__
        info["recipes"] = list_recipes()
        info["recipes_shim"] = os.environ.get("GPU_CHECK_RECIPES_SHIM") == "1"
    except Exception as e:
        info["aotpack_error"] = f"{type(e).__name__}: {first_line(str(e))}"
    try:  # what results.md names the machine by; the check goes on without it
        from aotpack.bench import machine

        info["machine"] = machine()
    except Exception as e:
        warnings.append(f"aotpack.bench.machine(): {type(e).__name__}: {first_line(str(e))}")
        info["machine"] = _machine_here(info)
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        info["cuda_home"] = CUDA_HOME
    except Exception:
        info["cuda_home"] = None
    info["nvcc"] = shutil.which("nvcc")
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)]
    info["cxx"] = shutil.which(compilers[0]) if compilers else None
    info["warnings"] = warnings[:10]
    emit(info)


def _machine_here(info: dict) -> dict:
    """aotpack.bench.machine()'s fields, read without aotpack."""
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown") if Path("/proc/cpuinfo").is_file() else "unknown"
    try:
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory = "?"
    gpu = info.get("gpu")
    return {"platform": f"cuda-sm{''.join(map(str, info['capability']))}" if gpu else f"cpu-{platform.machine()}",
            "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_gb": memory, "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "os": platform.platform()}


def child_prepare(a: dict) -> None:
    """The builtin pipeline (made once, in AOTPACK_CACHE) and, for tiny-flux, a random LoRA for it."""
    _aotpack_from_tree()
    folder = _builtin(a["builtin"])
    if a.get("lora"):
        make_lora(folder / "transformer", Path(a["lora"]))
    emit({"folder": str(folder)})


def make_lora(transformer_folder: Path, path: Path, rank: int = 4, seed: int = 5) -> Path:
    """A random rank-4 LoRA in the diffusers/PEFT layout for the linears of a saved Flux transformer
    (aotpack's own, as tests/conftest.py's ``lora_file``)."""
    _aotpack_from_tree()
    from aotpack.builder.tiny import random_lora

    return random_lora(transformer_folder, path, rank=rank, seed=seed)


def child_build(a: dict) -> None:
    """``aotpack.build`` (an artifact already in place and valid is kept: a rerun on a warm machine)."""
    _aotpack_from_tree()
    import aotpack

    out = Path(a["out"])
    t = time.perf_counter()
    reused = False
    if (out / "manifest.json").is_file():
        try:
            aotpack.inspect(out)  # valid for this aotpack
            reused = True
        except Exception:
            reused = False
    if not reused:
        aotpack.build(a["recipe"], a["scheme"], dtype=a["dtype"], out=out, overwrite=True)
    aotpack.inspect(out)
    emit({"path": str(out), "seconds": time.perf_counter() - t, "reused": reused, **manifest_facts(out)})


def child_tiny(a: dict) -> None:
    """The real FluxPipeline: eager diffusers + torchao vs the artifact, plain and under CUDA graphs, and a
    LoRA swapped in (under CUDA graphs on a GPU). One result line per comparison; a part that raises is
    reported and the next part runs."""
    import torch

    _aotpack_from_tree()
    if a.get("single_threaded"):
        _patch_single_threaded()
    import aotpack
    from diffusers import FluxPipeline

    path = a["artifact"]
    facts = manifest_facts(path)
    dtype_name, scheme, device = facts["dtype"], facts["scheme"], facts["device"]
    dtype = getattr(torch, dtype_name)
    folder = str(_builtin(facts["checkpoint"]))
    kwargs = dict(height=96, width=64, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
                  max_sequence_length=facts["max_sequence_length"])  # not the export's size

    def pipeline(dt=dtype, lora=None):
        pipe = FluxPipeline.from_pretrained(folder, dtype=dt).to(device)
        pipe.set_progress_bar_config(disable=True)
        if lora:  # diffusers' own LoRA path (needs peft), as fresh_check.py does
            pipe.load_lora_weights(lora)
            pipe.fuse_lora(lora_scale=LORA_SCALE)
            pipe.unload_lora_weights()
        return pipe

    def quantize(transformer):  # as a diffusers user would, from the config the manifest records
        config = facts["torchao_config"]
        if config:
            from torchao.core.config import config_from_dict
            from torchao.quantization import quantize_

            quantize_(transformer, config_from_dict(config))

    def call(pipe):
        with torch.no_grad():
            out = pipe("a dog surfing on the moon", **kwargs, generator=torch.Generator("cpu").manual_seed(1)).images
        return out.float().cpu()

    def rounding(lora=None) -> float:
        """How far eager in the artifact's dtype lands from eager in float32 (unquantized, same call)."""
        if dtype == torch.float32:
            return 0.0
        return diff(call(pipeline(dtype, lora)), call(pipeline(torch.float32, lora)))

    def part(name, fn):
        try:
            return fn()
        except Exception as e:
            traceback.print_exc()
            emit({"check": name, "ok": False, "error": f"{type(e).__name__}: {first_line(str(e))}"})
            return None

    def diff(x, y) -> float:
        return float((x - y).abs().max())

    pipe = pipeline()
    eager_fp = call(pipe)
    scale, error = float(eager_fp.abs().max()), rounding()
    quantize(pipe.transformer)
    eager_q = call(pipe)
    tol = tolerance(dtype_name, scheme, scale=scale, rounding=error)
    emit({"check": "eager", "ok": True, "scale": scale, "rounding": error,
          "quant_error": diff(eager_q, eager_fp), "tol": tol, "device": device})
    aot = part("artifact", lambda: call(aotpack.load_into(pipe, path)))
    if aot is not None:
        emit({"check": "artifact", "ok": diff(aot, eager_q) <= tol, "diff": diff(aot, eager_q), "tol": tol,
              "vs_unquantized": diff(aot, eager_fp)})
    graphs = device == "cuda"
    if graphs:
        def replay():
            p = aotpack.load_into(pipe, path, cuda_graphs=True)
            return call(p), call(p)  # the first transformer call captures, every later one replays

        got = part("graphs", replay)
        if got is not None:
            ref, bound = (aot, replay_tolerance(dtype_name, scale)) if aot is not None else (eager_q, tol)
            d = max(diff(got[0], ref), diff(got[1], ref))
            emit({"check": "graphs", "ok": d <= bound, "diff": d, "tol": bound, "vs": "plain" if aot is not None else "eager"})
    if not a.get("lora"):
        return

    def swapped():
        pipe.transformer.swap_lora(a["lora"], LORA_SCALE)  # the graphs module on a GPU: recaptured after
        return call(pipe)

    lora_out = part("lora", swapped)

    def reference():
        error_lora = rounding(a["lora"])
        ref = pipeline(dtype, a["lora"])
        quantize(ref.transformer)
        return call(ref), error_lora

    got = part("lora reference", reference) if lora_out is not None else None
    if got is not None:
        eager_lora, error_lora = got
        bound = tolerance(dtype_name, scheme, scale=scale, rounding=max(error, error_lora))
        d, away = diff(lora_out, eager_lora), diff(lora_out, eager_q)
        # within the bound, and nearer eager with the LoRA than eager without it: a swap that did nothing fails
        emit({"check": "lora", "ok": d <= bound and d < away, "diff": d, "tol": bound, "without_lora": away,
              "under_graphs": graphs})


def child_bench(a: dict) -> None:
    """One variant of aotpack.bench's worker, with CUDA graphs (and the single-threaded runner) on request."""
    _aotpack_from_tree()
    from aotpack import bench

    label = a.pop("label", a["variant"])
    if a.pop("cuda_graphs", False):
        _patch_bench_graphs()
    if a.pop("single_threaded", False):
        _patch_single_threaded()
    result = bench.worker(a)
    result["variant"] = label
    emit(result)


def child_load(a: dict) -> None:
    """aotpack.bench's load worker, with its example inputs on the artifact's device (it makes them on the
    CPU) and, on a GPU, the allocated peak right after ``aotpack.load`` (the weights, once)."""
    _aotpack_from_tree()
    import torch

    from aotpack import bench

    device = manifest_facts(a["artifact"])["device"]
    _patch("_example_inputs", ("aotpack.bench",),
           lambda make: lambda *args: {k: _to(v, device) for k, v in make(*args).items()})
    gpu: dict[str, int] = {}

    def measured(load):
        def measured_load(*args, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                gpu["before"] = torch.cuda.memory_allocated()
            module = load(*args, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
                gpu["peak_after_load"] = torch.cuda.max_memory_allocated() - gpu["before"]
                gpu["allocated_after_load"] = torch.cuda.memory_allocated() - gpu["before"]
            return module
        return measured_load

    _patch("load", ("aotpack.serve.load", "aotpack.serve.module"), measured)
    result = bench.load_worker(a)
    result.update({f"gpu_{k}": v for k, v in gpu.items() if k != "before"})
    emit(result)


def _to(value, device):
    if hasattr(value, "to"):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


CHILDREN = {"env": child_env, "prepare": child_prepare, "build": child_build, "tiny": child_tiny,
            "bench": child_bench, "load": child_load}


# ---- steps ------------------------------------------------------------------------------------------------------

def step_install(run: Run, clock: Clock) -> tuple[str, str, dict]:
    """diffusers and torchao from .whl/ into WORK/site, unless the pinned versions import already.

    ``pip install --target`` into a folder put on PYTHONPATH, not ``--user``: the GPU machines' python3 is a
    virtualenv (``--user`` is refused there), a target folder leaves the machine's environment as it was, and
    PEP 668 does not apply to it. Without pip, a wheel is a zip: these two unpack as they are."""
    from importlib.metadata import PackageNotFoundError, version

    have = {}
    for name in WHEELS:
        try:
            have[name] = version(name)
        except PackageNotFoundError:
            have[name] = None
    missing = [n for n, v in WHEELS.items() if have[n] != v]
    if not missing:
        return "pass", "already installed: " + ", ".join(f"{n} {v}" for n, v in have.items()), {"installed": []}
    wheels = find_wheels(REPO / ".whl")
    absent = [n for n in missing if n not in wheels]
    if absent:
        return "fail", (f"{', '.join(absent)} {'/'.join(WHEELS[n] for n in absent)} neither installed nor in .whl/ "
                        "(run 'make gpu-wheels' where there is network, and carry .whl)"), {}
    files = [str(wheels[n]) for n in missing]
    run.site.mkdir(parents=True, exist_ok=True)
    how = "pip --target"
    log = run.logs / "install-wheels.log"
    try:
        import pip  # noqa: F401

        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(run.site), *files]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, clock.left()))
        log.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise ChildFailed(f"pip install failed: {first_line(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else '')}",
                              str(log))
    except ImportError:
        import zipfile

        how = "unzipped (no pip)"
        for f in files:
            with zipfile.ZipFile(f) as z:
                z.extractall(run.site)
    return "pass", f"{', '.join(f'{n} {WHEELS[n]}' for n in missing)} into {run.site} ({how})", {"installed": missing}


def _prerequisites(env: dict, work: Path) -> list[tuple[str, str, str]]:
    """(level, what, detail): level "ok", "warn" or "FAIL". ``env`` is child_env's report ({} if it failed)."""
    out: list[tuple[str, str, str]] = []
    py = sys.version_info
    out.append(("ok" if py >= (3, 11) else "FAIL", "python",
                f"{sys.version.split()[0]} at {sys.executable}" + ("" if py >= (3, 11) else
                                                                   " (aotpack reads recipes with tomllib: 3.11+)")))
    if env.get("torch"):
        note = "" if env["torch"].startswith(("2.13", "2.14")) else " (aotpack asks for 2.13: run from the working tree, breakage is reported)"
        out.append(("ok", "torch", env["torch"] + note))
    else:
        out.append(("FAIL", "torch", "does not import" + (f": {env['import_error']}" if env.get("import_error") else "")))
    if env.get("cuda"):
        out.append(("ok", "CUDA", f"{env.get('gpu')} sm{''.join(map(str, env.get('capability', [])))}, "
                                  f"{env.get('gpu_memory_gb')} GiB, CUDA {env.get('cuda_runtime')}, triton {env.get('triton')}"))
    else:
        out.append(("warn", "CUDA", "no CUDA device here: a real run stops at once (--allow-cpu for a CPU smoke run);"
                                    " the plan above assumes an sm90 GPU"))
    wheels = find_wheels(REPO / ".whl")
    here_tags = _here_tags()
    for name, pinned in WHEELS.items():
        have = env.get(name)
        if have == pinned:
            out.append(("ok", name, f"{have} imports"))
        elif name in wheels:
            fits = wheel_fits(wheel_info(wheels[name].name)["tags"], here_tags)
            level = "FAIL" if fits is False else "ok"
            out.append((level, name, f"{'installed ' + have + ', ' if have else ''}{wheels[name].name} in .whl/ "
                                     + ("does not fit this python" if fits is False else "will be installed")))
        else:
            out.append(("FAIL", name, f"{pinned} neither imports ({have or 'absent'}) nor is in .whl/: "
                                      "run 'make gpu-wheels' and carry .whl"))
    missing_reqs = _missing_requirements(wheels.get("diffusers"))
    if missing_reqs:
        out.append(("warn", "diffusers needs", ", ".join(missing_reqs)
                    + " not installed (importlib_metadata is not imported on Python 3.8+)"))
    for name, level in (("transformers", "FAIL"), ("safetensors", "FAIL"), ("huggingface_hub", "FAIL"),
                        ("psutil", "FAIL"), ("accelerate", "warn"), ("peft", "warn")):
        if name in env and env[name] is None:
            why = " (the LoRA check's eager reference uses diffusers' load_lora_weights)" if name == "peft" else ""
            out.append((level, name, f"does not import: {env.get('import_errors', {}).get(name, '')}{why}"))
    if env.get("aotpack_error"):
        out.append(("FAIL", "aotpack", f"from the working tree: {env['aotpack_error']}"))
    elif env.get("aotpack"):
        need = {"tiny-flux", "flux-blocks"} - set(env.get("recipes", []))
        shim = " (recipes found only through this script's shim: recipes_dir() misses the repo's recipes/ without the editable install)" if env.get("recipes_shim") else ""
        out.append(("FAIL" if need else "ok", "aotpack", f"{env['aotpack']} from {env.get('aotpack_file')}"
                    + (f"; recipes missing: {', '.join(sorted(need))}" if need else "") + shim))
    out.append(("ok" if env.get("cxx") else ("FAIL" if env else "warn"), "C++ compiler",
                env.get("cxx") or "none found (AOTInductor compiles C++)"))
    if env.get("cuda"):
        out.append(("ok" if env.get("cuda_home") or env.get("nvcc") else "warn", "CUDA toolkit",
                    f"CUDA_HOME {env.get('cuda_home')}, nvcc {env.get('nvcc')}"))
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free / 2**30
    out.append(("ok" if free >= MIN_FREE_DISK_GB else "FAIL", "disk", f"{free:.0f} GiB free in {work} "
                f"(needs {MIN_FREE_DISK_GB})"))
    try:
        import pip  # noqa: F401

        out.append(("ok", "pip", "for the wheels (--target WORK/site)"))
    except ImportError:
        out.append(("warn", "pip", "absent: the wheels will be unzipped into WORK/site"))
    for w in env.get("warnings", []):
        out.append(("warn", "import", w))
    return out


def _missing_requirements(wheel: Path | None) -> list[str]:
    """Requirements a wheel declares (extras aside) that are not installed here."""
    if wheel is None:
        return []
    import zipfile
    from importlib.metadata import PackageNotFoundError, version

    with zipfile.ZipFile(wheel) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        text = z.read(meta).decode() if meta else ""
    missing = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            name = re.split(r"[<>=!~;\[ (]", line.split(":", 1)[1].strip(), maxsplit=1)[0]
            try:
                version(name)
            except PackageNotFoundError:
                missing.append(name)
    return missing


def step_environment(run: Run, clock: Clock) -> tuple[str, str, dict]:
    env = run.child("env", {}, budget=clock.left(), log="environment")[-1]
    checks = _prerequisites(env, run.work)
    bad = [f"{what}: {detail}" for level, what, detail in checks if level == "FAIL"]
    head = (f"python {env.get('python')}, torch {env.get('torch')}, "
            + (f"{env.get('gpu')} sm{''.join(map(str, env.get('capability', [])))}" if env.get("cuda") else "no CUDA")
            + f", diffusers {env.get('diffusers')}, torchao {env.get('torchao')}")
    env["checks"] = checks
    if bad:
        return "fail", bad[0] + (f" (+{len(bad) - 1} more: results.md)" if len(bad) > 1 else ""), env
    return "pass", head, env


def make_step_prepare(builtin: str, lora: Path | None) -> Callable:
    def fn(run: Run, clock: Clock):
        out = run.child("prepare", {"builtin": builtin, "lora": str(lora) if lora else None}, budget=clock.left(),
                        log=f"prepare-{builtin}")[-1]
        return "pass", f"{builtin} pipeline in {out['folder']}" + (", random LoRA made" if lora else ""), out
    return fn


def make_step_build(recipe: str, scheme: str, dtype: str) -> Callable:
    def fn(run: Run, clock: Clock):
        dest = run.work / "artifacts" / f"{recipe}-{scheme}-{dtype}"
        out = run.child("build", {"recipe": recipe, "scheme": scheme, "dtype": dtype, "out": str(dest)},
                        budget=clock.left(), log=f"build-{recipe}-{scheme}-{dtype}")[-1]
        st = out["stages"]
        how = "existed" if out["reused"] else f"export {st.get('export', 0):.0f} s, compile {st.get('compile', 0):.0f} s ({out['compiled']})"
        error = f"; compiled vs eager {out['max_abs_error']:.1e}" if out.get("max_abs_error") is not None else ""
        return "pass", f"{out['weights_bytes'] / 2**20:.1f} MiB of weights; {how}{error}", out
    return fn


def make_step_tiny(scheme: str, build_step: str, lora: Path | None) -> Callable:
    def fn(run: Run, clock: Clock):
        artifact = run.results[build_step].data["path"]
        args = {"artifact": artifact, "lora": str(lora) if lora else None}
        log = f"tiny-{scheme}"
        try:
            lines = run.child("tiny", args, budget=clock.left(), log=log)
            crashed = None
        except ChildFailed as e:  # the result lines printed before the crash still count
            lines, crashed = _lines_of(e.log), e
        checks = {ln["check"]: ln for ln in lines if "check" in ln}
        data: dict[str, Any] = {"checks": checks, "_log": str(run.logs / f"{log}.log")}
        graph_error = any(checks.get(c, {}).get("error") for c in ("graphs", "lora")) or (
            crashed is not None and "artifact" in checks and "graphs" not in checks)
        if graph_error and run.results.get("environment", Result("", "", "")).data.get("cuda") and clock.left() > MIN_START_S:
            # Does AOTInductor's single-threaded runner make CUDA graphs work? (see _patch_single_threaded)
            try:
                again = run.child("tiny", {**args, "single_threaded": True}, budget=clock.left(), log=log + "-single-threaded")
            except ChildFailed as e:
                again = _lines_of(e.log)
            data["single_threaded"] = {ln["check"]: ln for ln in again if "check" in ln}
        return _judge_tiny(checks, data, crashed)
    return fn


def _lines_of(log: str | None) -> list[dict]:
    if not log or not Path(log).is_file():
        return []
    return [ln for ln in _parse(Path(log).read_text(errors="replace")) if "_done" not in ln]


def _judge_tiny(checks: dict, data: dict, crashed: ChildFailed | None) -> tuple[str, str, dict]:
    """One line: each comparison as diff/tolerance, the first failure first."""
    parts, failed = [], []
    for name in ("artifact", "graphs", "lora", "lora reference"):
        c = checks.get(name)
        if c is None:
            continue
        if c.get("error"):
            failed.append(f"{name}: {c['error']}")
            continue
        parts.append(f"{name} {c['diff']:.1e}/{c['tol']:.1e}")
        if c["diff"] > c["tol"]:
            failed.append(f"{name} differs by {c['diff']:.2e} > {c['tol']:.2e}")
        elif name == "lora" and c["diff"] >= c.get("without_lora", float("inf")):
            failed.append(f"the LoRA swap did not move the artifact towards eager with the LoRA "
                          f"({c['diff']:.1e} from it, {c['without_lora']:.1e} from eager without)")
    st = data.get("single_threaded")
    if st is not None:
        ok = "graphs" in st and all(st[n].get("ok") for n in ("graphs", "lora") if n in st)
        parts.append("with the single-threaded runner: graphs " + ("pass" if ok else "fail"))
    if crashed is not None:
        failed.append(crashed.cause)
    if "artifact" not in checks and crashed is None:
        failed.append("no comparison was made")
    if failed:
        return "fail", "; ".join(failed + parts[:1] + ([parts[-1]] if st is not None else [])), data
    eager = checks.get("eager", {})
    return "pass", f"{', '.join(parts)} (scale {eager.get('scale', 0):.2f}, {eager.get('rounding', 0):.1e} from fp32)", data


def make_step_bench(recipe_name: str, scheme: str, build_step: str, dtype: str, device: str, images: int) -> Callable:
    def fn(run: Run, clock: Clock):
        _aotpack_from_tree()
        from aotpack import bench

        recipe = _recipe(recipe_name)
        artifact = Path(run.results[build_step].data["path"])
        checkpoint = Path(run.results[f"prepare {recipe_name}"].data["folder"])
        common = {"recipe": recipe.name, "recipe_variant": None, "device": device, "dtype": dtype,
                  "height": recipe.capture["height"], "width": recipe.capture["width"], "steps": recipe.run["steps"],
                  "images": images, "batch": 1, "max_autotune": False}
        tmp = Path(tempfile.mkdtemp(prefix=f"bench-{scheme}-", dir=run.work))
        cache_file = tmp / "megacache.bin"
        weights = manifest_facts(artifact)["weights_bytes"]
        rows, problems = [], []
        variants = [v for v in ("aotpack", "aotpack+graphs", "eager", "compile", "compile+cache")
                    if device == "cuda" or v != "aotpack+graphs"]  # the aotpack rows first: they matter most
        for label in variants:
            if clock.left() < MIN_START_S:
                problems.append(f"{label}: no time left")
                continue
            variant = "aotpack" if label.startswith("aotpack") else label
            args = {**common, "variant": variant, "quant": scheme, "artifact": str(artifact), "label": label,
                    "save_cache": str(cache_file) if label == "compile" else None, "cache_file": str(cache_file)}
            if label == "compile+cache" and not cache_file.exists():
                problems.append("compile+cache: the compile variant saved no portable cache")
                continue
            tries = [{"cuda_graphs": True}, {"cuda_graphs": True, "single_threaded": True}] if label == "aotpack+graphs" else [{}]
            for extra in tries:
                bench.evict(checkpoint, artifact)  # a cold page cache, as aotpack bench does
                env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}  # an empty compiler cache
                try:
                    r = run.child("bench", {**args, **extra}, budget=clock.left(), log=f"bench-{scheme}-{label}"
                                  + ("-single-threaded" if extra.get("single_threaded") else ""), env=env, timed=True)[-1]
                except ChildFailed as e:
                    problems.append(f"{label}{' (single-threaded runner)' if extra.get('single_threaded') else ''}: {e.cause}")
                    run.record_failure(f"bench {scheme} {label}", e.cause, e.log)
                    continue
                if extra.get("single_threaded"):
                    r["variant"] = label + "*"  # * = with the single-threaded runner patch (see results.md)
                r.update({"quant": scheme, "weights_bytes": weights})
                rows.append(r)
                break
        loads = {}
        if clock.left() > 2 * MIN_START_S:
            try:
                loads = run.child("load", {"artifact": str(artifact)}, budget=clock.left(), log=f"load-{scheme}")[-1]
                loads["first_load_s"] = run.child("load", {"artifact": str(artifact), "full": True},
                                                  budget=clock.left(), log=f"load-{scheme}-full")[-1]["load_s"]
            except ChildFailed as e:
                problems.append(f"load: {e.cause}")
                run.record_failure(f"bench {scheme} load", e.cause, e.log)
                loads = {}
        else:
            problems.append("load: no time left")
        shutil.rmtree(tmp, ignore_errors=True)
        order = {v: i for i, v in enumerate(BENCH_VARIANTS)}
        rows.sort(key=lambda r: order.get(r["variant"].rstrip("*"), 99))
        data = {"scheme": scheme, "rows": rows, "loads": loads, "common": common, "weights_bytes": weights,
                "build_s": run.results[build_step].data.get("seconds")}
        line = bench_line(rows, weights, device)
        if problems:
            return "fail", "; ".join(problems[:2]) + (f" (+{len(problems) - 2})" if len(problems) > 2 else "") + f"; {line}", data
        return "pass", line, data
    return fn


def bench_line(rows: list[dict], weights: int, device: str = "cuda") -> str:
    """forward ms and first image s per variant, and the artifact's memory when ready against its weights."""
    if not rows:
        return "no variant ran"
    parts = [f"{r['variant']} {r['forward_s'] * 1e3:.1f} ms / {r['first_image_s']:.1f} s" for r in rows
             if r.get("forward_s") is not None]
    aot = next((r for r in rows if r["variant"] == "aotpack"), None)
    # on a GPU model_memory is memory_allocated when ready (the artifact's weights and the small text encoders)
    mem = f"; aotpack ready {aot['model_memory'] / max(weights, 1):.2f}x weights" if aot and device == "cuda" else ""
    return "forward / first image: " + ", ".join(parts) + mem


def step_gpu_tests(run: Run, clock: Clock) -> tuple[str, str, dict]:
    """tests/test_gpu.py, which builds its own artifacts: the tests themselves proven on the GPU."""
    log = run.logs / "gpu-tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=run.env,
                                start_new_session=True)  # tests/conftest.py gives it its own AOTPACK_CACHE
        timeout = max(1.0, clock.left())
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ChildFailed(f"pytest timed out after {timeout:.0f} s", str(log)) from None
    last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["(no output)"]
    if rc == 5 or "No module named pytest" in last[0]:
        return "skip", last[0][:120], {}
    if rc != 0:
        raise ChildFailed(last[0][:200], str(log))
    return "pass", last[0][:120], {"_log": None}


def step_results(run: Run, clock: Clock) -> tuple[str, str, dict]:
    write_results(run)
    return "pass", f"{run.out}/results.md, results.json", {}


def write_results(run: Run) -> None:
    """results.md and results.json in the bench's format (aotpack.bench.write_results) when a bench ran,
    with this check's steps added; the check's steps alone otherwise."""
    steps = [dataclasses.asdict(r) for r in run.results.values()]
    env = run.results.get("environment", Result("", "", "")).data
    check = {"elapsed_s": round(run.elapsed(), 1), "environment": {k: v for k, v in env.items() if k != "checks"},
             "steps": steps}
    benches = [r for r in run.results.values() if r.name.startswith("bench ") and r.data.get("rows")]
    md_extra = _check_markdown(run)
    written = False
    if benches:
        try:
            _aotpack_from_tree()
            from aotpack.bench import write_results as bench_write

            rows = [row for b in benches for row in b.data["rows"]]
            loads = {b.data["scheme"]: b.data["loads"] for b in benches if b.data["loads"]}
            builds = {b.data["scheme"]: b.data["build_s"] for b in benches if b.data.get("build_s")}
            common = benches[0].data["common"]
            recipe = dataclasses.replace(_recipe(common["recipe"]), dtype=common["dtype"])
            info = env.get("machine") or {"platform": "?", "cpu": "?", "cores": os.cpu_count(), "threads": "?",
                                          "memory_gb": "?", "gpu": env.get("gpu"), "torch": env.get("torch"),
                                          "python": env.get("python"), "os": "?"}
            bench_write(run.out, recipe, rows, loads, builds, info, common)
            data = json.loads((run.out / "results.json").read_text())
            (run.out / "results.json").write_text(json.dumps({**data, "check": check}, indent=2, default=str) + "\n")
            with open(run.out / "results.md", "a") as fh:
                fh.write("\n" + md_extra)
            written = True
        except Exception as e:
            md_extra += f"\n(aotpack.bench.write_results failed: {type(e).__name__}: {first_line(str(e))})\n"
            check["bench_rows"] = [row for b in benches for row in b.data["rows"]]
    if not written:
        (run.out / "results.json").write_text(json.dumps({"check": check}, indent=2, default=str) + "\n")
        (run.out / "results.md").write_text("# aotpack GPU check\n\n" + md_extra)


def _check_markdown(run: Run) -> str:
    env = run.results.get("environment", Result("", "", "")).data
    lines = ["## GPU check (scripts/gpu_check.py)", "",
             f"{env.get('gpu') or 'no GPU'}; python {env.get('python')}, torch {env.get('torch')}, "
             f"diffusers {env.get('diffusers')}, torchao {env.get('torchao')}, triton {env.get('triton')}; "
             f"{run.elapsed():.0f} s in all.", "",
             "tiny-flux checks: max |diff| of the final latents (3 steps at 96x64) against eager diffusers with the "
             "same torchao scheme, as `diff/tolerance`. Tolerance: 3x the distance between eager in the artifact's "
             "dtype and eager in float32 (the dtype's own rounding), at least 8 ulps (bf16) or 256 ulps (fp32) of "
             "the latents' scale; x2 for int8dq, x4 for fp8dqrow, and at least 2/127 (int8dq) or 1/16 (fp8) of the "
             "scale. CUDA graphs against the plain call: 4 ulps of the scale. The LoRA swap must also land nearer "
             "eager with the LoRA than eager without it. `*` after a bench variant: with AOTInductor's "
             "single-threaded runner patched into aotpack's loader.", "",
             "| step | status | seconds | detail |", "|---|---|---|---|"]
    for r in run.results.values():
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |")
    checks = env.get("checks") or []
    if checks:
        lines += ["", "Prerequisites:", ""] + [f"- {lv} {what}: {detail}" for lv, what, detail in checks]
    return "\n".join(lines) + "\n"


def pack_logs(run: Run) -> None:
    with tarfile.open(run.out / "logs.tar.gz", "w:gz") as tar:
        tar.add(run.logs, arcname="logs")


# ---- the plan ---------------------------------------------------------------------------------------------------

def make_plan(opts: argparse.Namespace, device: str, capability: tuple[int, int] | None, work: Path) -> list[Step]:
    """Every step after the environment, for this device (the fp8 scheme on sm89+ only)."""
    dtype, recipe = opts.dtype, opts.bench_recipe
    schemes = opts.schemes.split(",") if opts.schemes else schemes_for(device, capability)
    tiny = [(s, dtype, s) for s in schemes]  # (scheme, dtype, the steps' label)
    if not opts.no_fp32 and dtype != "float32":  # the sharp check: float32 rounds too little to hide an error
        tiny.append(("none", "float32", "none float32"))
    bench = [] if opts.no_bench else [best_scheme(device, capability), "none"]  # the headline first
    lora = work / "lora" / "tiny-flux-rank4.safetensors"
    steps = [Step("prepare tiny-flux", "make the tiny-flux pipeline (offline, seeded) and a random LoRA", 40,
                  make_step_prepare("tiny-flux", lora), needs=("environment",))]
    if bench and recipe != "tiny-flux":
        steps.append(Step(f"prepare {recipe}", f"make the {recipe} pipeline (real width, 2.2 GB in fp32)", 60,
                          make_step_prepare(recipe, None), needs=("environment",)))
    for s, dt, label in tiny:
        steps.append(Step(f"build tiny-flux {label}", f"aotpack.build('tiny-flux', '{s}', dtype='{dt}')", 100,
                          make_step_build("tiny-flux", s, dt), needs=("prepare tiny-flux",)))
    for s in bench:
        if f"build {recipe} {s}" not in {st.name for st in steps}:
            steps.append(Step(f"build {recipe} {s}", f"aotpack.build('{recipe}', '{s}', dtype='{dtype}')", 150,
                              make_step_build(recipe, s, dtype), needs=(f"prepare {recipe}",)))
    graphs = " (plain and cuda_graphs=True), LoRA swap under CUDA graphs" if device == "cuda" else ", LoRA swap"
    for s, dt, label in tiny:
        steps.append(Step(f"tiny-flux {label}", f"FluxPipeline: artifact vs eager diffusers + {s} in {dt}{graphs}", 70,
                          make_step_tiny(label, f"build tiny-flux {label}", lora), needs=(f"build tiny-flux {label}",)))
    variants = ", ".join(v for v in BENCH_VARIANTS if device == "cuda" or v != "aotpack+graphs")
    for s in bench:
        steps.append(Step(f"bench {s}", f"{recipe} in {dtype}: {variants}; fresh processes, cold page cache", 110,
                          make_step_bench(recipe, s, f"build {recipe} {s}", dtype, device, opts.images),
                          needs=(f"build {recipe} {s}", f"prepare {recipe}"), exclusive=True, share=True))
    if not opts.no_tests:
        steps.append(Step("gpu tests", "pytest -m gpu tests/test_gpu.py (when its budget is left)", 150,
                          step_gpu_tests, needs=("environment",), exclusive=True, optional=True))
    steps.append(Step("results", "write results.md / results.json, summary.txt, logs.tar.gz", 10, step_results,
                      exclusive=True, always=True))
    for st in steps:
        st.budget_s *= opts.budget_scale
    return steps


def first_steps(budget_scale: float = 1.0) -> list[Step]:
    """What runs before the plan can be made (it depends on the GPU found)."""
    steps = [Step("install wheels", "diffusers 0.42.1 + torchao 0.18.0 from .whl/ (pip --target WORK/site) if missing",
                  20, step_install),
             Step("environment", "versions, CUDA, aotpack from the working tree, compilers, disk", 40,
                  step_environment, needs=("install wheels",))]
    for st in steps:
        st.budget_s *= budget_scale
    return steps


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("out", type=Path, help="folder for results.md, results.json, summary.txt, failures.log, logs.tar.gz")
    ap.add_argument("--dry-run", action="store_true", help="list the steps, check the prerequisites, run nothing")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aotpack-gpu-check",
                    help="artifacts, caches, installed wheels and logs (default: %(default)s); not under OUT")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for all steps (default %(default)s)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--schemes", help="tiny-flux schemes, comma-separated (default: none,int8wo,int8dq[,fp8dqrow])")
    ap.add_argument("--bench-recipe", default="flux-blocks")
    ap.add_argument("--images", type=int, default=2, help="steady images per bench variant")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--no-tests", action="store_true", help="leave out pytest tests/test_gpu.py")
    ap.add_argument("--parallel", type=int, default=8, help="steps at a time (builds, tiny checks)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="multiply every step's budget (a CPU smoke run: 3); the deadline stays")
    ap.add_argument("--no-fp32", action="store_true", help="leave out the float32 tiny-flux check")
    ap.add_argument("--allow-cpu", action="store_true", help="run on a machine without CUDA (a smoke run of the script)")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        CHILDREN[argv[1]](json.loads(argv[2]) if len(argv) > 2 else {})
        emit({"_done": True})  # the work is done: a child slow to exit after this is not a failure
        return 0
    opts = parse(argv)
    if opts.dry_run:
        return dry_run(opts)
    shutil.rmtree(opts.work / "logs", ignore_errors=True)  # artifacts and caches stay for a rerun; logs do not
    run = Run(opts.out, opts.work, opts.deadline, opts)
    for old in [*opts.out.glob("results.*"), *(opts.out / n for n in ("summary.txt", "failures.log", "logs.tar.gz"))]:
        old.unlink(missing_ok=True)  # a rerun into the same folder shows only its own results

    def progress(r: Result) -> None:
        line = f"[{run.elapsed():5.0f} s] {r.status.upper():<4} {r.name}: {r.detail}"
        print(line, file=sys.stderr, flush=True)
        with open(run.logs / "progress.log", "a") as fh:
            fh.write(line + "\n")

    print(f"aotpack GPU check: deadline {opts.deadline:.0f} s, work in {opts.work}", file=sys.stderr, flush=True)
    run_steps(first_steps(opts.budget_scale), run, progress=progress)
    env = run.results["environment"].data if run.results["environment"].status == "pass" else {}
    if env and not env.get("cuda") and not opts.allow_cpu:
        print("no CUDA device here: this check is for a GPU machine (--dry-run checks the plan anywhere, "
              "--allow-cpu runs it on a CPU)", file=sys.stderr)
        return 2
    device = "cuda" if env.get("cuda") else "cpu"
    capability = tuple(env["capability"]) if env.get("capability") else None
    steps = make_plan(opts, device, capability, opts.work)
    run_steps(steps, run, parallel=opts.parallel, progress=progress)
    results = list(run.results.values())
    header = (f"aotpack GPU check - {env.get('gpu') or device}, python {env.get('python')}, torch {env.get('torch')}, "
              f"diffusers {env.get('diffusers')}, torchao {env.get('torchao')}")
    failed = any(r.status == "fail" for r in results)
    text = summary(results, header=header,
                   footer=f"{run.elapsed():.0f} s; {opts.out}/results.md" + (", failures.log" if failed else ""))
    (opts.out / "summary.txt").write_text(text + "\n")
    try:
        pack_logs(run)
    except OSError as e:
        print(f"could not pack the logs: {e}", file=sys.stderr)
    print(text)
    return 1 if failed else 0


def dry_run(opts: argparse.Namespace) -> int:
    """List the steps with their budgets and check what can be checked here; 0 when the plan is sound."""
    opts.work.mkdir(parents=True, exist_ok=True)
    run = Run(opts.out, opts.work, opts.deadline, opts)
    site_env = {"PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    try:  # what imports here as it is (nothing is installed by a dry run)
        env = run.child("env", {}, budget=120, log="dry-run-environment", env=site_env)[-1]
    except ChildFailed as e:
        env = {"import_error": e.cause}
    device = "cuda"  # the plan is for a GPU machine, whatever this one is
    capability = tuple(env["capability"]) if env.get("cuda") else (9, 0)
    steps = first_steps(opts.budget_scale) + make_plan(opts, device, capability, opts.work)
    print(f"Plan for {env.get('gpu') or 'a CUDA GPU (sm90 assumed)'}: {len(steps)} steps, critical path "
          f"{critical_path_s(steps):.0f} s of budgets, deadline {opts.deadline:.0f} s, command limit {COMMAND_LIMIT_S} s")
    width = max(len(s.name) for s in steps)
    for s in steps:
        flags = ", ".join(f for f, on in (("alone", s.exclusive), ("if time is left", s.optional)) if on)
        needs = f" <- {', '.join(s.needs)}" if s.needs else ""
        print(f"  {s.name:<{width}}  {s.budget_s:4.0f} s  {s.what}{f' [{flags}]' if flags else ''}{needs}")
    print("Prerequisites:")
    checks = _prerequisites(env, opts.work)
    for level, what, detail in checks:
        print(f"  {level:<4} {what}: {detail}")
    problems = plan_problems(steps, opts.deadline) + [f"{w}: {d}" for lv, w, d in checks if lv == "FAIL"]
    if problems:
        print("The plan is NOT sound:\n" + "\n".join(f"  - {p}" for p in problems))
        return 1
    print("The plan is sound.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
