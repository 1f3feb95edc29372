"""The command-line options more than one module needs, declared once: ``-q``/``--json`` (every command),
``--token`` and ``--trusted-key`` (the commands that reach the Hub or load an artifact), the options of a derived
recipe (``build SOURCE``, ``recipe SOURCE``) and ``aotpack build``'s whole set, which the build farm also parses a
matrix cell's options with (so the farm never imports the CLI)."""

from __future__ import annotations

import functools
import logging

import click


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        logging.getLogger("aotpack").setLevel(logging.WARNING)


# Options several commands share, declared once: `-q` works before or after the command name.
quiet_option = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                            help="Only errors on stderr.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as one JSON object on stdout (progress stays on stderr).")
token_option = click.option("--token", default=None,
                            help="Hub token (default: HF_TOKEN or the one saved by 'hf auth login').")
trusted_key_option = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(),
    help="Require a signature by this public key (PEM; repeatable; default: AOTPACK_TRUSTED_KEYS).")


def derive_options(f):
    """The options of a recipe derived from a model folder or Hub id (``build SOURCE``, ``recipe SOURCE``)."""
    for option in reversed([
        click.option("--component", default=None,
                     help="Model source: the pipeline component to compile (default: transformer)."),
        click.option("--blocks", multiple=True, metavar="CLASS",
                     help="Model source: a block class to compile regionally (repeatable; default: the model's "
                          "_repeated_blocks)."),
        click.option("--max-size", type=int, default=None,
                     help="Model source: the largest height/width it accepts (default: the pipeline's default size)."),
        click.option("--max-frames", type=int, default=None,
                     help="Model source: the most frames (video; default: the pipeline's default num_frames)."),
        click.option("--max-batch", type=int, default=None, help="Model source: outputs per prompt (default 4)."),
        click.option("--revision", default=None,
                     help="Hub repo id source: the branch, tag or commit (a branch is resolved and recorded)."),
    ]):
        f = option(f)
    return f


def build_options(f):
    """``aotpack build``'s argument and options, on ``f`` (a click callback)."""

    @click.argument("recipe")
    @click.option("--quant", "quant", default=None,
                  help="Quantization scheme (default: the recipe's; a recipe may name several, and this machine "
                       "gets the first it runs fast: no int8dq on a CPU without VNNI/AMX); 'auto' picks one per "
                       "layer (see --error-budget).")
    @click.option("--plan", type=click.Path(), default=None,
                  help="Rebuild from the plan.json of an earlier --quant auto build, without timing again.")
    @click.option("--error-budget", type=float, default=None,
                  help="--quant auto: the largest relative output error a layer may get (default 0.05).")
    @click.option("--out", type=click.Path(), default=None, help="The artifact folder itself (default: artifacts/<recipe>-<scheme>-<platform>).")
    @click.option("--model", default=None, help="A local diffusers folder or Hub id instead of the recipe's checkpoint.")
    @click.option("--variant", default=None, help="A recipe variant, e.g. 'schnell' for flux.")
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16", "auto"]), default=None,
                  help="Override the recipe's dtype; auto: what this machine computes fastest (bf16 on a CPU with "
                       "AMX or AVX512-BF16 and on GPUs, float32 on other CPUs and for int8dq on any CPU).")
    @click.option("--overwrite", is_flag=True, help="Replace an existing artifact folder.")
    @click.option("--lora", type=click.Path(), default=None, help="A LoRA .safetensors to fuse into the weights before quantizing.")
    @click.option("--lora-scale", type=float, default=1.0, show_default=True, help="Strength of --lora.")
    @click.option("--fuse-qkv", is_flag=True, help="Fuse each attention's q/k/v projections into one linear before quantizing.")
    @click.option("--quantize-text-encoder", default=None, metavar="SCHEME",
                  help="Quantize the pipeline's text encoders with SCHEME when the artifact is loaded (they stay eager).")
    @click.option("--quantize-vae", default=None, metavar="SCHEME",
                  help="Quantize the VAE with SCHEME (compiled in with --compile-vae, else applied at load).")
    @click.option("--compile-vae", is_flag=True, help="Compile the VAE decoder too, as a second module in the artifact.")
    @click.option("--max-autotune", is_flag=True,
                  help="Let inductor benchmark kernel choices while compiling (GPU; slow). The tuned code is the .pt2.")
    @click.option("--freeze/--no-freeze", default=None,
                  help="CPU: compile with inductor's freezing (weights transposed and packed in oneDNN's layout, "
                       "replayed from the artifact's weights at load and on a LoRA swap). With --quant none or "
                       "int8dq; not with --lora, --compile-vae or --reuse. Default: the recipe's (flux-blocks "
                       "freezes where it can).")
    @click.option("--reuse", type=click.Path(), default=None,
                  help="Take the compiled code of this artifact instead of compiling, when the graph is the same "
                       "(e.g. other weights or a LoRA).")
    @click.option("--sign-key", type=click.Path(), default=None,
                  help="Sign the artifact with this EC private key (PEM) as it is built (see 'aotpack sign').")
    @click.option("--regional/--whole-graph", default=None,
                  help="Compile each repeated block class once (build time flat in depth; the loaded model keeps its "
                       "blocks) or the whole transformer as one graph. Default: the recipe's.")
    @click.option("--push", "push_to", metavar="OWNER/NAME", default=None,
                  help="Push the build into this Hub repo when it is done (as 'aotpack push'); prints its URL.")
    @click.option("--tag", "tag_name", default=None, help="With --push: tag the commit (a pin for serving boxes).")
    @click.option("--on", "on_flavor", metavar="FLAVOR", default=None,
                  help="Build on a Hugging Face Jobs machine of this flavor (l4x1, a100-large, h200, ...) instead of "
                       "here, then push (needs --push); streams the job's log; Ctrl-C cancels the job.")
    @derive_options
    @json_option
    @click.option("--install", metavar="SPEC", default=None,
                  help="With --on: what the job installs as aotpack (default: aotpack==this version), with the "
                       "versions of its dependencies installed here.")
    @functools.wraps(f)
    def command(*args, **kwargs):
        return f(*args, **kwargs)

    return command
