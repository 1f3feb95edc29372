"""The bench's artifacts: a fresh build of one in its own process with an empty compile cache (its time is a cold
compile's), and what an artifact's manifest says of its build (the build table's row)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_artifact(recipe_name: str, quant: str, out: Path, *, regional: bool, variant: str | None = None,
                   dtype: str | None = None, cold: bool = True, extra: tuple[str, ...] = ()) -> float:
    """Build an artifact from scratch and return the seconds its process took.

    In its own process (its peak memory is its own) with an empty compile cache (``AOTPACK_CACHE`` a temp
    folder that shares only the builtin pipelines with the real cache, and an empty inductor cache), so that
    its build time is a cold compile's; ``cold=False`` keeps the real caches (the tests: no figure is kept)."""
    from aotpack.errors import AotpackError
    from aotpack.paths import cache_dir

    cmd = [sys.executable, "-m", "aotpack.cli", "-q", "build", recipe_name, "--quant", quant, "--out", str(out),
           "--overwrite", "--regional" if regional else "--whole-graph"] \
        + (["--variant", variant] if variant else []) + (["--dtype", dtype] if dtype else []) + list(extra)
    builtin = cache_dir() / "builtin"
    builtin.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="aotpack-bench-build-") as tmp:
        cache = Path(tmp) / "cache"
        cache.mkdir()
        (cache / "builtin").symlink_to(builtin.absolute(), target_is_directory=True)
        env = {**os.environ, "AOTPACK_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(Path(tmp) / "inductor")} \
            if cold else dict(os.environ)
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")] or ["Error: build failed"]
        what = f"{quant} {'regional' if regional else 'whole-graph'}"
        raise AotpackError(f"bench could not build {what}: {lines[0][7:]}",
                           f"run the build by itself: aotpack build {recipe_name} --quant {quant}"
                           + (" --regional" if regional else " --whole-graph"))
    return wall


def build_record(path: Path, *, recipe_name: str, wall_s: float | None = None) -> dict:
    """What the manifest of the artifact ``path`` says of its build: stage times (export, compile, the sum of
    all stages), compiled code and weights bytes, peak RSS, where the code came from."""
    from aotpack.artifact import manifest as mf

    m = mf.read(path)
    stages = m.build.stages
    config = m.model.config
    blocks = "+".join(str(config[k]) for k in ("num_layers", "num_single_layers") if isinstance(config.get(k), int))
    return {
        "recipe": recipe_name, "blocks": blocks, "quant": m.scheme.name, "dtype": m.dtype,
        "mode": "regional" if m.options.regional else "whole", "modules": len(m.modules),
        "capture": _capture(m.recipe.data), "stages": dict(stages),
        "export_s": stages.get("export"), "compile_s": stages.get("compile"),
        "total_s": round(sum(stages.values()), 3), "wall_s": None if wall_s is None else round(wall_s, 3),
        "pt2_bytes": sum(e.size for name, e in m.files.items() if name.endswith(".pt2")),
        "weights_bytes": m.weights_bytes(), "peak_rss_bytes": m.build.peak_rss_bytes,
        "code": ", ".join(sorted({mod.compiled or "compiled" for mod in m.modules})), "date": m.build.date,
        "path": str(path),
    }


def _capture(data: dict | None) -> str:
    """The recipe's capture call as the manifest recorded it: '512x512, 512 tokens, batch 2, 2 steps'."""
    data = data or {}
    cap, tokens = data.get("capture") or {}, (data.get("shapes") or {}).get("max_sequence_length")
    if not cap:
        return ""
    return (f"{cap.get('height')}x{cap.get('width')}" + (f", {tokens} tokens" if tokens else "")
            + f", batch {cap.get('batch', 2)}, {cap.get('steps')} steps")


def weights_bytes(path: Path) -> int:
    from aotpack.artifact import manifest as mf

    return mf.read(path).weights_bytes()

