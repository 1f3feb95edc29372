"""The ``aotpack`` group itself: logging set up once, and every error turned into one 'Error:'/'Hint:' pair and an
exit code. The commands are added to it in ``aotpack.cli``."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from aotpack._version import __version__
from aotpack.cli.output import debug
from aotpack.errors import AotpackError, first_line


def _quiet_dependencies() -> None:
    """torchao and friends log import-time noise (CUDA kernels missing on CPU, deprecations): keep stderr
    for aotpack's own progress unless debugging."""
    if debug():
        return
    for name in ("torchao", "torch._export", "torch.export", "torch._inductor", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("aotpack")
    log.handlers[:] = []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


class AotpackGroup(click.Group):
    """Turns AotpackError into 'Error: ...' / 'Hint: ...' and exit code 1; tracebacks only with AOTPACK_DEBUG=1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AotpackError as e:
            if debug():
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
            if debug():
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
