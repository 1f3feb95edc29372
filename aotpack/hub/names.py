"""Build names: the folder of a build inside a repo (``builds/<name>/``), from its scheme, options, dtype,
LoRA, recipe variant and platform, so that builds that differ in anything that changes the artifact sit side
by side."""

from __future__ import annotations

from typing import Any

from aotpack.artifact.platform import tag
from aotpack.errors import AotpackError
from aotpack.hub.client import _json


# Short names of build options in build names; an option not listed here is named by its key.
_OPTION_NAMES = {"fuse_qkv": "qkv", "compile_vae": "cvae", "quantize_text_encoder": "qte", "quantize_vae": "qvae",
                 "max_autotune": "tuned", "regional": "regional", "freeze": "frozen"}


def build_name(data: Any) -> str:
    """Folder of a build inside the repo (see ``name_of``), from its manifest. The dtype is named where it is
    not the recipe's own (as the recipes this aotpack ships say; a recipe it does not ship always names it)."""
    from aotpack.builder.recipe import get_recipe

    data = _json(data)
    recipe, lora = data.get("recipe") or {}, data.get("lora") or None
    try:
        default_dtype = get_recipe(recipe["name"], recipe.get("variant")).dtype
    except (AotpackError, KeyError, TypeError):
        default_dtype = None
    return name_of(data["scheme"]["name"], data.get("options") or {}, bool(lora), tag(data["platform"]),
                   dtype=data.get("dtype"), default_dtype=default_dtype, variant=recipe.get("variant"),
                   lora_sha256=lora.get("sha256") if lora else None,
                   lora_scale=lora.get("scale", 1.0) if lora else 1.0)


def name_of(scheme: str, options: dict, lora: bool, platform_tag: str, *, dtype: str | None = None,
            default_dtype: str | None = None, lora_sha256: str | None = None, lora_scale: float = 1.0,
            variant: str | None = None) -> str:
    """'int8wo-cpu-x86_64-avx2' for a default build; 'int8wo-qkv-cuda-sm90' with --fuse-qkv,
    'none-qte_int8wo-cpu-x86_64-avx2' with --quantize-text-encoder int8wo, 'int8wo-bf16-...' with a dtype
    that is not ``default_dtype`` (the recipe's), 'int8wo-lora_1a2b3c4d-...' with a LoRA fused in (the first
    8 hex of its sha256; '_x0.5' for a scale other than 1), 'int8wo-schnell-...' for a recipe variant: builds
    that differ in anything that changes the artifact are different builds, and one repo keeps them side by
    side instead of replacing one by the other. Left out (a plan made before the build), a part is not named."""
    parts = [scheme] + ([variant] if variant else [])
    for key, value in sorted(options.items()):
        short = _OPTION_NAMES.get(key, key.replace("_", ""))
        if value is True:
            parts.append(short)
        elif isinstance(value, str) and value:
            parts.append(f"{short}_{value}")
    if dtype and dtype != default_dtype:
        parts.append({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype))
    if lora:
        scale = "" if lora_scale == 1 else "_x" + format(float(lora_scale), "g").replace("+", "")
        parts.append(f"lora_{lora_sha256[:8]}{scale}" if lora_sha256 else "lora" + scale)
    return "-".join(parts + [platform_tag])
