"""The Hub client every other part of ``aotpack.hub`` talks through: the endpoint as HF_ENDPOINT says now,
huggingface_hub's ``HfApi`` and ``constants``, and ``_hub_errors``, which maps what huggingface_hub raises to
one ``HubError`` line; plus the file names and small helpers the parts share."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
from typing import Any, Iterator

from aotpack.errors import AotpackError, HubError, ResourceError, first_line

INDEX = "aotpack-index.json"
INDEX_SCHEMA = 1
SIGNATURE = "signature.sig"   # aotpack.signing writes it after the manifest: not one of the manifest's files
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _constants():
    from huggingface_hub import constants

    return constants


def endpoint() -> str:
    """The Hub to talk to, as HF_ENDPOINT says *now*. huggingface_hub reads HF_ENDPOINT once, at import, into
    ``constants.ENDPOINT`` and the download-URL template made from it, and takes an explicit ``endpoint=`` for a
    Hub chosen later: so every call here passes this. Unset, it is huggingface_hub's default (staging included)."""
    return (os.environ.get("HF_ENDPOINT") or _constants().ENDPOINT).rstrip("/")


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


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
