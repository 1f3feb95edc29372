"""The artifact folder: its layout, the list of its files for the manifest, and writing it atomically.

    model.pt2            AOTInductor package: compiled code only, no weights (one .pt2 per compiled module)
    weights.safetensors  the (quantized) weights of every module, as plain tensors
    manifest.json        what it is, what it needs, and the size and sha256 of every other file
    signature.sig        optional: an OpenSSF model-signing signature over all of the above

Reading it back is beside this module and re-exported here: ``verified`` (hashing on load, ``VerifiedFiles``:
only the bytes that were verified are opened), ``formats`` (the safetensors header and .pt2 zip checks) and
``temp_folders`` (the temporary folders ``atomic_folder`` writes in).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterator

from aotpack.artifact.formats import (SAFETENSORS_DTYPES, TensorEntry, check_package, read_safetensors_header,
                                      thread_sized)
from aotpack.artifact.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, parse
from aotpack.artifact.temp_folders import MARK, own_folder, sweep_partials
from aotpack.artifact.verified import (VERIFY_ENV, VERIFY_MODES, VerifiedFiles, _record, _stamp, fd_path,
                                       remember_folder, remember_verified, verified_before, verify_files, verify_mode)
from aotpack.errors import ManifestError, OutputExistsError, one_line

__all__ = [
    "MODEL", "WEIGHTS", "SIGNATURE", "sha256_file", "file_entries", "atomic_folder", "check_output", "is_artifact",
    # re-exported: formats, verified, temp_folders (and two private helpers tests/test_artifact.py reads)
    "SAFETENSORS_DTYPES", "TensorEntry", "read_safetensors_header", "check_package", "thread_sized", "VERIFY_ENV",
    "VERIFY_MODES",
    "verify_mode", "verified_before", "remember_verified", "remember_folder", "VerifiedFiles", "fd_path",
    "verify_files", "MARK", "_record", "_stamp",
]

MODEL = "model.pt2"
WEIGHTS = "weights.safetensors"
SIGNATURE = "signature.sig"      # written by aotpack.signing; not listed in the manifest it signs
_GLOB = frozenset("*?[]")


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path, pattern: str = "*") -> dict[str, FileEntry]:
    """Size and sha256 of every file in ``folder`` matching ``pattern`` except the manifest and the signature:
    an artifact's files for its manifest, or a checkpoint component's ``*.safetensors``."""
    return {p.name: FileEntry(size=p.stat().st_size, sha256=sha256_file(p))
            for p in sorted(folder.iterdir() if pattern == "*" else folder.glob(pattern))  # "*": dot files too
            if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}


@contextlib.contextmanager
def atomic_folder(final: str | Path, *, overwrite: bool = False,
                  before_publish: Callable[[Path, Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success rename it to ``final``.

    On any error or interrupt the temporary folder is removed, so ``final`` is either the complete new
    artifact or exactly what was there before. ``overwrite`` replaces only an earlier artifact or an empty
    folder, never an unrelated folder. The temporary folder lives in a folder of aotpack's own beside
    ``final`` (``own_folder``), so that a build killed midway leaves something a later one can recognise.
    """
    final = Path(final).absolute()
    check_output(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(final)
    box = own_folder(final, "partial")
    tmp = box / "build"
    try:
        tmp.mkdir()
        yield tmp
        _publishable(tmp)
        if before_publish is not None:  # the files as they are, in a folder only this process writes
            before_publish(tmp, final)
        check_output(final, overwrite=overwrite)  # it may have appeared while we worked
        if final.exists():
            old = own_folder(final, "old")  # this process made it: removed by its path, never by a name
            try:
                os.rename(final, old / "x")
            except BaseException:
                shutil.rmtree(old, ignore_errors=True)
                raise
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(old / "x", final)  # the earlier artifact goes back where it was
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def _publishable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only modes; give the artifact ordinary umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def check_output(final: Path, *, overwrite: bool) -> None:
    """Refuse an existing output folder unless --overwrite, and never replace a folder that is not an aotpack
    artifact (one whose manifest.json validates as an aotpack manifest) or an empty folder. A name with a glob
    character is refused: it is almost always a pattern the shell did not expand (quoted), and a folder named
    '*' is one the next 'rm -r out/*' reads as a pattern."""
    if _GLOB & set(final.name):
        raise OutputExistsError(f"output folder name {one_line(final.name, 80)!r} holds a glob character (* ? [ ]); "
                                "aotpack does not expand patterns", "choose a plain folder name for --out")
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputExistsError(f"{final} exists and is not a folder", "choose another --out")
    if not overwrite:
        raise OutputExistsError(f"output folder {final} already exists",
                                "pass --overwrite to replace it, or choose another --out")
    if any(final.iterdir()) and not is_artifact(final):
        raise OutputExistsError(f"{final} exists and is not an aotpack artifact; refusing to delete it",
                                "choose another --out")


def is_artifact(folder: Path) -> bool:
    """True when ``folder`` holds a manifest.json (a regular file) that validates as an aotpack manifest."""
    try:
        fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return False
            parse(f.read(MAX_MANIFEST_BYTES + 1))
        return True
    except (OSError, ManifestError):
        return False
