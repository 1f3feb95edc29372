"""``aotpack build``: here, or on a Hugging Face Jobs machine with ``--on``; with the refusals made before torch is
imported."""

from __future__ import annotations

import click

from aotpack.cli.hub_commands import pushed_json
from aotpack.cli.output import echo_result, quiet_pipelines
from aotpack.errors import RecipeError
from aotpack.options import build_options, quiet_option


@click.command()
@quiet_option
@build_options
@click.pass_context
def build(ctx, recipe, quant, plan, error_budget, out, model, variant, dtype, overwrite, lora, lora_scale, fuse_qkv,
          quantize_text_encoder, quantize_vae, compile_vae, max_autotune, freeze, reuse, sign_key, regional,
          push_to, tag_name, on_flavor, install, as_json, **derive_kwargs) -> None:
    """Quantize, export and compile RECIPE into an artifact folder; prints its path.

    RECIPE is a shipped recipe's name (aotpack recipes), a recipe file (./my.toml), or a model source: a local
    diffusers pipeline folder or a Hub repo id, whose recipe is derived from real pipeline calls (see
    'aotpack recipe'; the --component/--blocks/--max-*/--revision options are for it).

    \b
    Examples:
      aotpack build tiny-flux --quant int8wo
      aotpack build tiny-flux --quant int8dq --out my-artifact --overwrite
      aotpack build flux --quant int8dq                       # real FLUX.1-dev: network + GPU
      aotpack build flux --variant schnell --quant int8wo
      aotpack build flux --model ./my-flux-dir --quant int8wo --dtype float32
      aotpack build tiny-cogvideox --quant int8wo
      aotpack build tiny-flux --lora my-style.safetensors --lora-scale 0.8 --fuse-qkv
      aotpack build flux-blocks --quant auto --error-budget 0.02
      aotpack build flux-blocks --plan artifacts/flux-blocks-auto-cpu-x86_64-avx512/plan.json --out again
      aotpack build tiny-flux --sign-key builder.pem
      aotpack build flux-depth --regional                     # 19 + 38 blocks, two block compiles
      aotpack build tiny-flux --quant int8wo --push me/tiny-flux-aot --tag v1
      aotpack build flux --quant int8dq --on h200 --push me/flux-aot --tag v1   # on Hugging Face Jobs
      aotpack build ./my-wan-pipeline --quant int8wo --max-size 480 --max-frames 33   # no recipe needed
      aotpack build ./wan.toml                                # the recipe 'aotpack recipe' wrote, edited
    """
    derive_kwargs = {k: v for k, v in derive_kwargs.items() if v not in (None, ())}
    if tag_name and not push_to:
        raise click.UsageError("--tag needs --push OWNER/NAME")
    if install and not on_flavor:
        raise click.UsageError("--install needs --on FLAVOR (it says what the job installs)")
    if on_flavor:
        _build_on_jobs(ctx, recipe, quant, plan, variant, derive_kwargs, flavor=on_flavor, push_to=push_to,
                       tag_name=tag_name, install=install, as_json=as_json)
        return
    _refuse_early(recipe, quant, variant, model, plan, max_autotune, derive_kwargs,
                  freeze={"lora": lora is not None, "compile_vae": compile_vae,
                          "reuse": reuse is not None} if freeze else None)
    if push_to:  # an offline box or a bad token fails now, not after the build
        from aotpack.hub import check_can_push

        check_can_push(push_to)
    quiet_pipelines()
    from aotpack.builder.pipeline import build as build_artifact

    path = build_artifact(recipe, quant, out=out, model=model, variant=variant, dtype=dtype, overwrite=overwrite,
                          lora=lora, lora_scale=lora_scale, fuse_qkv=fuse_qkv,
                          quantize_text_encoder=quantize_text_encoder, quantize_vae=quantize_vae,
                          compile_vae=compile_vae, plan=plan, error_budget=error_budget, reuse=reuse,
                          max_autotune=max_autotune, freeze=freeze, sign_key=sign_key, regional=regional,
                          **derive_kwargs)
    if not push_to:
        echo_result(as_json, {"path": str(path)}, str(path))
        return
    from aotpack.hub import push as push_build

    pushed = push_build(path, push_to, tag_name=tag_name)
    echo_result(as_json, {"path": str(path), **pushed_json(pushed)}, f"{path}\n{pushed.url}")


def _build_on_jobs(ctx: click.Context, recipe: str, quant: str | None, plan: str | None, variant: str | None,
                   derive_kwargs: dict, *, flavor: str, push_to: str | None, tag_name: str | None,
                   install: str | None, as_json: bool) -> None:
    """``build --on FLAVOR``: the build runs in a Hugging Face Job and lands in ``push_to``; prints where."""
    from aotpack.builder.derive import is_pipeline_source

    if is_pipeline_source(recipe) or derive_kwargs:
        raise RecipeError(f"--on builds a shipped recipe in the job; {recipe} is a model source",
                          "build it here (aotpack build SOURCE --push ...), or ship its recipe in aotpack")
    if not push_to:
        raise click.UsageError("--on needs --push OWNER/NAME: the job's build lands in that repo")
    from aotpack.farm import options_from_context, remote_build

    quant = quant or ("auto" if plan else _default_quant(recipe, variant))  # --plan implies auto
    state = remote_build(recipe, quant, flavor=flavor, repo_id=push_to, tag=tag_name, variant=variant,
                         options=options_from_context(ctx), install=install)
    echo_result(as_json, {"repo_id": state.cell.repo, "build": state.build, "commit": state.commit},
                f"{state.cell.repo}: builds/{state.build} (commit {state.commit})")


def _refuse_early(recipe: str, quant: str | None, variant: str | None, model: str | None, plan: str | None,
                  max_autotune: bool = False, derive_kwargs: dict | None = None, freeze: dict | None = None) -> None:
    """The refusals that need neither torch nor a model, made before the build imports them (a second instead of
    ten): an unknown recipe or variant, a scheme this device cannot run, a GPU checkpoint on a machine without
    one. The build checks all of them again (the Python API goes straight there)."""
    from aotpack.artifact.platform import cpu_flags, default_device
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.schemes import check_scheme
    from aotpack.builder.derive import DEFAULT_QUANT, is_pipeline_source
    from aotpack.builder.source import resolve_source

    device = default_device()
    if is_pipeline_source(recipe):  # a model source: its recipe is derived by the build (which checks the rest)
        if device == "cpu" and plan is None and (quant or DEFAULT_QUANT) != "auto":
            check_scheme(quant or DEFAULT_QUANT, device)
        return
    if derive_kwargs:
        from aotpack.builder.spec import recipe_for

        recipe_for(recipe, variant, model, derive_kwargs, device)  # raises: these options need a model source
    r = get_recipe(recipe, variant)
    if device != "cpu":
        return  # GPU capabilities need torch: the build checks them
    scheme = quant or r.default_for(device, cpu_flags())[0]
    if plan is None and scheme != "auto":
        check_scheme(scheme, device)
    if max_autotune:
        from aotpack.builder.schemes import check_max_autotune

        check_max_autotune(device)
    if freeze is not None:
        from aotpack.builder.schemes import check_freeze

        check_freeze(device, freeze["lora"], quant=scheme if plan is None else "auto",
                     compile_vae=freeze["compile_vae"], reuse=freeze["reuse"])
    if not model and not r.builtin and r.checkpoint_needs and r.checkpoint_needs != device:
        resolve_source(r, None, device)  # raises its one line


def _default_quant(recipe: str, variant: str | None) -> str:
    from aotpack.builder.recipe import get_recipe

    return get_recipe(recipe, variant).default_quant
