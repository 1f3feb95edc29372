"""One home for the paths aotpack keeps, and for the records it keeps there.

``cache_dir()`` (``AOTPACK_CACHE``, default ~/.cache/aotpack) holds what can be rebuilt: builtin pipelines,
compiled code reused across builds, remembered file hashes, Hub pins. Anyone who can write there could plant
entries, so every record aotpack trusts from it is *sealed*: an HMAC-SHA256 with a key kept outside the cache
(``state_dir()/record.key``, mode 0600, ``AOTPACK_STATE``, default ~/.local/state/aotpack). An unsealed or
forged record is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any

from aotpack.errors import ConfigError, one_line


def cache_dir() -> Path:
    """Where aotpack keeps things it can rebuild (``AOTPACK_CACHE``, default ~/.cache/aotpack)."""
    return Path(os.environ.get("AOTPACK_CACHE") or Path.home() / ".cache" / "aotpack")


def state_dir() -> Path:
    """Where aotpack keeps its record key (``AOTPACK_STATE``, default ~/.local/state/aotpack)."""
    return Path(os.environ.get("AOTPACK_STATE") or Path.home() / ".local" / "state" / "aotpack")


def check_cache_writable() -> Path:
    """The cache folder, created if needed; a ConfigError naming it when it cannot be written."""
    path = cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"AOTPACK_CACHE={one_line(str(path), 200)} is not writable ({e.strerror or e})",
                          "point AOTPACK_CACHE at a folder you can write, or unset it") from None
    return path


@lru_cache(maxsize=4)
def _record_key(folder: str) -> bytes:
    path = Path(folder) / "record.key"
    try:
        data = path.read_bytes()
        if len(data) == 32 and (path.stat().st_mode & 0o077) == 0:
            return data
    except OSError:
        pass
    Path(folder).mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    tmp = path.with_name(f".record.key.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    try:
        os.link(tmp, path)  # the first writer wins; a concurrent one reads the winner's key
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != 32:
        raise ConfigError(f"{path} is not an aotpack record key", f"delete {path}; it is made again")
    return data


def _mac(kind: str, payload: Any) -> str:
    text = json.dumps([kind, payload], sort_keys=True, separators=(",", ":"))
    return hmac.new(_record_key(str(state_dir())), text.encode(), hashlib.sha256).hexdigest()


def seal(kind: str, payload: Any) -> str:
    """JSON text of ``payload`` with a MAC binding it to ``kind`` and this user's record key."""
    return json.dumps({"kind": kind, "payload": payload, "mac": _mac(kind, payload)})


def unseal(kind: str, text: str | bytes) -> Any | None:
    """The payload of a record written by ``seal(kind, ...)``; None for anything else (forged, other kind,
    unreadable). Never raises on hostile input."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("mac"), str):
            return None
        if not hmac.compare_digest(data["mac"], _mac(kind, data.get("payload"))):
            return None
        return data["payload"]
    except (ValueError, TypeError, RecursionError):
        return None
    except OSError:  # no record key could be made: nothing is trusted
        return None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place (never in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
