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
    keys = ("AOTPACK_CACHE", "AOTPACK_STATE", "HF_HUB_OFFLINE", "AOTPACK_DEBUG", "HF_HOME", "AOTPACK_TRUSTED_KEYS",
            "AOTPACK_VERIFY", "AOTPACK_MEMORY_RESERVE")
    old = {k: os.environ.get(k) for k in keys}
    for k in ("AOTPACK_TRUSTED_KEYS", "AOTPACK_VERIFY", "AOTPACK_MEMORY_RESERVE"):
        os.environ.pop(k, None)
    os.environ["AOTPACK_CACHE"] = str(cache)
    os.environ["AOTPACK_STATE"] = str(tmp_path_factory.mktemp("aotpack-state"))
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
    """Builds each (recipe, scheme, options) once per session; tests copy before they damage anything."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[tuple, Path] = {}

    def __call__(self, scheme: str, recipe: str = "tiny-flux", **options) -> Path:
        key = (recipe, scheme, tuple(sorted(options.items())))
        if key not in self._built:
            import aotpack

            name = f"{recipe}-{scheme}" + "".join(f"-{k}" for k in sorted(options))
            self._built[key] = aotpack.build(recipe, scheme, out=self.root / name, **options)
        return self._built[key]

    def copy(self, scheme: str, dest: Path, **kwargs) -> Path:
        shutil.copytree(self(scheme, **kwargs), dest)
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


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory) -> Path:
    """A random rank-4 LoRA for tiny-flux in the diffusers/PEFT layout (no alphas: scaling 1)."""
    import torch
    from safetensors.torch import save_file

    from aotpack.builder.tiny import ensure_builtin

    folder = ensure_builtin("tiny-flux") / "transformer"
    from safetensors import safe_open

    g = torch.Generator().manual_seed(5)
    tensors = {}
    with safe_open(str(next(folder.glob("*.safetensors"))), framework="pt") as f:
        for key in f.keys():
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and any(t in name for t in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                     "attn.to_out.0", "ff.net.2", "proj_mlp")):
                out_f, in_f = f.get_slice(key).get_shape()
                tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.3
                tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file(tensors, str(path))
    return path
