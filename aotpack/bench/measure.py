"""One bench measurement in a fresh process: ``spawn`` starts ``python -m aotpack.bench KIND ARGS_JSON`` with the
page cache of the given folders evicted, and reads back the JSON line it prints; in that process ``worker`` times
one variant from process start to the last image, ``load_worker`` times ``aotpack.load`` against reading the
artifact's bytes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


def evict(*folders: Path) -> None:
    """Drop the files under ``folders`` from the page cache, so the next read is a cold read."""
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.fsync(fd) if os.access(path, os.W_OK) else None
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    from aotpack.stages import peak_rss_bytes

    return peak_rss_bytes()


def worker(args: dict) -> dict:
    """Run one variant; ``args['t0']`` is the parent's clock when it started this process.

    The timed sequence itself, from process start to the last image, in order: what each clock reading includes
    is read here; the variant's setup is ``load_variant``, the clock on each forward ``_forward_clock``."""
    t0 = args["t0"]
    import torch

    from aotpack.bench.bound import LinearFlops
    from aotpack.bench.variants import load_variant
    from aotpack.builder.recipe import get_recipe

    for name in ("aotpack.builder.source", "aotpack.builder.schemes"):  # the setup's code, loaded before rss_start
        importlib.import_module(name)
    variant = args["variant"]
    recipe = get_recipe(args["recipe"], args.get("recipe_variant"))
    cuda = args["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_start = _rss()
    pipe, transformer = load_variant(args, recipe)
    ready_s = time.time() - t0
    model_memory = (torch.cuda.memory_allocated() if cuda else _rss())
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    forwards = _forward_clock(transformer, sync)
    image = _image_clock(pipe, recipe, args, sync)
    # the eager row counts the forward's linear FLOPs (hooks on its nn.Linear calls, first image only)
    counter = LinearFlops(transformer) if variant == "eager" else None
    first_image_s = image()
    linear_flops = counter.per_forward(len(forwards)) if counter else None
    first_forward_end = forwards[0][1]
    first_output_s = (first_forward_end - time.perf_counter()) + (time.time() - t0)
    first_image_total_s = time.time() - t0
    if variant == "compile" and args.get("save_cache"):
        blob = torch.compiler.save_cache_artifacts()
        if blob is not None:
            Path(args["save_cache"]).write_bytes(blob[0])
    n0 = len(forwards)
    times = [image() for _ in range(args["images"])]
    steady = sorted(e - s for s, e in forwards[n0:])
    result = {
        "variant": variant,
        "ready_s": ready_s,
        "cold_start_s": first_output_s,
        "first_image_s": first_image_total_s,
        "first_call_s": first_image_s,
        "forward_s": steady[len(steady) // 2] if steady else None,
        "image_s": sum(times) / len(times) if times else None,
        "model_memory": model_memory,
        "inference_memory": torch.cuda.max_memory_allocated() if cuda else _peak_rss(),
        "rss_start": rss_start,
        "threads": torch.get_num_threads(),
        "linear_flops": linear_flops,
    }
    return result


def _forward_clock(transformer: Any, sync: Callable[[], None]) -> list[tuple[float, float]]:
    """Hooks on ``transformer`` that append (start, end) of every forward, synchronized, to the list returned."""
    forwards: list[tuple[float, float]] = []
    start: list[float] = []

    def pre(module, a, k):
        sync()
        start.append(time.perf_counter())

    def post(module, a, k, out):
        sync()
        forwards.append((start[-1], time.perf_counter()))

    transformer.register_forward_pre_hook(pre, with_kwargs=True)
    transformer.register_forward_hook(post, with_kwargs=True)
    return forwards


def _image_clock(pipe: Any, recipe: Any, args: dict, sync: Callable[[], None]) -> Callable[[], float]:
    """A function that makes one image of the bench's workload (seeded) and returns the seconds it took."""
    import torch

    kwargs = recipe.pipeline_kwargs(height=args["height"], width=args["width"], steps=args["steps"],
                                    guidance_scale=recipe.run.get("guidance_scale", 3.5), batch=args["batch"],
                                    frames=recipe.run.get("frames") if recipe.is_video else None)

    def image() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            pipe(prompt="a dog surfing on the moon", **kwargs, generator=torch.Generator("cpu").manual_seed(0),
                 output_type="pil")
        sync()
        return time.perf_counter() - t

    return image


def load_worker(args: dict) -> dict:
    """``aotpack.load`` of the artifact against reading its bytes; each from a cold page cache.

    ``args['inputs_from']``: an artifact whose component's InputSpec makes the example inputs (a regional
    artifact records its blocks' inputs, not the transformer's: the whole-graph artifact of the same build)."""
    import psutil
    import torch

    # What a serving process has imported before it loads (torch, diffusers, safetensors): process start,
    # not load time.
    for dependency in ("diffusers.configuration_utils", "safetensors.torch"):
        importlib.import_module(dependency)

    from aotpack import _torch_compat

    _torch_compat.preload()

    from aotpack.artifact import manifest as mf
    from aotpack.serve.load import load

    folder = Path(args["artifact"])
    manifest = mf.read(folder)
    # ... and the diffusers class of the model the artifact replaces (a process that serves a pipeline imported it
    # with the pipeline; diffusers imports lazily, and its transformer classes took 0.84 s of a 1.3 s later load)
    getattr(importlib.import_module("diffusers"), manifest.model.config.get("_class_name") or "", None)
    evict(folder)
    t = time.perf_counter()
    for name in manifest.files:
        with open(folder / name, "rb") as fh:
            while fh.read(16 << 20):
                pass
    read_s = time.perf_counter() - t
    evict(folder)
    if args.get("full"):
        os.environ["AOTPACK_VERIFY"] = "full"  # a first boot: every byte hashed
    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    module = load(folder)  # a later boot: the hashes of unchanged files are remembered
    load_s = time.perf_counter() - t
    rss_load = psutil.Process().memory_info().rss - rss0
    spec = mf.read(Path(args["inputs_from"])).component.inputs if args.get("inputs_from") else \
        manifest.component.inputs
    x = _example_inputs(spec, torch, manifest.platform.device)
    with torch.no_grad():
        module(**x)
    rss_forward = psutil.Process().memory_info().rss - rss0
    return {"read_s": read_s, "load_s": load_s, "weights_bytes": manifest.weights_bytes(),
            "artifact_bytes": sum(e.size for e in manifest.files.values()),
            "rss_added_by_load": rss_load, "rss_after_forward": rss_forward}


def _example_inputs(spec: Any, torch: Any, device: str = "cpu") -> dict:
    """Inputs at the smallest batch and a mid-range size of every dynamic dim (relations respected)."""
    from aotpack.builder.capture import unflatten_inputs

    def mid(name: str, rng: tuple[int, ...]) -> int:
        step = rng[2] if len(rng) > 2 else 1
        return 1 if name == "batch" else step * max(1, (rng[0] + rng[1]) // 2 // step)

    sizes = spec.sizes(mid)
    x = {t.name: (torch.randn([sizes[d] if isinstance(d, str) else d for d in t.shape]) * 0.1)
         .to(device=device, dtype=getattr(torch, t.dtype)) for t in spec.tensors}
    return unflatten_inputs(x)


def spawn(kind: str, args: dict, env: dict | None = None, evict_folders: tuple = ()) -> dict:
    """Run ``worker`` (``kind`` 'worker') or ``load_worker`` ('load') on ``args`` in a fresh process, with
    ``evict_folders`` out of the page cache and ``env`` added to the environment; returns what it measured."""
    evict(*evict_folders)
    args = {**args, "t0": time.time()}
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-m", "aotpack.bench", kind, json.dumps(args)], capture_output=True,
                         text=True, env=full_env)
    if out.returncode != 0:
        from aotpack.errors import AotpackError

        tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise AotpackError(f"bench variant {args.get('variant', kind)} failed: {tail[0][:300]}",
                           "run it again with AOTPACK_DEBUG=1")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    """``python -m aotpack.bench worker|load|interleaved|matrix ARGS_JSON``: one measurement, its result as the last line
    of stdout."""
    kind, args = argv[0], json.loads(argv[1])
    import logging

    logging.disable(logging.WARNING)
    if kind == "interleaved":
        from aotpack.bench.interleaved import interleaved

        result = interleaved(args["paths"], compile_rows=args["compile"], rounds=args.get("rounds", 30))
    elif kind == "matrix":
        from aotpack.bench.interleaved import matrix

        result = matrix(args["path"], rounds=args.get("rounds", 10), max_autotune=args.get("max_autotune", False),
                        others=tuple(args.get("others", ())))
    else:
        result = worker(args) if kind == "worker" else load_worker(args)
    print(json.dumps(result))
