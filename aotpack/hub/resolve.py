"""Repo ids, revisions and refs: a malformed name is refused before it reaches a URL, the repo's tags and
branches are read (through ``http_backoff``: the one read the client does not retry), and a revision becomes
the commit to read: commits are pins, tags are pinned at their first pull here, branches need ``trust``."""

from __future__ import annotations

import logging
from typing import Any

from aotpack.errors import HubError
from aotpack.hub.client import _COMMIT, _constants, _hub_errors, _shown, endpoint
from aotpack.hub.pins import _pins_locked, _read_pins, _write_pins

log = logging.getLogger("aotpack")
_RETRIES = 3                  # reads the client does not retry itself: http_backoff, 0.5 s, 1 s, 2 s


def _check_names(repo_id: str, revision: str | None) -> None:
    """Refuse a malformed repo id or revision before it reaches a URL, a file name or a message."""
    from huggingface_hub.utils import validate_repo_id

    with _hub_errors(repo_id, revision):
        validate_repo_id(repo_id)
    if revision is not None and (not revision or not revision.isprintable() or len(revision) > 255
                                 or revision.strip() != revision):
        raise HubError(f"revision {_shown(revision)} is not a tag, branch or commit name",
                       "pass a tag (e.g. v1) or a 40-character commit hash as --revision")


def _refs(repo_id: str, token: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """The repo's tags and branches, {name: commit}. ``HfApi.list_repo_refs`` does not retry server errors;
    huggingface_hub's ``http_backoff`` does, so this one read goes through it."""
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    response = http_backoff("GET", f"{endpoint()}/api/models/{repo_id}/refs",
                            headers=build_hf_headers(token=token), max_retries=_RETRIES, base_wait_time=0.5,
                            max_wait_time=2)
    hf_raise_for_status(response)
    try:
        data = response.json()
        return ({t["name"]: t["targetCommit"] for t in data["tags"]},
                {b["name"]: b["targetCommit"] for b in data["branches"]})
    except (ValueError, KeyError, TypeError):
        raise HubError(f"the Hub's list of refs of {repo_id} is not what huggingface_hub expects",
                       "check HF_ENDPOINT") from None


def _resolve_pin(api: Any, repo_id: str, revision: str | None, *, trust: bool, refresh_pins: bool,
                 token: str | None) -> str:
    """The commit to read. Branches move, so they need ``trust``; commits are pins; a tag is pinned to the
    commit it had when this machine first pulled it, and a tag moved since is refused unless ``refresh_pins``
    (or ``trust``) re-pins it."""
    asked, revision = revision, revision or "main"
    if _COMMIT.match(revision):
        return revision
    key = f"{endpoint()}|{repo_id}|{revision}"
    if _constants().is_offline_mode():
        pins = _read_pins()
        if key in pins:
            return pins[key]
        if trust:
            return revision
        if asked is None:
            raise HubError(f"offline, and nothing of {repo_id} was pulled here with a tag",
                           f"pull it once with network access (aotpack pull {repo_id} --revision TAG), or pass "
                           "--revision COMMIT of a build pulled before")
        raise HubError(f"offline, and {_shown(revision)} of {repo_id} was never pulled here",
                       "pull it once with network access, or pass --revision COMMIT of a build pulled before")
    tags, branches = _refs(repo_id, token)
    if revision in tags:
        now = tags[revision]
        with _pins_locked():
            pinned = _read_pins().get(key)
            if pinned not in (None, now) and not (refresh_pins or trust):
                raise HubError(f"tag {_shown(revision)} of {repo_id} moved: pinned to {pinned} at its first pull "
                               f"here, now at {now}",
                               "if you moved it, pass --refresh-pins; else keep the old build with "
                               f"--revision {pinned}")
            if pinned != now:
                if pinned:
                    log.warning("tag %s of %s re-pinned from %s to %s", revision, repo_id, pinned[:12], now[:12])
                pins = _read_pins()
                pins[key] = now
                try:
                    _write_pins(pins)
                except OSError as e:  # the pull itself is fine; only the memory of this pin is lost
                    log.warning("could not record the pin of tag %s (%s): a later move would go unnoticed",
                                revision, e.strerror)
        return now
    if revision in branches:
        if not trust:
            raise HubError(
                f"{_shown(revision)} is a branch of {repo_id}: it can change under you, and a .pt2 is native code",
                "pin a tag or commit with --revision, or pass --trust (trust=True) to accept the branch",
            )
        return branches[revision]
    raise HubError(f"revision {_shown(revision)} does not exist in {repo_id}",
                   f"tags: {', '.join(sorted(tags)) or 'none'}; branches: {', '.join(sorted(branches))}")
