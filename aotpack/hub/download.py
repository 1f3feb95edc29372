"""``pull``: download the build that fits this machine into ``AOTPACK_CACHE/hub/`` (one folder per commit)
with huggingface_hub's ``snapshot_download``, verify every file's sha256 (and the signature, with trusted
keys) before anything is loaded, and seal the record a later load checks against."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

from aotpack.artifact import files as artifact
from aotpack.artifact import manifest as mf
from aotpack.artifact.platform import describe
from aotpack.errors import HubError, IntegrityError, ManifestError, first_line
from aotpack.hub.client import SIGNATURE, _api, _constants, _files, _hub_errors, endpoint
from aotpack.hub.identity import _RECORD, Pulled, _pulled_record, _read_record
from aotpack.hub.index import _read_index, choose_build
from aotpack.hub.resolve import _check_names, _resolve_pin
from aotpack.paths import seal, write_atomic

log = logging.getLogger("aotpack")


def pulled_dir(repo_id: str, commit: str) -> Path:
    """Where ``pull`` puts the builds of one commit: ``AOTPACK_CACHE/hub/models--OWNER--NAME/COMMIT``.

    huggingface_hub's ``local_dir`` download (real files, not the Hub cache's links to blobs: a loader opens
    only regular files it hashed), one folder per commit, so a later pull never rewrites files a running
    server reads; offline, it is read back without a request."""
    from huggingface_hub.file_download import repo_folder_name

    from aotpack.paths import cache_dir

    return cache_dir() / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model") / commit


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    quant: str | None = None,
    build: str | None = None,
    token: str | None = None,
    trust: bool = False,
    refresh_pins: bool = False,
    trusted_keys: list | None = None,
) -> Path:
    """Download the build of ``repo_id`` that fits this machine (or the one named ``build``), verify it, and
    return its folder. A tag that moved since this machine first pulled it is refused unless ``refresh_pins``.
    ``trusted_keys``: the build must be signed by one of these public keys (default: ``AOTPACK_TRUSTED_KEYS``).
    A later ``load`` of the folder checks it against this pull's sealed record (``pulled_identity``)."""
    return _pull(repo_id, revision=revision, quant=quant, build=build, token=token, trust=trust,
                 refresh_pins=refresh_pins, trusted_keys=trusted_keys)[0]


def _pull(repo_id: str, *, revision: str | None, quant: str | None, build: str | None, token: str | None,
          trust: bool, refresh_pins: bool, trusted_keys: list | None) -> tuple[Path, "Pulled"]:
    _check_names(repo_id, revision)
    api = _api(token)
    here = describe(probe_isa=False)  # pulls sit on a serving box's boot path: no compiler probe
    with _hub_errors(repo_id, revision):
        commit = _resolve_pin(api, repo_id, revision, trust=trust, refresh_pins=refresh_pins, token=token)
        root = pulled_dir(repo_id, commit)
        index = _read_index(api, repo_id, commit, local_dir=root, wanted=build)
        name = choose_build(index, here, quant, build)
        log.info("pulling %s from %s@%s", name, repo_id, commit[:12])
        offline = _constants().is_offline_mode()
        for attempt in (1, 2):
            _download(api, repo_id, commit, name, root, token, offline)
            try:
                manifest_bytes, pulled = _verify_pulled(root, name, index["builds"][name], repo_id, commit, offline)
                break
            except (IntegrityError, ManifestError, OSError) as e:
                _evict(root, name)  # the next download fetches every file again instead of re-reading bad bytes
                if attempt == 1 and not offline and not isinstance(e, OSError):
                    log.warning("%s: files in %s failed verification (%s); downloading them again", repo_id,
                                root, e.cause)
                    continue
                if isinstance(e, OSError):
                    raise IntegrityError(f"download of {name} is incomplete ({e.strerror})", "pull again") from None
                raise IntegrityError(f"downloaded {name} failed verification: {e.cause}",
                                     "pull again; if it persists the repo's files were altered: do not load them") \
                    from None
    folder = root / "builds" / name
    from aotpack.signing import check_signature, trusted_keys_from_env

    keys = trusted_keys_from_env() if trusted_keys is None else list(trusted_keys)
    if keys:  # the same check a load makes: before the folder is handed to anyone
        from aotpack import signing

        check_signature(signing.read_signature(folder), manifest_bytes, mf.parse(manifest_bytes), keys, folder)
    return folder, pulled


def _download(api: Any, repo_id: str, commit: str, name: str, root: Path, token: str | None, offline: bool) -> None:
    """The build's files into ``root``; online, its manifest always from the server (a local copy is what
    someone who can write the cache would plant: every other file is checked against the manifest)."""
    from huggingface_hub import snapshot_download

    try:
        if not offline:
            api.hf_hub_download(repo_id, f"builds/{name}/{mf.MANIFEST}", revision=commit, local_dir=root,
                                force_download=True)
        snapshot_download(repo_id, revision=commit, allow_patterns=[f"builds/{name}/*"], token=token,
                          endpoint=endpoint(), local_dir=root)
    except ValueError as e:  # huggingface_hub refuses a server file name with '..' or a root: not a plain path
        _evict(root, name)
        raise HubError(f"{repo_id} lists a file under builds/{name}/ that is not a plain file name "
                       f"({first_line(e, 160)})", "do not use this repo; ask its owner to remove that file") from None
    except BaseException:
        # huggingface_hub removes its own partial file; the files of this build that did arrive go too, so
        # that a failed pull (a full disk, an interrupt) leaves no half build behind.
        _evict(root, name)
        raise


def _verify_pulled(root: Path, name: str, entry: dict, repo_id: str, commit: str,
                   offline: bool) -> tuple[bytes, "Pulled"]:
    """Check a pulled build against the index entry and its manifest; returns the manifest's bytes and the
    identity a load verifies against. Online, that identity is sealed into the pull's record; offline, only a
    build whose record says this machine pulled and verified exactly these bytes online before passes."""
    folder = root / "builds" / name
    manifest_bytes = (folder / mf.MANIFEST).read_bytes()
    pulled = Pulled(endpoint(), repo_id, commit, name, hashlib.sha256(manifest_bytes).hexdigest(),
                    entry.get("signature_sha256"))
    if pulled.manifest_sha256 != entry["manifest_sha256"]:
        raise IntegrityError(f"{name}/manifest.json does not match the repo index", "do not load this build")
    signature_sha = pulled.signature_sha256
    if signature_sha and hashlib.sha256((folder / SIGNATURE).read_bytes()).hexdigest() != signature_sha:
        raise IntegrityError(f"{name}/{SIGNATURE} does not match the repo index", "do not load this build")
    artifact.verify_files(folder, _files(mf.parse(manifest_bytes)))
    if offline:
        if _read_record(repo_id, commit, name) != pulled:
            raise HubError(f"offline, and {name} of {repo_id}@{commit[:12]} was never pulled online here (or its "
                           "files changed since)", "pull it once with network access, or unset HF_HUB_OFFLINE")
    else:
        write_atomic(_pulled_record(repo_id, commit, name), seal(_RECORD, dataclasses.asdict(pulled)))
    return manifest_bytes, pulled


def _evict(root: Path, name: str) -> None:
    """Delete a pulled build's files (and huggingface_hub's notes on them), so the next pull downloads again."""
    for folder in (root / "builds" / name, root / ".cache" / "huggingface" / "download" / "builds" / name):
        if folder.is_dir():
            for path in folder.iterdir():
                with contextlib.suppress(OSError):
                    path.unlink()


def resolve_for_load(repo_id: str, *, revision: str | None = None, trust: bool = False,
                     token: str | None = None, quant: str | None = None,
                     refresh_pins: bool = False) -> tuple[Path, Pulled]:
    """``load("owner/name", revision=...)``: pull the fitting build; returns its folder and what was pulled, which
    the loader checks the bytes it opens against (and the signature itself, with the keys it was given)."""
    return _pull(repo_id, revision=revision, quant=quant, build=None, token=token, trust=trust,
                 refresh_pins=refresh_pins, trusted_keys=[])
