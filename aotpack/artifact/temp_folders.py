"""aotpack's own temporary folders beside an output folder: made and marked by ``own_folder``, and the ones a
killed build left behind removed by ``sweep_partials`` (only those aotpack can tell it made). Used by
``aotpack.artifact.files.atomic_folder``, which re-exports ``MARK``.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from aotpack.errors import AotpackError, one_line
from aotpack.paths import seal, unseal

log = logging.getLogger("aotpack")

# A build writes into '.NAME.partial-PID-XXXX/build/' and moves a replaced artifact to '.NAME.old-PID-XXXX/x'
# before deleting it. Each such folder's first file is a sealed mark (aotpack.paths.seal: only this user's
# aotpack can make one) naming the folder, its destination and its process. A later build of NAME removes a
# leftover only when its name starts with exactly '.NAME.partial-' or '.NAME.old-' (a string, never a pattern),
# it is a real folder of this user, its mark is genuine and names it, and its process is gone.

MARK = ".aotpack-temporary"
_MARK_KIND = "temporary-folder"
_MAX_MARK_BYTES = 4096
_KINDS = ("partial", "old")


def own_folder(final: Path, kind: str) -> Path:
    """A new folder '.NAME.KIND-PID-XXXX' beside ``final`` (mode 0700), marked as aotpack's before anything
    else is written into it. Without a mark (no record key can be made) it is only ever removed by this process."""
    pid = os.getpid()
    box = Path(tempfile.mkdtemp(prefix=f".{final.name}.{kind}-{pid}-", dir=final.parent))
    try:
        text = seal(_MARK_KIND, _mark(box.name, final.name, kind, pid))
        fd = os.open(box / MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except (OSError, AotpackError) as e:
        log.warning("cannot mark %s as aotpack's (%s): a later build will not remove it if this one is killed",
                    box, one_line(str(e), 120))
    return box


def _mark(folder: str, final: str, kind: str, pid: int) -> dict:
    return {"folder": folder, "final": final, "kind": kind, "pid": pid}


def _is_marked(path: Path, final: str, kind: str, pid: int) -> bool:
    """True when ``path`` is a real folder of this user whose mark is genuine and names exactly this folder."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            return False
        fd = os.open(path / MARK, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            text = f.read(_MAX_MARK_BYTES + 1)
    except OSError:
        return False
    return len(text) <= _MAX_MARK_BYTES and unseal(_MARK_KIND, text) == _mark(path.name, final, kind, pid)


def sweep_partials(final: Path) -> None:
    """Remove the temporary folders that killed builds of ``final`` left beside it (see above); anything else
    is left alone, one that only looks like a leftover with a warning."""
    with os.scandir(final.parent) as entries:
        names = sorted(e.name for e in entries)
    for kind in _KINDS:
        prefix = f".{final.name}.{kind}-"
        for name in names:
            if not name.startswith(prefix):  # a plain string comparison: no character of NAME is a pattern
                continue
            pid_text, sep, _ = name[len(prefix):].partition("-")
            pid = int(pid_text) if sep and pid_text.isascii() and pid_text.isdigit() else None
            if pid is None or not _is_marked(final.parent / name, final.name, kind, pid):
                log.warning("left %s alone: it is named like a temporary folder of aotpack's but aotpack cannot "
                            "tell it made it (another tool's, or an older aotpack's: delete it yourself if so)",
                            final.parent / name)
            elif pid != os.getpid() and not _alive(pid):
                shutil.rmtree(final.parent / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's, or no pid at all: not ours to judge
        return True
    return True
