#!/usr/bin/env python3
"""One prepared check of aotpack's GPU path, for a lent H100/H200: a thin driver over aotpack's own commands.

    python3 scripts/gpu_check.py OUT             # the whole check (a CUDA machine; under 9 minutes)
    python3 scripts/gpu_check.py --dry-run OUT   # list the steps and check the prerequisites (any machine)
    OUT=DIR make gpu-check                       # the same, through make (no venv, no network needed)

Each step runs the code CI runs on CPU (``python -m aotpack.cli``, pytest) in subprocesses, within its own time
budget; a failure is one line (the command's ``Error:`` line or its traceback's last one), the rest go on.
  install wheels  pinned diffusers / torchao (+ other wheels in .whl/) into WORK/site (pip --target) if missing
  environment     a probe (versions, CUDA, compiler) and ``aotpack --version``
  prepare         the builtin pipelines (tiny-flux; flux-blocks for the benches) and a random LoRA
  build, run      side by side: ``aotpack build`` + ``aotpack inspect --json`` (the build checks compiled vs
                  eager) of tiny-flux in bf16 (none, int8wo, int8dq, fp8dqrow on sm89+; int8wo regional), in fp32
                  (none), and of flux-blocks; ``aotpack run`` of each tiny-flux one (on CUDA + --cuda-graphs --lora)
  bench S         ``aotpack.bench.run_bench`` (``aotpack bench`` has no --dtype nor graphs row yet): flux-blocks in
                  bf16, aotpack (+graphs) / eager / compile / compile+cache; fp8dqrow (int8dq below sm89), none
  gpu tests       ``pytest -m gpu tests/test_gpu.py`` on the tiny-flux builds above, if its budget is left
Then OUT/results.md + .json (with the benches' tables), summary.txt, failures.log, logs.tar.gz (all output).
aotpack runs from the working tree (PYTHONPATH): it asks for torch>=2.13 and the GPU machines have 2.11, so
what breaks there is reported rather than refused at install time.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
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
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
WHEELS = {"diffusers": "0.42.1", "torchao": "0.18.0"}   # what `make gpu-wheels` puts in .whl/
COMMAND_LIMIT_S = 600          # the lent machine's limit for one command
DEADLINE_S = 510               # all steps; the rest is for process start, the results and the transfer back
MIN_START_S = 10               # a step is not started with less than this left
MIN_FREE_DISK_GB = 10          # flux-blocks checkpoint (2.2 GB fp32) + artifacts + compiler caches
DTYPE, IMAGES, PARALLEL = "bfloat16", 2, 8
AOTPACK = [sys.executable, "-m", "aotpack.cli"]
OUT_FILES = ("results.md", "results.json", "summary.txt", "failures.log", "logs.tar.gz")
PROBE_PY = r"""import importlib, json, shutil, sys
info, errors = {"python": sys.version.split()[0]}, {}
for n in ("torch", "triton", "diffusers", "torchao", "transformers", "safetensors", "click", "pytest", "aotpack"):
    try: info[n] = getattr(importlib.import_module(n), "__version__", "?")
    except Exception as e: info[n], errors[n] = None, f"{type(e).__name__}: {e}".split("\n")[0]
if info["torch"] and info["aotpack"]:
    import torch; from aotpack.artifact.platform import describe, tag; here = describe(probe_isa=False)
    info.update(cuda=torch.cuda.is_available(), gpu=here.gpu_name, tag=tag(here), cuda_runtime=torch.version.cuda,
                capability=torch.cuda.is_available() and torch.cuda.get_device_capability())
cxx = next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)
where = getattr(sys.modules.get("aotpack"), "__file__", None)
print(json.dumps({**info, "errors": errors, "cxx": cxx, "where": where}))"""
PREPARE_PY = """import sys; from pathlib import Path; from aotpack.builder.tiny import ensure_builtin, random_lora
folders = [ensure_builtin(name) for name in sys.argv[2:]]
random_lora(folders[0] / "transformer", Path(sys.argv[1]), rank=4, seed=5)
print(f"{', '.join(sys.argv[2:])} pipelines in {folders[0].parent}, a random LoRA")"""
BENCH_PY = """import json, sys; from pathlib import Path; from aotpack.bench import run_bench
a = json.loads(sys.argv[1])
out = run_bench("flux-blocks", [a["scheme"]], out=Path(a["out"]), images=a["images"], dtype=a["dtype"],
                variants=tuple(a["variants"]), artifacts_dir=Path(a["artifacts"]))
rows = json.loads((out / "results.json").read_text())["rows"]
print("forward / first image: " + ", ".join(f"{r['variant']} {r['forward_s'] * 1e3:.1f} ms / {r['first_image_s']:.1f} s"
                                           for r in rows))"""


@dataclasses.dataclass
class Step:
    name: str
    what: str
    budget_s: float
    fn: Callable[["Check", float], str]   # (check, the step's end on the monotonic clock) -> one line
    needs: tuple[str, ...] = ()
    optional: bool = False     # started only when its whole budget is left


@dataclasses.dataclass
class Result:
    name: str
    status: str                # "pass", "fail" or "skip"
    detail: str
    seconds: float = 0.0
    log: str | None = None


class StepFailed(Exception):
    """``StepFailed(cause, log=None)``: one line, and the log of the command that failed."""


def failure_line(text: str, returncode: int) -> str:
    """A crash's signal, else aotpack's last 'Error: ...' line, else the last traceback's exception line (its
    first line after the frames), else the last line of ``text`` (pytest's stdout: its counts)."""
    if returncode < 0:
        return f"crashed ({signal.Signals(-returncode).name})"
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    tb = [n for n, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")][-1:]
    tb = [ln for ln in lines[tb[0] + 1:] if not ln.startswith(" ")][:1] if tb else []
    return ([ln for ln in lines if ln.startswith("Error: ")] or tb or lines or [f"exited with {returncode}"])[-1][:200]


class Check:
    """One run: where things go, the children's environment, the deadline, the results so far."""

    def __init__(self, out: Path, work: Path, deadline_s: float) -> None:
        self.out, self.work, self.logs, self.site = out, work, work / "logs", work / "site"
        for d in (out, self.logs, work / "images"):
            d.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline, self.results, self.info, self.prereqs = self.t0 + deadline_s, {}, {}, []
        self.lock = threading.Lock()
        path = [str(self.site), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),  # the wheels, then aotpack from the tree
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "AOTPACK_DEBUG": "1",  # tracebacks in the logs
                    "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(work / "hf"), "AOTPACK_STATE": str(work / "st"),
                    "AOTPACK_CACHE": str(work / "cache"), "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor")}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def command(self, cmd: list[str], *, log: str, end: float, env: dict | None = None) -> str:
        """Run ``cmd`` in its own process group until ``end`` (never past the deadline): its stdout, both streams
        kept in WORK/logs/<log>.log, or StepFailed with one line. Output goes to files, not pipes, and the whole
        group is killed when the command ends: compile workers that outlive it hold nothing."""
        path, rc = self.logs / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', log)}.log", None
        timeout = max(1.0, min(end - time.monotonic(), self.left()))
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO, start_new_session=True,
                                    env={**self.env, **(env or {})})
            with contextlib.suppress(subprocess.TimeoutExpired):
                rc = proc.wait(timeout=timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stdout, stderr = (f.seek(0) or f.read() for f in (out, err))
        with open(path, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{stderr}\n---- stdout\n{stdout}\n---- exit {rc}\n\n")
        if rc is None:
            raise StepFailed(f"timed out after {timeout:.0f} s", str(path))
        if rc != 0:
            raise StepFailed(failure_line(stderr.strip() or stdout, rc), str(path))  # pytest: its stdout
        return stdout


def execute(step: Step, check: Check) -> Result:
    """Run one step; whatever it raises is a failed Result of one line, written to OUT/failures.log at once with
    the end of its log (that survives a kill)."""
    t0 = time.monotonic()
    try:
        return Result(step.name, "pass", step.fn(check, t0 + min(step.budget_s, check.left())), time.monotonic() - t0)
    except StepFailed as e:
        r = Result(step.name, "fail", e.args[0], time.monotonic() - t0, (e.args + (None,))[1])
    except Exception as e:  # a bug of this driver: still one line, and the rest go on
        r = Result(step.name, "fail", f"{type(e).__name__}: {str(e).split(chr(10))[0]}", time.monotonic() - t0)
    tail = "\n".join(Path(r.log).read_text(errors="replace").splitlines()[-60:]) if r.log else ""
    with check.lock, open(check.out / "failures.log", "a") as fh:
        fh.write(f"==== {r.name}: {r.detail}\n---- {r.log or '(no log)'} (last 60 lines)\n{tail}\n\n")
    r.log = "failures.log" + (f", logs/{Path(r.log).name}" if r.log else "")
    return r


def blocked(step: Step, check: Check) -> str | None:
    """Why ``step`` cannot start (a need that did not pass, the deadline); None when it can."""
    for n in step.needs:
        if (r := check.results.get(n)) is None or r.status != "pass":
            return f"needs {n}, which " + ({"fail": "failed", "skip": "was skipped"}[r.status] if r else "did not run")
    if (left := check.left()) < MIN_START_S or (step.optional and left < step.budget_s):
        return f"no time left ({max(left, 0):.0f} s before the deadline)"
    return None


def run_steps(steps: list[Step], check: Check, *, parallel: int = 1,
              progress: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Run ``steps`` in their order, ``parallel`` at a time; a step waits for its needs in this list (which come
    before it, so a FIFO pool has started them) and is skipped when one did not pass."""
    done = {s.name: threading.Event() for s in steps}

    def go(s: Step) -> None:
        for n in s.needs:
            if n in done:
                done[n].wait()
        why = blocked(s, check)
        check.results[s.name] = result = Result(s.name, "skip", why) if why else execute(s, check)
        progress(result)
        done[s.name].set()

    with cf.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(go, steps))
    return [check.results[s.name] for s in steps]


def critical_path_s(phases: list[tuple[list[Step], int]]) -> float:
    """Seconds the phases take with every (not optional) step using its whole budget: one by one, the sum of the
    budgets; side by side, the longest chain of needs."""
    total = 0.0
    for steps, parallel in phases:
        finish: dict[str, float] = {}
        for s in (s for s in steps if not s.optional):
            finish[s.name] = max([0.0] + [finish.get(n, 0.0) for n in s.needs]) + s.budget_s
        total += sum(s.budget_s for s in steps if not s.optional) if parallel == 1 else max(finish.values(), default=0)
    return total


def find_wheels(folder: Path) -> dict[str, Path]:
    """The wheels in ``folder`` by project (PEP 427 names): a pinned project's pinned version, any other's."""
    out = {}
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        name, version = (path.name.split("-") + [""])[:2]
        if WHEELS.get(name := name.lower().replace("_", "-"), version) == version:
            out[name] = path
    return out


def step_install(check: Check, end: float) -> str:
    """``pip install --target WORK/site``, not ``--user``: the GPU machines' python3 is a virtualenv (--user is
    refused there), a target folder leaves the machine as it was, and PEP 668 does not apply to it."""
    from importlib.metadata import distributions

    wheels = find_wheels(REPO / ".whl")
    have = {n: next((d.version for d in distributions(name=n, path=[str(check.site), *sys.path])), None)
            for n in {*WHEELS, *wheels}}
    missing = sorted(n for n, v in have.items() if v is None or v != WHEELS.get(n, v))
    if absent := [n for n in missing if n not in wheels]:
        raise StepFailed(f"{', '.join(f'{n} {WHEELS[n]}' for n in absent)} neither installed nor in .whl/ "
                         "(run 'make gpu-wheels' where there is network, and carry .whl)")
    if not missing:
        return "already installed: " + ", ".join(f"{n} {have[n]}" for n in sorted(WHEELS))
    check.command([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                   "--target", str(check.site), *(str(wheels[n]) for n in missing)], log="install-wheels", end=end)
    return f"{', '.join(missing)} into {check.site}"


def probe(check: Check, end: float, env: dict | None = None) -> dict:
    out = check.command([sys.executable, "-c", PROBE_PY], log="environment", end=end, env=env)
    return json.loads(out.strip().splitlines()[-1])


def step_environment(check: Check, end: float) -> str:
    check.info = i = probe(check, end)
    version = check.command([*AOTPACK, "--version"], log="environment", end=end).strip()
    check.prereqs = prerequisites(i, check.work)
    if bad := [f"{what}: {detail}" for level, what, detail in check.prereqs if level == "FAIL"]:
        raise StepFailed(bad[0] + (f" (+{len(bad) - 1} more: results.md)" if len(bad) > 1 else ""))
    gpu = f"{i['gpu']} sm{''.join(map(str, i['capability']))}" if i.get("cuda") else "no CUDA"
    return f"{version}; torch {i['torch']}, {gpu}, diffusers {i['diffusers']}, torchao {i['torchao']}"


def prerequisites(i: dict, work: Path) -> list[tuple[str, str, str]]:
    """(level, what, detail), level "ok", "warn" or "FAIL"; ``i``: the probe's report."""
    errors, wheels, cap = i.get("errors", {}), find_wheels(REPO / ".whl"), "".join(map(str, i.get("capability") or ()))
    out = [("ok" if sys.version_info >= (3, 11) else "FAIL", "python", sys.version.split()[0]),
           ("ok", "CUDA", f"{i['gpu']} sm{cap}, CUDA {i['cuda_runtime']}") if i.get("cuda") else
           ("warn", "CUDA", "none")]
    for name in ("torch", *WHEELS, "transformers", "safetensors", "click", "aotpack", "pytest"):
        ok = i.get(name) and i[name] == WHEELS.get(name, i[name]) and name not in errors
        level = "ok" if ok or name in wheels else "warn" if name == "pytest" else "FAIL"
        out.append((level, name, f"{i[name]}" + f" from {i.get('where')}" * (name == "aotpack") if ok else
                    f"{wheels[name].name} in .whl/ will be installed" if name in wheels else
                    f"{i.get(name) or 'does not import'} {errors.get(name, '')}".strip()
                    + f" (wants {WHEELS[name]}: make gpu-wheels, carry .whl)" * (name in WHEELS)))
    out.append(("ok", "C++ compiler", i["cxx"]) if i.get("cxx") else ("FAIL", "C++ compiler", "none found"))
    free = shutil.disk_usage(work).free / 2**30
    return out + [("ok" if free >= MIN_FREE_DISK_GB else "FAIL", "disk", f"{free:.0f} GiB, {MIN_FREE_DISK_GB} needed")]


def step_build(recipe: str, scheme: str, dtype: str, out: Path, flags: list[str], runs: list[list[str]] = ()
               ) -> Callable[[Check, float], str]:
    """``aotpack build`` into ``out``, ``aotpack inspect --json`` for the step's line, then ``aotpack run`` with
    each of ``runs`` (more options)."""
    def fn(check: Check, end: float) -> str:
        check.command([*AOTPACK, "build", recipe, "--quant", scheme, "--dtype", dtype, "--out", str(out),
                       "--overwrite", "--json", *flags], log=out.name, end=end)
        m = json.loads(check.command([*AOTPACK, "inspect", str(out), "--json"], log=out.name, end=end))
        if check.info.get("cuda") and m["platform"]["device"] != "cuda":
            raise StepFailed(f"built for {m['platform']['device']}, not for the GPU")
        st, weights = m["build"]["stages"], sum(f["size"] for n, f in m["files"].items() if n.endswith(".safetensors"))
        err, tol = max((x["max_abs_error"], x["tolerance"]) for x in m["modules"])
        line = (f"{weights / 2**20:.1f} MiB; export {st.get('export', 0):.0f} s, compile {st.get('compile', 0):.0f} s;"
                f" vs eager {err:.1e} <= {tol:.1e}")
        for n, extra in enumerate(runs):
            t, png = time.monotonic(), check.work / "images" / f"{out.name}-{n}.png"
            check.command([*AOTPACK, "run", str(out), "--prompt", "a dog surfing on the moon", "--seed", "1", "--out",
                           str(png), "--json", *extra], log=out.name, end=end)
            line += f"; {' '.join(['run'] + [x for x in extra if x.startswith('--')])} {time.monotonic() - t:.1f} s"
        return line
    return fn


def step_python(code: str, *args: str, log: str) -> Callable[[Check, float], str]:
    """``python -c CODE ARGS`` (the library's own functions); the last line it prints is the step's line."""
    def fn(check: Check, end: float) -> str:
        return check.command([sys.executable, "-c", code, *args], log=log, end=end).strip().split("\n")[-1]
    return fn


def step_gpu_tests(check: Check, end: float) -> str:
    """tests/test_gpu.py, on the tiny-flux builds of this run (GPU_CHECK_ARTIFACTS; it builds what is missing)."""
    stdout = check.command([sys.executable, "-m", "pytest", "-q", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
                            "tests/test_gpu.py"], log="gpu-tests", end=end,
                           env={"GPU_CHECK_ARTIFACTS": str(check.work / "artifacts")})
    return ([ln for ln in stdout.splitlines() if ln.strip()] or ["(no output)"])[-1].strip("= ")


def make_plan(opts: argparse.Namespace, info: dict, work: Path) -> list[tuple[list[Step], int]]:
    """(steps, steps at a time) for the GPU in the probe's report ``info``, which the first phase makes."""
    k, arts, lora, cuda = opts.budget_scale, work / "artifacts", work / "lora-rank4.safetensors", bool(info.get("cuda"))
    fp8 = cuda and tuple(info.get("capability") or ()) >= (8, 9)
    first = [Step("install wheels", "diffusers, torchao, other wheels of .whl/ into WORK/site", 20 * k, step_install),
             Step("environment", "probe; aotpack --version", 40 * k, step_environment, needs=("install wheels",))]
    schemes = opts.schemes.split(",") if opts.schemes else ["none", "int8wo", "int8dq"] + ["fp8dqrow"] * fp8
    tiny = [(s, DTYPE, "") for s in schemes] + [("none", "float32", "")] + [("int8wo", DTYPE, "--regional")] * (
        not opts.schemes)  # regional: one compiled block per class
    runs = [[]] + [["--cuda-graphs", "--lora", str(lora)]] * cuda
    side = []
    for scheme, dtype, flag in tiny:  # WORK/artifacts/<name>: the folders tests/test_gpu.py looks for
        name = f"tiny-flux-{scheme}-{dtype}" + flag.replace("--", "-")
        side.append(Step(name, f"aotpack build tiny-flux --quant {scheme} --dtype {dtype} {flag}; inspect; run"
                         + " (+ --cuda-graphs --lora)" * cuda, 150 * k,
                         step_build("tiny-flux", scheme, dtype, arts / name, [flag] * bool(flag), runs), ("prepare",)))
    bench = [] if opts.no_bench else ["fp8dqrow" if fp8 else "int8dq", "none"]
    side += [Step(f"build flux-blocks {s}", f"aotpack build flux-blocks --quant {s} --dtype {DTYPE}; inspect", 150 * k,
                  # into the folder run_bench looks for (else it builds one itself: slower, still right)
                  step_build("flux-blocks", s, DTYPE, arts / f"flux-blocks-{s}-{info.get('tag')}", ["--whole-graph"]),
                  needs=("prepare",)) for s in bench]
    variants = ("aotpack",) + ("aotpack+graphs",) * cuda + ("eager", "compile", "compile+cache")
    args = {"dtype": DTYPE, "images": IMAGES, "variants": variants, "artifacts": str(arts)}
    last = [Step(f"bench {s}", f"run_bench flux-blocks in {DTYPE}: {', '.join(variants)}", 120 * k, step_python(
        BENCH_PY, json.dumps({**args, "scheme": s, "out": str(work / "bench" / s)}), log=f"bench-{s}"),
                 needs=(f"build flux-blocks {s}",)) for s in bench]
    last.append(Step("gpu tests", "pytest -m gpu tests/test_gpu.py (if its budget is left)", 150 * k, step_gpu_tests,
                     ("environment",), optional=True))
    prepare = Step("prepare", "builtin pipelines, a random LoRA", 40 * k, step_python(
        PREPARE_PY, str(lora), "tiny-flux", *["flux-blocks"] * bool(bench), log="prepare"), needs=("environment",))
    return [(first, 1), ([prepare], 1), (side, PARALLEL), (last, 1)]


def summary(results: list[Result], *, header: str = "", footer: str = "", width: int = 120) -> str:
    """One screen: a line per step (PASS / FAIL / SKIP, seconds, one line of detail), then the counts."""
    lines, name_w = [header] * bool(header), max([len(r.name) for r in results] + [10])
    for r in results:
        secs = f"{r.seconds:6.1f} s" if r.status != "skip" else "     -  "
        line = f" {r.status.upper():<4}  {r.name:<{name_w}}  {secs}  {r.detail}" + f"  [{r.log}]" * bool(r.log)
        lines.append(line if len(line) <= width else line[: width - 1] + "…")
    n = [sum(r.status == k for r in results) for k in ("pass", "fail", "skip")]
    return "\n".join(lines + [f"{n[0]} passed, {n[1]} failed, {n[2]} skipped" + f" - {footer}" * bool(footer)])


def write_results(check: Check, text: str) -> None:
    """results.md (steps, prerequisites, each bench's results.md), results.json, summary.txt, logs.tar.gz."""
    i, benches, results = check.info, sorted((check.work / "bench").glob("*/results.json")), check.results.values()
    versions = ", ".join(f"{n} {i.get(n)}" for n in ("python", "torch", "diffusers", "torchao", "triton"))
    md = ["# aotpack GPU check (scripts/gpu_check.py)", "", f"{i.get('gpu') or 'no GPU'}; {versions}; "
          f"{time.monotonic() - check.t0:.0f} s in all.", "", "| step | status | seconds | detail |", "|" + "---|" * 4]
    md += [f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.detail.replace('|', '/')} |" for r in results]
    md += ["", "Prerequisites:", ""] + [f"- {lv} {what}: {detail}" for lv, what, detail in check.prereqs]
    md += [re.sub(r"^#", "\n##", (b.parent / "results.md").read_text(), flags=re.M) for b in benches]
    (check.out / "results.md").write_text("\n".join(md) + "\n")
    data = {"check": {"elapsed_s": round(time.monotonic() - check.t0, 1), "environment": i,
                      "prerequisites": check.prereqs, "steps": [dataclasses.asdict(r) for r in results]},
            "bench": {b.parent.name: json.loads(b.read_text()) for b in benches}}
    (check.out / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (check.out / "summary.txt").write_text(text + "\n")
    with tarfile.open(check.out / "logs.tar.gz", "w:gz") as tar:
        for name in ("logs", "bench", "images"):
            if (check.work / name).is_dir():
                tar.add(check.work / name, arcname=name)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder for " + ", ".join(OUT_FILES))
    ap.add_argument("--dry-run", action="store_true", help="list the steps, check the prerequisites, run nothing")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "aotpack-gpu-check",
                    help="artifacts, caches, installed wheels and logs (default: %(default)s); not under OUT")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for all steps (default %(default)s)")
    ap.add_argument("--schemes", help="tiny-flux schemes, comma-separated (default: none,int8wo,int8dq[,fp8dqrow])")
    ap.add_argument("--no-bench", action="store_true", help="leave out flux-blocks (its builds and benches)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's budget (a CPU run: 3)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on a machine without CUDA (a smoke run)")
    return ap.parse_args(argv)


def dry_run(opts: argparse.Namespace) -> int:
    """List the steps with their budgets and check what can be checked here; 0 when the plan is sound."""
    check = Check(opts.work / "dry-run", opts.work, opts.deadline)
    try:  # what imports here as it is (a dry run installs nothing)
        info = probe(check, time.monotonic() + 120, env={"PYTHONPATH": str(REPO)})
    except StepFailed as e:
        info = {"errors": {"aotpack": f"the probe failed: {e.args[0]}"}}
    cap = tuple(info["capability"]) if info.get("cuda") else (9, 0)  # the plan is for a GPU, whatever this is
    gpu = {**info, "cuda": True, "capability": cap, "tag": f"cuda-sm{cap[0]}{cap[1]}"}
    phases = make_plan(opts, gpu, opts.work)
    path = critical_path_s(phases)
    print(f"Plan for {info.get('gpu') or 'a CUDA GPU (sm90 assumed)'}: critical path {path:.0f} s of budgets, "
          f"deadline {opts.deadline:.0f} s, command limit {COMMAND_LIMIT_S} s")
    for s, parallel in ((s, parallel) for steps, parallel in phases for s in steps):
        print(f"  {s.name:<32}  {s.budget_s:4.0f} s  {s.what}" + " [side by side]" * (parallel > 1)
              + " [if time is left]" * s.optional + f" <- {', '.join(s.needs)}" * bool(s.needs))
    checks = prerequisites(info, opts.work)
    print("Prerequisites:\n" + "\n".join(f"  {lv:<4} {what}: {detail}" for lv, what, detail in checks))
    problems = [f"{w}: {d}" for lv, w, d in checks if lv == "FAIL"] + [
        f"the budgets need {path:.0f} s, over the {opts.deadline:.0f} s deadline"] * (path > opts.deadline)
    print("The plan is NOT sound:\n" + "\n".join(f"  - {p}" for p in problems) if problems else "The plan is sound.")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    opts = parse(argv)
    if opts.dry_run:
        return dry_run(opts)
    for old in ("logs", "bench", "images"):  # artifacts and caches stay for a rerun; outputs do not
        shutil.rmtree(opts.work / old, ignore_errors=True)
    for old in OUT_FILES:
        (opts.out / old).unlink(missing_ok=True)
    check = Check(opts.out, opts.work, opts.deadline)

    def progress(r: Result) -> None:
        print(f"[{time.monotonic() - check.t0:5.0f} s] {r.status.upper():<4} {r.name}: {r.detail}", file=sys.stderr,
              flush=True)

    print(f"aotpack GPU check: deadline {opts.deadline:.0f} s, work in {opts.work}", file=sys.stderr, flush=True)
    results = run_steps(make_plan(opts, {}, opts.work)[0][0], check, progress=progress)
    if check.info and not check.info.get("cuda") and not opts.allow_cpu:
        return print("no CUDA device here (--dry-run checks the plan anywhere, --allow-cpu runs it on a CPU)",
                     file=sys.stderr) or 2
    for steps, parallel in make_plan(opts, check.info, opts.work)[1:]:
        results += run_steps(steps, check, parallel=parallel, progress=progress)
    check.results, i = {r.name: r for r in results}, check.info  # in the plan's order, not as they finished
    failed = any(r.status == "fail" for r in results)
    text = summary(results, header=f"aotpack GPU check - {i.get('gpu') or 'no GPU'}, torch {i.get('torch')}",
                   footer=f"{time.monotonic() - check.t0:.0f} s; {opts.out}/results.md" + ", failures.log" * failed)
    write_results(check, text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
