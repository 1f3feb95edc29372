"""Shared fixtures: every path points at a temp dir; each tiny artifact is built once per session.

The suite runs in two processes (``pytest -n 2``, as ``make test`` does: the compiler is mostly single-threaded
Python). Both share one artifacts folder, one compile cache and one record key, and an artifact is built under a
file lock by whichever process needs it first: every artifact is still built once.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A suite started in the background by a shell (`cmd &`, nohup, some CI runners) inherits SIGINT ignored, and so
# would every process it starts: the Ctrl-C tests would see no Ctrl-C. Give this process (and, through exec,
# its children) the terminal's SIGINT.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def shared_root(tmp_path_factory) -> Path:
    """A folder every process of this test session shares (the base temp of the session, above the workers')."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """The aotpack cache (tiny pipelines, compiled code) lives in a session temp dir shared by the test processes;
    nothing touches ~/.cache or the Hub."""
    root = shared_root(tmp_path_factory)
    cache, state = root / "aotpack-cache", root / "aotpack-state"
    cache.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    keys = ("AOTPACK_CACHE", "AOTPACK_STATE", "HF_HUB_OFFLINE", "AOTPACK_DEBUG", "HF_HOME", "AOTPACK_TRUSTED_KEYS",
            "AOTPACK_VERIFY", "AOTPACK_MEMORY_RESERVE")
    old = {k: os.environ.get(k) for k in keys}
    for k in ("AOTPACK_TRUSTED_KEYS", "AOTPACK_VERIFY", "AOTPACK_MEMORY_RESERVE"):
        os.environ.pop(k, None)
    os.environ["AOTPACK_CACHE"] = str(cache)
    os.environ["AOTPACK_STATE"] = str(state)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))
    os.environ.pop("AOTPACK_DEBUG", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


BUILDS = {"artifacts", "module", "hub", "signed"}  # fixtures that build (or hold) AOTInductor artifacts


def pytest_collection_modifyitems(config, items):
    """A test that builds an artifact is slow, whether or not it says so: ``make test-fast`` compiles nothing."""
    for item in items:
        if BUILDS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


class ArtifactFactory:
    """Builds each (recipe, scheme, options) once per session, whichever test process asks first (under a file
    lock); tests copy before they damage anything."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple, Path] = {}

    def __call__(self, scheme: str, recipe: str = "tiny-flux", **options) -> Path:
        key = (recipe, scheme, tuple(sorted(options.items())))
        if key not in self._built:
            import aotpack
            from aotpack.artifact.files import is_artifact

            name = f"{recipe}-{scheme}-" + hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            out = self.root / name
            with open(self.root / f".{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # held while another process builds this one
                if not is_artifact(out):
                    aotpack.build(recipe, scheme, out=out, overwrite=True, **options)
            self._built[key] = out
        return self._built[key]

    def copy(self, scheme: str, dest: Path, **kwargs) -> Path:
        shutil.copytree(self(scheme, **kwargs), dest)
        return dest


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> ArtifactFactory:
    root = shared_root(tmp_path_factory) / "artifacts"
    root.mkdir(exist_ok=True)
    return ArtifactFactory(root)


# The expensive shared artifacts, split between the two processes of `make test` (pytest -n 2) so that they
# compile side by side at the start instead of one process waiting on the other's lock later. Keys as the tests
# ask for them ("lora" is filled in with the session's LoRA file).
PREBUILD = {
    "gw0": [("int8wo", {"lora": True, "fuse_qkv": True, "quantize_text_encoder": "int8wo", "compile_vae": True,
                        "lora_scale": 0.8}),
            ("auto", {"error_budget": 0.05}), ("int8wo", {"recipe": "tiny-cogvideox"}), ("none", {}),
            ("none", {"dtype": "bfloat16", "freeze": True, "regional": False}),
            ("int8dq", {"dtype": "float32", "freeze": True, "regional": False})],
    "gw1": [("int8dq", {}), ("int8wo", {"regional": True}), ("int8wo", {}),
            ("int8wo", {"recipe": "tiny-cogvideox", "regional": True}), ("int8wo", {"regional": True, "dtype": "bfloat16"}),
            ("none", {"dtype": "bfloat16", "freeze": True, "regional": True})],
}


@pytest.fixture(scope="session", autouse=True)
def _prebuild(request):
    """In a full run on two processes, each builds its share of the shared artifacts first."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    slow = [i for i in request.session.items if i.get_closest_marker("slow")]
    if worker not in PREBUILD or len(slow) < 100 or "not slow" in (request.config.getoption("-m") or ""):
        return
    artifacts = request.getfixturevalue("artifacts")
    for scheme, options in PREBUILD[worker]:
        if options.get("lora"):
            options = {**options, "lora": str(request.getfixturevalue("lora_file"))}
        artifacts(scheme, **options)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``aotpack`` command in a fresh process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "aotpack.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def no_partials(folder: Path) -> bool:
    """True when no temporary build folder was left in ``folder`` by a build that ended (the other test process
    may be building into a shared folder right now: its live folders do not count)."""
    def left(p: Path) -> bool:
        for mark in (".partial-", ".old-"):
            if mark in p.name:
                pid = p.name.split(mark, 1)[1].split("-", 1)[0]
                return not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)))
        return False

    return not [p for p in folder.iterdir() if left(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture
def opened(monkeypatch):
    """The sha256 of every package torch's loader is handed, in order (a spy on the one place that opens them)."""
    from aotpack import _torch_compat
    from aotpack.artifact.files import sha256_file

    seen: list[str] = []
    real = _torch_compat.open_package

    def spy(path, **kwargs):
        seen.append(sha256_file(path))
        return real(path, **kwargs)

    monkeypatch.setattr(_torch_compat, "open_package", spy)
    return seen


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory) -> Path:
    """A random rank-4 LoRA for tiny-flux in the diffusers/PEFT layout (no alphas: scaling 1)."""
    from aotpack.builder.tiny import ensure_builtin, random_lora

    return random_lora(ensure_builtin("tiny-flux") / "transformer",
                       tmp_path_factory.mktemp("lora") / "style.safetensors")
