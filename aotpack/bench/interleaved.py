"""Steady transformer forwards of artifacts and of torch.compile on the same model, interleaved in ONE process.

The bench's variants each run in their own fresh process, minutes apart, and a small box drifts by ~10 % over
minutes; here every variant runs once per round, in rotating order, so their ratios share the drift. The inputs
are the transformer's own arguments in a one-step pipeline call at the first artifact's recipe run size
(captured by a hook); the torch.compile rows quantize the checkpoint with that artifact's scheme, in its dtype, as
the bench's rows do (default, and with inductor's freezing)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

COMPILE_ROWS = (("compile", "default"), ("compile+freezing", "freezing"))  # (variant, mode of _compiled)


def captured_kwargs(pipe: Any, recipe: Any) -> dict[str, Any]:
    """The component's keyword arguments in its first call of a one-step pipeline call at the run size."""
    import torch

    seen: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = getattr(pipe, recipe.component).register_forward_pre_hook(hook, with_kwargs=True)
    kwargs = recipe.pipeline_kwargs(height=recipe.run["height"], width=recipe.run["width"], steps=1,
                                    guidance_scale=recipe.run.get("guidance_scale", 3.5),
                                    frames=recipe.run.get("frames") if recipe.is_video else None)
    try:
        with torch.no_grad():
            pipe(prompt="a dog surfing on the moon", **kwargs, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(0))
    finally:
        handle.remove()
    return {**seen, "return_dict": False}


def _runs(paths: list[str], compile_rows: bool) -> tuple[dict[str, Callable[[], Any]], Any]:
    import aotpack
    from aotpack.bench.variants import _quantize
    from aotpack.builder.recipe import recipe_of
    from aotpack.builder.source import load_pipeline, source_of

    manifest = aotpack.inspect(paths[0])
    recipe = recipe_of(manifest.recipe)
    pipe = load_pipeline(recipe, source_of(manifest.model), dtype=manifest.dtype)
    pipe.set_progress_bar_config(disable=True)
    kwargs = captured_kwargs(pipe, recipe)
    runs: dict[str, Callable[[], Any]] = {}
    for path in paths:  # the keys AOTPACK_TRUSTED_KEYS asks for, as any load: a bench is no way around them
        module = aotpack.load(path)
        name = "aotpack-regional" if module.manifest.options.regional else "aotpack"
        if module.manifest.dtype != manifest.dtype:  # another dtype of the same model: its inputs cast once
            name += f"-{module.manifest.dtype}"
        if module.manifest.scheme.name != manifest.scheme.name:
            name += f"-{module.manifest.scheme.name}"
        if name in runs:  # two builds alike (say one before a change, one after): told apart by their folders
            name += f" ({Path(path).name})"
        runs[name] = (lambda m, kw: lambda: m(**kw))(module, _cast(kwargs, module.manifest))
    if compile_rows:
        # quantized as the bench's own rows are (an auto artifact: by its per-layer plan)
        _quantize(getattr(pipe, recipe.component), {"quant": manifest.scheme.name, "artifact": paths[0]})
        for name, mode in COMPILE_ROWS:  # one model, a graph per mode (see _compiled)
            runs[name] = _compiled(getattr(pipe, recipe.component), kwargs, mode)
    return runs, manifest


def _cast(kwargs: dict[str, Any], manifest: Any) -> dict[str, Any]:
    """``kwargs`` with each floating-point tensor in the dtype the artifact takes it in (its exported input's, else
    the artifact's dtype: a regional model's own forward takes those)."""
    import torch

    want = {t.name: t.dtype for m in manifest.modules if m.kind != "block" for t in m.inputs.tensors}
    return {k: v.to(getattr(torch, want.get(k, manifest.dtype)))
            if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}


def _rounds(runs: dict[str, Callable[[], Any]], rounds: int, prune: float | None = None,
            keep: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{name: {"median_s", "min_s"}} of every run, each once per round in rotating order (after first calls: page
    faults, lazy setup). ``prune``: a run (other than those in ``keep``) whose faster of two timed first calls took
    over ``prune`` x the fastest run's joins no round; its entry is that call, with "pruned": True (int8 matmuls on
    a CPU without int8 units run ~25x slower: ten rounds of them would be most of a matrix's hour, to show what one
    call shows)."""
    import torch

    names = list(runs)
    first: dict[str, float] = {}
    with torch.no_grad():
        for n, f in runs.items():
            f()
            if prune is None:
                f()
                continue
            for _ in range(2):
                t = time.perf_counter()
                f()
                first[n] = min(first.get(n, float("inf")), time.perf_counter() - t)
    fastest = min(first.values(), default=0.0)
    cut = {n: t for n, t in first.items() if prune is not None and n not in keep and t > prune * fastest}
    names = [n for n in names if n not in cut]
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:
                t = time.perf_counter()
                runs[n]()
                times[n].append(time.perf_counter() - t)
    done: dict[str, dict[str, Any]] = {n: {"median_s": sorted(v)[len(v) // 2], "min_s": min(v)}
                                       for n, v in times.items()}
    return done | {n: {"median_s": t, "min_s": t, "pruned": True} for n, t in cut.items()}


def interleaved(paths: list[str], *, compile_rows: bool = True, rounds: int = 15) -> dict[str, Any]:
    """{"what": model scheme dtype, "rounds": N, "rows": [{"variant", "median_s", "min_s"}]} of the artifacts at
    ``paths`` (the first one's model) and, with ``compile_rows``, torch.compile of it."""
    import torch

    runs, manifest = _runs([str(p) for p in paths], compile_rows)
    rows = [{"variant": n, **t} for n, t in _rounds(runs, rounds).items()]
    return {"what": f"{manifest.recipe.name} {manifest.scheme.name} {manifest.dtype}", "rounds": rounds,
            "threads": torch.get_num_threads(), "rows": rows}


MATRIX_DTYPES = ("float32", "bfloat16")
MATRIX_SCHEMES = ("none", "int8dq", "int8wo")
MATRIX_MODES = ("default", "freezing")      # with max_autotune also "max-autotune+freezing"
PRUNE = 3.0   # a matrix row over this many times the fastest row's first timed call runs no rounds (see _rounds)


def _compiled(transformer: Any, kwargs: dict[str, Any], mode: str) -> Callable[[], Any]:
    """torch.compile of ``transformer`` in ``mode``, compiled by a first call. Each mode gets its own inductor
    options, so dynamo keeps one compiled graph per mode of one module (a second torch.compile of the same module
    class with equal options reuses the first graph), and the global freezing flag set while it compiles (inductor
    reads that one, not the options: measured, the same code either way without it, no oneDNN-packed weight). A
    dynamo reset between the modes instead, as the interleaved worker once did, left fp32 int8dq's plain row running
    at the frozen row's speed (0.344 s against 0.150-0.160)."""
    import torch

    freezing = mode != "default"
    options = {"freezing": freezing, **({"max_autotune": True} if mode.startswith("max-autotune") else {})}
    torch._inductor.config.freezing = freezing
    try:
        compiled = torch.compile(transformer, options=options)
        with torch.no_grad():
            compiled(**kwargs)
    finally:
        torch._inductor.config.freezing = False
    return lambda: compiled(**kwargs)


def matrix(path: str, *, rounds: int = 10, max_autotune: bool = False, dtypes: tuple = MATRIX_DTYPES,
           schemes: tuple = MATRIX_SCHEMES, modes: tuple | None = None, others: tuple = ()) -> dict[str, Any]:
    """The artifact at ``path`` (a box's default: its recipe's scheme in the dtype ``auto`` chose) against
    torch.compile of its checkpoint in every dtype x scheme x mode, interleaved in one process: is the default
    at least as fast as the fastest way torch.compile runs this model here, and as the fastest that is as accurate?
    Every row runs on one set of inputs (the transformer's arguments in a float32 pipeline call, cast to the row's
    dtype) and its forward error is measured against the float32 eager model, unquantized, on them. A variant that
    fails to compile is a row with its error. ``others``: more artifacts of the same model, rows of mode "artifact"
    (the bench adds its other frozen builds). Returns {"what", "rounds", "threads", "rows": [{"variant", "dtype",
    "scheme", "mode", "median_s", "min_s", "error"} or {..., "fails"}]}."""
    import torch

    import aotpack
    from aotpack.bench.variants import _quantize
    from aotpack.builder.recipe import recipe_of
    from aotpack.builder.source import load_pipeline, source_of
    from aotpack.errors import one_line

    modes = modes or MATRIX_MODES + (("max-autotune+freezing",) if max_autotune else ())
    manifest = aotpack.inspect(path)
    if manifest.dtype not in dtypes:
        raise ValueError(f"the artifact's dtype {manifest.dtype} is not among {dtypes}")
    recipe = recipe_of(manifest.recipe)
    kwargs, reference = _reference(recipe, source_of(manifest.model))
    module = aotpack.load(path)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(modes) * len(schemes))
    runs: dict[str, Callable[[], Any]] = {"aotpack": (lambda kw: lambda: module(**kw))(_cast(kwargs, manifest))}
    rows: list[dict[str, Any]] = [{"variant": "aotpack", "dtype": manifest.dtype, "scheme": manifest.scheme.name,
                                   "mode": "artifact"}]
    rows += [_other(path, kwargs, runs) for path in others]
    for dtype in dtypes:
        inputs = _in_dtype(kwargs, getattr(torch, dtype))
        for scheme in schemes:
            fresh = load_pipeline(recipe, source_of(manifest.model), dtype=dtype)
            transformer = getattr(fresh, recipe.component).eval()
            _quantize(transformer, {"quant": scheme, "artifact": path})
            for mode in modes:
                name = f"compile {dtype} {scheme}" + ("" if mode == "default" else f" +{mode}")
                row = {"variant": name, "dtype": dtype, "scheme": scheme, "mode": mode}
                try:
                    runs[name] = _compiled(transformer, inputs, mode)
                except Exception as e:  # inductor's own failure (bf16 max-autotune on CPU): a row that says so
                    row["fails"] = one_line(f"{type(e).__name__}: {e}", 200)
                rows.append(row)
    with torch.no_grad():
        errors = {name: _error(run(), reference) for name, run in runs.items()}
    times = _rounds(runs, rounds, prune=PRUNE, keep=("aotpack",))  # the default: every ratio is to it
    for row in rows:
        row.update(times.get(row["variant"], {}))
        if row["variant"] in errors:
            row["error"] = errors[row["variant"]]
    return {"what": f"{manifest.recipe.name} {manifest.scheme.name} {manifest.dtype}", "rounds": rounds,
            "threads": torch.get_num_threads(), "rows": rows}


def _other(path: str, kwargs: dict[str, Any], runs: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """The matrix's row of another artifact of the model (its run into ``runs``); a row that says why when it
    does not load, as for a variant that fails to compile."""
    import aotpack
    from aotpack.errors import one_line

    m = aotpack.inspect(path)
    name = f"aotpack {m.dtype} {m.scheme.name}" + (" --freeze" if m.options.freeze else "")
    row = {"variant": name, "dtype": m.dtype, "scheme": m.scheme.name, "mode": "artifact"}
    try:
        runs[name] = (lambda mod, kw: lambda: mod(**kw))(aotpack.load(path), _cast(kwargs, m))
    except Exception as e:  # noqa: BLE001
        row["fails"] = one_line(f"{type(e).__name__}: {e}", 200)
    return row


def _reference(recipe: Any, source: Any) -> tuple[dict[str, Any], Any]:
    """The transformer's arguments in a float32 pipeline call, and the float32 eager model's output on them."""
    import torch

    from aotpack.builder.source import load_pipeline

    pipe = load_pipeline(recipe, source, dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    kwargs = captured_kwargs(pipe, recipe)
    with torch.no_grad():
        reference = _first(getattr(pipe, recipe.component)(**kwargs)).float()
    return kwargs, reference


def _in_dtype(kwargs: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """``kwargs`` with every floating-point tensor in ``dtype``, as a pipeline of that dtype passes them."""
    return {k: v.to(dtype) if hasattr(v, "is_floating_point") and v.is_floating_point() else v
            for k, v in kwargs.items()}


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (list, tuple)) else out


def _error(out: Any, reference: Any) -> float:
    """The largest difference of a forward's output from the reference's, relative to the reference's largest."""
    return float((_first(out).float() - reference).abs().max() / reference.abs().max())
