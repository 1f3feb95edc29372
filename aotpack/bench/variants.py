"""What each bench row is: the variants' names, whether the model has repeated blocks (then a regional row), and
the setup of one variant in its worker process: the artifact's pipeline, or the checkpoint's pipeline quantized
as the artifact is (and torch.compiled for the compile rows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VARIANTS = ("eager", "compile", "compile+freezing", "compile+cache", "aotpack")
COMPILES = ("compile", "compile+freezing", "compile+cache")  # torch.compile rows: the aotpack forward's bar
REGIONAL = "aotpack-regional"                   # the regional artifact, run exactly as "aotpack"
GPU_VARIANTS = VARIANTS + ("aotpack+graphs",)   # CUDA graphs replay of the artifact (GPU only)
SHOWN = VARIANTS + (REGIONAL, "aotpack+graphs")  # the order of the plot's bars


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


def load_variant(args: dict, recipe: Any) -> tuple[Any, Any]:
    """The pipeline of ``args['variant']`` and its transformer, ready to serve: the artifact's (``aotpack*``),
    or the checkpoint's with the transformer quantized by ``args['quant']`` (and ``torch.compile``d: with
    inductor's freezing for ``compile+freezing``, from the portable cache ``args['cache_file']`` for
    ``compile+cache``)."""
    import torch

    from aotpack.builder.source import load_pipeline, resolve_source

    variant = args["variant"]
    if variant.startswith("aotpack"):
        from aotpack.serve.run import pipeline_for

        pipe, _ = pipeline_for(args["artifact"], **({"cuda_graphs": True} if variant == "aotpack+graphs" else {}))
        return pipe, getattr(pipe, recipe.component)
    source = resolve_source(recipe, args.get("model"), args["device"])
    pipe = load_pipeline(recipe, source, dtype=args["dtype"])
    pipe.to(args["device"])
    transformer = getattr(pipe, recipe.component)
    _quantize(transformer, args)
    if variant.startswith("compile"):
        if variant == "compile+cache":
            torch.compiler.load_cache_artifacts(Path(args["cache_file"]).read_bytes())
        if variant == "compile+freezing":  # weights folded in as constants (inductor freezes under no_grad,
            torch._inductor.config.freezing = True  # which a diffusers pipeline call is)
        mode = "max-autotune" if args.get("max_autotune") else None
        transformer = torch.compile(transformer, mode=mode)
        setattr(pipe, recipe.component, transformer)
    return pipe, transformer


def _quantize(transformer: Any, args: dict) -> None:
    """Quantize the eager ``transformer`` in place by ``args['quant']``; ``auto``: by the per-layer plan of the
    artifact ``args['artifact']`` (the whole-graph artifact of the same scheme)."""
    import torch

    from aotpack.builder.schemes import quantize_named

    if args["quant"] == "auto":  # the artifact's per-layer plan, applied to the eager model
        from aotpack.builder.plan import PLAN_FILE, linear_quantizer

        apply = linear_quantizer("auto", json.loads((Path(args["artifact"]) / PLAN_FILE).read_text()))
        for name, module in list(transformer.named_modules()):
            if isinstance(module, torch.nn.Linear):
                apply(name, module)
    else:
        quantize_named(transformer, args["quant"])
