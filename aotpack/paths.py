"""Where aotpack keeps what it can rebuild or must remember: one home for paths (``AOTPACK_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where aotpack keeps things it can rebuild (``AOTPACK_CACHE``, default ~/.cache/aotpack)."""
    return Path(os.environ.get("AOTPACK_CACHE") or Path.home() / ".cache" / "aotpack")
