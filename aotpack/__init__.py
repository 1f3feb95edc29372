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
from typing import Any

from aotpack._version import __version__
from aotpack.errors import AotpackError

# public function -> the module that defines it
_API = {
    "build": "aotpack.builder.pipeline",     # recipe -> artifact folder
    "inspect": "aotpack.artifact.summary",   # the validated manifest
    "sign": "aotpack.signing",               # sign an artifact folder
    "load": "aotpack.serve.load",            # artifact -> drop-in module
    "load_into": "aotpack.serve.load",       # ... put into a pipeline
    "from_pretrained": "aotpack.serve.pipe", # pipeline folder or Hub id + artifact -> the ready pipeline
    "run": "aotpack.serve.run",              # artifact -> image or video
    "push": "aotpack.hub",                   # artifact -> Hub repo
    "pull": "aotpack.hub",                   # Hub repo -> artifact folder
    "remote_build": "aotpack.farm",          # one build on a Hugging Face Job, pushed to a repo
    "run_farm": "aotpack.farm",              # a build matrix, one Job per cell
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'aotpack' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["AotpackError", "__version__", *_API]
