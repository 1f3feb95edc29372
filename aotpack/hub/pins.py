"""Pins: a tag is resolved to its commit once per machine, and stays there. The pins file is sealed, kept
under AOTPACK_STATE (not the cache), read as untrusted input and written atomically under a lock."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator

from aotpack.errors import HubError
from aotpack.hub.client import _COMMIT, _shown

PINS = "hub-pins.json"
PINS_SCHEMA = 1
_MAX_PINS_BYTES = 1 << 20


def _pins_file() -> Path:
    """Under AOTPACK_STATE, not the cache: deleting or rolling back the pins would undo the moved-tag check."""
    from aotpack.paths import state_dir

    return state_dir() / PINS


def _bad_pins(path: Path, why: str) -> HubError:
    return HubError(f"{path} is not a valid aotpack pins file ({why})",
                    f"check who else writes to {path.parent}, then delete the file: tags are pinned again at the "
                    "next pull")


def _read_pins() -> dict[str, str]:
    """{'endpoint|repo|tag': commit}. The file is untrusted input: a regular file, bounded, of one known shape."""
    path = _pins_file()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise _bad_pins(path, e.strerror or type(e).__name__) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _bad_pins(path, "not a regular file")
        raw = f.read(_MAX_PINS_BYTES + 1)
    if len(raw) > _MAX_PINS_BYTES:
        raise _bad_pins(path, f"larger than {_MAX_PINS_BYTES >> 20} MiB")
    from aotpack.paths import unseal

    # sealed (aotpack.paths): someone who can write the cache cannot pin a tag to a commit of their choosing
    data = unseal("pins", raw)
    if data is None:
        raise _bad_pins(path, "its seal does not match: not written by aotpack for this user")
    if isinstance(data, dict) and set(data) == {"schema_version", "pins"} and data["schema_version"] == PINS_SCHEMA:
        pins = data["pins"]
    else:
        raise _bad_pins(path, "unknown layout")
    if not isinstance(pins, dict):
        raise _bad_pins(path, "'pins' is not an object")
    for key, commit in pins.items():
        if not (isinstance(key, str) and key.count("|") >= 2 and key.isprintable()
                and isinstance(commit, str) and _COMMIT.match(commit)):
            raise _bad_pins(path, f"entry {_shown(str(key))} is not 'endpoint|repo|tag' -> commit")
    return pins


def _write_pins(pins: dict[str, str]) -> None:
    """Atomically: a unique temporary file beside it, synced, renamed over it."""
    path = _pins_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PINS}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    from aotpack.paths import seal

    try:
        with open(tmp, "x") as f:
            f.write(seal("pins", {"schema_version": PINS_SCHEMA, "pins": pins}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _pins_locked() -> Iterator[None]:
    from huggingface_hub.utils import WeakFileLock

    path = _pins_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(path.with_name(f".{PINS}.lock"), timeout=60):
        yield
