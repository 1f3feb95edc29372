"""``push`` / ``pull``: artifacts travel through the Hugging Face Hub.

One repo holds many builds (scheme x options x platform), each under ``builds/<name>/``, with an index
(``aotpack-index.json``) and a model card at the root. ``pull`` downloads only the build that fits this
machine (into ``AOTPACK_CACHE/hub/``, one folder per commit) and verifies every file's sha256 before anything
is loaded. A .pt2 is native code: pulling needs a pinned revision (commit or tag) or an explicit ``trust``; a
tag is pinned to the commit it had at this machine's first pull of it.

Everything that talks to the Hub is huggingface_hub's: ``HfApi``, ``snapshot_download`` (which retries
server errors and resumes dropped downloads itself), ``http_backoff`` for the one read the client does not
retry (refs), its errors, and ``constants`` for the cache and offline mode.

The parts: ``client`` (endpoint, errors), ``names`` (build names), ``index``, ``card``, ``pins``, ``resolve``
(revisions to commits), ``identity`` (what was pulled), ``download`` (``pull``), ``upload`` (``push``). This
package only re-exports the names other modules and tests import from ``aotpack.hub``.
"""

from aotpack.hub.card import model_card
from aotpack.hub.client import INDEX, INDEX_SCHEMA, SIGNATURE, _hub_errors, endpoint
from aotpack.hub.download import pull, pulled_dir, resolve_for_load
from aotpack.hub.identity import Pulled, pulled_identity
from aotpack.hub.index import choose_build
from aotpack.hub.names import _OPTION_NAMES, build_name, name_of
from aotpack.hub.pins import _pins_file
from aotpack.hub.upload import PushResult, add_tag, check_can_push, push

__all__ = ["INDEX", "INDEX_SCHEMA", "SIGNATURE", "Pulled", "PushResult", "add_tag", "build_name", "check_can_push",
           "choose_build", "endpoint", "model_card", "name_of", "pull", "pulled_dir", "pulled_identity", "push",
           "resolve_for_load", "_OPTION_NAMES", "_hub_errors", "_pins_file"]
