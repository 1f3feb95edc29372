"""Build farm on Hugging Face Jobs, against the Jobs endpoints of tests/hub_server.py, with the real client.

The server runs each job's command here, on this CPU, whatever its flavor: so the farm's cells use a CPU
flavor (a GPU flavor's build would come back as a CPU build, which the farm rightly refuses), and two
schemes x two option sets give four distinct builds in one repo. The jobs share this session's AOTPACK_CACHE,
so the compiled code of the session's tiny builds is reused and each job skips its compile.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from aotpack import farm
from aotpack import hub as aothub
from aotpack.artifact import manifest as mf

from conftest import REPO, run_cli
from test_hub import TOKEN, builds_in, env, head, hub, online  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

MATRIX = """
repo = "me/farm-{recipe}"
tag = "v1"
flavors = ["cpu-upgrade"]
schemes = ["int8wo", "none"]

[[build]]
recipe = "tiny-flux"

[[build]]
recipe = "tiny-flux"
options = ["--quantize-text-encoder", "int8wo"]

[[build]]            # a cell whose job fails: its install finds nothing
recipe = "tiny-flux"
repo = "me/farm-broken"
schemes = ["int8wo"]
install = "aotpack==0.0.0.does-not-exist"
"""


@pytest.fixture(scope="module")
def jobs(hub, tmp_path_factory):  # noqa: F811
    """The job machine: a stand-in `uv` that logs what it would install (and fails on a missing version),
    this venv's `aotpack` on PATH with this checkout first on PYTHONPATH, and the session's AOTPACK_CACHE
    (with AOTPACK_STATE, whose key vouches for the cache's compiled code)."""
    root = tmp_path_factory.mktemp("job-machine")
    (root / "bin").mkdir()
    installs = root / "installs.log"
    uv = root / "bin" / "uv"
    uv.write_text(f"""#!/bin/sh
echo "$*" >> {installs}
case "$*" in *does-not-exist*) echo "error: no version of aotpack matches 0.0.0.does-not-exist" >&2; exit 1;; esac
echo "Resolved 12 packages (stand-in for the job image's uv)"
""")
    uv.chmod(0o755)
    hub.state.job_env = {
        "PATH": f"{root / 'bin'}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(root), "PYTHONPATH": str(REPO), "AOTPACK_CACHE": os.environ["AOTPACK_CACHE"],
        "HF_HOME": str(root / "hf"), "LANG": "C.UTF-8",
        **{k: os.environ[k] for k in ("AOTPACK_STATE",) if k in os.environ},
    }
    return {"root": root, "installs": installs}


def test_matrix_builds_pushes_pulls_and_runs(hub, jobs, env, online, artifacts, tmp_path):  # noqa: F811
    import aotpack

    artifacts("int8wo"), artifacts("none")  # the compiled code the jobs will find in the compile cache
    matrix = tmp_path / "farm.toml"
    matrix.write_text(MATRIX)
    dry = run_cli("farm", str(matrix), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("cpu-upgrade") == 5 and "5 job(s) would be submitted" in dry.stdout
    assert not hub.state.jobs  # a dry run submits nothing

    result = run_cli("farm", str(matrix), env=env)
    assert result.returncode == 1, result.stderr  # one cell failed, the others went on
    assert "4 of 5 builds completed" in result.stdout
    for stage in ("queued", "running", "completed", "error"):
        assert stage in result.stderr, stage  # the live table, one line per change (not a terminal)
    assert "does-not-exist" in result.stderr  # the failed cell's log tail

    names = builds_in(hub, "me/farm-tiny-flux")
    assert len(names) == 4, names
    index = json.loads(hub.state.repos["me/farm-tiny-flux"].commits[head(hub, "me/farm-tiny-flux")]["files"]
                       ["aotpack-index.json"]["data"])
    card = hub.state.repos["me/farm-tiny-flux"].commits[head(hub, "me/farm-tiny-flux")]["files"]["README.md"]["data"]
    assert set(index["builds"]) == names and all(f"`{n}`" in card.decode() for n in names)
    assert hub.state.repos["me/farm-tiny-flux"].tags["v1"] == head(hub, "me/farm-tiny-flux")  # tagged once, at the end
    assert "me/farm-broken" not in hub.state.repos or not hub.state.repos["me/farm-broken"].tags
    for name in sorted(names):
        assert name in result.stdout
        folder = aothub.pull("me/farm-tiny-flux", revision="v1", build=name)
        assert json.loads((folder / mf.MANIFEST).read_text())["scheme"]["name"] == name.split("-")[0]
        aotpack.run(folder, prompt="a dog", height=64, width=64, steps=1, out=tmp_path / f"{name}.png")

    built = [job for job in hub.state.jobs.values() if job.stage == "COMPLETED"]
    assert len(built) == 4 and all(any("model.pt2: compile cache" in ln for _, ln in job.lines) for job in built)
    installs = jobs["installs"].read_text().splitlines()
    assert len(installs) == 5 and all(f"aotpack=={aotpack.__version__}" in ln or "does-not-exist" in ln
                                      for ln in installs)
    assert all("torch==" in ln and "diffusers==" in ln for ln in installs)  # the versions installed here
    assert_no_token(hub, jobs, result.stdout + result.stderr + dry.stdout + dry.stderr, tmp_path)


def assert_no_token(hub, jobs, output, tmp_path):  # noqa: F811
    """The token reached each job as a secret and nowhere else: command, environment, labels, logs, files."""
    assert TOKEN not in output
    for job in hub.state.jobs.values():
        assert job.secrets == {"HF_TOKEN": TOKEN}  # it did travel, as a secret
        assert TOKEN not in json.dumps(job.spec) and TOKEN not in json.dumps(job.to_json(hub.url))
        assert all(TOKEN not in line for _, line in job.lines)
    for root in (jobs["root"], hub.state.job_root, tmp_path):
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert TOKEN.encode() not in path.read_bytes(), path
    for repo in hub.state.repos.values():
        for commit in repo.commits.values():
            assert all(TOKEN.encode() not in (f["data"] or b"") for f in commit["files"].values())


def test_dry_run_refuses_what_a_flavor_cannot_build(hub, jobs, env, online, tmp_path):  # noqa: F811
    matrix = tmp_path / "gpus.toml"
    matrix.write_text('repo = "me/fp8-{recipe}"\nrecipes = ["tiny-flux"]\nschemes = ["fp8dqrow"]\n'
                      'flavors = ["t4-small", "a10g-small", "a100-large", "l4x1", "h200"]\n')
    before = len(hub.state.jobs)
    result = run_cli("farm", str(matrix), "--dry-run", env=env)
    assert result.returncode == 1 and len(hub.state.jobs) == before
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]) == 1, result.stderr
    assert "cannot build fp8dqrow" in result.stderr and "and 2 more cells" in result.stderr
    rows = {ln.split()[2]: ln for ln in result.stdout.splitlines() if "fp8dqrow" in ln}
    assert {f: rows[f].split()[3] for f in rows} == {"t4-small": "cuda-sm75", "a10g-small": "cuda-sm86",
                                                     "a100-large": "cuda-sm80", "l4x1": "cuda-sm89",
                                                     "h200": "cuda-sm90"}
    assert all("refused" in rows[f] for f in ("t4-small", "a10g-small", "a100-large"))
    assert "me/fp8-tiny-flux:builds/fp8dqrow-cuda-sm90" in rows["h200"]

    cell = farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="l4x1", repo_id="me/x")
    problems = [p.problem for p in farm.plan_farm([
        cell,
        farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="l40sx1", repo_id="me/x"),        # sm89 again
        farm.Cell(recipe="tiny-cogvideox", scheme="int8wo", flavor="h200", repo_id="me/x"),     # another model
        farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="h200", repo_id="me/y",
                  options=("--lora", "a.safetensors")),
        farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="h200", repo_id="me/y", options=("--no-such",)),
        farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="h200", repo_id="me/y", options=("--out", "x")),
        farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="z80-tiny", repo_id="me/y"),
    ])]
    assert "would both push int8wo-cuda-sm89 into me/x" in problems[1]
    assert "a repo holds one model" in problems[2] and "a repo holds one model" in problems[0]
    assert "a job cannot read" in problems[3] and "No such option" in problems[4]
    assert "set by the farm" in problems[5] and "unknown Jobs flavor" in problems[6]


def test_job_command_and_environment_hold_no_token(online, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cell = farm.Cell(recipe="tiny-flux", scheme="int8wo", flavor="h200", repo_id="me/{recipe}-aot", tag="v1",
                     options=("--fuse-qkv",))
    command = farm.job_command(cell)
    script = command[-1]
    assert command[:2] == ["sh", "-c"] and "uv pip install --system --quiet aotpack==" in script
    assert "aotpack build tiny-flux --quant int8wo --fuse-qkv --push me/tiny-flux-aot --tag v1" in script
    assert farm.job_command(cell, tag_in_job=False)[-1].endswith("--push me/tiny-flux-aot")
    assert TOKEN not in script and TOKEN not in json.dumps(farm._job_env())
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 2, "layers": {"transformer_blocks.0.ff.net.0.proj": {"scheme": "int8wo"}}}')
    planned = farm.job_command(farm.Cell(recipe="tiny-flux", scheme="auto", flavor="h200", repo_id="me/p",
                                         options=("--plan", str(plan))))[-1]
    assert "base64 -d > plan.json" in planned and "--plan plan.json" in planned and str(plan) not in planned


def test_a_build_the_plan_names_frozen_is_built_frozen_whatever_the_jobs_cpu(online):  # noqa: F811
    """flux-blocks freezes by default. The job's CPU is unknown when the farm plans, so the plan names the recipe's
    default and the job's command says --freeze: the build pushed is the one named, whatever default the job's
    aotpack has. --no-freeze, and a GPU cell, say nothing."""
    cell = farm.Cell(recipe="flux-blocks", scheme="none", flavor="cpu-upgrade", repo_id="me/fb")
    [planned] = farm.plan_farm([cell])
    assert "frozen" in planned.build, planned.build
    assert "--quant none --freeze --push me/fb" in farm.job_command(cell)[-1]
    unfrozen = farm.Cell(recipe="flux-blocks", scheme="none", flavor="cpu-upgrade", repo_id="me/fb",
                         options=("--no-freeze",))
    [planned] = farm.plan_farm([unfrozen])
    assert "frozen" not in planned.build and "--freeze" not in farm.job_command(unfrozen)[-1].replace("no-freeze", "")
    gpu = farm.Cell(recipe="flux-blocks", scheme="none", flavor="h200", repo_id="me/fb")
    assert "--freeze" not in farm.job_command(gpu)[-1]


def test_interrupt_cancels_the_job(hub, jobs, online, caplog):  # noqa: F811
    import logging

    caplog.set_level(logging.INFO, logger="aotpack")
    seen = []

    def interrupt(line):
        seen.append(line)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        farm.remote_build("tiny-flux", "int8wo", flavor="cpu-basic", repo_id="me/interrupted-farm", on_line=interrupt)
    job = list(hub.state.jobs.values())[-1]
    assert seen and "Resolved" in seen[0]
    assert job.stage == "CANCELED" and f"canceled job {job.id}" in caplog.text
    deadline = time.monotonic() + 10
    while job.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.proc.poll() is not None  # the command was stopped, not left running


def test_a_failed_remote_build_is_one_error_line(hub, jobs, env):  # noqa: F811
    result = run_cli("build", "tiny-flux", "--quant", "int8wo", "--on", "cpu-basic", "--push", "me/remote",
                     "--install", "aotpack==0.0.0.does-not-exist", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]) == 1, result.stderr
    assert "ended error" in result.stderr and "does-not-exist" in result.stderr  # streamed, then the last line
    assert TOKEN not in result.stdout + result.stderr


def test_concurrent_pushes_keep_every_build(hub, online, artifacts, tmp_path):  # noqa: F811
    """Four jobs finishing at once each rewrite the index and the card: all four builds stay."""
    folders = []
    for cap in ("8.0", "8.6", "8.9", "9.0"):
        folder = tmp_path / cap
        shutil.copytree(artifacts("int8wo"), folder)
        data = json.loads((folder / mf.MANIFEST).read_text())
        data["platform"].update(device="cuda", cuda_capability=cap, isa=None, gpu_name="GPU")
        (folder / mf.MANIFEST).write_text(json.dumps(data))
        folders.append(folder)
    start, results, errors = threading.Barrier(len(folders)), [], []

    def push(folder):
        start.wait()
        try:
            results.append(aothub.push(folder, "me/concurrent"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = {f"int8wo-cuda-sm{c}" for c in ("80", "86", "89", "90")}
    assert builds_in(hub, "me/concurrent") == expected
    files = hub.state.repos["me/concurrent"].commits[head(hub, "me/concurrent")]["files"]
    assert set(json.loads(files["aotpack-index.json"]["data"])["builds"]) == expected
    assert all(f"`{n}`" in files["README.md"]["data"].decode() for n in expected)
    assert len({r.commit for r in results}) == 4  # four commits, one after the other


# ---- files a job is sent, matrix values, job output, the commit a job reports -----------------------------

VALID_PLAN = {"version": 2, "device": "cpu", "budget": 0.05,
              "layers": {"transformer_blocks.0.ff.net.0.proj": {"scheme": "int8wo", "error": 0.01}}}


def errors_in(text):
    return [ln for ln in text.splitlines() if ln.startswith("Error:")]


@pytest.fixture
def job_machine(hub, jobs, tmp_path):  # noqa: F811
    """A job machine whose `aotpack` is a shell script the test writes (its `uv` installs nothing)."""
    bin_dir = tmp_path / "job-bin"
    bin_dir.mkdir()
    (bin_dir / "uv").write_text("#!/bin/sh\nexit 0\n")
    before = dict(hub.state.job_env)
    hub.state.job_env = {**before, "PATH": f"{bin_dir}:/usr/bin:/bin"}

    def aotpack(script: str) -> None:
        (bin_dir / "aotpack").write_text("#!/bin/sh\n" + script)
        for f in bin_dir.iterdir():
            f.chmod(0o755)

    yield aotpack
    hub.state.job_env = before


def test_t22_files_handed_to_a_job_are_checked_before_anything_is_submitted(hub, jobs, env, tmp_path):  # noqa: F811
    """The environment, a token file, a FIFO, a link to a secret, a plan of the wrong shape: each refused in
    one line by the farm (dry run or not) and by build --on; no job is created, no request holds the secret."""
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    fifo = tmp_path / "plan-fifo.json"
    os.mkfifo(fifo)
    link = tmp_path / "link.json"
    link.symlink_to(secret)
    shaped = tmp_path / "shaped.json"
    shaped.write_text(json.dumps({"version": 2, "layers": {"x.proj": {"scheme": "int8wo", "token": TOKEN}}}))
    cases = {"/proc/self/environ": "is not what its size says", str(secret): "is not valid JSON",
             str(fifo): "is not a regular file", str(link): "is a symbolic link",
             str(shaped): "is not a valid aotpack plan"}
    matrix = tmp_path / "files.toml"
    matrix.write_text('repo = "me/t22-{recipe}"\nflavors = ["cpu-basic"]\nschemes = ["auto"]\n' + "".join(
        f'[[build]]\nrecipe = "tiny-flux"\noptions = ["--plan", "{path}"]\n' for path in cases))
    requests, job_count = len(hub.state.job_requests), len(hub.state.jobs)
    outputs = []
    dry = run_cli("farm", str(matrix), "--dry-run", env=env)
    outputs.append(dry.stdout + dry.stderr)
    assert dry.returncode == 1 and len(errors_in(dry.stderr)) == 1 and "and 4 more cells" in dry.stderr, dry.stderr
    rows = [ln for ln in dry.stdout.splitlines() if "cpu-basic" in ln]
    assert len(rows) == 5 and all("refused" in row for row in rows), dry.stdout
    for path, says in cases.items():
        assert any(path in row and says in row for row in rows), (path, dry.stdout)
    real = run_cli("farm", str(matrix), env=env)
    outputs.append(real.stdout + real.stderr)
    assert real.returncode == 1 and len(errors_in(real.stderr)) == 1, real.stderr
    for path, says in cases.items():
        one = run_cli("build", "tiny-flux", "--quant", "auto", "--plan", path, "--on", "cpu-basic",
                      "--push", "me/t22", env=env)
        outputs.append(one.stdout + one.stderr)
        assert one.returncode == 1 and "Traceback" not in one.stderr, one.stderr
        assert len(errors_in(one.stderr)) == 1 and says in one.stderr, (path, one.stderr)
    assert len(hub.state.job_requests) == requests and len(hub.state.jobs) == job_count  # nothing submitted
    for body in hub.state.job_requests:  # no request of this module carried the token but as the secret
        spec = json.loads(body)
        spec.pop("secrets", None)
        blobs = re.findall(r"echo ([A-Za-z0-9+/=]+) \| base64 -d", json.dumps(spec))
        assert TOKEN not in json.dumps(spec) and all(TOKEN.encode() not in base64.b64decode(b) for b in blobs)
    assert all(TOKEN not in out for out in outputs)


def test_t22_a_valid_plan_travels_and_the_dry_run_lists_it(hub, job_machine, env, tmp_path):  # noqa: F811
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(VALID_PLAN))
    sha = hashlib.sha256(plan.read_bytes()).hexdigest()
    matrix = tmp_path / "plan.toml"
    matrix.write_text(f'repo = "me/t22-ok"\nflavors = ["cpu-basic"]\nschemes = ["auto"]\n'
                      f'[[build]]\nrecipe = "tiny-flux"\noptions = ["--plan", "{plan}"]\n')
    dry = run_cli("farm", str(matrix), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"uploads --plan {plan} as plan.json: {plan.stat().st_size} bytes, sha256 {sha}" in dry.stdout
    job_machine('sha256sum plan.json; echo "args: $*"; exit 3\n')  # the job shows what arrived, then fails
    requests = len(hub.state.job_requests)
    result = run_cli("build", "tiny-flux", "--plan", str(plan), "--on", "cpu-basic", "--push", "me/t22-ok", env=env)
    assert result.returncode == 1 and len(errors_in(result.stderr)) == 1, result.stderr
    assert f"sending --plan {plan} as plan.json" in result.stderr
    assert len(hub.state.job_requests) == requests + 1
    job = list(hub.state.jobs.values())[-1]
    assert any(ln.startswith(sha) for _, ln in job.lines), job.lines  # the bytes checked here are the bytes sent
    assert any("--plan plan.json" in ln for _, ln in job.lines)


def test_t23_matrix_files_not_text_or_a_timeout_that_is_no_duration(env, tmp_path):  # noqa: F811
    matrix = tmp_path / "m.toml"
    for text, says in ((b'repo = "me/x"\n# caf\xe9\n', "is not UTF-8 text"),
                       (b'repo = "me/{recipe}"\nrecipes = ["tiny-flux"]\nschemes = ["int8wo"]\n'
                        b'flavors = ["cpu-basic"]\ntimeout = "forever"\n', "'timeout' 'forever' is not a duration")):
        matrix.write_bytes(text)
        result = run_cli("farm", str(matrix), "--dry-run", env=env)
        assert result.returncode == 1 and "unexpected" not in result.stderr, result.stderr
        assert len(errors_in(result.stderr)) == 1 and says in result.stderr, result.stderr
    assert farm.plan_farm([farm.Cell("tiny-flux", "int8wo", "cpu-basic", "me/x", timeout="1.5x")])[0].problem


def test_t24_matrix_values_and_job_output_are_shown_escaped(hub, job_machine, env, tmp_path):  # noqa: F811
    matrix = tmp_path / "m.toml"
    matrix.write_text('repo = "me/{recipe}"\nrecipes = ["tiny-flux"]\nschemes = ["int8wo"]\n'
                      'flavors = ["cpu-basic\\nError: fake"]\n')
    result = run_cli("farm", str(matrix), "--dry-run", env=env)
    assert result.returncode == 1 and len(errors_in(result.stderr)) == 1, result.stderr
    assert "holds a control character" in result.stderr
    cell = farm.Cell("tiny-flux", "int8wo", "h200\nError: fake\x1b[2J", "me/x")
    error = farm.refused(farm.plan_farm([cell]))
    assert error and error.cause.isprintable() and "h200\\nError: fake" in error.cause

    job_machine("printf 'Error: fake from the job\\n\\033[2J\\033[31mred\\n'; exit 2\n")
    result = run_cli("build", "tiny-flux", "--quant", "int8wo", "--on", "cpu-basic", "--push", "me/t24", env=env)
    assert result.returncode == 1 and "\x1b" not in result.stderr + result.stdout, result.stderr
    assert len(errors_in(result.stderr)) == 1 and errors_in(result.stderr)[0].startswith("Error: job "), result.stderr
    assert "job| Error: fake from the job" in result.stderr and "job| \\x1b[2J\\x1b[31mred" in result.stderr


def test_t25_build_on_checks_the_commit_the_job_reports(hub, job_machine, env, online, tmp_path):  # noqa: F811
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("me/t25")
    real = api.upload_file(path_or_fileobj=b"hello", path_in_repo="notes.txt", repo_id="me/t25").oid
    for commit in ("0" * 40, real):  # a commit that does not exist; one that exists without the build
        job_machine(f'echo "{hub.url}/me/t25/tree/{commit}/builds/int8wo-cpu-x86_64-avx2"\n')
        result = run_cli("build", "tiny-flux", "--quant", "int8wo", "--on", "cpu-basic", "--push", "me/t25",
                         env=env)
        assert result.returncode == 1 and len(errors_in(result.stderr)) == 1, result.stderr
        assert f"the job printed commit {commit} of me/t25, but the Hub has no builds/int8wo" in result.stderr
        assert "builds/int8wo-cpu-x86_64-avx2 (commit" not in result.stdout  # no success line
