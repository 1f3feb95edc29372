"""The ``aotpack`` command: a thin Click layer over the library. Results on stdout, progress on stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from aotpack._version import __version__
from aotpack.errors import AotpackError, RecipeError, first_line
from aotpack.options import build_options, derive_options, json_option, quiet_option


def _debug() -> bool:
    return os.environ.get("AOTPACK_DEBUG", "") not in ("", "0")


def _quiet_dependencies() -> None:
    """torchao and friends log import-time noise (CUDA kernels missing on CPU, deprecations): keep stderr
    for aotpack's own progress unless debugging."""
    if _debug():
        return
    for name in ("torchao", "torch._export", "torch.export", "torch._inductor", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_pipelines() -> None:
    """diffusers' and transformers' progress bars off, for the commands that load pipelines. Not at start-up:
    importing them imports torch (5-10 s), and a refusal needs neither."""
    if _debug():
        return
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("aotpack")
    log.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _result(as_json: bool, data: dict, text: str) -> None:
    """The command's result on stdout: ``text``, or ``data`` as JSON with ``--json``."""
    click.echo(json.dumps(data, sort_keys=True) if as_json else text)


class AotpackGroup(click.Group):
    """Turns AotpackError into 'Error: ...' / 'Hint: ...' and exit code 1; tracebacks only with AOTPACK_DEBUG=1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AotpackError as e:
            if _debug():
                raise
            click.echo(f"Error: {e.cause}", err=True)
            if e.hint:
                click.echo(f"Hint: {e.hint}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("Error: interrupted; nothing was left half-written", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:  # the reader went away ('aotpack recipes | head'): not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)
        except Exception as e:  # a bug or an unforeseen failure: still one line unless debugging
            if _debug():
                raise
            first = first_line(e)
            click.echo(f"Error: unexpected {type(e).__name__}: {first[:300]}", err=True)
            click.echo("Hint: run again with AOTPACK_DEBUG=1 for the full traceback, and report it", err=True)
            ctx.exit(1)


@click.group(cls=AotpackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aotpack")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
def cli(quiet: bool) -> None:
    """Quantize a diffusion transformer with torchao, compile it ahead of time with AOTInductor, and load
    the artifact into a diffusers pipeline.

    \b
    Examples:
      aotpack recipes
      aotpack build tiny-flux --quant int8wo
      aotpack inspect artifacts/tiny-flux-int8wo-cpu-x86_64-avx512
      aotpack run artifacts/tiny-flux-int8wo-cpu-x86_64-avx512 --prompt "a dog surfing on the moon" --out dog.png

    Set AOTPACK_DEBUG=1 for full tracebacks.
    """
    _setup_logging(quiet)
    _quiet_dependencies()


@cli.command()
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def recipes(as_json: bool) -> None:
    """List recipes and the quantization schemes each can use on this machine.

    \b
    Examples:
      aotpack recipes
      aotpack recipes --json
    """
    from aotpack.artifact.platform import default_device
    from aotpack.builder.recipe import get_recipe, list_recipes
    from aotpack.builder.schemes import SCHEMES, why_not

    device = default_device()
    usable = [name for name, s in SCHEMES.items() if why_not(s, device) is None]
    rows = []
    for name in list_recipes():
        r = get_recipe(name)
        rows.append({"name": name, "description": r.description, "checkpoint": r.checkpoint, "dtype": r.dtype,
                     "variants": list(r.variants), "default_quant": r.default_quant,
                     "build": "regional" if r.regional else "whole-graph",
                     "runs_here": not (r.checkpoint_needs and r.checkpoint_needs != device)})
    if as_json:
        click.echo(json.dumps({"device": device, "schemes_here": usable, "recipes": rows}, indent=2))
        return
    for row in rows:
        variants = f" (variants: {', '.join(row['variants'])})" if row["variants"] else ""
        note = "" if row["runs_here"] else "  [needs a GPU; use --model for a local checkpoint]"
        click.echo(f"{row['name']:<12} {row['description']}{variants}{note}")
        click.echo(f"{'':<12} checkpoint {row['checkpoint']}, dtype {row['dtype']}, default --quant {row['default_quant']}, "
                   f"{row['build']} build")
    click.echo(f"\nschemes usable on this machine ({device}): {', '.join(usable)}")
    click.echo("all schemes and what they need: aotpack schemes")
    click.echo("any other diffusers model: aotpack build ./pipeline-folder (or OWNER/NAME); aotpack recipe SOURCE "
               "shows the recipe derived for it")


@cli.command()
@quiet_option
def schemes() -> None:
    """List every quantization scheme, the torchao config behind it and the hardware it needs."""
    from aotpack.artifact.platform import default_device
    from aotpack.builder.schemes import SCHEMES, why_not

    device = default_device()
    for name, s in SCHEMES.items():
        status = "ok here" if why_not(s, device) is None else f"not here (use {s.instead})"
        click.echo(f"{name:<10} {s.description:<52} needs {s.needs():<30} {status}")
    from aotpack.builder.plan import candidates

    here = ", ".join(c.name for c in candidates(device))
    click.echo(f"{'auto':<10} {'a scheme per layer: the fastest within --error-budget':<52} "
               f"{'chooses among':<36} {here}")




@cli.command()
@quiet_option
@click.argument("source")
@derive_options
@json_option
def recipe(source, as_json, **derive_kwargs) -> None:
    """Derive the recipe of SOURCE (a diffusers pipeline folder or Hub repo id) and print it as TOML.

    The dims come from real pipeline calls, each stopped at the transformer's first forward (its weights are not
    read). Save it, edit it, pin it: `aotpack build ./my.toml` builds exactly that.

    \b
    Examples:
      aotpack recipe ./my-wan-pipeline > wan.toml
      aotpack recipe Qwen/Qwen-Image --revision main --max-size 1024 > qwen.toml
    """
    from aotpack.builder.derive import Options, derive, is_pipeline_source, to_toml

    if not is_pipeline_source(source):
        raise RecipeError(f"{source} is neither a diffusers pipeline folder nor a Hub repo id",
                          "pass the folder (holding model_index.json) or OWNER/NAME")
    _quiet_pipelines()
    from aotpack.artifact.platform import default_device
    from aotpack.builder.recipe import parse_recipe

    opts = {k: v for k, v in derive_kwargs.items() if v not in (None, ())}
    opts["blocks"] = tuple(opts.get("blocks", ()))
    data = derive(source, Options(**opts), device=default_device())
    parse_recipe(data, source=f"the recipe derived from {source}", pinned=False)  # what build would refuse
    _result(as_json, data, to_toml(data).rstrip("\n"))


@cli.command()
@quiet_option
@build_options
@click.pass_context
def build(ctx, recipe, quant, plan, error_budget, out, model, variant, dtype, overwrite, lora, lora_scale, fuse_qkv,
          quantize_text_encoder, quantize_vae, compile_vae, max_autotune, reuse, sign_key, regional,
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
        from aotpack.builder.derive import is_pipeline_source

        if is_pipeline_source(recipe) or derive_kwargs:
            raise RecipeError(f"--on builds a shipped recipe in the job; {recipe} is a model source",
                              "build it here (aotpack build SOURCE --push ...), or ship its recipe in aotpack")
        if not push_to:
            raise click.UsageError("--on needs --push OWNER/NAME: the job's build lands in that repo")
        from aotpack.farm import options_from_context, remote_build

        quant = quant or ("auto" if plan else _default_quant(recipe, variant))  # --plan implies auto
        state = remote_build(recipe, quant, flavor=on_flavor, repo_id=push_to, tag=tag_name, variant=variant,
                             options=options_from_context(ctx), install=install)
        _result(as_json, {"repo_id": state.cell.repo, "build": state.build, "commit": state.commit},
                f"{state.cell.repo}: builds/{state.build} (commit {state.commit})")
        return
    _refuse_early(recipe, quant, variant, model, plan, max_autotune, derive_kwargs)
    if push_to:  # an offline box or a bad token fails now, not after the build
        from aotpack.hub import check_can_push

        check_can_push(push_to)
    _quiet_pipelines()
    from aotpack.builder.pipeline import build as build_artifact

    path = build_artifact(recipe, quant, out=out, model=model, variant=variant, dtype=dtype, overwrite=overwrite,
                          lora=lora, lora_scale=lora_scale, fuse_qkv=fuse_qkv,
                          quantize_text_encoder=quantize_text_encoder, quantize_vae=quantize_vae,
                          compile_vae=compile_vae, plan=plan, error_budget=error_budget, reuse=reuse,
                          max_autotune=max_autotune, sign_key=sign_key, regional=regional, **derive_kwargs)
    if not push_to:
        _result(as_json, {"path": str(path)}, str(path))
        return
    from aotpack.hub import push as push_build

    pushed = push_build(path, push_to, tag_name=tag_name)
    _result(as_json, {"path": str(path), **_pushed(pushed)}, f"{path}\n{pushed.url}")


def _refuse_early(recipe: str, quant: str | None, variant: str | None, model: str | None, plan: str | None,
                  max_autotune: bool = False, derive_kwargs: dict | None = None) -> None:
    """The refusals that need neither torch nor a model, made before the build imports them (a second instead of
    ten): an unknown recipe or variant, a scheme this device cannot run, a GPU checkpoint on a machine without
    one. The build checks all of them again (the Python API goes straight there)."""
    from aotpack.artifact.platform import default_device
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
    scheme = quant or r.default_quant
    if plan is None and scheme != "auto":
        check_scheme(scheme, device)
    if max_autotune:
        from aotpack.builder.schemes import check_max_autotune

        check_max_autotune(device)
    if not model and not r.builtin and r.checkpoint_needs and r.checkpoint_needs != device:
        resolve_source(r, None, device)  # raises its one line


def _pushed(result) -> dict:
    """What ``--json`` prints of a push."""
    return {"repo_id": result.repo_id, "build": result.build, "commit": result.commit, "url": result.url,
            "tag": result.tag, "uploaded": result.uploaded}


def _default_quant(recipe: str, variant: str | None) -> str:
    from aotpack.builder.recipe import get_recipe

    return get_recipe(recipe, variant).default_quant


@cli.command()
@quiet_option
@click.argument("artifact", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
def inspect(artifact, as_json) -> None:
    """Summarise an artifact's manifest (validated, no code loaded).

    \b
    Examples:
      aotpack inspect artifacts/tiny-flux-int8wo-cpu-x86_64-avx512
      aotpack inspect artifacts/tiny-flux-int8wo-cpu-x86_64-avx512 --json
    """
    from aotpack.artifact.summary import inspect as read_manifest, summarize

    manifest = read_manifest(artifact)
    click.echo(json.dumps(manifest.to_json(), indent=2, sort_keys=True) if as_json
               else summarize(manifest, Path(artifact)))


@cli.command()
@quiet_option
@click.argument("artifact", type=click.Path())
@click.option("--key", "key", type=click.Path(), required=True, help="EC private key (PEM) of the builder.")
def sign(artifact, key) -> None:
    """Sign an artifact folder (OpenSSF model-signing, elliptic key, offline); prints the key's fingerprint.

    Writes ARTIFACT/signature.sig over every file of the folder. Serving boxes that pass --trusted-key (or set
    AOTPACK_TRUSTED_KEYS) load only artifacts signed by one of their keys.

    \b
    Examples:
      openssl ecparam -genkey -name prime256v1 -noout -out builder.pem
      openssl ec -in builder.pem -pubout -out builder.pub
      aotpack sign artifacts/tiny-flux-int8wo-cpu-x86_64-avx512 --key builder.pem
      aotpack run artifacts/tiny-flux-int8wo-cpu-x86_64-avx512 --prompt "a cat" --trusted-key builder.pub
    """
    from aotpack import signing

    info = signing.sign(artifact, key_path=key)
    click.echo(info.fingerprint)


@cli.command()
@quiet_option
@click.argument("artifact")
@click.option("--prompt", required=True, help="Text prompt.")
@click.option("--out", type=click.Path(), default=None,
              help="File to write: .png/.jpg/.webp for images; .mp4 or .gif for videos "
                   "(default out.png, or out.mp4 for video artifacts - out.gif without an mp4 writer).")
@click.option("--frames", type=int, default=None, help="Video artifacts: frames to generate (default: the recipe's).")
@click.option("--height", type=int, default=None, help="Pixels (default: the recipe's).")
@click.option("--width", type=int, default=None, help="Pixels (default: the recipe's).")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the recipe's; at most its max_steps).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (0 .. 2^63-1).")
@click.option("--max-sequence-length", type=int, default=None,
              help="Text tokens (default and maximum: the recipe's; fewer where the artifact's text length is dynamic).")
@click.option("--guidance-scale", type=float, default=None)
@click.option("--revision", default=None, help="For a Hub repo id: the tag or commit to load.")
@click.option("--trust", is_flag=True, help="For a Hub repo id: accept a branch.")
@click.option("--lora", type=click.Path(), default=None, help="Swap this LoRA .safetensors in (no recompile).")
@click.option("--lora-scale", type=float, default=1.0, show_default=True)
@click.option("--cuda-graphs", is_flag=True, help="Replay the compiled module as CUDA graphs (CUDA artifacts).")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(),
              help="Require a signature by this public key (PEM; repeatable; default: AOTPACK_TRUSTED_KEYS).")
@json_option
def run(artifact, prompt, out, frames, height, width, steps, seed, max_sequence_length, guidance_scale, revision, trust,
        lora, lora_scale, cuda_graphs, trusted_keys, as_json) -> None:
    """Generate an image (or a video) with an artifact dropped into its diffusers pipeline; prints the file
    written.

    \b
    Examples:
      aotpack run artifacts/tiny-flux-int8wo-cpu-x86_64-avx512 --prompt "a dog surfing on the moon" --out dog.png
      aotpack run my-artifact --prompt "a cat" --height 256 --width 256 --steps 8 --seed 1
      aotpack run me/tiny-flux-aot --revision v1 --prompt "a cat" --out cat.png
      aotpack run artifacts/tiny-cogvideox-int8wo-cpu-x86_64-avx512 --prompt "a cat" --frames 13 --out cat.mp4
      aotpack run my-artifact --prompt "a cat" --lora style.safetensors --lora-scale 0.8
    """
    _quiet_pipelines()
    from aotpack.serve.run import run as run_artifact

    extra = {"revision": revision, "trust": trust} if (revision or trust) else {}
    if lora:
        extra.update(lora=lora, lora_scale=lora_scale)
    if cuda_graphs:
        extra["cuda_graphs"] = True
    if trusted_keys:
        extra["trusted_keys"] = list(trusted_keys)
    path = run_artifact(artifact, prompt=prompt, out=out, height=height, width=width, steps=steps, seed=seed,
                        guidance_scale=guidance_scale, frames=frames, max_sequence_length=max_sequence_length, **extra)
    _result(as_json, {"path": str(path)}, str(path))


@cli.command()
@quiet_option
@click.argument("artifact", type=click.Path())
@click.argument("repo", required=False, metavar="[REPO_ID]")
@click.option("--repo-id", default=None, help="Hub repo, owner/name (created if missing); or give it as REPO_ID.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", default="main", show_default=True, help="Branch to commit to.")
@click.option("--tag", "tag_name", default=None, help="Tag the resulting commit (a pin for serving boxes).")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the one saved by 'hf auth login').")
@json_option
def push(artifact, repo, repo_id, private, revision, tag_name, token, as_json) -> None:
    """Add (or replace) one build in a Hub repo, in one commit; prints the URL of the build at that commit.

    The repo keeps several builds (scheme x options x platform) under builds/, an index and a model card.
    Pushing a build the repo already holds uploads nothing; a signature.sig in the folder goes with it.

    \b
    Examples:
      aotpack push artifacts/tiny-flux-int8wo-cpu-x86_64-avx2 me/tiny-flux-aot --tag v1
      aotpack push my-artifact --repo-id me/flux-aot --private --revision dev
      aotpack push my-artifact me/flux-aot --json    # {"url": ..., "commit": ..., "uploaded": ...}
    """
    if repo and repo_id and repo != repo_id:
        raise click.UsageError(f"two repos given: {repo} and --repo-id {repo_id}")
    repo_id = repo or repo_id
    if not repo_id:
        raise click.UsageError("name the Hub repo: aotpack push ARTIFACT OWNER/NAME (or --repo-id OWNER/NAME)")
    from aotpack.hub import push as push_build

    result = push_build(artifact, repo_id, private=private, revision=revision, tag_name=tag_name, token=token)
    if not result.uploaded:  # still a result on stdout: a script that pushes twice gets the URL both times
        click.echo(f"{repo_id}: build {result.build} is already there; nothing uploaded", err=True)
    _result(as_json, _pushed(result), result.url)


@cli.command()
@quiet_option
@click.argument("repo_id")
@click.option("--revision", default=None, help="Tag or commit to pull (a branch needs --trust).")
@click.option("--quant", default=None, help="Only a build of this scheme.")
@click.option("--build", "build_name", default=None, metavar="NAME",
              help="This build of the repo (e.g. int8wo-qkv-cuda-sm90) instead of the best fit.")
@click.option("--trust", is_flag=True, help="Accept a branch (a moving revision) for native code.")
@click.option("--refresh-pins", is_flag=True,
              help="Accept a tag that now points to another commit than at its first pull here, and pin that.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the one saved by 'hf auth login').")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(),
              help="Require a signature by this public key (PEM; repeatable; default: AOTPACK_TRUSTED_KEYS).")
@json_option
def pull(repo_id, revision, quant, build_name, trust, refresh_pins, token, trusted_keys, as_json) -> None:
    """Download the build of REPO_ID that fits this machine, verify it, print its folder.

    A tag is pinned to its commit at its first pull here; if it is moved later, pulls refuse it until
    --refresh-pins. Works offline from the Hub cache (HF_HUB_OFFLINE=1) once pulled.

    \b
    Examples:
      aotpack pull me/tiny-flux-aot --revision v1
      aotpack pull me/tiny-flux-aot --revision v1 --quant int8wo
      aotpack pull me/tiny-flux-aot --revision v1 --build int8wo-qkv-cuda-sm90
      aotpack pull me/tiny-flux-aot --revision v1 --refresh-pins   # you moved tag v1 on purpose
      aotpack pull me/tiny-flux-aot --trust            # latest main: only for repos you control
      aotpack pull me/tiny-flux-aot --revision v1 --trusted-key builder.pub   # only what that key signed
    """
    from aotpack.hub import pull as pull_build

    folder = pull_build(repo_id, revision=revision, quant=quant, build=build_name, token=token, trust=trust,
                        refresh_pins=refresh_pins, trusted_keys=list(trusted_keys) or None)
    # pulled builds sit at .../COMMIT/builds/NAME
    _result(as_json, {"path": str(folder), "repo_id": repo_id, "build": Path(folder).name,
                      "commit": Path(folder).parent.parent.name}, str(folder))


@cli.command()
@quiet_option
@click.argument("matrix", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True,
              help="Print the cells, the platform each flavor gives and its price; submit nothing.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the one saved by 'hf auth login').")
def farm(matrix, dry_run, token) -> None:
    """Build a matrix (recipes x schemes x flavors) on Hugging Face Jobs: one job per cell, pushed into the Hub.

    Shows a live table on stderr and prints a summary; a failed cell shows the tail of its log and the others
    go on. Cells a flavor cannot build are refused before anything is submitted. Ctrl-C cancels the jobs.

    \b
    Examples:
      aotpack farm farm.toml --dry-run
      aotpack farm farm.toml
    """
    from aotpack.farm import check_farm, read_matrix, refused, run_farm

    cells = read_matrix(matrix)
    if dry_run:
        planned = check_farm(cells, token=token)
        for p in planned:
            state = f"refused: {p.problem}" if p.problem else f"-> {p.cell.repo}:builds/{p.build}"
            click.echo(f"{p.cell.label:<40} {p.cell.flavor:<14} {p.platform:<10} {p.price:<16} {state}")
            for upload in p.uploads:  # what the job will be sent, as read and checked here
                click.echo(f"    uploads {upload.describe()}")
        error = refused(planned)
        if error:
            raise error
        click.echo(f"{len(cells)} job(s) would be submitted, one per cell")
        return
    view = _FarmView()
    states = run_farm(cells, token=token, on_change=view.show)
    failed = [s for s in states if s.stage != "completed"]
    for s in failed:
        click.echo(f"--- {s.cell.label} on {s.cell.flavor} ({s.stage}: {s.message}); log tail:", err=True)
        for line in s.tail:
            click.echo(f"    {line}", err=True)
    for s in states:
        where = f"{s.cell.repo}:builds/{s.build}" if s.build else (s.message or "")
        click.echo(f"{s.stage:<10} {s.cell.label:<40} {s.cell.flavor:<14} {s.elapsed:6.0f} s  {where}")
    click.echo(f"{len(states) - len(failed)} of {len(states)} builds completed")
    if failed:
        raise click.exceptions.Exit(1)


class _FarmView:
    """The live table on stderr: redrawn in place on a terminal, one line per change otherwise."""

    def __init__(self) -> None:
        self.drawn = 0
        self.last: dict[int, str] = {}

    def show(self, states) -> None:
        rows = [f"{s.stage:<10} {s.elapsed:6.0f} s  {s.cell.label} on {s.cell.flavor}" for s in states]
        if sys.stderr.isatty():
            if self.drawn:
                sys.stderr.write(f"\x1b[{self.drawn}F\x1b[J")
            sys.stderr.write("\n".join(rows) + "\n")
            sys.stderr.flush()
            self.drawn = len(rows)
            return
        for i, (s, row) in enumerate(zip(states, rows)):
            if self.last.get(i) != s.stage:
                self.last[i] = s.stage
                click.echo(row, err=True)


@cli.command()
@quiet_option
@click.argument("recipe")
@click.option("--quant", "quants", multiple=True, help="Scheme(s) to compare (repeatable; default: none and the recipe's).")
@click.option("--variant", default=None, help="A recipe variant.")
@click.option("--steps", type=int, default=None, help="Denoising steps per image (default: the recipe's run steps).")
@click.option("--images", type=int, default=2, show_default=True, help="Images after the first, for steady latency.")
@click.option("--out", type=click.Path(), default=None,
              help="Results folder (default: artifacts/bench/<recipe>-<platform>; with --build-only "
                   "artifacts/bench/<recipe>-builds-<platform>, shared by the recipe's variants).")
@click.option("--max-autotune", is_flag=True, help="torch.compile with mode='max-autotune' (GPU).")
@click.option("--regional/--no-regional", default=None,
              help="Also build and run the regional artifact (row aotpack-regional). Default: on when the model "
                   "has repeated blocks.")
@click.option("--build-only", is_flag=True,
              help="Only build, each artifact afresh in its own process with an empty compile cache, and write the "
                   "build table (builds.md/.csv/.json: stage times, .pt2 bytes, peak RSS); rows of other runs in "
                   "the same folder are kept.")
@json_option
def bench(recipe, quants, variant, steps, images, out, max_autotune, regional, build_only, as_json) -> None:
    """Compare eager, torch.compile (cold), torch.compile + its portable cache and the aotpack artifacts.

    Each variant runs in a fresh process with the checkpoint and artifact evicted from the page cache and an
    empty compiler cache. Writes results.md (table), results.csv, results.json and results.png; prints the
    folder. Artifacts are built first when missing (into artifacts/, from an empty compile cache).

    \b
    Examples:
      aotpack bench tiny-flux --quant int8wo
      aotpack bench flux-blocks --quant none --quant int8wo --quant auto   # real width: `make bench`
      aotpack bench flux-blocks --quant int8wo --no-regional     # whole graph only
      aotpack bench flux-depth --quant int8wo --build-only --variant shallow   # 1 + 1 blocks
      aotpack bench flux-depth --quant int8wo --build-only       # 19 + 38 blocks, same table
    """
    _quiet_pipelines()
    from aotpack.bench import run_bench
    from aotpack.artifact.platform import describe, tag
    from aotpack.builder.recipe import get_recipe

    r = get_recipe(recipe, variant)
    quants = list(quants) or list(dict.fromkeys(["none", r.default_quant]))
    name = f"{r.name}-builds" if build_only else r.full_name
    folder = Path(out) if out else Path("artifacts") / "bench" / f"{name}-{tag(describe())}"
    done = run_bench(recipe, quants, out=folder, steps=steps, images=images, variant=variant,
                     max_autotune=max_autotune, regional=regional, build_only=build_only)
    _result(as_json, {"path": str(done)}, str(done))


def main() -> None:
    cli(prog_name="aotpack")


if __name__ == "__main__":
    main()
