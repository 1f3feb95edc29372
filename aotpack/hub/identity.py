"""What was pulled: the identity every Hub load verifies against. A pull that verified a build online seals
a record of it under AOTPACK_STATE; a folder loaded from aotpack's Hub cache must match such a record."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path

from aotpack.artifact import manifest as mf
from aotpack.errors import IntegrityError
from aotpack.hub.client import _COMMIT, SIGNATURE, _shown
from aotpack.paths import unseal

_RECORD = "pulled-build"


@dataclasses.dataclass(frozen=True)
class Pulled:
    """A build as the index at one commit names it: (endpoint, repo, commit, build, manifest sha256,
    signature sha256). The manifest's hash pins every other file's (the manifest lists their sha256), so a load
    that checks the manifest bytes it parses against this loads those bytes or nothing."""

    endpoint: str
    repo_id: str
    commit: str
    build: str
    manifest_sha256: str
    signature_sha256: str | None

    def check(self, manifest_bytes: bytes, signature: bytes | None) -> bytes | None:
        """Refuse a manifest (or signature) other than the pulled one; returns the signature a load may use:
        None when the build was pulled unsigned (a signature.sig there now was not pulled)."""
        where = f"{self.build} of {self.repo_id}@{self.commit[:12]}"
        hint = f"do not load it; pull it again: aotpack pull {self.repo_id} --revision {self.commit}"
        if hashlib.sha256(manifest_bytes).hexdigest() != self.manifest_sha256:
            raise IntegrityError(f"{where}: manifest.json is not the one pulled (its folder was changed after the "
                                 "pull)", hint)
        if self.signature_sha256 is None:
            return None
        if signature is None or hashlib.sha256(signature).hexdigest() != self.signature_sha256:
            raise IntegrityError(f"{where}: {SIGNATURE} is not the one pulled (its folder was changed after the "
                                 "pull)", hint)
        return signature


def _pulled_record(repo_id: str, commit: str, name: str) -> Path:
    """Where a build pulled and verified online is recorded (sealed, under AOTPACK_STATE, not the cache): one
    record per pulled folder (``pulled_dir`` holds no endpoint either); the endpoint is in the record."""
    from aotpack.paths import state_dir

    key = hashlib.sha256(f"{repo_id}|{commit}|{name}".encode()).hexdigest()[:32]
    return state_dir() / "pulled" / f"{key}.json"


def _read_record(repo_id: str, commit: str, name: str) -> Pulled | None:
    data = unseal(_RECORD, _read_small(_pulled_record(repo_id, commit, name)))
    if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(Pulled)}:
        return None  # no record, a forged one, or one from an older aotpack (pull again)
    pulled = Pulled(**data)
    return pulled if (pulled.repo_id, pulled.commit, pulled.build) == (repo_id, commit, name) else None


def pulled_identity(path: str | os.PathLike) -> Pulled | None:
    """What a folder loaded by path must hold: None for a folder outside aotpack's Hub cache; for one reached
    through ``AOTPACK_CACHE/hub`` (its path, a link on the way, or '..'), the sealed record of the pull that put
    it there. Anyone who can write the cache can put a self-consistent build where a pull landed; the record,
    kept outside the cache, cannot be forged. A folder there without one is refused."""
    from aotpack.paths import cache_dir

    lexical = os.path.abspath(cache_dir() / "hub")
    roots = {lexical, os.path.realpath(lexical)}
    inside = [(p, r) for p in _places(path) for r in roots if p == r or p.startswith(r.rstrip("/") + "/")]
    if not inside:
        return None
    found = {b for p, r in inside if (b := _build_at(Path(p).relative_to(r).parts)) is not None}
    if len(found) != 1:
        raise IntegrityError(f"{_shown(str(path), 120)} lies in aotpack's Hub cache ({lexical}) but is not the "
                             "folder of one pulled build", "load the folder 'aotpack pull' printed, or the repo id "
                             "with --revision")
    repo_id, commit, name = found.pop()
    pulled = _read_record(repo_id, commit, name)
    if pulled is None:
        raise IntegrityError(f"{name} of {repo_id}@{commit[:12]} in aotpack's Hub cache has no record of a pull "
                             "that verified it here", f"pull it again: aotpack pull {repo_id} --revision {commit}")
    return pulled


def _places(path: str | os.PathLike) -> list[str]:
    """Every place resolving ``path`` passes through, each link followed by hand as the kernel follows it
    (and '..' taken after the link before it, as the kernel takes it)."""
    parts = list(Path(os.getcwd(), os.path.expanduser(str(path))).parts)
    here, seen, links = "/", [], 0
    while parts:
        part = parts.pop(0)
        if part == os.sep:
            here = os.sep
            continue
        nxt = os.path.dirname(here) if part == ".." else os.path.join(here, part)
        seen.append(nxt)
        if part != ".." and os.path.islink(nxt) and links < 40:
            links += 1
            with contextlib.suppress(OSError):  # gone meanwhile: the open that follows fails on its own
                parts[:0] = [p for p in Path(os.readlink(nxt)).parts if p != "."]
            continue
        here = nxt
    return seen


def _build_at(parts: tuple[str, ...]) -> tuple[str, str, str] | None:
    """(repo id, commit, build) of a path below the Hub cache: models--OWNER--NAME/COMMIT/builds/BUILD."""
    if len(parts) != 4 or not parts[0].startswith("models--") or not _COMMIT.match(parts[1]) \
            or parts[2] != "builds" or not mf.is_safe_name(parts[3]):
        return None
    return parts[0][len("models--"):].replace("--", "/"), parts[1], parts[3]  # repo ids never hold '--'


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return b""
