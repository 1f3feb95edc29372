"""Hashing an artifact's files on load, and opening only the bytes that were verified.

A loader never hashes a path and then opens the path again: ``VerifiedFiles`` opens the folder once, opens
each file once relative to it, hashes through that open file, and hands out a private copy (code) or the
open file itself (weights, via /proc/self/fd): the bytes that were hashed, whatever happens to the folder.
A file hashed once is remembered (``verified_before``) until its identity changes. ``aotpack.artifact.files``
re-exports every name here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from aotpack.artifact.formats import check_package
from aotpack.artifact.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, is_safe_name, no_manifest
from aotpack.errors import ConfigError, IntegrityError, ManifestError, one_line
from aotpack.paths import cache_dir, seal, unseal, write_atomic

VERIFY_ENV = "AOTPACK_VERIFY"
VERIFY_MODES = ("", "remembered", "full")


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


def verify_files(folder: Path, files: dict[str, FileEntry]) -> None:
    """Check every listed file's size and sha256 (for push, --reuse and tests that need no handles)."""
    with VerifiedFiles(folder, files) as vf:
        vf.check_all()
