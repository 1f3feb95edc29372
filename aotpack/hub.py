"""``push`` / ``pull``: artifacts travel through the Hugging Face Hub.

One repo holds many builds (scheme x platform), each under ``builds/<scheme>-<platform>/``, with an index
(``aotpack-index.json``) and a model card at the root. ``pull`` downloads only the build that fits this
machine and verifies every file's sha256 before anything is loaded. A .pt2 is native code: pulling needs a
pinned revision (commit or tag) or an explicit ``trust``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from aotpack.artifact import files as artifact
from aotpack.artifact import manifest as mf
from aotpack.errors import AotpackError, HubError, IncompatibleArtifactError, IntegrityError, first_line
from aotpack.artifact.platform import describe, mismatches, tag

log = logging.getLogger("aotpack")

INDEX = "aotpack-index.json"
INDEX_SCHEMA = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_RETRIES = 3


def endpoint() -> str:
    """The Hub to talk to: ``HF_ENDPOINT`` read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def build_name(data: dict) -> str:
    """Folder of a build inside the repo: '<scheme>-<platform>', e.g. 'int8wo-cpu-x86_64-avx2'."""
    return f"{data['scheme']['name']}-{tag(data['platform'])}"


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Map huggingface_hub and network errors to one HubError line. Tokens never appear in messages."""
    import httpx2
    from huggingface_hub import errors as hfe

    try:
        yield
    except AotpackError:
        raise
    except hfe.RevisionNotFoundError:
        raise HubError(f"revision '{revision}' does not exist in {repo_id}",
                       "check --revision (a branch, tag or commit of that repo)") from None
    except (hfe.GatedRepoError, hfe.RepositoryNotFoundError):
        raise HubError(f"repo {repo_id} was not found, or it is private and this token cannot see it",
                       "check the repo id; log in with 'hf auth login', set HF_TOKEN or pass --token") from None
    except hfe.EntryNotFoundError as e:
        raise HubError(f"{repo_id} has no such file ({first_line(e, 200)})", "was this repo written by 'aotpack push'?") from None
    except hfe.OfflineModeIsEnabled:
        raise HubError(f"{repo_id} is not in the local cache and HF_HUB_OFFLINE=1",
                       "pull it once with network access, or unset HF_HUB_OFFLINE") from None
    except hfe.LocalEntryNotFoundError:
        raise HubError(f"could not reach the Hub at {endpoint()} and {repo_id} is not in the local cache",
                       "check the network and HF_ENDPOINT") from None
    except hfe.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(f"the Hub at {endpoint()} refused the token (401 Unauthorized)",
                           "log in with 'hf auth login', set HF_TOKEN or pass a valid --token") from None
        if status == 403:
            raise HubError(f"the token may not write to {repo_id} (403 Forbidden)",
                           "use a token with write access to that namespace") from None
        raise HubError(f"the Hub answered {status}: {first_line(e, 200)}", "try again later") from None
    except (httpx2.TransportError, ConnectionError) as e:
        raise HubError(f"could not reach the Hub at {endpoint()}: {type(e).__name__}",
                       "check the network and HF_ENDPOINT; try again") from None


def _retrying(fn: Callable[[], Any], what: str) -> Any:
    """Call ``fn``, retrying server errors (5xx) and dropped connections with backoff."""
    import httpx2
    from huggingface_hub import errors as hfe

    for attempt in range(1, _RETRIES + 1):
        try:
            return fn()
        except hfe.HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else None
            if status is None or status < 500 or attempt == _RETRIES:
                raise
            reason = f"server error {status}"
        except (httpx2.TransportError, ConnectionError) as e:
            if attempt == _RETRIES:
                raise
            reason = type(e).__name__
        log.warning("%s: %s, retrying (%d/%d)", what, reason, attempt, _RETRIES - 1)
        time.sleep(0.5 * attempt)


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


def _read_index(api: Any, repo_id: str, revision: str) -> dict:
    """The repo's index at ``revision`` (an empty one for a new repo)."""
    from huggingface_hub import errors as hfe

    try:
        path = _retrying(lambda: api.hf_hub_download(repo_id, INDEX, revision=revision), "download index")
    except hfe.EntryNotFoundError:
        return {"schema_version": INDEX_SCHEMA, "builds": {}}
    return _parse_index(Path(path).read_bytes(), repo_id)


def _parse_index(text: bytes, repo_id: str) -> dict:
    try:
        data = json.loads(text)
    except ValueError:
        raise HubError(f"{repo_id}/{INDEX} is not valid JSON", "push a build again to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("builds"), dict):
        raise HubError(f"{repo_id}/{INDEX} is not an aotpack index", "was this repo written by 'aotpack push'?")
    if data.get("schema_version", 0) > INDEX_SCHEMA:
        raise HubError(f"{repo_id} was written by a newer aotpack", "upgrade aotpack: pip install -U aotpack")
    for name, entry in data["builds"].items():
        if not mf.is_safe_name(name) or not isinstance(entry, dict) or not isinstance(entry.get("platform"), dict):
            raise HubError(f"{repo_id}/{INDEX} has an invalid build entry {name!r}", "do not use this repo")
    return data


def _index_entry(data: dict, manifest_sha: str) -> dict:
    return {
        "recipe": data["recipe"]["name"] + (f"-{data['recipe']['variant']}" if data["recipe"]["variant"] else ""),
        "checkpoint": data["model"]["checkpoint"],
        "scheme": data["scheme"]["name"],
        "platform": data["platform"],
        "size": sum(e["size"] for e in data["files"].values()),
        "build_seconds": round(sum(data["build"]["stages"].values()), 1),
        "date": data["build"]["date"],
        "manifest_sha256": manifest_sha,
    }


def model_card(repo_id: str, index: dict) -> str:
    """README.md of the repo, made with huggingface_hub's ModelCard from the builds' index."""
    from huggingface_hub import ModelCard, ModelCardData

    builds = index["builds"]
    checkpoints = sorted({b["checkpoint"] for b in builds.values()})
    base = [c for c in checkpoints if not c.startswith(("builtin:", "/"))]
    card_data = ModelCardData(
        base_model=base[0] if len(base) == 1 else (base or None),
        library_name="diffusers",
        tags=["aotpack", "torchao", "aoti", "diffusers"],
    )
    rows = "\n".join(
        f"| `{name}` | {b['scheme']} | {tag(b['platform'])} | {b['platform']['torch']} | "
        f"{b['size'] / 1e6:.1f} MB | {b['build_seconds']:.0f} s |"
        for name, b in sorted(builds.items())
    )
    one = sorted(builds)[0] if builds else "SCHEME-PLATFORM"
    content = f"""---
{card_data.to_yaml()}
---

# {repo_id}

Ahead-of-time compiled ([AOTInductor](https://pytorch.org/docs/stable/torch.compiler_aot_inductor.html)) and
[torchao](https://github.com/pytorch/ao)-quantized transformer of {', '.join(f'`{c}`' for c in checkpoints)},
packaged by **aotpack**. Each build is a folder under `builds/`: `model.pt2` (compiled code),
`weights.safetensors` (quantized weights) and `manifest.json` (sha256 of every file, platform, input ranges).

| build | scheme | platform | torch | size | build time |
|---|---|---|---|---|---|
{rows}

```python
import aotpack  # picks the build that fits this machine and verifies every file before loading
aotpack.load_into(pipe, "{repo_id}", revision="<tag or commit>")   # pipe: the diffusers pipeline
image = pipe("a dog surfing on the moon").images[0]
```

A `.pt2` holds native code: load it from a pinned revision (a tag or a commit), as above. This
machine-specific build `{one}` only runs on the platform its name says; aotpack refuses the others.
"""
    return str(ModelCard(content))


@dataclasses.dataclass
class PushResult:
    repo_id: str
    build: str
    commit: str | None     # None when the repo already held this exact build
    url: str | None
    tag: str | None


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str = "main",
    tag_name: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Add or replace one build in ``repo_id`` in one commit; other builds stay as they are.

    Pushing a build the repo already holds (same manifest bytes) makes no commit and uploads nothing.
    """
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    data = mf.read(folder)
    artifact.verify_files(folder, data["files"])  # never publish a damaged artifact
    manifest_bytes = (folder / mf.MANIFEST).read_bytes()
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    name = build_name(data)
    if not mf.is_safe_name(name):
        raise HubError(f"build name {name!r} is not a plain folder name", "rebuild the artifact with this aotpack")
    api = _api(token)
    with _hub_errors(repo_id, revision):
        _retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create repo")
        if revision != "main":
            _retrying(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "create branch")
        index = _read_index(api, repo_id, revision)
        others = {b["checkpoint"] for b in index["builds"].values()} - {data["model"]["checkpoint"]}
        if others:
            raise HubError(f"{repo_id} holds builds of {', '.join(sorted(others))}, not {data['model']['checkpoint']}",
                           "push each model to its own repo")
        commit = None
        if index["builds"].get(name, {}).get("manifest_sha256") != manifest_sha:
            index["builds"][name] = _index_entry(data, manifest_sha)
            index["schema_version"] = INDEX_SCHEMA
            ops = [CommitOperationAdd(f"builds/{name}/{f}", str(folder / f)) for f in sorted(data["files"])]
            ops.append(CommitOperationAdd(f"builds/{name}/{mf.MANIFEST}", manifest_bytes))
            ops.append(CommitOperationAdd(INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
            ops.append(CommitOperationAdd("README.md", model_card(repo_id, index).encode()))
            info = _retrying(lambda: api.create_commit(repo_id, ops, commit_message=f"aotpack: add build {name}",
                                                       revision=revision), "commit")
            commit = info.oid
            log.info("pushed %s to %s@%s (commit %s)", name, repo_id, revision, commit[:12])
        else:
            log.info("%s@%s already holds this exact build %s: nothing to upload", repo_id, revision, name)
        if tag_name:
            target = commit or api.repo_info(repo_id, revision=revision).sha
            refs = api.list_repo_refs(repo_id)
            existing = {t.name: t.target_commit for t in refs.tags}
            if existing.get(tag_name) not in (None, target):
                raise HubError(f"tag '{tag_name}' already exists in {repo_id} at another commit",
                               "tags are pins: choose a new tag name")
            if tag_name not in existing:
                _retrying(lambda: api.create_tag(repo_id, tag=tag_name, revision=target), "create tag")
    url = f"{endpoint()}/{repo_id}/tree/{commit}" if commit else None
    return PushResult(repo_id, name, commit, url, tag_name)


def _pins_file() -> Path:
    from aotpack.paths import cache_dir

    return cache_dir() / "hub-pins.json"


def _resolve_pin(api: Any, repo_id: str, revision: str | None, trust: bool) -> str:
    """The commit to read. Branches move, so they need ``trust``; commits and tags are pins."""
    revision = revision or "main"
    if _COMMIT.match(revision):
        return revision
    pins = {}
    if _pins_file().is_file():
        with contextlib.suppress(ValueError):
            pins = json.loads(_pins_file().read_text())
    key = f"{endpoint()}|{repo_id}|{revision}"
    if _offline():
        if key in pins:
            return pins[key]
        if trust:
            return revision
        raise HubError(f"offline, and '{revision}' was never pulled as a tag of {repo_id}",
                       "pass a commit hash as --revision, or --trust to use the cached branch")
    refs = _retrying(lambda: api.list_repo_refs(repo_id), "list refs")
    tags = {t.name: t.target_commit for t in refs.tags}
    branches = {b.name: b.target_commit for b in refs.branches}
    if revision in tags:
        pins[key] = tags[revision]
        _pins_file().parent.mkdir(parents=True, exist_ok=True)
        tmp = _pins_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(pins, indent=1))
        os.replace(tmp, _pins_file())
        return tags[revision]
    if revision in branches:
        if not trust:
            raise HubError(
                f"'{revision}' is a branch of {repo_id}: it can change under you, and a .pt2 is native code",
                "pin a tag or commit with --revision, or pass --trust (trust=True) to accept the branch",
            )
        return branches[revision]
    raise HubError(f"revision '{revision}' does not exist in {repo_id}",
                   f"tags: {', '.join(sorted(tags)) or 'none'}; branches: {', '.join(sorted(branches))}")


def choose_build(index: dict, here: dict, quant: str | None = None) -> str:
    """The build of ``index`` that runs here: exact platform first, then the smallest."""
    fits = []
    for name, entry in index["builds"].items():
        if quant and entry.get("scheme") != quant:
            continue
        platform = entry["platform"]
        try:
            if mismatches(platform, here):
                continue
        except (KeyError, TypeError, AttributeError):
            continue
        fits.append((tag(platform) != tag(here), entry.get("size", 0), name))
    if fits:
        return sorted(fits)[0][2]
    have = ", ".join(sorted(f"{n} (torch {e['platform'].get('torch')})" for n, e in index["builds"].items())) or "nothing"
    raise IncompatibleArtifactError(
        f"no build{' for --quant ' + quant if quant else ''} fits this machine ({tag(here)}, torch {here['torch']}); "
        f"the repo has: {have}",
        "build one here and push it: aotpack build ... && aotpack push ...",
    )


def pull(
    repo_id: str,
    *,
    revision: str | None = None,
    quant: str | None = None,
    token: str | None = None,
    trust: bool = False,
) -> Path:
    """Download the build of ``repo_id`` that fits this machine, verify it, and return its folder."""
    from huggingface_hub import snapshot_download

    api = _api(token)
    here = describe(probe_isa=False)  # pulls sit on a serving box's boot path: no compiler probe
    with _hub_errors(repo_id, revision):
        commit = _resolve_pin(api, repo_id, revision, trust)
        index = _read_index(api, repo_id, commit)
        name = choose_build(index, here, quant)
        log.info("pulling %s from %s@%s", name, repo_id, commit[:12])
        root = _retrying(lambda: snapshot_download(
            repo_id, revision=commit, allow_patterns=[f"builds/{name}/*"], endpoint=endpoint(), token=token,
        ), "download build")
    folder = Path(root) / "builds" / name
    try:
        manifest_bytes = (folder / mf.MANIFEST).read_bytes()
        if hashlib.sha256(manifest_bytes).hexdigest() != index["builds"][name].get("manifest_sha256"):
            raise IntegrityError(f"{name}/manifest.json does not match the repo index", "do not load this build")
        data = mf.parse(manifest_bytes)
        artifact.verify_files(folder, data["files"])
    except (IntegrityError, mf.ManifestError, OSError) as e:
        _evict(folder)  # so that the next pull downloads again instead of re-reading bad bytes
        if isinstance(e, OSError):
            raise IntegrityError(f"download of {name} is incomplete ({e.strerror})", "pull again") from None
        raise IntegrityError(f"downloaded {name} failed verification: {e.cause}",
                             "pull again; if it persists the repo's files were altered: do not load them") from None
    return folder


def _evict(folder: Path) -> None:
    """Delete a build's snapshot links and their blobs from the Hub cache."""
    if not folder.is_dir():
        return
    for link in folder.iterdir():
        with contextlib.suppress(OSError):
            target = link.resolve()
            link.unlink()
            if target != link and target.is_file():
                target.unlink()


def resolve_for_load(repo_id: str, *, revision: str | None = None, trust: bool = False,
                     token: str | None = None, quant: str | None = None) -> Path:
    """``load("owner/name", revision=...)``: pull the fitting build, then load it like a folder."""
    return pull(repo_id, revision=revision, quant=quant, token=token, trust=trust)
