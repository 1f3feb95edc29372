"""``BuildSpec``: everything a build needs, resolved once from the CLI/API arguments and the recipe.

Every check that needs no model runs here, before anything heavy: an unknown recipe, scheme, dtype or
variant, a scheme this machine cannot run, a LoRA or plan file that cannot be used, an output folder that
must not be replaced, a signing key that cannot sign, a cache that cannot be written.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from aotpack.artifact import manifest as mf
from aotpack.artifact.files import check_output, verify_files
from aotpack.artifact.manifest import Options
from aotpack.artifact.platform import Platform, compute_dtype, default_device, describe, slow_scheme, tag
from aotpack.builder.compile import Reusable
from aotpack.builder.plan import DEFAULT_BUDGET, read_plan
from aotpack.builder.recipe import _COMMIT, DTYPES, Recipe, get_recipe, is_local_checkpoint
from aotpack.builder.schemes import check_freeze, check_max_autotune, check_scheme, freezes_by_default
from aotpack.builder.source import Source, resolve_source
from aotpack.errors import RecipeError
from aotpack.paths import check_cache_writable

log = logging.getLogger("aotpack")


@dataclasses.dataclass(frozen=True)
class LoraRequest:
    path: Path
    scale: float


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    recipe: Recipe
    quant: str                      # a scheme name, or "auto"
    plan: dict | None               # a checked --plan file (implies quant "auto")
    error_budget: float
    dtype: str
    platform: Platform              # the machine the build runs on and compiles for
    source: Source
    out: Path
    overwrite: bool
    options: Options
    lora: LoraRequest | None = None
    reuse: dict[str, Reusable] = dataclasses.field(default_factory=dict)
    sign_key: Path | None = None

    @property
    def device(self) -> str:
        return self.platform.device


def default_out(recipe_name: str, quant: str, platform_tag: str, artifacts_dir: str | os.PathLike = "artifacts",
                regional: bool = False, *, options: Options | None = None, dtype: str | None = None,
                default_dtype: str | None = None, lora: LoraRequest | None = None) -> Path:
    """artifacts/<recipe>-<scheme>-<platform>[-regional], then whatever else changes the artifact, named as in
    its Hub build name (``aotpack.hub.name_of``): the other options, a dtype that is not the recipe's
    (``default_dtype``), the LoRA fused in (8 hex of its sha256, its scale unless 1). Builds that differ never
    share a default folder (a --lora build after a plain one is a new folder, not "already exists")."""
    from aotpack.artifact.files import sha256_file
    from aotpack.hub import name_of

    chosen = {k: v for k, v in dataclasses.asdict(options).items() if k != "regional"} if options else {}
    extra = name_of("", chosen, lora is not None, "", dtype=dtype, default_dtype=default_dtype,
                    lora_sha256=sha256_file(lora.path) if lora else None, lora_scale=lora.scale if lora else 1.0)
    return Path(artifacts_dir) / (f"{recipe_name}-{quant}-{platform_tag}" + ("-regional" if regional else "")
                                  + extra.rstrip("-"))


def resolve(
    recipe: "str | os.PathLike | Recipe",
    quant: str | None = None,
    *,
    out: str | os.PathLike | None = None,
    model: str | None = None,
    dtype: str | None = None,
    variant: str | None = None,
    overwrite: bool = False,
    artifacts_dir: str | os.PathLike = "artifacts",
    device: str | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    fuse_qkv: bool = False,
    quantize_text_encoder: str | None = None,
    quantize_vae: str | None = None,
    compile_vae: bool = False,
    plan: str | os.PathLike | None = None,
    error_budget: float | None = None,
    reuse: str | os.PathLike | None = None,
    max_autotune: bool = False,
    freeze: bool | None = None,
    regional: bool | None = None,
    sign_key: str | os.PathLike | None = None,
    component: str | None = None,
    blocks: tuple[str, ...] | list[str] | None = None,
    max_size: int | None = None,
    max_frames: int | None = None,
    max_batch: int | None = None,
    revision: str | None = None,
) -> BuildSpec:
    """Resolve and check a build request; see :func:`aotpack.builder.pipeline.build` for the arguments.

    One function on purpose (~70 lines): the checks read top to bottom in the order they run, cheapest first,
    each raising its own one-line error before any model is loaded (a model folder or Hub id as ``recipe``
    is the exception: its recipe is derived from real pipeline calls first, see ``aotpack.builder.derive``)."""
    here = describe(device or default_device())
    derive_opts = {k: v for k, v in dict(component=component, blocks=tuple(blocks or ()), max_size=max_size,
                                         max_frames=max_frames, max_batch=max_batch, revision=revision).items()
                   if v not in (None, ())}
    r = recipe_for(recipe, variant, model, derive_opts, here.device)
    model = model or _recipe_model(r)
    quant, plan_data = _scheme(quant, plan, error_budget, r, here)
    dtype = build_dtype(_plan_dtype(plan_data, dtype) or dtype or r.dtype, here, quant)
    for what, side in (("--quantize-text-encoder", quantize_text_encoder), ("--quantize-vae", quantize_vae)):
        if side is not None:
            try:
                check_scheme(side, here.device, here.capability)
            except Exception as e:
                raise type(e)(f"{what}: {e.cause}", e.hint) from None
    lora_request = _check_lora(lora, lora_scale) if lora is not None else None
    if compile_vae and r.is_video:
        raise RecipeError(f"--compile-vae is not available for {r.full_name}: the video VAE decodes frames in a "
                          "Python loop that export fixes to one frame count",
                          "leave --compile-vae out (the VAE then runs eager)")
    if max_autotune:
        check_max_autotune(here.device)
    regional = r.regional if regional is None else regional
    if freeze is None:  # the recipe's default holds only where freezing can (an explicit --freeze is checked)
        freeze = freezes_by_default(r, here.device, quant, lora=lora_request is not None,
                                    compile_vae=bool(compile_vae), reuse=reuse is not None)
    if freeze:
        check_freeze(here.device, lora_request is not None, quant=quant,
                     compile_vae=bool(compile_vae), reuse=reuse is not None)
    options = Options(fuse_qkv=bool(fuse_qkv), quantize_text_encoder=quantize_text_encoder,
                      quantize_vae=quantize_vae, compile_vae=bool(compile_vae), max_autotune=bool(max_autotune),
                      regional=bool(regional), freeze=bool(freeze))
    key = _check_sign_key(Path(sign_key)) if sign_key is not None else None
    reusable = reusable_code(Path(reuse)) if reuse is not None else {}
    check_cache_writable()
    source = resolve_source(r, model, here.device)
    final = Path(out) if out else default_out(r.full_name, quant, tag(here), artifacts_dir, regional,
                                              options=options, dtype=dtype, default_dtype=r.dtype,
                                              lora=lora_request)
    check_output(final.absolute(), overwrite=overwrite)
    return BuildSpec(recipe=r, quant=quant, plan=plan_data, error_budget=DEFAULT_BUDGET if error_budget is None
                     else error_budget, dtype=dtype, platform=here, source=source, out=final, overwrite=overwrite,
                     options=options, lora=lora_request, reuse=reusable, sign_key=key)


def _scheme(quant: str | None, plan: str | os.PathLike | None, error_budget: float | None, r: Recipe,
            here: Platform) -> tuple[str, dict | None]:
    """The scheme (``auto`` with a --plan) and the checked plan, or a one-line error."""
    if plan is not None:
        if quant not in (None, "auto"):
            raise RecipeError(f"--plan and --quant {quant} contradict each other", "leave --quant out with --plan")
        quant = "auto"
    if quant is None:
        quant, why = r.default_for(here.device, here.cpu_flags)
        if why:
            log.info("--quant %s: %s", quant, why)
    if slow := slow_scheme(here.device, here.cpu_flags, quant):  # asked for, or the recipe's only default
        log.warning("--quant %s: %s; --quant none runs faster here, --quant int8wo keeps int8 weights", quant, slow)
    if quant != "auto":
        check_scheme(quant, here.device, here.capability)
        return quant, None
    plan_data = read_plan(plan, here.device, here.capability) if plan is not None else None
    if error_budget is not None and not 0 <= error_budget < 1:
        raise RecipeError(f"--error-budget {error_budget} must be in [0, 1)", "e.g. --error-budget 0.05")
    return quant, plan_data


def build_dtype(dtype: str, here: Platform, scheme: str | None = None) -> str:
    """The dtype a build runs in: ``auto`` (``--dtype auto``, or a recipe's ``dtype = "auto"``) is what this machine
    computes fastest for ``scheme`` (``aotpack.artifact.platform.compute_dtype``: bf16 where it has bf16 matrix
    units, fp32 on a CPU without them and for int8 matmuls on CPU); any other name is checked."""
    if dtype == "auto":
        chosen, why = compute_dtype(here, scheme)
        log.info("dtype auto: %s (%s)", chosen, why)
        return chosen
    if dtype not in DTYPES:
        raise RecipeError(f"unknown dtype '{dtype}'", f"choose one of: {', '.join(DTYPES)}, auto")
    return dtype


def _plan_dtype(plan: dict | None, asked: str | None) -> str | None:
    """The dtype a --plan was measured in (its errors and timings hold for that dtype only); a --dtype that
    contradicts it is refused. None for a plan made before plans recorded their dtype."""
    made_in = (plan or {}).get("dtype")
    if made_in and asked and asked != made_in:
        raise RecipeError(f"the plan was measured in {made_in}, not --dtype {asked}",
                          f"leave --dtype out (the build runs in {made_in}), or make a plan in {asked} (--quant auto)")
    return made_in


def recipe_for(recipe: "str | os.PathLike | Recipe", variant: str | None, model: str | None, opts: dict,
               device: str) -> Recipe:
    """The build's recipe: a shipped recipe, a recipe file, a ``Recipe``, or one derived from a model folder or
    Hub id (``opts``: component, blocks, max_size, max_frames, max_batch, revision)."""
    from aotpack.builder.derive import Options, derive, is_pipeline_source
    from aotpack.builder.recipe import parse_recipe

    if isinstance(recipe, Recipe) or not is_pipeline_source(os.fspath(recipe)):
        if opts:
            flags = ", ".join("--" + k.replace("_", "-") for k in opts)
            raise RecipeError(f"{flags}: only for a model folder or Hub id as the source",
                              "edit the recipe instead, or pass the model folder / repo id as the source")
        return get_recipe(recipe, variant)
    source = os.fspath(recipe)
    if variant is not None:
        raise RecipeError(f"--variant {variant} given with a model source ({source}): variants belong to recipes",
                          "leave --variant out")
    if model:
        raise RecipeError(f"--model {model} given with a model source ({source})",
                          "pass the model once: as the source, or as --model beside a recipe")
    for key in ("max_size", "max_frames", "max_batch"):
        if key in opts and not (type(opts[key]) is int and opts[key] > 0):
            raise RecipeError(f"--{key.replace('_', '-')} must be a positive integer", "e.g. --max-size 1024")
    data = derive(source, Options(**opts), device=device)
    return parse_recipe(data, source=f"the recipe derived from {source}", pinned=False)


def _recipe_model(r: Recipe) -> str | None:
    """The folder a recipe file names as its checkpoint (built like --model); refuses a Hub checkpoint read
    without a pinned commit (a recipe file may leave its revision out when it is built from --model)."""
    if is_local_checkpoint(r.checkpoint):
        return r.checkpoint
    if not r.builtin and not _COMMIT.match(str(r.revision)):
        raise RecipeError(f"recipe {r.full_name} reads {r.checkpoint} from the Hub without a pinned revision "
                          f"(got {r.revision!r}; a branch or tag can move)",
                          "set revision to a 40-hex commit in the recipe, or pass --model with a local folder")
    return None


def _check_lora(path: str | os.PathLike, scale: float) -> LoraRequest:
    from aotpack.builder.weights import lora_file, lora_scale

    scale = lora_scale(scale)  # finite, |scale| <= 100: a NaN or 1e30 scale makes every output NaN
    return LoraRequest(lora_file(path), scale)


def _check_sign_key(path: Path) -> Path:
    from aotpack import signing

    signing.load_private_key(path)  # bounded: a regular file of at most 64 KiB holding one PEM key
    return path


def reusable_code(folder: Path) -> dict[str, Reusable]:
    """{compile key: .pt2} of the artifact ``folder`` (every file checked now; each .pt2 is hashed again as it
    is copied, against the manifest read now, so a swap in between is caught). Its code runs in this build (and
    is signed with it): with ``AOTPACK_TRUSTED_KEYS`` set, it must be signed by one of those keys."""
    from aotpack import signing
    from aotpack.signing import check_signature, trusted_keys_from_env

    data = mf.read_bytes(folder)
    manifest = mf.parse(data)
    keys = trusted_keys_from_env()
    if keys:
        check_signature(signing.read_signature(folder), data, manifest, keys, folder)
    verify_files(folder, manifest.files)
    found = {m.compile_key: Reusable(folder, m.code, manifest.files[m.code]) for m in manifest.modules if m.compile_key}
    if not found:
        raise RecipeError(f"{folder} records no compile key (built by an older aotpack)", "build without --reuse")
    return found
