"""What every command shares: the debug switch, quiet pipelines and the one way a result reaches stdout."""

from __future__ import annotations

import json
import os

import click


def debug() -> bool:
    """AOTPACK_DEBUG set (and not 0): full tracebacks and the dependencies' own logging."""
    return os.environ.get("AOTPACK_DEBUG", "") not in ("", "0")


def quiet_pipelines() -> None:
    """diffusers' and transformers' progress bars off, for the commands that load pipelines. Not at start-up:
    importing them imports torch (5-10 s), and a refusal needs neither."""
    if debug():
        return
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.set_verbosity_error()
        tlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def echo_result(as_json: bool, data: dict, text: str) -> None:
    """The command's result on stdout: ``text``, or ``data`` as JSON with ``--json``."""
    click.echo(json.dumps(data, sort_keys=True) if as_json else text)
