"""aotpack: quantize a diffusion transformer with torchao, compile it ahead of time with AOTInductor, and
drop the artifact back into a diffusers pipeline.

    import aotpack
    aotpack.load_into(pipe, "artifacts/tiny-flux-int8wo-cpu-x86_64-avx512")
"""

from aotpack._version import __version__  # noqa: E402

from .errors import AotpackError  # noqa: E402  (light: no torch import)


def build(*args, **kwargs):
    """Build an artifact; see :func:`aotpack.builder.build`."""
    from aotpack.builder.pipeline import build as _build

    return _build(*args, **kwargs)


def load(*args, **kwargs):
    """Load an artifact as a drop-in module; see :func:`aotpack.runtime.load`."""
    from aotpack.serve.module import load as _load

    return _load(*args, **kwargs)


def load_into(*args, **kwargs):
    """Swap a pipeline's component for an artifact; see :func:`aotpack.runtime.load_into`."""
    from aotpack.serve.module import load_into as _load_into

    return _load_into(*args, **kwargs)


def run(*args, **kwargs):
    """Generate an image with an artifact; see :func:`aotpack.run.run`."""
    from aotpack.serve.run import run as _run

    return _run(*args, **kwargs)


def inspect(*args, **kwargs):
    """Read an artifact's validated manifest; see :func:`aotpack.info.inspect`."""
    from aotpack.artifact.summary import inspect as _inspect

    return _inspect(*args, **kwargs)


__all__ = ["AotpackError", "build", "inspect", "load", "load_into", "run", "__version__"]
