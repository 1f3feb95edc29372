"""The commands that read an artifact folder: ``inspect`` its manifest, ``sign`` it, ``run`` it in its pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import click

from aotpack.cli.output import echo_result, quiet_pipelines
from aotpack.options import json_option, quiet_option, trusted_key_option


@click.command()
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


@click.command()
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


@click.command()
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
@trusted_key_option
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
    quiet_pipelines()
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
    echo_result(as_json, {"path": str(path)}, str(path))
