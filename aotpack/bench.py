"""``aotpack bench``: eager, torch.compile (cold), torch.compile + its portable cache, and the aotpack
artifact (whole graph, and regional where the model has repeated blocks), side by side; every variant in a fresh
process, started with the page cache of the checkpoint and the artifact evicted (``posix_fadvise(DONTNEED)``)
and an empty inductor cache.

Per variant: cold start (process start -> first transformer output, and -> first image), steady latency
per transformer forward and per image, resident memory when ready and at its peak (``max_memory_allocated``
on GPU), weights bytes; for the artifacts also their build (export, compile and all stages, from the manifest)
and the bytes of their compiled code, and ``aotpack.load`` against the time to read their bytes (the floor).
Writes ``results.md`` (the seed's columns + these), ``results.csv``, ``results.json`` and ``results.png`` (with
matplotlib). ``build_only``: fresh builds only (each in its own process with an empty compile cache), written
to ``builds.md/.csv/.json`` - the depth-scaling table.
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
from typing import Any, Callable

VARIANTS = ("eager", "compile", "compile+cache", "aotpack")
REGIONAL = "aotpack-regional"                   # the regional artifact, run exactly as "aotpack"
GPU_VARIANTS = VARIANTS + ("aotpack+graphs",)   # CUDA graphs replay of the artifact (GPU only)
SHOWN = VARIANTS + (REGIONAL, "aotpack+graphs")  # the order of the plot's bars


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
    """Run one variant; ``args['t0']`` is the parent's clock when it started this process.

    One function on purpose (~95 lines): it is the timed sequence itself, from process start to the last image;
    split, the reader would have to reassemble what each clock reading includes."""
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
    """``aotpack.load`` of the artifact against reading its bytes; each from a cold page cache.

    ``args['inputs_from']``: an artifact whose component's InputSpec makes the example inputs (a regional
    artifact records its blocks' inputs, not the transformer's: the whole-graph artifact of the same build)."""
    import psutil
    import torch

    # What a serving process has imported before it loads (torch, diffusers, safetensors): process start,
    # not load time.
    import diffusers.configuration_utils  # noqa: F401
    import safetensors.torch  # noqa: F401

    from aotpack import _torch_compat

    _torch_compat.preload()

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


def _spawn(kind: str, args: dict, env: dict | None = None, evict_folders: tuple = ()) -> dict:
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


def has_repeated_blocks(recipe, source) -> bool:
    """True when a regional build of ``recipe`` has blocks to compile: the recipe names them, or the component's
    diffusers class declares ``_repeated_blocks`` (read from the checkpoint's config, or the pipeline's
    signature for a Hub checkpoint, so nothing is downloaded)."""
    import inspect

    import diffusers

    if recipe.blocks:
        return True
    cls = None
    config = Path(source.location) / recipe.component / "config.json" if source.kind != "hub" else None
    if config is not None and config.is_file():
        cls = getattr(diffusers, json.loads(config.read_text()).get("_class_name", ""), None)
    if cls is None:
        pipeline = getattr(diffusers, recipe.pipeline, None)
        try:
            cls = inspect.signature(pipeline.__init__).parameters[recipe.component].annotation
        except (TypeError, ValueError, KeyError, AttributeError):
            return False
    return bool(getattr(cls, "_repeated_blocks", None))


def build_artifact(recipe_name: str, quant: str, out: Path, *, regional: bool, variant: str | None = None,
                   dtype: str | None = None, cold: bool = True) -> float:
    """Build an artifact from scratch and return the seconds its process took.

    In its own process (its peak memory is its own) with an empty compile cache (``AOTPACK_CACHE`` a temp
    folder that shares only the builtin pipelines with the real cache, and an empty inductor cache), so that
    its build time is a cold compile's; ``cold=False`` keeps the real caches (the tests: no figure is kept)."""
    from aotpack.errors import AotpackError
    from aotpack.paths import cache_dir

    cmd = [sys.executable, "-m", "aotpack.cli", "-q", "build", recipe_name, "--quant", quant, "--out", str(out),
           "--overwrite", "--regional" if regional else "--whole-graph"] \
        + (["--variant", variant] if variant else []) + (["--dtype", dtype] if dtype else [])
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
        "export_s": stages.get("export"), "compile_s": stages.get("compile"),
        "total_s": round(sum(stages.values()), 3), "wall_s": None if wall_s is None else round(wall_s, 3),
        "pt2_bytes": sum(e.size for name, e in m.files.items() if name.endswith(".pt2")),
        "weights_bytes": m.weights_bytes(), "peak_rss_bytes": m.build.peak_rss_bytes,
        "code": ", ".join(sorted({mod.compiled or "compiled" for mod in m.modules})), "date": m.build.date,
        "path": str(path),
    }


def run_bench(recipe_name: str, quants: list[str], *, out: Path, steps: int | None = None, images: int = 2,
              variants: tuple[str, ...] | None = None, variant: str | None = None, max_autotune: bool = False,
              dtype: str | None = None, regional: bool | None = None, build_only: bool = False,
              artifacts_dir: Path = Path("artifacts"), cold_builds: bool = True) -> Path:
    """Build (or reuse) the artifacts, run every variant for every scheme, write results; returns ``out``.

    ``variants``: default eager, compile, compile+cache, aotpack, plus aotpack-regional when ``regional``
    (default: when the model has repeated blocks). Artifacts that are missing are built from scratch (see
    ``build_artifact``); existing ones are reused and their manifests say how they were built.
    ``build_only``: build every artifact afresh (whole graph, and regional when ``regional``), run nothing, and
    write the build table to ``out/builds.md``, ``.csv`` and ``.json``; rows of other recipes, variants or
    schemes already in ``out/builds.json`` (same platform) are kept, so that one folder gathers a table.

    Long (~85 lines) because it is the bench's plan in order: what is built, which variant runs after which,
    and what each is measured against; the measuring itself is in ``worker`` and ``load_worker``."""
    from aotpack.builder.spec import default_out
    from aotpack.artifact.platform import default_device, describe, tag
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.source import resolve_source

    recipe = get_recipe(recipe_name, variant)
    device = default_device()
    here = describe(device)
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_source(recipe, None, device)  # builtins are made here, once, outside any timed build
    if regional is None:
        regional = REGIONAL in variants if variants is not None else has_repeated_blocks(recipe, source)
    if variants is None:
        variants = VARIANTS + ((REGIONAL,) if regional else ())
    wanted = {"aotpack": False} | ({REGIONAL: True} if REGIONAL in variants or (build_only and regional) else {})
    if build_only:
        records = []
        for quant in quants:
            for is_regional in wanted.values():
                path = default_out(recipe.full_name, quant, tag(here), artifacts_dir, regional=is_regional)
                print(f"  building {recipe.full_name} {quant} {'regional' if is_regional else 'whole graph'} ...",
                      file=sys.stderr)
                wall = build_artifact(recipe.name, quant, path, regional=is_regional, variant=variant, dtype=dtype,
                                      cold=cold_builds)
                records.append(build_record(path, recipe_name=recipe.full_name, wall_s=wall))
                r = records[-1]
                print(f"  {quant:<8} {r['mode']:<8} export {r['export_s']:.1f} s, compile {r['compile_s']:.1f} s, "
                      f"total {r['total_s']:.1f} s, .pt2 {r['pt2_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
        write_builds(out, records, machine())
        return out
    print_plan(out, recipe.full_name, quants, variants, wanted, lambda q, r: default_out(
        recipe.full_name, q, tag(here), artifacts_dir, regional=r), images)
    rows, loads, builds, records = [], {}, {}, []
    checkpoint_dir = Path(source.location) if source.kind != "hub" else None
    common = {"recipe": recipe.name, "recipe_variant": variant, "device": device, "dtype": dtype or recipe.dtype,
              "height": recipe.capture["height"], "width": recipe.capture["width"],
              "steps": steps or recipe.run["steps"], "images": images, "batch": 1, "max_autotune": max_autotune}
    for quant in quants:
        paths = {v: default_out(recipe.full_name, quant, tag(here), artifacts_dir, regional=r)
                 for v, r in wanted.items()}
        facts = {}
        for v, path in paths.items():
            label = _label(quant, v)
            if not (path / "manifest.json").is_file():
                builds[label] = build_artifact(recipe.name, quant, path, regional=wanted[v], variant=variant, cold=cold_builds,
                                               dtype=dtype)
            records.append(build_record(path, recipe_name=recipe.full_name, wall_s=builds.get(label)))
            facts[v] = {k: records[-1][k] for k in ("export_s", "compile_s", "total_s", "pt2_bytes")}
        whole = paths["aotpack"]
        with tempfile.TemporaryDirectory(prefix="aotpack-bench-") as tmp:
            cache_file = Path(tmp) / "megacache.bin"
            for v in variants:
                if v == "compile+cache" and not cache_file.exists():
                    if "compile" in variants:
                        raise RuntimeError("the compile variant did not save a portable cache")
                    _spawn("worker", {**common, "variant": "compile", "quant": quant, "save_cache": str(cache_file)},
                           env={"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)})
                path = paths.get(v, whole)  # eager and compile read the whole-graph artifact's plan (auto)
                cold = [p for p in (checkpoint_dir, path) if p is not None]
                env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}  # always an empty compiler cache
                args = {**common, "variant": v, "quant": quant, "artifact": str(path),
                        "save_cache": str(cache_file) if v == "compile" else None, "cache_file": str(cache_file)}
                r = _spawn("worker", args, env=env, evict_folders=tuple(cold))
                r.update({"quant": quant, "weights_bytes": _weights_bytes(path), **facts.get(v, {})})
                rows.append(r)
                print(f"  {quant:<8} {v:<16} cold start {r['cold_start_s']:6.1f} s, forward {r['forward_s']:.3f} s, "
                      f"image {r['image_s']:.2f} s", file=sys.stderr)
        for v, path in paths.items():
            label, inputs = _label(quant, v), {"inputs_from": str(whole)} if v != "aotpack" else {}
            loads[label] = _spawn("load", {"artifact": str(path), "full": True, **inputs})  # a first boot (hashes)
            first = loads[label]["load_s"]
            loads[label] = _spawn("load", {"artifact": str(path), **inputs})  # a later boot (hashes remembered)
            loads[label]["first_load_s"] = first
    info = machine()
    write_results(out, recipe, rows, loads, builds, info, common, artifacts=records)
    return out


def _label(quant: str, variant: str) -> str:
    """The name of an artifact in the load and build tables: its scheme, and 'regional' for a regional one."""
    return f"{quant} regional" if variant == REGIONAL else quant


def _weights_bytes(path: Path) -> int:
    from aotpack.artifact import manifest as mf

    return mf.read(path).weights_bytes()


COLUMNS = ["ckpt_id", "batch_size", "fuse", "compile", "compile_vae", "quantization", "sparsify", "model_memory",
           "inference_memory", "time", "variant", "cold_start", "first_image", "forward", "weights", "threads",
           "build_export", "build_compile", "build_total", "pt2"]


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(value, digits)


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
            # the artifact's build (its manifest): eager and torch.compile rows have none
            "build_export": _round(r.get("export_s"), 1), "build_compile": _round(r.get("compile_s"), 1),
            "build_total": _round(r.get("total_s"), 1),
            "pt2": _round(r["pt2_bytes"] / 2**20 if r.get("pt2_bytes") is not None else None, 2),
        })
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def _machine_line(info: dict) -> str:
    return (f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
            f"{info['memory_gb']} GiB" + (f", GPU {info['gpu']}" if info["gpu"] else "") +
            f"; platform {info['platform']}; torch {info['torch']}, python {info['python']}; {info['os']}.")


BUILD_COLUMNS = ["recipe", "blocks", "quant", "dtype", "mode", "modules", "export_s", "compile_s", "total_s",
                 "wall_s", "pt2_mib", "weights_mib", "peak_rss_gib", "code"]
_BUILD_NOTE = ("Build time by stage from each artifact's manifest (`build.stages`): export and compile summed over "
               "its compiled modules (one per block class in a regional build), total = every stage (load, "
               "quantize, capture, reference, export, compile, save, verify, quant error); wall = the build "
               "process from start to exit (empty when the artifact existed); .pt2 = the compiled code, all "
               "modules; peak RSS of the build process. `code` says where the compiled code came from: "
               "'compiled' is a cold compile.")


def _build_rows(records: list[dict]) -> list[dict]:
    def r(v: float | None, d: int = 1) -> float | str:
        return "" if v is None else round(v, d)

    return [{"recipe": b["recipe"], "blocks": b["blocks"], "quant": b["quant"], "dtype": b["dtype"], "mode": b["mode"],
             "modules": b["modules"], "export_s": r(b["export_s"]), "compile_s": r(b["compile_s"]),
             "total_s": r(b["total_s"]), "wall_s": r(b["wall_s"]), "pt2_mib": r(b["pt2_bytes"] / 2**20, 2),
             "weights_mib": r(b["weights_bytes"] / 2**20), "peak_rss_gib": r(b["peak_rss_bytes"] / 2**30, 2),
             "code": b["code"]} for b in records]


def _build_table(records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(BUILD_COLUMNS) + " |", "|" + "---|" * len(BUILD_COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in BUILD_COLUMNS) + " |" for row in _build_rows(records)]
    pairs = {}
    for b in records:
        pairs.setdefault((b["recipe"], b["quant"], b["dtype"]), {})[b["mode"]] = b
    ratios = [(key, p["regional"], p["whole"]) for key, p in pairs.items() if {"regional", "whole"} <= set(p)]
    if ratios:
        lines += ["", "| recipe | quant | compile regional / whole | total regional / whole | .pt2 regional / whole |",
                  "|---|---|---|---|---|"]
        for (recipe, quant, _), reg, whole in ratios:
            lines.append(f"| {recipe} | {quant} | {_ratio(reg['compile_s'], whole['compile_s'])} | "
                         f"{_ratio(reg['total_s'], whole['total_s'])} | {_ratio(reg['pt2_bytes'], whole['pt2_bytes'])} |")
    return lines


def write_builds(out: Path, records: list[dict], info: dict) -> None:
    """builds.md, builds.csv and builds.json in ``out``: the build table. Rows already in builds.json for
    other (recipe, scheme, dtype, mode) and the same platform are kept: several runs gather one table."""
    key = lambda b: (b["recipe"], b["quant"], b["dtype"], b["mode"])  # noqa: E731
    merged: dict[tuple, dict] = {}
    try:
        old = json.loads((out / "builds.json").read_text())
        if old.get("machine", {}).get("platform") == info["platform"]:
            merged = {key(b): b for b in old.get("builds", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    merged.update({key(b): b for b in records})
    records = sorted(merged.values(), key=lambda b: (b["recipe"], b["quant"], b["dtype"], b["mode"] != "whole"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=BUILD_COLUMNS)
    w.writeheader()
    w.writerows(_build_rows(records))
    (out / "builds.csv").write_text(buf.getvalue())
    lines = ["# aotpack builds", "", _machine_line(info), "", _BUILD_NOTE, ""] + _build_table(records)
    (out / "builds.md").write_text("\n".join(lines) + "\n")
    (out / "builds.json").write_text(json.dumps({"machine": info, "builds": records}, indent=2) + "\n")


def print_plan(out: Path, name: str, quants: list[str], variants: tuple, wanted: dict, path_of: Callable,
               images: int) -> None:
    """The bench's plan on stderr before anything runs: the runs, the builds missing, and an estimate from an
    earlier run in ``out`` (its cold starts and images), where there is one."""
    missing = [f"{q}{' regional' if r else ''}" for q in quants for r in wanted.values()
               if not (path_of(q, r) / "manifest.json").is_file()]
    runs = len(quants) * len(variants)
    print(f"bench {name}: {len(quants)} scheme(s) ({', '.join(quants)}) x {len(variants)} variants "
          f"({', '.join(variants)}) = {runs} runs, each in a fresh process, {images} image(s) after the first; "
          f"then 2 loads per artifact; builds first: {', '.join(missing) or 'none (all exist)'}", file=sys.stderr)
    try:
        earlier = json.loads((out / "results.json").read_text())["rows"]
        seconds = sum(r["cold_start_s"] + (1 + images) * r["image_s"] for r in earlier
                      if r.get("quant") in quants and r.get("variant") in variants)
        print(f"  estimate from the last run in {out}: about {seconds / 60:.0f} min of runs, plus builds",
              file=sys.stderr)
    except (OSError, ValueError, KeyError, TypeError):
        print("  no earlier run in this folder to estimate the time from", file=sys.stderr)


def _target(ratio: str, limit: float) -> str:
    """A ratio cell marked against its target: '0.21 met', '1.31 missed' ('n/a' stays)."""
    try:
        return f"{ratio} {'met' if float(ratio) <= limit else 'missed'}"
    except ValueError:
        return ratio


def write_results(out: Path, recipe, rows: list[dict], loads: dict, builds: dict, info: dict, common: dict, *,
                  artifacts: list[dict] = ()) -> None:
    """results.md/.csv/.json/.png. ``loads`` and ``builds`` (seconds of builds run here) are keyed by artifact
    label (the scheme; 'SCHEME regional' for a regional one); ``artifacts``: their ``build_record``s."""
    records = _records(recipe, rows, common)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(records)
    (out / "results.csv").write_text(buf.getvalue())
    lines = [f"# aotpack bench: {recipe.full_name}", "", _machine_line(info),
             f"Workload: {recipe.pipeline} at {common['height']}x{common['width']}, {common['steps']} steps, "
             f"batch {common['batch']}, {common['dtype']}; each variant in a fresh process with the checkpoint and "
             f"artifact evicted from the page cache and an empty inductor cache.", "",
             "memory in GiB (RSS on CPU: model_memory when ready to serve, inference_memory the peak; "
             "max_memory_allocated on GPU), time = seconds per image (steady), cold_start = process start to the "
             "first transformer output, first_image = process start to the first image, forward = seconds per "
             "transformer forward (steady, median), weights in MiB; for the artifacts (aotpack, aotpack-regional: "
             "one compiled module per block class, every block instance runs it with its own weights) "
             "build_export, build_compile and build_total (every stage) in seconds from the manifest, "
             "pt2 = the compiled code in MiB.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for rec in records:
        lines.append("| " + " | ".join(str(rec[c]) for c in COLUMNS) + " |")
    lines += ["", "## Targets", "", "Each ratio is marked met or missed against its target.", "",
              "| scheme | cold start aotpack / compile+cache (<= 0.25) | forward aotpack / compile "
              "(<= 1.0) | RSS after load and one forward / weights (<= 1.15) | load / read floor (<= 2): "
              "first, later | forward regional / whole (<= 1.02) | cold start regional / whole |",
              "|---|---|---|---|---|---|---|"]
    by = {(r["quant"], r["variant"]): r for r in rows}
    for quant in dict.fromkeys(r["quant"] for r in rows):
        a, c, cc = by.get((quant, "aotpack")), by.get((quant, "compile")), by.get((quant, "compile+cache"))
        reg, ld = by.get((quant, REGIONAL)), loads.get(quant)
        rss = _target(_ratio(ld["rss_after_forward"], ld["weights_bytes"]), 1.15) if ld else "n/a"
        load = (f"{_target(_ratio(ld['first_load_s'], ld['read_s']), 2)}, "
                f"{_target(_ratio(ld['load_s'], ld['read_s']), 2)}") if ld else "n/a"
        lines.append(
            f"| {quant} | {_target(_ratio(a and a['cold_start_s'], cc and cc['cold_start_s']), 0.25)} | "
            f"{_target(_ratio(a and a['forward_s'], c and c['forward_s']), 1.0)} | {rss} | {load} | "
            f"{_target(_ratio(reg and reg['forward_s'], a and a['forward_s']), 1.02)} | "
            f"{_ratio(reg and reg['cold_start_s'], a and a['cold_start_s'])} |")
    lines += ["", "## Artifact load", "", "Each figure in a fresh process with a cold page cache (torch, diffusers "
              "and safetensors imported: a serving process has them). A first load hashes every byte; later "
              "loads of the same files skip the hash (file identity remembered, see README) and map the "
              "weights lazily, so their bytes are read by the first forward.", "",
              "| artifact | artifact MiB | read s (cold, floor) | first aotpack.load s | later aotpack.load s | "
              "RSS added by load MiB | RSS after one forward MiB | build s |", "|---|---|---|---|---|---|---|---|"]
    for label, ld in loads.items():
        built = f"{builds[label]:.1f}" if label in builds else "(existed)"
        lines.append(f"| {label} | {ld['artifact_bytes'] / 2**20:.1f} | {ld['read_s']:.2f} | "
                     f"{ld['first_load_s']:.2f} | {ld['load_s']:.2f} | "
                     f"{ld['rss_added_by_load'] / 2**20:.0f} | {ld['rss_after_forward'] / 2**20:.0f} | {built} |")
    if artifacts:
        lines += ["", "## Builds", "", _BUILD_NOTE, ""] + _build_table(list(artifacts))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": info, "workload": common, "rows": rows,
                                                   "loads": loads, "builds": builds,
                                                   "artifacts": list(artifacts)}, indent=2) + "\n")
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
        shown = [v for v in SHOWN if any(r["variant"] == v for r in records)]
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
