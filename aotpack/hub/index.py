"""The repo's index (``aotpack-index.json``): read from the Hub, checked as the untrusted input it is, one
entry made per pushed build, and the build that fits this machine chosen from it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from aotpack.artifact import manifest as mf
from aotpack.artifact.platform import Platform, compute_dtype, mismatches, slow_scheme, tag
from aotpack.errors import HubError, IncompatibleArtifactError
from aotpack.hub.client import INDEX, INDEX_SCHEMA, _SHA256, _constants, _json, _shown

log = logging.getLogger("aotpack")


def _read_index(api: Any, repo_id: str, revision: str, local_dir: Path | None = None, *,
                for_push: bool = False, wanted: str | None = None) -> dict:
    """The repo's index at ``revision`` (an empty one for a new repo); online always from the server (a copy
    in the local folder is what someone who can write the cache would plant)."""
    from huggingface_hub import errors as hfe

    try:
        path = api.hf_hub_download(repo_id, INDEX, revision=revision, local_dir=local_dir,
                                   force_download=not _constants().is_offline_mode())
    except hfe.RemoteEntryNotFoundError:  # not its local twin: offline, a missing index is a missing repo
        return {"schema_version": INDEX_SCHEMA, "builds": {}}
    return _parse_index(Path(path).read_bytes(), repo_id, for_push=for_push, wanted=wanted)


def _parse_index(text: bytes, repo_id: str, *, for_push: bool = False, wanted: str | None = None) -> dict:
    """The index, checked once as it is read (it is untrusted input): every entry left has the fields and types
    the rest of this module uses. A pull skips a bad entry with a warning (refuses when it is ``wanted``, the
    build asked for); a push refuses any, since it would write the index back."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise HubError(f"{repo_id}/{INDEX} is not valid JSON", "push a build again to rewrite it") from None
    if not isinstance(data, dict) or not isinstance(data.get("builds"), dict):
        raise HubError(f"{repo_id}/{INDEX} is not an aotpack index", "was this repo written by 'aotpack push'?")
    version = data.get("schema_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise HubError(f"{repo_id}/{INDEX} is not an aotpack index (schema_version)",
                       "was this repo written by 'aotpack push'?")
    if version > INDEX_SCHEMA:
        raise HubError(f"{repo_id} was written by a newer aotpack", "upgrade aotpack: pip install -U aotpack")
    builds = {}
    for name, entry in data["builds"].items():
        why = _entry_problem(name, entry)
        if why is None:
            builds[name] = entry
        elif for_push:
            raise HubError(f"{repo_id}/{INDEX} has an unusable build entry {_shown(name)} ({why})",
                           f"fix or delete that entry of {INDEX} in {repo_id} (e.g. in the Hub's web editor), or "
                           "push to another repo")
        elif name == wanted:
            raise HubError(f"build {_shown(name)} of {repo_id} has an unusable index entry ({why})",
                           "do not use this build; ask the repo's owner to push it again")
        else:
            log.warning("%s/%s: ignoring build entry %s (%s)", repo_id, INDEX, _shown(name), why)
    data["builds"] = builds
    return data


def _entry_problem(name: str, entry: Any) -> str | None:
    """Why an index entry cannot be used, or None: the fields pull, push and the card read, with their types."""
    if not mf.is_safe_name(name):
        return "its name is not a plain folder name"
    if not isinstance(entry, dict):
        return "not an object"
    for key in ("scheme", "checkpoint"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            return f"{key!r} is missing or not text"
    for key in ("manifest_sha256", "signature_sha256"):
        value = entry.get(key)
        if (value is not None or key == "manifest_sha256") and not (isinstance(value, str) and _SHA256.match(value)):
            return f"{key!r} is not a sha256"
    for key in ("size", "build_seconds"):
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            return f"{key!r} is not a number >= 0"
    platform = entry.get("platform")
    if not isinstance(platform, dict) or not platform:
        return "'platform' is missing or empty"
    texts = ("device", "arch", "torch", "torchao", "diffusers", "python")
    optional = ("isa", "cuda_capability", "gpu_name")
    if (platform.get("device") not in ("cpu", "cuda") or not all(isinstance(platform.get(k), str) for k in texts)
            or not all(isinstance(platform.get(k), (str, type(None))) for k in optional)
            or not isinstance(platform.get("cpu_flags", []), list)):
        return "'platform' is not a platform"
    return None


def _index_entry(data: Any, manifest_sha: str, signature_sha: str | None) -> dict:
    data = _json(data)
    entry = {
        "recipe": data["recipe"]["name"] + (f"-{data['recipe']['variant']}" if data["recipe"]["variant"] else ""),
        "checkpoint": data["model"]["checkpoint"],
        "scheme": data["scheme"]["name"],
        "options": {k: v for k, v in sorted((data.get("options") or {}).items()) if v},
        "platform": data["platform"],
        "size": sum(e["size"] for e in data["files"].values()),
        "build_seconds": round(sum(data["build"]["stages"].values()), 1),
        "date": data["build"]["date"],
        "manifest_sha256": manifest_sha,
    }
    entry["dtype"] = data.get("dtype")
    entry["request"] = data.get("request")  # what a call may ask: the card's loading example stays inside it
    q = data["build"].get("quant_error")
    if q:  # quantized compiled model vs full precision, measured at build: what a user picks a build by
        entry["quant_error"] = {"forward_max_abs": q["forward_max_abs"], "forward_ref_max": q["forward_ref_max"]}
    if signature_sha:
        entry["signature_sha256"] = signature_sha
    return entry


def choose_build(index: dict, here: dict, quant: str | None = None, build: str | None = None) -> str:
    """The build of ``index`` that runs here: ``build`` if named, else a scheme that is not many times slower here
    (``slow_scheme``: int8 matmuls on a CPU without int8 units), then the exact platform, then the dtype this
    machine computes fastest (``compute_dtype``: a bf16 build is the smaller one, yet on a CPU without bf16 units
    it runs several times slower than fp32), then the smallest."""
    if build is not None:
        if build not in index["builds"]:
            raise HubError(f"the repo has no build {_shown(build)}",
                           f"it has: {', '.join(sorted(index['builds'])) or 'nothing'}")
        candidates = {build: index["builds"][build]}
    else:
        candidates = index["builds"]
    fits, h = [], Platform.coerce(here)
    for name, entry in candidates.items():
        if quant and entry.get("scheme") != quant:
            continue
        platform = entry["platform"]
        try:
            if mismatches(platform, here):
                continue
        except (KeyError, TypeError, AttributeError):
            continue
        fastest = compute_dtype(here, entry.get("scheme"))[0]  # what `--dtype auto` builds this scheme in here
        slow = slow_scheme(h.device, h.cpu_flags, entry.get("scheme")) is not None
        fits.append((slow, tag(platform) != tag(here), entry.get("dtype") != fastest, entry.get("size", 0), name))
    if fits:
        fits.sort()
        passed_over, other, slower, size, name = fits[0]
        why = ("the one named" if build else
               f"{'a compatible' if other else 'the exact'} platform for this machine ({tag(here)})"
               + (f", scheme {quant}" if quant else "")
               + ("" if passed_over or not any(f[0] for f in fits) else
                  ", passing over a scheme many times slower here (int8 matmuls without int8 units)")
               + ("" if slower or len(fits) == 1 else ", in the dtype it computes that scheme fastest in")
               + (f", the smallest of {len(fits)} that fit" if len(fits) > 1 else "")
               + (f"; {len(index['builds']) - len(fits)} other build(s) do not fit" if len(index["builds"]) > len(fits)
                  else ""))
        log.info("chose build %s: %s", name, why)
        return name
    have = ", ".join(sorted(f"{n} (torch {e['platform'].get('torch')})"
                            for n, e in index["builds"].items())) or "nothing"
    what = f" {build}" if build else (" for --quant " + quant if quant else "")
    raise IncompatibleArtifactError(
        f"no build{what} fits this machine ({tag(here)}, torch {_json(here)['torch']}); the repo has: {have}",
        "build one here and push it: aotpack build ... --push REPO",
    )
