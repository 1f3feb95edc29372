"""aotpack: quantize a diffusion transformer with torchao, compile it ahead of time with AOTInductor, and
drop the artifact back into a diffusers pipeline.

    import aotpack
    path = aotpack.build("tiny-flux", "int8wo")
    aotpack.load_into(pipe, path)

Importing aotpack is light (no torch): each function below is imported from its side of the package the
first time it is used.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from aotpack._version import __version__
from aotpack.errors import AotpackError

# public function -> the module that defines it
_API = {
    "build": "aotpack.builder.pipeline",     # recipe -> artifact folder
    "inspect": "aotpack.artifact.summary",   # the validated manifest
    "sign": "aotpack.signing",               # sign an artifact folder
    "load": "aotpack.serve.load",            # artifact -> drop-in module
    "load_into": "aotpack.serve.pipe",       # ... put into a pipeline
    "from_pretrained": "aotpack.serve.pipe", # pipeline folder or Hub id + artifact -> the ready pipeline
    "run": "aotpack.serve.run",              # artifact -> image or video
    "push": "aotpack.hub",                   # artifact -> Hub repo
    "pull": "aotpack.hub",                   # Hub repo -> artifact folder
    "remote_build": "aotpack.farm",          # one build on a Hugging Face Job, pushed to a repo
    "run_farm": "aotpack.farm",              # a build matrix, one Job per cell
}


class _Progress(logging.Handler):
    """aotpack's stage lines on stderr (whatever ``sys.stderr`` is at the time: notebooks, captured output),
    unless the application configured logging itself: then its handlers show them, once."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            sys.stderr.write(record.getMessage() + "\n")
        except Exception:  # pragma: no cover - a closed stderr must not break a build
            pass


_PROGRESS = _Progress()


def set_progress(on: bool = True) -> None:
    """Show aotpack's progress and stage lines ("compile transformer (1 of 1) took 15.4 s, peak RSS 0.54 GB")
    on stderr, as the CLI does (the default; ``AOTPACK_PROGRESS=0`` starts with them off), or not: off, only
    warnings and errors reach logging's own configuration."""
    log = logging.getLogger("aotpack")
    if on:
        log.setLevel(logging.INFO)
        if _PROGRESS not in log.handlers:
            log.addHandler(_PROGRESS)
    else:
        log.setLevel(logging.WARNING)
        if _PROGRESS in log.handlers:
            log.removeHandler(_PROGRESS)


set_progress(os.environ.get("AOTPACK_PROGRESS", "1") not in ("0", "false", "no"))


# Loggers whose import-time lines say nothing to an aotpack user: torchao's CUDA kernels missing on a CPU box
# ("Failed to load ..._C_mxfp8.so"), torch's pytree deprecations about torchao's enums. Quieted to errors when
# the API is first used, unless AOTPACK_DEBUG is set or the application set their level itself.
_NOISE = ("torchao", "torch.utils._pytree")


def _quiet_noise() -> None:
    if os.environ.get("AOTPACK_DEBUG", "") not in ("", "0"):
        return
    for name in _NOISE:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def __getattr__(name: str) -> Any:
    if name in _API:
        _quiet_noise()
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'aotpack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["AotpackError", "__version__", "set_progress", *_API]
