"""The artifact folder: layout, atomic writes, file hashes, and opening only the bytes that were verified.

    model.pt2            AOTInductor package: compiled code only, no weights (one .pt2 per compiled module)
    weights.safetensors  the (quantized) weights of every module, as plain tensors
    manifest.json        what it is, what it needs, and the size and sha256 of every other file
    signature.sig        optional: an OpenSSF model-signing signature over all of the above

A loader never hashes a path and then opens the path again: ``VerifiedFiles`` opens the folder once, opens
each file once relative to it, hashes through that open file, and hands out a private copy (code) or the
open file itself (weights, via /proc/self/fd) — the bytes that were hashed, whatever happens to the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from aotpack.artifact.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, is_safe_name, no_manifest, parse
from aotpack.errors import AotpackError, ConfigError, IntegrityError, ManifestError, OutputExistsError, one_line
from aotpack.paths import cache_dir, seal, unseal, write_atomic

MODEL = "model.pt2"
WEIGHTS = "weights.safetensors"
SIGNATURE = "signature.sig"      # written by aotpack.signing; not listed in the manifest it signs
# safetensors header dtype codes -> torch dtype names
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2,
             "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_MAX_HEADER = 100 << 20
VERIFY_ENV = "AOTPACK_VERIFY"
VERIFY_MODES = ("", "remembered", "full")
log = logging.getLogger("aotpack")


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


# ---- safetensors headers --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorEntry:
    dtype: str          # torch dtype name
    shape: tuple[int, ...]
    offset: int         # from the start of the file
    nbytes: int


def read_safetensors_header(fd: int, size: int, name: str, error: type = IntegrityError) -> dict[str, TensorEntry]:
    """The tensors a .safetensors file declares, checked before anything maps it: a header length inside the
    file, known dtypes, offsets inside the data and not overlapping, and sizes that match the shapes."""
    head = os.pread(fd, 8, 0)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= min(size - 8, _MAX_HEADER):
        raise error(f"{name} is not a safetensors file", "download or save it again")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (ValueError, RecursionError):
        raise error(f"{name} has a broken safetensors header", "download or save it again") from None
    if not isinstance(header, dict):
        raise error(f"{name} has a broken safetensors header", "download or save it again")
    header.pop("__metadata__", None)
    data = size - 8 - n
    out: dict[str, TensorEntry] = {}
    spans = []
    for key, e in header.items():
        ok = isinstance(e, dict) and e.get("dtype") in SAFETENSORS_DTYPES and isinstance(e.get("shape"), list) \
            and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list) \
            and len(e["data_offsets"]) == 2 and all(type(v) is int for v in e["data_offsets"])
        if ok:
            lo, hi = e["data_offsets"]
            dtype = SAFETENSORS_DTYPES[e["dtype"]]
            count = 1
            for d in e["shape"]:
                count *= d
            ok = 0 <= lo <= hi <= data and hi - lo == count * _ITEMSIZE[dtype]
        if not ok:
            raise error(f"{name}: tensor {one_line(str(key), 80)} is out of bounds, of an unknown dtype or of the "
                        "wrong size", "download or save it again")
        out[key] = TensorEntry(dtype, tuple(e["shape"]), 8 + n + lo, hi - lo)
        spans.append((lo, hi, key))
    spans.sort()
    for (lo1, hi1, k1), (lo2, hi2, k2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            raise error(f"{name}: tensors {one_line(str(k1), 60)} and {one_line(str(k2), 60)} overlap",
                        "download or save it again")
    return out


# ---- remembered hashes ----------------------------------------------------------------------------------------
# A file hashed once is not hashed again while its identity is unchanged: device, inode, size, mtime and ctime
# (any write through write(2), rename into place or utime changes the ctime, which user space cannot set back).
# A write through a shared memory map changes neither until the kernel syncs it: AOTPACK_VERIFY=full hashes every
# load. The records live in AOTPACK_CACHE/verified/, sealed (aotpack.paths): a planted or edited record is ignored,
# and a genuine one only ever says "skip the hash of the file with exactly this identity and this sha256".

def verify_mode() -> str:
    """``AOTPACK_VERIFY``: unset/'' or 'remembered' (default), or 'full'. Anything else is an error."""
    mode = os.environ.get(VERIFY_ENV, "")
    if mode not in VERIFY_MODES:
        raise ConfigError(f"{VERIFY_ENV}={one_line(mode, 40)!s} is not a verify mode",
                          f"set {VERIFY_ENV}=full (hash every load) or unset it")
    return mode or "remembered"


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _record(path: Path) -> Path:
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:32]
    return cache_dir() / "verified" / f"{key}.json"


def verified_before(path: Path, st: os.stat_result, sha256: str) -> bool:
    """True when this very file (same identity) was hashed to ``sha256`` before, by a sealed record."""
    if verify_mode() == "full":
        return False
    try:
        with open(_record(path), "rb") as f:
            text = f.read(4096)
    except OSError:
        return False
    try:
        return unseal("verified", text) == {"path": str(path.absolute()), "stamp": _stamp(st), "sha256": sha256}
    except ConfigError:  # no usable record key (a read-only state folder): trust no record, hash the file
        return False


def remember_verified(path: Path, st: os.stat_result, sha256: str) -> None:
    try:
        write_atomic(_record(path), seal("verified", {"path": str(path.absolute()), "stamp": _stamp(st),
                                                      "sha256": sha256}))
    except (OSError, ConfigError):  # a read-only cache or state folder only costs the hash next time
        pass


def remember_folder(private: Path, files: dict[str, FileEntry], final: Path | None = None) -> None:
    """Record files a build just hashed itself in its private folder (only this process writes there), under the
    paths they will have once published (``final``), so that the first load need not hash them again. The
    identity recorded is the file's in the private folder: a file swapped in after publishing has another."""
    for name, entry in files.items():
        with contextlib.suppress(OSError):
            remember_verified((final or private) / name, os.stat(private / name), entry.sha256)


# ---- opening only verified bytes ---------------------------------------------------------------------------------

def _mismatch(name: str) -> IntegrityError:
    return IntegrityError(f"{name} does not match its sha256 in the manifest (corrupted or tampered)",
                          "download or build the artifact again; do not load it")


class VerifiedFiles:
    """The files of one artifact, each opened once (relative to the folder opened once) and checked against
    the manifest before anything uses them. ``code(name)`` is a private copy of a .pt2 (hashed as it was
    copied, in a 0700 folder only this process writes); ``data(name)`` is a path to the verified open file
    itself (/proc/self/fd/N), so that a file swapped in the folder afterwards is never read."""

    def __init__(self, folder: Path, files: dict[str, FileEntry] | None = None) -> None:
        """``files``: what the manifest lists; without it, read the manifest first (``manifest_bytes``) and set
        ``files`` from it: then manifest and files come from the same folder, whatever is renamed meanwhile."""
        verify_mode()  # a bad AOTPACK_VERIFY is an error before anything is read
        self.folder, self.files = Path(folder), files or {}
        self._fds: dict[str, int] = {}
        self._copies: dict[str, Path] = {}
        self._private: Path | None = None
        try:
            self._dir = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ManifestError(f"no artifact at {one_line(str(self.folder))}",
                                "build one with 'aotpack build', or check the path") from None
        except NotADirectoryError:
            raise ManifestError(f"{one_line(str(self.folder))} is not a folder",
                                "pass the artifact folder (the one holding manifest.json)") from None

    def __enter__(self) -> "VerifiedFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        with contextlib.suppress(OSError):
            os.close(self._dir)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def small_file(self, name: str, limit: int) -> bytes | None:
        """The bytes of a small file of the folder (the manifest, the signature), read through the folder opened
        once; None when it is not there. Only a regular file of at most ``limit`` bytes is read."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0),
                         dir_fd=self._dir)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise IntegrityError(f"cannot open {name}: {e.strerror}", "download or build the artifact again") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise IntegrityError(f"{name} is not a regular file", "do not load this artifact")
            data = f.read(limit + 1)
        if len(data) > limit:
            raise IntegrityError(f"{name} is larger than {limit >> 20} MiB", "do not load this artifact")
        return data

    def manifest_bytes(self) -> bytes:
        data = self.small_file(MANIFEST, MAX_MANIFEST_BYTES)
        if data is None:
            raise no_manifest(self.folder)
        return data

    def _open(self, name: str) -> tuple[int, os.stat_result]:
        entry = self.files.get(name)
        if entry is None or not is_safe_name(name):
            raise IntegrityError(f"manifest lists no {name}", "rebuild the artifact")
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                         | os.O_NONBLOCK, dir_fd=self._dir)
        except FileNotFoundError:
            raise IntegrityError(f"{name} is missing from {one_line(str(self.folder))}",
                                 "download or build the artifact again") from None
        except OSError as e:
            raise IntegrityError(f"cannot open {name}: {e.strerror}", "download or build the artifact again") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise IntegrityError(f"{name} is not a regular file", "do not load this artifact")
        if st.st_size != entry.size:
            os.close(fd)
            raise IntegrityError(f"{name} is {st.st_size} bytes, the manifest says {entry.size} (truncated or replaced)",
                                 "download or build the artifact again")
        return fd, st

    def _hash_fd(self, fd: int, name: str, sink=None) -> None:
        """Hash the open file from its start (copying to ``sink`` as it goes) and compare with the manifest;
        the file's identity must not change while it is read."""
        before = os.fstat(fd)
        h, offset = hashlib.sha256(), 0
        while True:
            block = os.pread(fd, 8 << 20, offset)
            if not block:
                break
            h.update(block)
            if sink is not None:
                sink.write(block)
            offset += len(block)
        if _stamp(os.fstat(fd)) != _stamp(before) or offset != self.files[name].size:
            raise IntegrityError(f"{name} changed while it was being verified", "load again once it is complete")
        if h.hexdigest() != self.files[name].sha256:
            raise _mismatch(name)

    def check_all(self) -> None:
        """Open and verify every file of the manifest now (the code files are copied as they are hashed)."""
        for name in self.files:
            if name.endswith(".pt2"):
                self.code(name)
            else:
                self.data(name)

    def data(self, name: str) -> str:
        """A path that reads exactly the verified bytes of ``name`` (for safetensors and JSON files): the open
        file itself when only this user (or root) can change it, else a private copy made as it is hashed."""
        if name in self._copies:
            return str(self._copies[name])
        if name not in self._fds:
            fd, st = self._open(name)
            try:
                if not _private_enough(st):
                    # someone else could write it in place after the check (or it has another name elsewhere):
                    # neither a remembered hash nor a map of it can be trusted
                    os.close(fd)
                    self._copies[name] = self._copy(name, check_zip=False)
                    return str(self._copies[name])
                path = self.folder / name
                if not verified_before(path, st, self.files[name].sha256):
                    self._hash_fd(fd, name)
                    remember_verified(path, st, self.files[name].sha256)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fds[name] = fd
        return fd_path(self._fds[name])

    def read(self, name: str) -> bytes:
        """The verified bytes of a small file (plan.json)."""
        with open(self.data(name), "rb") as f:
            return f.read(self.files[name].size)

    def code(self, name: str) -> Path:
        """A private copy of the .pt2 ``name``, hashed as it was copied and checked as a zip."""
        if name not in self._copies:
            self._copies[name] = self._copy(name, check_zip=True)
        return self._copies[name]

    def _copy(self, name: str, *, check_zip: bool) -> Path:
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="aotpack-code-"))  # mode 0700
        target = self._private / name
        fd, st = self._open(name)
        try:
            with open(target, "xb") as sink:
                self._hash_fd(fd, name, sink)
            if check_zip:
                check_package(target, name)
        except BaseException:
            target.unlink(missing_ok=True)  # never handed out unchecked
            raise
        finally:
            os.close(fd)
        return target


def _private_enough(st: os.stat_result) -> bool:
    """A file only this user (or root) can change, with no other name: safe to map and to remember."""
    return st.st_uid in (os.getuid(), 0) and not st.st_mode & 0o022 and st.st_nlink == 1


def fd_path(fd: int) -> str:
    """A path that opens the very file ``fd`` refers to (not whatever its name points at now)."""
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def check_package(path: Path, name: str) -> None:
    """A .pt2 is a zip the loader extracts: no absolute or '..' entry names, no links, and a total size that is
    not far beyond the archive's own (AOTInductor stores its files uncompressed; a zip bomb is refused)."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            total = 0
            for info in z.infolist():
                parts = info.filename.replace("\\", "/").split("/")
                if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
                    raise IntegrityError(f"{name} holds an entry named {one_line(info.filename, 80)!r} outside "
                                         "its folder", "do not load this artifact")
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise IntegrityError(f"{name} holds a link ({one_line(info.filename, 80)})",
                                         "do not load this artifact")
                total += info.file_size
    except zipfile.BadZipFile:
        raise IntegrityError(f"{name} is not an AOTInductor package (not a zip)", "do not load this artifact") from None
    if total > 2 * size + (16 << 20):
        raise IntegrityError(f"{name} would unpack to {total >> 20} MiB from {size >> 20} MiB (a zip bomb?)",
                             "do not load this artifact")


def verify_files(folder: Path, files: dict[str, FileEntry]) -> None:
    """Check every listed file's size and sha256 (for push, --reuse and tests that need no handles)."""
    with VerifiedFiles(folder, files) as vf:
        vf.check_all()


# ---- writing ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_folder(final: str | Path, *, overwrite: bool = False,
                  before_publish: Callable[[Path, Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success rename it to ``final``.

    On any error or interrupt the temporary folder is removed, so ``final`` is either the complete new
    artifact or exactly what was there before. ``overwrite`` replaces only an earlier artifact or an empty
    folder, never an unrelated folder. The temporary folder lives in a folder of aotpack's own beside
    ``final`` (``_own_folder``), so that a build killed midway leaves something a later one can recognise.
    """
    final = Path(final).absolute()
    check_output(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(final)
    box = _own_folder(final, "partial")
    tmp = box / "build"
    try:
        tmp.mkdir()
        yield tmp
        _publishable(tmp)
        if before_publish is not None:  # the files as they are, in a folder only this process writes
            before_publish(tmp, final)
        check_output(final, overwrite=overwrite)  # it may have appeared while we worked
        if final.exists():
            old = _own_folder(final, "old")  # this process made it: removed by its path, never by a name
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


# ---- aotpack's own temporary folders -----------------------------------------------------------------------
# A build writes into '.NAME.partial-PID-XXXX/build/' and moves a replaced artifact to '.NAME.old-PID-XXXX/x'
# before deleting it. Each such folder's first file is a sealed mark (aotpack.paths.seal: only this user's
# aotpack can make one) naming the folder, its destination and its process. A later build of NAME removes a
# leftover only when its name starts with exactly '.NAME.partial-' or '.NAME.old-' (a string, never a pattern),
# it is a real folder of this user, its mark is genuine and names it, and its process is gone.

MARK = ".aotpack-temporary"
_MARK_KIND = "temporary-folder"
_MAX_MARK_BYTES = 4096
_GLOB = frozenset("*?[]")
_KINDS = ("partial", "old")


def _own_folder(final: Path, kind: str) -> Path:
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


def _sweep_partials(final: Path) -> None:
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
