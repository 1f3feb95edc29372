"""``push``: upload one build into a repo in one commit, beside the builds already there, with the index and
model card rewritten; the commit names its parent and is retried when another push lands first. ``add_tag``
pins a commit; ``check_can_push`` fails fast before a long build."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from aotpack.artifact import files as artifact
from aotpack.artifact import manifest as mf
from aotpack.errors import HubError, first_line
from aotpack.hub.card import model_card
from aotpack.hub.client import (INDEX, INDEX_SCHEMA, SIGNATURE, _api, _constants, _files, _hub_errors, _json, _shown,
                                endpoint)
from aotpack.hub.index import _index_entry, _read_index
from aotpack.hub.names import build_name
from aotpack.hub.resolve import _check_names, _refs

log = logging.getLogger("aotpack")
_PUSH_ATTEMPTS = 8            # a push races other pushes into the same branch (build farms): see _commit_build


def check_can_push(repo_id: str, *, token: str | None = None) -> None:
    """Before a long build that ends in a push: the Hub is reachable and takes the token (``whoami``), so an
    offline box or a bad token fails in a second, not after the build."""
    _check_names(repo_id, None)
    if _constants().is_offline_mode():
        raise HubError(f"HF_HUB_OFFLINE is set: the build could not be pushed to {repo_id}",
                       "unset HF_HUB_OFFLINE, or build without --push and push the folder later")
    with _hub_errors(repo_id):
        _api(token).whoami()


@dataclasses.dataclass
class PushResult:
    repo_id: str
    build: str
    commit: str            # the commit that holds this build (the branch head when it was already there)
    url: str               # the build's folder at that commit
    tag: str | None
    uploaded: bool         # False when the repo already held this exact build: no commit was made


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str = "main",
    tag: str | None = None,
    token: str | None = None,
    tag_name: str | None = None,
) -> PushResult:
    """Add or replace one build in ``repo_id`` in one commit; other builds stay as they are; ``tag`` tags that
    commit (``--tag`` on the command line; ``tag_name`` is the older spelling of it).

    The commit names its parent: when another push lands first (many farm jobs finishing at once), the index
    is read again and the commit retried, so concurrent pushes into one repo all end up in its index and card.
    Pushing a build the repo already holds (same manifest and signature bytes) makes no commit and uploads
    nothing. A ``signature.sig`` in the folder travels with the build.
    """
    if tag is not None and tag_name is not None and tag != tag_name:
        raise HubError(f"two tags given: tag={tag!r} and tag_name={tag_name!r}", "pass tag= only")
    tag_name = tag if tag is not None else tag_name
    folder = Path(folder)
    _check_names(repo_id, revision)
    manifest = mf.read(folder)
    artifact.verify_files(folder, _files(manifest))  # never publish a damaged artifact
    data = _json(manifest)
    manifest_bytes = (folder / mf.MANIFEST).read_bytes()
    signature = (folder / SIGNATURE).read_bytes() if (folder / SIGNATURE).is_file() else None
    if signature is not None:  # the index would call the build signed: the signature must cover these files
        _check_signature_covers(folder, signature, manifest_bytes, data)
    entry = _index_entry(data, hashlib.sha256(manifest_bytes).hexdigest(),
                         hashlib.sha256(signature).hexdigest() if signature is not None else None)
    name = build_name(data)
    if not mf.is_safe_name(name):
        raise HubError(f"build name {_shown(name)} is not a plain folder name",
                       "rebuild the artifact with this aotpack")
    files = {f"builds/{name}/{f}": folder / f for f in sorted(data["files"])}
    files[f"builds/{name}/{mf.MANIFEST}"] = manifest_bytes
    if signature is not None:
        files[f"builds/{name}/{SIGNATURE}"] = signature
    if tag_name:
        _check_names(repo_id, tag_name)
    api = _api(token)
    with _hub_errors(repo_id, revision):
        tagged = _tagged_already(api, repo_id, tag_name, name, entry, token) if tag_name else None
        if tagged is not None:
            return PushResult(repo_id, name, tagged, f"{endpoint()}/{repo_id}/tree/{tagged}/builds/{name}",
                              tag_name, False)
        commit, uploaded = _commit_build(api, repo_id, revision, name, entry, files, token, private=private,
                                         tag_name=tag_name)
        if tag_name:
            add_tag(repo_id, tag_name, commit=commit, token=token)
    return PushResult(repo_id, name, commit, f"{endpoint()}/{repo_id}/tree/{commit}/builds/{name}",
                      tag_name, uploaded)


def _check_signature_covers(folder: Path, signature: bytes, manifest_bytes: bytes, data: dict) -> None:
    """The signature must attest exactly this manifest and its files. Read, not verified (the pusher need not
    hold the public key; every loader verifies it): this catches a signature left over from before the folder
    changed, which would otherwise be published as "signed" and refused on every box."""
    from aotpack import signing

    hint = (f"sign it again: aotpack sign {folder} --key KEY.pem (or delete {SIGNATURE} to push it unsigned)")
    try:
        from model_signing._signing.signing import dsse_payload_to_manifest

        bundle = signing._parse_bundle(signature)
        statement = dsse_payload_to_manifest(json.loads(bundle.dsse_envelope.payload))
        digests = {item.identifier: item.digest.digest_hex for item in statement.resource_descriptors()}
        signing.check_covers(signing.SignedContents(digests=digests, fingerprint=""),
                             manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                             files={n: e["sha256"] for n, e in data["files"].items()})
    except signing.SignatureError as e:
        raise signing.SignatureError(f"{folder / SIGNATURE} does not cover this build: {e.cause}", hint) from None
    except Exception as e:  # a bundle whose payload is no model-signing statement: ValueError, KeyError, ...
        raise signing.SignatureError(f"{folder / SIGNATURE} holds no readable model-signing statement "
                                     f"({first_line(e, 120)})", hint) from None


def _tagged_already(api: Any, repo_id: str, tag_name: str, name: str, entry: dict, token: str | None) -> str | None:
    """Before anything is committed: a tag that exists is a pin and is never moved. When it already holds this
    exact build, the push is done (its commit is returned); at another build, the push is refused now, not
    after a commit has landed."""
    from huggingface_hub import errors as hfe

    try:
        at = _refs(repo_id, token)[0].get(tag_name)
    except hfe.RepositoryNotFoundError:  # a new repo: no tags yet (a token refused is refused by the commit)
        return None
    if at is None:
        return None
    old = _read_index(api, repo_id, at)["builds"].get(name, {})
    if (old.get("manifest_sha256"), old.get("signature_sha256")) == (entry["manifest_sha256"],
                                                                     entry.get("signature_sha256")):
        log.info("tag %s of %s already holds this exact build %s: nothing to upload", tag_name, repo_id, name)
        return at
    raise HubError(f"tag {_shown(tag_name)} already exists in {repo_id} (at {at[:12]}), without this build",
                   "tags are pins: choose a new tag name; nothing was pushed")


def add_tag(repo_id: str, tag_name: str, *, commit: str | None = None, revision: str = "main",
            token: str | None = None) -> str:
    """Tag ``commit`` (default: the head of ``revision``) and return it. Tags are pins: one that exists at another
    commit is never moved."""
    api = _api(token)
    with _hub_errors(repo_id, revision):
        tags, branches = _refs(repo_id, token)
        commit = commit or branches.get(revision)
        if commit is None:
            raise HubError(f"branch {_shown(revision)} does not exist in {repo_id}", "push a build first")
        if tags.get(tag_name) not in (None, commit):
            raise HubError(f"tag {_shown(tag_name)} already exists in {repo_id} at another commit",
                           "tags are pins: choose a new tag name")
        if tag_name not in tags:
            api.create_tag(repo_id, tag=tag_name, revision=commit)
    return commit


def _commit_build(api: Any, repo_id: str, revision: str, name: str, entry: dict, files: dict[str, Any],
                  token: str | None, *, private: bool, tag_name: str | None = None) -> tuple[str, bool]:
    """Commit one build onto the head of ``revision``; returns (commit holding it, whether a commit was made).

    Read head, read its index, commit with ``parent_commit=head``: the Hub refuses the commit (409/412) when the
    branch moved meanwhile, and then everything is read again. The same holds for a server error or a dropped
    connection at any step: no step has an effect until the commit is accepted, so the attempt is repeated.
    """
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import httpx

    for attempt in range(1, _PUSH_ATTEMPTS + 1):
        try:
            return _commit_once(api, repo_id, revision, name, entry, files, token, private=private,
                                tag_name=tag_name)
        except hfe.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status not in (409, 412) and (status is None or status < 500) or attempt == _PUSH_ATTEMPTS:
                raise
            reason = "another push landed first" if status in (409, 412) else f"server error {status}"
        except httpx.TransportError as e:
            if attempt == _PUSH_ATTEMPTS:
                raise
            reason = type(e).__name__
        log.info("push of %s: %s; reading the index again (%d/%d)", name, reason, attempt, _PUSH_ATTEMPTS - 1)
        time.sleep(random.uniform(0.1, 0.5) * attempt)  # jitter: N racing jobs do not retry in lockstep
    raise AssertionError("unreachable")


def _commit_once(api: Any, repo_id: str, revision: str, name: str, entry: dict, files: dict[str, Any],
                 token: str | None, *, private: bool, tag_name: str | None) -> tuple[str, bool]:
    """One attempt of ``_commit_build``: read the head and its index, then commit on top of that head."""
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head = _refs(repo_id, token)[1].get(revision)
    if head is None:
        raise HubError(f"branch {_shown(revision)} does not exist in {repo_id}", "push to main or create it")
    index = _read_index(api, repo_id, head, for_push=True)
    others = {b["checkpoint"] for b in index["builds"].values()} - {entry["checkpoint"]}
    if others:
        raise HubError(f"{repo_id} holds builds of {', '.join(sorted(others))}, not {entry['checkpoint']}",
                       "push each model to its own repo")
    old = index["builds"].get(name, {})
    if (old.get("manifest_sha256"), old.get("signature_sha256")) == (entry["manifest_sha256"],
                                                                     entry.get("signature_sha256")):
        log.info("%s@%s already holds this exact build %s: nothing to upload", repo_id, revision, name)
        return head, False
    ops: list[Any] = _stale_deletes(api, repo_id, revision, head, name, old, files) if old else []
    index["builds"][name] = entry
    index["schema_version"] = INDEX_SCHEMA
    ops += [CommitOperationAdd(p, str(v) if isinstance(v, Path) else v) for p, v in files.items()]
    ops.append(CommitOperationAdd(INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
    ops.append(CommitOperationAdd("README.md", model_card(repo_id, index, tag_name).encode()))
    info = api.create_commit(repo_id, ops, commit_message=f"aotpack: add build {name}", revision=revision,
                             parent_commit=head)
    log.info("pushed %s to %s@%s (commit %s)", name, repo_id, revision, info.oid[:12])
    return info.oid, True


def _stale_deletes(api: Any, repo_id: str, revision: str, head: str, name: str, old: dict,
                   files: dict[str, Any]) -> list[Any]:
    """Replacing a build: files of the old build that the new one lacks (a signature, a plan) go."""
    from huggingface_hub import CommitOperationDelete, RepoFile

    log.warning("%s@%s holds another build named %s (manifest %s, built %s): replacing it", repo_id,
                revision, name, old["manifest_sha256"][:12], _shown(str(old.get("date", "?")), 40))
    stale = {f.path for f in api.list_repo_tree(repo_id, path_in_repo=f"builds/{name}", revision=head,
                                                recursive=True) if isinstance(f, RepoFile)} - set(files)
    for path in sorted(stale):
        if ".." in path.split("/") or path.startswith("/"):
            raise HubError(f"{repo_id} holds a file {_shown(path)} under builds/{name}/ that is not a "
                           "plain file name", "delete it from the repo (Hub web UI or 'hf'), then push "
                           "again")
    return [CommitOperationDelete(p) for p in sorted(stale)]
