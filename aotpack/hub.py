"""``push`` / ``pull``: artifacts travel through the Hugging Face Hub.

One repo holds many builds (scheme x options x platform), each under ``builds/<name>/``, with an index
(``aotpack-index.json``) and a model card at the root. ``pull`` downloads only the build that fits this
machine (into ``AOTPACK_CACHE/hub/``, one folder per commit) and verifies every file's sha256 before anything
is loaded. A .pt2 is native code: pulling needs a pinned revision (commit or tag) or an explicit ``trust``; a
tag is pinned to the commit it had at this machine's first pull of it.

Everything that talks to the Hub is huggingface_hub's: ``HfApi``, ``snapshot_download`` (which retries
server errors and resumes dropped downloads itself), ``http_backoff`` for the one read the client does not
retry (refs), its errors, and ``constants`` for the cache and offline mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import random
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any, Iterator

from aotpack.artifact import files as artifact
from aotpack.artifact import manifest as mf
from aotpack.artifact.platform import describe, mismatches, tag
from aotpack.paths import seal, unseal, write_atomic
from aotpack.errors import (AotpackError, HubError, IncompatibleArtifactError, IntegrityError, ManifestError,
                            ResourceError, first_line)

log = logging.getLogger("aotpack")

INDEX = "aotpack-index.json"
INDEX_SCHEMA = 1
SIGNATURE = "signature.sig"   # aotpack.signing writes it after the manifest: not one of the manifest's files
PINS = "hub-pins.json"
PINS_SCHEMA = 1
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RETRIES = 3                  # reads the client does not retry itself: http_backoff, 0.5 s, 1 s, 2 s
_PUSH_ATTEMPTS = 8            # a push races other pushes into the same branch (build farms): see _commit_build
_MAX_PINS_BYTES = 1 << 20
# Short names of build options in build names; an option not listed here is named by its key.
_OPTION_NAMES = {"fuse_qkv": "qkv", "compile_vae": "cvae", "quantize_text_encoder": "qte", "quantize_vae": "qvae",
                 "max_autotune": "tuned", "regional": "regional"}


def _constants():
    from huggingface_hub import constants

    return constants


def endpoint() -> str:
    """The Hub to talk to, as HF_ENDPOINT says *now*. huggingface_hub reads HF_ENDPOINT once, at import, into
    ``constants.ENDPOINT`` and the download-URL template made from it, and takes an explicit ``endpoint=`` for a
    Hub chosen later: so every call here passes this. Unset, it is huggingface_hub's default (staging included)."""
    return (os.environ.get("HF_ENDPOINT") or _constants().ENDPOINT).rstrip("/")


def _json(value: Any) -> Any:
    """The JSON form of a manifest or a platform, which is what the index stores and this module reads: a dict
    already, or a typed value's ``to_json()`` / fields."""
    if hasattr(value, "to_json"):
        return value.to_json()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _files(manifest: Any) -> Any:
    """The manifest's files, in the form ``verify_files`` takes."""
    return manifest["files"] if isinstance(manifest, dict) else manifest.files


def _shown(text: str, limit: int = 80) -> str:
    """A user- or server-supplied name inside a one-line message: quoted, control characters escaped."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def build_name(data: Any) -> str:
    """Folder of a build inside the repo (see ``name_of``), from its manifest. The dtype is named where it is
    not the recipe's own (as the recipes this aotpack ships say; a recipe it does not ship always names it)."""
    from aotpack.builder.recipe import get_recipe

    data = _json(data)
    recipe, lora = data.get("recipe") or {}, data.get("lora") or None
    try:
        default_dtype = get_recipe(recipe["name"], recipe.get("variant")).dtype
    except (AotpackError, KeyError, TypeError):
        default_dtype = None
    return name_of(data["scheme"]["name"], data.get("options") or {}, bool(lora), tag(data["platform"]),
                   dtype=data.get("dtype"), default_dtype=default_dtype, variant=recipe.get("variant"),
                   lora_sha256=lora.get("sha256") if lora else None,
                   lora_scale=lora.get("scale", 1.0) if lora else 1.0)


def name_of(scheme: str, options: dict, lora: bool, platform_tag: str, *, dtype: str | None = None,
            default_dtype: str | None = None, lora_sha256: str | None = None, lora_scale: float = 1.0,
            variant: str | None = None) -> str:
    """'int8wo-cpu-x86_64-avx2' for a default build; 'int8wo-qkv-cuda-sm90' with --fuse-qkv,
    'none-qte_int8wo-cpu-x86_64-avx2' with --quantize-text-encoder int8wo, 'int8wo-bf16-...' with a dtype
    that is not ``default_dtype`` (the recipe's), 'int8wo-lora_1a2b3c4d-...' with a LoRA fused in (the first
    8 hex of its sha256; '_x0.5' for a scale other than 1), 'int8wo-schnell-...' for a recipe variant: builds
    that differ in anything that changes the artifact are different builds, and one repo keeps them side by
    side instead of replacing one by the other. Left out (a plan made before the build), a part is not named."""
    parts = [scheme] + ([variant] if variant else [])
    for key, value in sorted(options.items()):
        short = _OPTION_NAMES.get(key, key.replace("_", ""))
        if value is True:
            parts.append(short)
        elif isinstance(value, str) and value:
            parts.append(f"{short}_{value}")
    if dtype and dtype != default_dtype:
        parts.append({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype))
    if lora:
        scale = "" if lora_scale == 1 else "_x" + format(float(lora_scale), "g").replace("+", "")
        parts.append(f"lora_{lora_sha256[:8]}{scale}" if lora_sha256 else "lora" + scale)
    return "-".join(parts + [platform_tag])


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Map what huggingface_hub raises to one HubError line. Tokens never appear in messages."""
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import httpx  # huggingface_hub's own export of its HTTP client's errors

    where = endpoint()
    try:
        yield
    except AotpackError:
        raise
    except hfe.RevisionNotFoundError:
        raise HubError(f"revision {_shown(revision or 'main')} does not exist in {repo_id}",
                       "check --revision (a branch, tag or commit of that repo)") from None
    except (hfe.GatedRepoError, hfe.RepositoryNotFoundError):
        raise HubError(f"repo {repo_id} was not found, or it is private and this token cannot see it",
                       "check the repo id; log in with 'hf auth login', set HF_TOKEN or pass --token") from None
    except hfe.OfflineModeIsEnabled:
        raise HubError(f"{repo_id} is not in the local cache and HF_HUB_OFFLINE=1",
                       "pull it once with network access, or unset HF_HUB_OFFLINE") from None
    except hfe.LocalEntryNotFoundError:  # before EntryNotFoundError, its base class
        if _constants().is_offline_mode():
            raise HubError(f"{repo_id} is not in the local cache and HF_HUB_OFFLINE=1",
                           "pull it once with network access, or unset HF_HUB_OFFLINE") from None
        raise HubError(f"could not reach the Hub at {where} and {repo_id} is not in the local cache",
                       "check the network and HF_ENDPOINT") from None
    except hfe.EntryNotFoundError as e:
        raise HubError(f"{repo_id} has no such file ({first_line(e, 200)})",
                       "was this repo written by 'aotpack push'?") from None
    except hfe.HFValidationError:
        raise HubError(f"{_shown(repo_id)} is not a Hub repo id", "use owner/name, e.g. me/tiny-flux-aot") from None
    except hfe.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise HubError(f"the Hub at {where} refused the token (401 Unauthorized)",
                           "log in with 'hf auth login', set HF_TOKEN or pass a valid --token") from None
        if status == 403:
            raise HubError(f"the token may not write to {repo_id} (403 Forbidden)",
                           "use a token with write access to that namespace") from None
        raise HubError(f"the Hub answered {status}: {first_line(e, 200)}", "try again later") from None
    except httpx.TransportError as e:
        raise HubError(f"could not reach the Hub at {where}: {type(e).__name__}",
                       "check the network and HF_ENDPOINT; try again") from None
    except OSError as e:  # the disk: full, permissions
        if e.errno == errno.ENOSPC:
            raise ResourceError(f"no space left on the disk while downloading from {repo_id}",
                                "free disk space, or point AOTPACK_CACHE and HF_HOME at a bigger disk; then pull "
                                "again") from None
        raise HubError(f"could not write a download: {e.strerror or type(e).__name__}"
                       + (f" ({_shown(str(e.filename), 120)})" if e.filename else ""),
                       "check AOTPACK_CACHE and HF_HOME") from None


def check_can_push(repo_id: str, *, token: str | None = None) -> None:
    """Before a long build that ends in a push: the Hub is reachable and takes the token (``whoami``), so an
    offline box or a bad token fails in a second, not after the build."""
    _check_names(repo_id, None)
    if _constants().is_offline_mode():
        raise HubError(f"HF_HUB_OFFLINE is set: the build could not be pushed to {repo_id}",
                       "unset HF_HUB_OFFLINE, or build without --push and push the folder later")
    with _hub_errors(repo_id):
        _api(token).whoami()


def _check_names(repo_id: str, revision: str | None) -> None:
    """Refuse a malformed repo id or revision before it reaches a URL, a file name or a message."""
    from huggingface_hub.utils import validate_repo_id

    with _hub_errors(repo_id, revision):
        validate_repo_id(repo_id)
    if revision is not None and (not revision or not revision.isprintable() or len(revision) > 255
                                 or revision.strip() != revision):
        raise HubError(f"revision {_shown(revision)} is not a tag, branch or commit name",
                       "pass a tag (e.g. v1) or a 40-character commit hash as --revision")


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


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


def _error_cell(b: dict) -> str:
    q = b.get("quant_error")  # an index read from the Hub is untrusted input: shown only when well-formed
    keys = ("forward_max_abs", "forward_ref_max")
    if not isinstance(q, dict) or not all(isinstance(q.get(k), (int, float)) for k in keys):
        return "—"
    return f"{q['forward_max_abs']:.1e} (of {q['forward_ref_max']:.2f})"


def _example_call(b: dict) -> str:
    """The keywords of a pipeline call inside the build's recorded bounds (an index from the Hub is untrusted:
    only well-formed integers are used, else the pipeline's defaults)."""
    req = b.get("request") if isinstance(b.get("request"), dict) else {}

    def bound(key: str) -> tuple[int, int] | None:
        v = req.get(key)
        ok = isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        return (v[0], v[1]) if ok and 0 < v[0] <= v[1] <= 1 << 16 else None

    multiple = req.get("multiple") if isinstance(req.get("multiple"), int) and 0 < req["multiple"] < 1 << 12 else 1
    parts = []
    for key in ("height", "width"):
        lo_hi = bound(key)
        if lo_hi:
            size = max(lo_hi[0], min(lo_hi[1], 512)) // multiple * multiple
            parts.append(f"{key}={max(size, lo_hi[0])}")
    if isinstance(req.get("max_steps"), int) and req["max_steps"] > 0:
        parts.append(f"num_inference_steps={min(4, req['max_steps'])}")
    if isinstance(req.get("max_sequence_length"), int) and 0 < req["max_sequence_length"] < 1 << 16:
        parts.append(f"max_sequence_length={req['max_sequence_length']}")
    frames = bound("frames")
    if frames:
        parts.append(f"num_frames={frames[0]}")
    return ", ".join(parts)


def model_card(repo_id: str, index: dict, tag_name: str | None = None) -> str:
    """README.md of the repo, made with huggingface_hub's ModelCard from the builds' index: what the repo is
    (aotpack builds, not a diffusers folder), the base model and its licence, each build's dtype, bounds and
    error, and a loading example that runs as written."""
    from huggingface_hub import ModelCard, ModelCardData

    builds = index["builds"]
    checkpoints = sorted({b["checkpoint"] for b in builds.values()})
    base = [c for c in checkpoints if not c.startswith(("builtin:", "/"))]
    card_data = ModelCardData(
        base_model=base[0] if len(base) == 1 else (base or None),
        library_name="aotpack",  # not a diffusers folder: DiffusionPipeline.from_pretrained(repo) cannot load it
        tags=["aotpack", "torchao", "aoti", "diffusers"],
    )

    def bounds(b: dict) -> str:
        req = b.get("request") if isinstance(b.get("request"), dict) else {}
        shown = [f"{k} {'..'.join(str(x) for x in req[k])}" for k in ("height", "width", "frames")
                 if isinstance(req.get(k), list) and len(req[k]) == 2 and all(isinstance(x, int) for x in req[k])]
        if isinstance(req.get("max_sequence_length"), int):
            shown.append(f"text <= {req['max_sequence_length']}")
        return ", ".join(shown) or "—"  # integers only: nothing from the index reaches the table as text

    rows = "\n".join(
        f"| `{name}` | {b['scheme']} | {b.get('dtype') if b.get('dtype') in ('float32', 'bfloat16', 'float16') else '—'} | {tag(b['platform'])} | "
        f"{b['platform']['torch']} | {bounds(b)} | {b['size'] / 1e6:.1f} MB | {_error_cell(b)} | "
        f"{b['build_seconds']:.0f} s |{' yes |' if b.get('signature_sha256') else ' |'}"
        for name, b in sorted(builds.items())
    )
    one = sorted(builds)[0] if builds else "SCHEME-PLATFORM"
    call = _example_call(builds[one]) if builds else ""
    revision = f'"{tag_name}"' if tag_name else '"<tag or commit>"'
    licence = (f"The weights are derived from {', '.join(f'`{c}`' for c in base)}: its licence applies to them."
               if base else "The weights are derived from the checkpoints named above.")
    content = f"""---
{card_data.to_yaml()}
---

# {repo_id}

Ahead-of-time compiled ([AOTInductor](https://pytorch.org/docs/stable/torch.compiler_aot_inductor.html)) and
[torchao](https://github.com/pytorch/ao)-quantized transformer of {', '.join(f'`{c}`' for c in checkpoints)},
packaged by **aotpack**. This repo is not a diffusers pipeline folder (`DiffusionPipeline.from_pretrained` of
it finds no `model_index.json`): it holds builds for aotpack to drop into the base model's pipeline. Each
build is a folder under `builds/`: `model.pt2` (compiled code), `weights.safetensors` (quantized weights) and
`manifest.json` (sha256 of every file, platform, input ranges), and `signature.sig` when its builder signed it.
The error is the largest difference of one transformer forward from the full-precision model's, measured at
build (of the largest output value). {licence}

| build | scheme | dtype | platform | torch | a call may ask | size | error vs full precision | build time | signed |
|---|---|---|---|---|---|---|---|---|---|
{rows}

```python
import aotpack  # pip install aotpack: picks the build that fits this machine, verifies every file, then loads

# None: the base model's pipeline (the checkpoint the build was made from); or a local folder / Hub id of it
pipe = aotpack.from_pretrained(None, "{repo_id}", revision={revision})
image = pipe("a dog surfing on the moon", {call}).images[0]
```

A `.pt2` holds native code: load it from a pinned revision (a tag or a commit), as above. This
machine-specific build `{one}` only runs on the platform its name says; aotpack refuses the others.
"""
    return str(ModelCard(content))


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
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, RepoFile
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import httpx

    for attempt in range(1, _PUSH_ATTEMPTS + 1):
        try:
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
            ops: list[Any] = []
            if old:  # replacing: files of the old build that the new one lacks (a signature, a plan) go
                log.warning("%s@%s holds another build named %s (manifest %s, built %s): replacing it", repo_id,
                            revision, name, old["manifest_sha256"][:12], _shown(str(old.get("date", "?")), 40))
                stale = {f.path for f in api.list_repo_tree(repo_id, path_in_repo=f"builds/{name}", revision=head,
                                                            recursive=True) if isinstance(f, RepoFile)} - set(files)
                for path in sorted(stale):
                    if ".." in path.split("/") or path.startswith("/"):
                        raise HubError(f"{repo_id} holds a file {_shown(path)} under builds/{name}/ that is not a "
                                       "plain file name", "delete it from the repo (Hub web UI or 'hf'), then push "
                                       "again")
                ops += [CommitOperationDelete(p) for p in sorted(stale)]
            index["builds"][name] = entry
            index["schema_version"] = INDEX_SCHEMA
            ops += [CommitOperationAdd(p, str(v) if isinstance(v, Path) else v) for p, v in files.items()]
            ops.append(CommitOperationAdd(INDEX, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()))
            ops.append(CommitOperationAdd("README.md", model_card(repo_id, index, tag_name).encode()))
            info = api.create_commit(repo_id, ops, commit_message=f"aotpack: add build {name}", revision=revision,
                                     parent_commit=head)
            log.info("pushed %s to %s@%s (commit %s)", name, repo_id, revision, info.oid[:12])
            return info.oid, True
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


# ---- pins: a tag is resolved to its commit once per machine, and stays there --------------------------------

def _pins_file() -> Path:
    """Under AOTPACK_STATE, not the cache: deleting or rolling back the pins would undo the moved-tag check."""
    from aotpack.paths import state_dir

    return state_dir() / PINS


def _bad_pins(path: Path, why: str) -> HubError:
    return HubError(f"{path} is not a valid aotpack pins file ({why})",
                    f"check who else writes to {path.parent}, then delete the file: tags are pinned again at the "
                    "next pull")


def _read_pins() -> dict[str, str]:
    """{'endpoint|repo|tag': commit}. The file is untrusted input: a regular file, bounded, of one known shape."""
    path = _pins_file()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise _bad_pins(path, e.strerror or type(e).__name__) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _bad_pins(path, "not a regular file")
        raw = f.read(_MAX_PINS_BYTES + 1)
    if len(raw) > _MAX_PINS_BYTES:
        raise _bad_pins(path, f"larger than {_MAX_PINS_BYTES >> 20} MiB")
    from aotpack.paths import unseal

    # sealed (aotpack.paths): someone who can write the cache cannot pin a tag to a commit of their choosing
    data = unseal("pins", raw)
    if data is None:
        raise _bad_pins(path, "its seal does not match: not written by aotpack for this user")
    if isinstance(data, dict) and set(data) == {"schema_version", "pins"} and data["schema_version"] == PINS_SCHEMA:
        pins = data["pins"]
    else:
        raise _bad_pins(path, "unknown layout")
    if not isinstance(pins, dict):
        raise _bad_pins(path, "'pins' is not an object")
    for key, commit in pins.items():
        if not (isinstance(key, str) and key.count("|") >= 2 and key.isprintable()
                and isinstance(commit, str) and _COMMIT.match(commit)):
            raise _bad_pins(path, f"entry {_shown(str(key))} is not 'endpoint|repo|tag' -> commit")
    return pins


def _write_pins(pins: dict[str, str]) -> None:
    """Atomically: a unique temporary file beside it, synced, renamed over it."""
    path = _pins_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{PINS}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    from aotpack.paths import seal

    try:
        with open(tmp, "x") as f:
            f.write(seal("pins", {"schema_version": PINS_SCHEMA, "pins": pins}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _pins_locked() -> Iterator[None]:
    from huggingface_hub.utils import WeakFileLock

    path = _pins_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(path.with_name(f".{PINS}.lock"), timeout=60):
        yield


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


# ---- pull ---------------------------------------------------------------------------------------------------

def choose_build(index: dict, here: dict, quant: str | None = None, build: str | None = None) -> str:
    """The build of ``index`` that runs here: ``build`` if named, else exact platform first, then the smallest."""
    if build is not None:
        if build not in index["builds"]:
            raise HubError(f"the repo has no build {_shown(build)}",
                           f"it has: {', '.join(sorted(index['builds'])) or 'nothing'}")
        candidates = {build: index["builds"][build]}
    else:
        candidates = index["builds"]
    fits = []
    for name, entry in candidates.items():
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
        fits.sort()
        other, size, name = fits[0]
        why = ("the one named" if build else
               f"{'a compatible' if other else 'the exact'} platform for this machine ({tag(here)})"
               + (f", scheme {quant}" if quant else "")
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


# ---- what was pulled: the identity every Hub load verifies against -------------------------------------------

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
