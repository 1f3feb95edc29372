"""One home for the paths aotpack keeps, and for the records it keeps there.

``cache_dir()`` (``AOTPACK_CACHE``, default ~/.cache/aotpack) holds what can be rebuilt: builtin pipelines,
compiled code reused across builds, remembered file hashes, Hub pins. Anyone who can write there could plant
entries, so every record aotpack trusts from it is *sealed*: an HMAC-SHA256 with a key kept outside the cache
(``state_dir()/record.key``, mode 0600, ``AOTPACK_STATE``, default ~/.local/state/aotpack). An unsealed or
forged record is ignored.
"""

from __future__ import annotations

import contextlib
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
    """Where aotpack keeps its record key (``AOTPACK_STATE``, default ~/.local/state/aotpack), symlinks resolved.

    A symlinked state folder means the folder it points to: that real folder is used (and must be this user's
    and writable by no one else, checked where the key is read), so every record under it is found again."""
    return Path(os.path.realpath(os.environ.get("AOTPACK_STATE") or Path.home() / ".local" / "state" / "aotpack"))


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


def _private(fd: int, what: Path, kind: str) -> os.stat_result:
    """The open file or folder ``fd`` must be this user's and writable by no one else."""
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & (0o077 if kind == "file" else 0o022):
        raise ConfigError(f"{what} is not private to this user (owner {st.st_uid}, mode {oct(st.st_mode & 0o777)})",
                          "remove it (it is made again), or point AOTPACK_STATE at a folder only you can write")
    return st


@lru_cache(maxsize=4)
def _record_key(folder: str) -> bytes:
    """The key that seals aotpack's records: 32 random bytes in ``folder/record.key``, made once, mode 0600.
    A key file (or folder) that someone else could have written is refused, not used; a state folder that cannot
    hold the key is a ConfigError too (never "no valid record", which would discard every genuine one)."""
    base = Path(folder)
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        # no link followed: state_dir() resolved them, so a link here now was planted after that
        dfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
        try:
            return _read_or_make_key(dfd, base)
        finally:
            os.close(dfd)
    except OSError as e:
        why = "not a folder" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror or e
        raise ConfigError(f"AOTPACK_STATE={one_line(folder, 200)} cannot hold aotpack's record key ({why})",
                          "point AOTPACK_STATE at a folder only you can write, or unset it") from None


def _read_or_make_key(dfd: int, base: Path) -> bytes:
    _private(dfd, base, "folder")
    for _ in range(2):
        try:
            fd = os.open("record.key", os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=dfd)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            with os.fdopen(fd, "rb") as f:
                _private(f.fileno(), base / "record.key", "file")
                data = f.read(33)
            if len(data) != 32:
                raise ConfigError(f"{base / 'record.key'} is not an aotpack record key",
                                  f"delete {base / 'record.key'}; it is made again")
            return data
        tmp = f".record.key.{secrets.token_hex(8)}"
        wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600, dir_fd=dfd)
        with os.fdopen(wfd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, "record.key", src_dir_fd=dfd, dst_dir_fd=dfd)  # the first writer wins; others read it
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp, dir_fd=dfd)
    raise ConfigError(f"cannot make a record key in {base}", "check the folder's permissions")


def _mac(kind: str, payload: Any) -> str:
    text = json.dumps([kind, payload], sort_keys=True, separators=(",", ":"))
    return hmac.new(_record_key(str(state_dir())), text.encode(), hashlib.sha256).hexdigest()


def seal(kind: str, payload: Any) -> str:
    """JSON text of ``payload`` with a MAC binding it to ``kind`` and this user's record key."""
    return json.dumps({"kind": kind, "payload": payload, "mac": _mac(kind, payload)})


def unseal(kind: str, text: str | bytes) -> Any | None:
    """The payload of a record written by ``seal(kind, ...)``; None for anything else (forged, other kind,
    unreadable). Never raises on hostile input; a state folder that cannot hold the key is a ConfigError."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("kind") != kind or not isinstance(data.get("mac"), str):
            return None
        if not hmac.compare_digest(data["mac"], _mac(kind, data.get("payload"))):
            return None
        return data["payload"]
    except (ValueError, TypeError, RecursionError):
        return None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a new temporary file (created exclusively: a planted link is never
    followed) renamed into place (never in place)."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
