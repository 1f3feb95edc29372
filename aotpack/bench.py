"""``aotpack bench``: eager, torch.compile (cold), torch.compile + its portable cache, and the aotpack
artifact, side by side; every variant in a fresh process, started with the page cache of the checkpoint and
the artifact evicted (``posix_fadvise(DONTNEED)``) and an empty inductor cache.

Per variant: cold start (process start -> first transformer output, and -> first image), steady latency
per transformer forward and per image, resident memory when ready and at its peak (``max_memory_allocated``
on GPU), weights bytes. For the artifact also: ``aotpack.load`` against the time to read its bytes (the floor).
Writes ``results.md`` (the seed's columns + these), ``results.csv`` and ``results.png`` (with matplotlib).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform as _platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("eager", "compile", "compile+cache", "aotpack")
GPU_VARIANTS = VARIANTS + ("aotpack+graphs",)   # CUDA graphs replay of the artifact (GPU only)


# ---- page cache -------------------------------------------------------------------------------------------

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


# ---- one variant, in a fresh process -----------------------------------------------------------------------

def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    from aotpack.stages import peak_rss_bytes

    return peak_rss_bytes()


def worker(args: dict) -> dict:
    """Run one variant; ``args['t0']`` is the parent's clock when it started this process."""
    t0 = args["t0"]
    import torch

    from aotpack.builder.source import load_pipeline, resolve_source
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.schemes import quantize_named

    variant = args["variant"]
    recipe = get_recipe(args["recipe"], args.get("recipe_variant"))
    cuda = args["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rss_start = _rss()
    if variant.startswith("aotpack"):
        from aotpack.serve.run import pipeline_for

        pipe, _ = pipeline_for(args["artifact"], **({"cuda_graphs": True} if variant == "aotpack+graphs" else {}))
        transformer = getattr(pipe, recipe.component)
    else:
        source = resolve_source(recipe, args.get("model"), args["device"])
        pipe = load_pipeline(recipe, source, dtype=args["dtype"])
        pipe.to(args["device"])
        transformer = getattr(pipe, recipe.component)
        if args["quant"] == "auto":  # the artifact's per-layer plan, applied to the eager model
            from aotpack.builder.plan import PLAN_FILE, linear_quantizer

            apply = linear_quantizer("auto", json.loads((Path(args["artifact"]) / PLAN_FILE).read_text()))
            for name, module in list(transformer.named_modules()):
                if isinstance(module, torch.nn.Linear):
                    apply(name, module)
        else:
            quantize_named(transformer, args["quant"])
        if variant.startswith("compile"):
            if variant == "compile+cache":
                torch.compiler.load_cache_artifacts(Path(args["cache_file"]).read_bytes())
            mode = "max-autotune" if args.get("max_autotune") else None
            transformer = torch.compile(transformer, mode=mode)
            setattr(pipe, recipe.component, transformer)
    ready_s = time.time() - t0
    model_memory = (torch.cuda.memory_allocated() if cuda else _rss())
    if cuda:
        torch.cuda.reset_peak_memory_stats()

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

    first_image_s = image()
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
    }
    return result


def load_worker(args: dict) -> dict:
    """``aotpack.load`` of the artifact against reading its bytes; each from a cold page cache."""
    import psutil
    import torch

    # What a serving process has imported before it loads (torch, diffusers, safetensors): process start,
    # not load time.
    import diffusers.configuration_utils  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch._inductor.package  # noqa: F401

    from aotpack.artifact import manifest as mf
    from aotpack.serve.load import load

    folder = Path(args["artifact"])
    manifest = mf.read(folder)
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
    x = _example_inputs(manifest.component.inputs, torch, manifest.platform.device)
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


def _spawn(kind: str, args: dict, env: dict | None = None, evict_folders: tuple = ()) -> dict:
    evict(*evict_folders)
    args = {**args, "t0": time.time()}
    full_env = {**os.environ, **(env or {})}
    out = subprocess.run([sys.executable, "-m", "aotpack.bench", kind, json.dumps(args)], capture_output=True,
                         text=True, env=full_env)
    if out.returncode != 0:
        from aotpack.errors import AotpackError, first_line

        tail = [ln for ln in out.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise AotpackError(f"bench variant {args.get('variant', kind)} failed: {tail[0][:300]}",
                           "run it again with AOTPACK_DEBUG=1")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the whole bench ----------------------------------------------------------------------------------------

def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from aotpack.artifact.platform import describe, tag

    here = describe()
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"platform": tag(here), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpu": here.gpu_name,
            "torch": torch.__version__, "python": _platform.python_version(), "os": _platform.platform()}


def run_bench(recipe_name: str, quants: list[str], *, out: Path, steps: int | None = None, images: int = 2,
              variants: tuple[str, ...] = VARIANTS, variant: str | None = None, max_autotune: bool = False,
              dtype: str | None = None,
              artifacts_dir: Path = Path("artifacts")) -> Path:
    """Build (or reuse) the artifacts, run every variant for every scheme, write results; returns ``out``."""
    from aotpack.builder.spec import default_out
    from aotpack.artifact.platform import default_device, describe, tag
    from aotpack.builder.recipe import get_recipe

    recipe = get_recipe(recipe_name, variant)
    device = default_device()
    here = describe(device)
    out.mkdir(parents=True, exist_ok=True)
    rows, loads, builds = [], {}, {}
    from aotpack.builder.source import resolve_source

    source = resolve_source(recipe, None, device)
    checkpoint_dir = Path(source.location) if source.kind != "hub" else None
    common = {"recipe": recipe.name, "recipe_variant": variant, "device": device, "dtype": dtype or recipe.dtype,
              "height": recipe.capture["height"], "width": recipe.capture["width"],
              "steps": steps or recipe.run["steps"], "images": images, "batch": 1, "max_autotune": max_autotune}
    for quant in quants:
        path = default_out(recipe.full_name, quant, tag(here), artifacts_dir)
        if not (path / "manifest.json").is_file():  # built in its own process: its peak memory is its own
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "aotpack.cli", "-q", "build", recipe.name, "--quant", quant,
                   "--out", str(path), "--overwrite"] + (["--variant", variant] if variant else []) \
                + (["--dtype", dtype] if dtype else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                from aotpack.errors import AotpackError

                lines = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")] or ["Error: build failed"]
                raise AotpackError(f"bench could not build {quant}: {lines[0][7:]}", "run the build by itself")
            builds[quant] = time.perf_counter() - t
        cold = [p for p in (checkpoint_dir, path) if p is not None]
        with tempfile.TemporaryDirectory(prefix="aotpack-bench-") as tmp:
            cache_file = Path(tmp) / "megacache.bin"
            for v in variants:
                if v == "compile+cache" and not cache_file.exists():
                    if "compile" in variants:
                        raise RuntimeError("the compile variant did not save a portable cache")
                    _spawn("worker", {**common, "variant": "compile", "quant": quant, "save_cache": str(cache_file)},
                           env={"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)})
                env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}  # always an empty compiler cache
                args = {**common, "variant": v, "quant": quant, "artifact": str(path),
                        "save_cache": str(cache_file) if v == "compile" else None, "cache_file": str(cache_file)}
                r = _spawn("worker", args, env=env, evict_folders=tuple(cold))
                r.update({"quant": quant, "weights_bytes": _weights_bytes(path)})
                rows.append(r)
                print(f"  {quant:<8} {v:<14} cold start {r['cold_start_s']:6.1f} s, forward {r['forward_s']:.3f} s, "
                      f"image {r['image_s']:.2f} s", file=sys.stderr)
        loads[quant] = _spawn("load", {"artifact": str(path)})  # a later boot (hashes remembered)
        loads[quant]["first_load_s"] = _spawn("load", {"artifact": str(path), "full": True})["load_s"]
    info = machine()
    write_results(out, recipe, rows, loads, builds, info, common)
    return out


def _weights_bytes(path: Path) -> int:
    from aotpack.artifact import manifest as mf

    return mf.read(path).weights_bytes()


COLUMNS = ["ckpt_id", "batch_size", "fuse", "compile", "compile_vae", "quantization", "sparsify", "model_memory",
           "inference_memory", "time", "variant", "cold_start", "first_image", "forward", "weights", "threads"]


def _records(recipe, rows: list[dict], common: dict) -> list[dict]:
    out = []
    for r in rows:
        out.append({
            "ckpt_id": recipe.checkpoint, "batch_size": common["batch"], "fuse": False,
            "compile": r["variant"] != "eager", "compile_vae": False, "quantization": r["quant"],
            "sparsify": r["quant"] == "sparsify",
            "model_memory": round(r["model_memory"] / 2**30, 3), "inference_memory": round(r["inference_memory"] / 2**30, 3),
            "time": round(r["image_s"], 3), "variant": r["variant"], "cold_start": round(r["cold_start_s"], 2),
            "first_image": round(r["first_image_s"], 2), "forward": round(r["forward_s"], 4),
            "weights": round(r["weights_bytes"] / 2**20, 1), "threads": r["threads"],
        })
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def write_results(out: Path, recipe, rows: list[dict], loads: dict, builds: dict, info: dict, common: dict) -> None:
    records = _records(recipe, rows, common)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(records)
    (out / "results.csv").write_text(buf.getvalue())
    lines = [f"# aotpack bench: {recipe.full_name}", "",
             f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
             f"{info['memory_gb']} GiB" + (f", GPU {info['gpu']}" if info["gpu"] else "") +
             f"; platform {info['platform']}; torch {info['torch']}, python {info['python']}; {info['os']}.",
             f"Workload: {recipe.pipeline} at {common['height']}x{common['width']}, {common['steps']} steps, "
             f"batch {common['batch']}, {recipe.dtype}; each variant in a fresh process with the checkpoint and "
             f"artifact evicted from the page cache and an empty inductor cache.", "",
             "memory in GiB (RSS on CPU: model_memory when ready to serve, inference_memory the peak; "
             "max_memory_allocated on GPU), time = seconds per image (steady), cold_start = process start to the "
             "first transformer output, first_image = process start to the first image, forward = seconds per "
             "transformer forward (steady, median), weights in MiB.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rec in records:
        lines.append("| " + " | ".join(str(rec[c]) for c in COLUMNS) + " |")
    lines += ["", "## Targets", "", "| scheme | cold start aotpack / compile+cache (<= 0.25) | forward aotpack / compile "
              "(<= 1.0) | RSS after load and one forward / weights (<= 1.15) | load / read floor (<= 2): "
              "first, later |", "|---|---|---|---|---|"]
    by = {(r["quant"], r["variant"]): r for r in rows}
    for quant, ld in loads.items():
        a, c, cc = by.get((quant, "aotpack")), by.get((quant, "compile")), by.get((quant, "compile+cache"))
        lines.append(
            f"| {quant} | {_ratio(a and a['cold_start_s'], cc and cc['cold_start_s'])} | "
            f"{_ratio(a and a['forward_s'], c and c['forward_s'])} | "
            f"{_ratio(ld['rss_after_forward'], ld['weights_bytes'])} | {_ratio(ld['first_load_s'], ld['read_s'])}, "
            f"{_ratio(ld['load_s'], ld['read_s'])} |")
    lines += ["", "## Artifact load", "", "Each figure in a fresh process with a cold page cache (torch, diffusers "
              "and safetensors imported: a serving process has them). A first load hashes every byte; later "
              "loads of the same files skip the hash (file identity remembered, see README) and map the "
              "weights lazily, so their bytes are read by the first forward.", "",
              "| scheme | artifact MiB | read s (cold, floor) | first aotpack.load s | later aotpack.load s | "
              "RSS added by load MiB | RSS after one forward MiB | build s |", "|---|---|---|---|---|---|---|---|"]
    for quant, ld in loads.items():
        built = f"{builds[quant]:.1f}" if quant in builds else "(existed)"
        lines.append(f"| {quant} | {ld['artifact_bytes'] / 2**20:.1f} | {ld['read_s']:.2f} | "
                     f"{ld['first_load_s']:.2f} | {ld['load_s']:.2f} | "
                     f"{ld['rss_added_by_load'] / 2**20:.0f} | {ld['rss_after_forward'] / 2**20:.0f} | {built} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": info, "workload": common, "rows": rows,
                                                   "loads": loads, "builds": builds}, indent=2) + "\n")
    _plot(out / "results.png", records, recipe.full_name)


def _plot(path: Path, records: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: pip install 'aotpack[bench]'
        return
    quants = sorted({r["quantization"] for r in records}, key=[r["quantization"] for r in records].index)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("cold_start", "time", "inference_memory"),
                              ("cold start, s", "seconds per image", "peak memory, GiB")):
        shown = [v for v in GPU_VARIANTS if any(r["variant"] == v for r in records)]
        width = 0.8 / len(shown)
        for i, v in enumerate(shown):
            ys = [next((r[key] for r in records if r["variant"] == v and r["quantization"] == q), 0) for q in quants]
            ax.bar([j + i * width for j in range(len(quants))], ys, width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(quants))], quants)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"aotpack bench: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> None:
    kind, args = argv[0], json.loads(argv[1])
    import logging

    logging.disable(logging.WARNING)
    result = worker(args) if kind == "worker" else load_worker(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
