"""The artifact folder: layout, atomic writes and file hashes.

    model.pt2            AOTInductor package: compiled code only, no weights
    weights.safetensors  the (quantized) weights as plain tensors, keyed by the compiled constants' names
    manifest.json        what it is, what it needs, and the size and sha256 of every other file
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from aotpack.errors import IntegrityError, OutputExistsError
from aotpack.artifact.manifest import MANIFEST, is_safe_name

MODEL = "model.pt2"
WEIGHTS = "weights.safetensors"
REQUIRED_FILES = (MODEL, WEIGHTS)
# safetensors header dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file in ``folder`` except the manifest, for the manifest."""
    return {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }


def verify_files(folder: Path, files: dict[str, dict], names: tuple[str, ...] = REQUIRED_FILES) -> None:
    """Check that every manifest file is present with the recorded size and sha256, before anything loads."""
    for name in names:
        if name not in files:
            raise IntegrityError(f"manifest lists no {name}", "rebuild the artifact")
    for name, entry in files.items():
        if not is_safe_name(name):
            raise IntegrityError(f"manifest names an unsafe file {name!r}", "do not load this artifact")
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{name} is missing from {folder}", "download or build the artifact again")
        size = path.stat().st_size
        if size != entry["size"]:
            raise IntegrityError(
                f"{name} is {size} bytes, the manifest says {entry['size']} (truncated or replaced)",
                "download or build the artifact again",
            )
        if verified_before(path, entry["sha256"]):
            continue
        if sha256_file(path) != entry["sha256"]:
            raise IntegrityError(f"{name} does not match its sha256 in the manifest (corrupted or tampered)",
                                 "download or build the artifact again; do not load it")
        remember_verified(path, entry["sha256"])


# A file hashed once is not hashed again while its identity is unchanged: device, inode, size, mtime and
# ctime (which no user-space call can set back, and which any write, rename into place or utime changes).
# The record lives in AOTPACK_CACHE/verified/, one small JSON file per path. AOTPACK_VERIFY=full ignores it.

def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record(path: Path) -> Path:
    from aotpack.paths import cache_dir

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def verified_before(path: Path, sha256: str) -> bool:
    import json

    if os.environ.get("AOTPACK_VERIFY") == "full":
        return False
    try:
        data = json.loads(_record(path).read_text())
        return data == {"path": str(path.resolve()), "stamp": _stamp(path), "sha256": sha256}
    except (OSError, ValueError):
        return False


def remember_verified(path: Path, sha256: str) -> None:
    import json

    rec = _record(path)
    try:
        rec.parent.mkdir(parents=True, exist_ok=True)
        tmp = rec.with_name(f".{rec.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"path": str(path.resolve()), "stamp": _stamp(path), "sha256": sha256}))
        os.replace(tmp, rec)
    except OSError:  # a read-only cache only costs the hash next time
        pass


def _is_artifact(path: Path) -> bool:
    return (path / MANIFEST).is_file()


@contextlib.contextmanager
def atomic_folder(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success rename it to ``final``.

    On any error or interrupt the temporary folder is removed, so ``final`` is either the complete new
    artifact or exactly what was there before. ``overwrite`` replaces only an earlier artifact or an empty
    folder, never an unrelated folder.
    """
    final = Path(final).absolute()
    check_output(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-{os.getpid()}-", dir=final.parent))
    try:
        yield tmp
        _publishable(tmp)
        check_output(final, overwrite=overwrite)  # it may have appeared while we worked
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.rename(final, old / "x")
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publishable(folder: Path) -> None:
    """mkdtemp and some writers create owner-only modes; give the artifact ordinary umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def check_output(final: Path, *, overwrite: bool) -> None:
    """Refuse an existing output folder unless --overwrite, and never replace a non-artifact folder."""
    if not final.exists():
        return
    if not final.is_dir():
        raise OutputExistsError(f"{final} exists and is not a folder", "choose another --out")
    if not overwrite:
        raise OutputExistsError(f"output folder {final} already exists", "pass --overwrite to replace it, or choose another --out")
    if any(final.iterdir()) and not _is_artifact(final):
        raise OutputExistsError(
            f"{final} exists and is not an aotpack artifact; refusing to delete it",
            "choose another --out",
        )


def _sweep_partials(final: Path) -> None:
    """Remove temporary folders left by builds of ``final`` that were killed (their process is gone)."""
    for p in final.parent.glob(f".{final.name}.partial-*"):
        try:
            pid = int(p.name.split("-")[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)
    for p in final.parent.glob(f".{final.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
