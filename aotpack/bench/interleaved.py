"""Steady transformer forwards of artifacts and of torch.compile on the same model, interleaved in ONE process.

The bench's variants each run in their own fresh process, minutes apart, and a small box drifts by ~10 % over
minutes; here every variant runs once per round, in rotating order, so their ratios share the drift. The inputs
are the transformer's own arguments in a one-step pipeline call at the first artifact's recipe run size
(captured by a hook); the torch.compile rows quantize the checkpoint with that artifact's scheme, in its dtype, as
the bench's rows do (default, and with inductor's freezing)."""

from __future__ import annotations

import time
from typing import Any, Callable

COMPILE_ROWS = (("compile", False), ("compile+freezing", True))  # (variant, inductor freezing)


def captured_kwargs(pipe: Any, recipe: Any) -> dict[str, Any]:
    """The transformer's keyword arguments in its first call of a one-step pipeline call at the run size."""
    import torch

    seen: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
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
    import torch

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
        runs["aotpack-regional" if module.manifest.options.regional else "aotpack"] = \
            (lambda m: lambda: m(**kwargs))(module)
    if compile_rows:
        # quantized as the bench's own rows are (an auto artifact: by its per-layer plan)
        _quantize(pipe.transformer, {"quant": manifest.scheme.name, "artifact": paths[0]})
        for name, freezing in COMPILE_ROWS:
            # dynamo would reuse the first compiled graph on the next torch.compile of the module, and inductor
            # reads `freezing` from its global config, not torch.compile's options (measured: the same code either
            # way, no oneDNN-packed weight): a reset, and the global flag while it compiles (an earlier compile
            # recompiles at its next call, with the flag it had: off). One model for both: freezing folds copies
            # of the weights into its code and leaves the module's own as they are
            torch._dynamo.reset()
            torch._inductor.config.freezing = freezing
            try:
                compiled = torch.compile(pipe.transformer)
                with torch.no_grad():
                    compiled(**kwargs)
            finally:
                torch._inductor.config.freezing = False
            runs[name] = (lambda f: lambda: f(**kwargs))(compiled)
    return runs, manifest


def interleaved(paths: list[str], *, compile_rows: bool = True, rounds: int = 15) -> dict[str, Any]:
    """{"what": model scheme dtype, "rounds": N, "rows": [{"variant", "median_s", "min_s"}]} of the artifacts at
    ``paths`` (the first one's model) and, with ``compile_rows``, torch.compile of it."""
    import torch

    runs, manifest = _runs([str(p) for p in paths], compile_rows)
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for f in runs.values():  # first calls, page faults
            f(), f()
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:
                t = time.perf_counter()
                runs[n]()
                times[n].append(time.perf_counter() - t)
    rows = [{"variant": n, "median_s": sorted(v)[len(v) // 2], "min_s": min(v)} for n, v in times.items()]
    return {"what": f"{manifest.recipe.name} {manifest.scheme.name} {manifest.dtype}", "rounds": rounds,
            "threads": torch.get_num_threads(), "rows": rows}
