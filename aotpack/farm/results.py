"""A finished job's outcome: the build it reports in its last lines, checked against its flavor and against the
Hub (the commit must hold that build), and the farm's tags once every cell of a repo is in."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from aotpack.errors import AotpackError, first_line, one_line
from aotpack.farm.cells import CellState, platform_label

log = logging.getLogger("aotpack")

_RESULT = re.compile(r"/(?P<repo>[\w.-]+/[\w.-]+)/tree/(?P<commit>[0-9a-f]{40})/builds/(?P<build>[A-Za-z0-9_.-]+)\s*$")


def _conclude(state: CellState, lines: list[str], stage: str, message: str | None) -> None:
    """Read the build's name in the repo from the job's last lines, and check it was built for the flavor."""
    state.finished = time.monotonic()
    state.tail = [one_line(ln, 500) for ln in lines if ln.strip()][-15:]  # the job's output: never raw
    if stage == "completed":
        found = next((m for m in map(_RESULT.search, reversed(lines)) if m), None)
        expected = platform_label(state.cell.flavor)
        if found is None:
            stage, message = "error", "the job ended without printing the URL of a pushed build"
        elif found["repo"] != state.cell.repo:
            stage, message = "error", f"the job printed a build in {found['repo']}, not in {state.cell.repo}"
        else:
            state.build, state.commit = found["build"], found["commit"]
            if not (found["build"].endswith("-" + expected) or expected == "cpu" and "-cpu-" in found["build"]):
                stage = "error"
                message = (f"built {found['build']} on {state.cell.flavor}, not a {expected} build: the job's torch "
                           "saw no GPU (check the image)")
    elif not message:
        message = f"job {stage}"
    state.stage, state.message = stage, one_line(message, 300) if message else message


def _check_pushed(api: Any, state: CellState) -> None:
    """A completed job's log is only its word: the commit it printed must be in the repo on the Hub and hold
    the build there (its manifest), else the cell failed."""
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import httpx

    if state.stage != "completed":
        return
    repo, commit, build = state.cell.repo, state.commit, state.build
    try:
        there = api.repo_info(repo, revision=commit).sha == commit and api.file_exists(
            repo, f"builds/{build}/manifest.json", revision=commit)
    except (hfe.RepositoryNotFoundError, hfe.RevisionNotFoundError):
        there = False
    except (hfe.HfHubHTTPError, httpx.TransportError) as e:
        state.stage = "error"
        state.message = f"could not check commit {commit} of {repo} on the Hub: {first_line(e, 160)}"
        return
    if not there:
        state.stage = "error"
        state.message = (f"the job printed commit {commit} of {repo}, but the Hub has no builds/{build} at that "
                         "commit: the build was not pushed")


def _tag_repos(states: list[CellState], token: str) -> None:
    """Tag each repo whose cells all completed, at the head that holds all their builds."""
    from aotpack.hub import add_tag

    groups: dict[tuple[str, str], list[CellState]] = {}
    for state in states:
        if state.cell.tag:
            groups.setdefault((state.cell.repo, state.cell.tag), []).append(state)
    for (repo, tag), group in groups.items():
        if any(s.stage != "completed" for s in group):
            log.warning("%s not tagged %s: not every build for it completed (tag it once they are: "
                        "aotpack farm again, or hf repo tag create %s %s)", repo, tag, repo, tag)
            continue
        try:
            commit = add_tag(repo, tag, token=token)
            log.info("tagged %s@%s as %s", repo, commit[:12], tag)
        except AotpackError as e:
            for s in group:
                s.stage, s.message = "error", f"built and pushed, but not tagged: {e.cause}"
