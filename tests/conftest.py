"""Shared fixtures: every path points at a temp dir; each tiny artifact is built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory):
    """The aotpack cache (tiny pipelines) lives in a session temp dir; nothing touches ~/.cache or the Hub."""
    cache = tmp_path_factory.mktemp("aotpack-cache")
    old = {k: os.environ.get(k) for k in ("AOTPACK_CACHE", "HF_HUB_OFFLINE", "AOTPACK_DEBUG", "HF_HOME")}
    os.environ["AOTPACK_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf-home"))
    os.environ.pop("AOTPACK_DEBUG", None)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class ArtifactFactory:
    """Builds tiny-flux once per scheme per session; tests copy before they damage anything."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def __call__(self, scheme: str) -> Path:
        if scheme not in self._built:
            import aotpack

            self._built[scheme] = aotpack.build("tiny-flux", scheme, out=self.root / f"tiny-flux-{scheme}")
        return self._built[scheme]

    def copy(self, scheme: str, dest: Path) -> Path:
        shutil.copytree(self(scheme), dest)
        return dest


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> ArtifactFactory:
    return ArtifactFactory(tmp_path_factory.mktemp("artifacts"))


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run the real ``aotpack`` command in a fresh process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "aotpack.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


def no_partials(folder: Path) -> bool:
    """True when no temporary build folder was left in ``folder``."""
    return not [p for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name]
