"""Submitting and watching jobs on Hugging Face Jobs: one build with its log streamed (``remote_build``), or one
job per cell of a matrix followed to the end (``run_farm``); an interrupt cancels what still runs."""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Iterable, Sequence

from aotpack.errors import BuildError, HubError, first_line, one_line
from aotpack.farm.cells import DEFAULT_IMAGE, DEFAULT_TIMEOUT, DONE, STAGES, Cell, CellState
from aotpack.farm.job_script import _job_env, job_command
from aotpack.farm.plan import Planned, _hardware, plan_farm, refused
from aotpack.farm.results import _check_pushed, _conclude, _tag_repos

log = logging.getLogger("aotpack")


def _session(token: str | None) -> tuple[Any, str, str]:
    """(HfApi, namespace, token): the jobs run in the token's user namespace."""
    from huggingface_hub import HfApi, get_token

    from aotpack.hub import _hub_errors, endpoint

    token = token or get_token()
    if not token:
        raise HubError("not logged in: a job needs a token to push its build",
                       "log in with 'hf auth login', set HF_TOKEN or pass --token")
    api = HfApi(endpoint=endpoint(), token=token)
    with _hub_errors("jobs"):
        return api, api.whoami()["name"], token


def _submit(api: Any, namespace: str, planned: Planned, token: str, *, tag_in_job: bool = True) -> Any:
    cell = planned.cell
    name = re.sub(r"[^a-zA-Z0-9_-]", "-", f"aotpack-{cell.recipe_name}-{cell.scheme}-{cell.flavor}")
    command = job_command(cell, tag_in_job=tag_in_job, uploads=planned.uploads)
    return api.run_job(image=cell.image, command=command, env=_job_env(),
                       secrets={"HF_TOKEN": token},
                       flavor=cell.flavor, timeout=cell.timeout, name=name[:60], namespace=namespace)


def _stage(info: Any) -> str:
    stage = info.status.stage
    return STAGES.get(getattr(stage, "value", stage), "running")


def remote_build(
    recipe: str,
    quant: str,
    *,
    flavor: str,
    repo_id: str,
    tag: str | None = None,
    variant: str | None = None,
    options: Sequence[str] = (),
    install: str | None = None,
    image: str = DEFAULT_IMAGE,
    timeout: str = DEFAULT_TIMEOUT,
    token: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> CellState:
    """Build on a Hugging Face Jobs machine of ``flavor`` and push into ``repo_id``; stream the job's log lines to
    ``on_line`` (each escaped to one printable line; default: the aotpack logger, marked ``job|``) and return
    the finished cell with the build's name in the repo, once the Hub shows that commit holding it.

    An interrupt (Ctrl-C) cancels the job before it propagates. A failed job is a BuildError with its last line.
    """
    cell = Cell(recipe=recipe, scheme=quant, flavor=flavor, repo_id=repo_id, variant=variant, options=tuple(options),
                tag=tag, install=install, image=image, timeout=timeout)
    api, namespace, token = _session(token)
    from aotpack.hub import _hub_errors

    with _hub_errors(cell.repo):
        planned = plan_farm([cell], hardware=_hardware(api))
        error = refused(planned)
        if error:
            raise error
        for upload in planned[0].uploads:
            log.info("sending %s", upload.describe())
        state = CellState(cell, stage="queued", submitted=time.monotonic())
        job = _submit(api, namespace, planned[0], token)
        state.job_id, state.url = job.id, job.url
        log.info("job %s on %s: %s", job.id, flavor, job.url)
        lines, info = _stream(api, namespace, state, on_line)
        _conclude(state, lines, _stage(info), info.status.message)
        _check_pushed(api, state)
    if state.stage != "completed":
        last = state.tail[-1] if state.tail else "no output"
        raise BuildError(f"job {job.id} on {one_line(flavor, 60)} ended {state.stage}: {state.message}; "
                         f"last line: {first_line(Exception(last), 200)}",
                         f"its log: hf jobs logs {job.id}")
    return state


def _stream(api: Any, namespace: str, state: CellState,
            on_line: Callable[[str], None] | None) -> tuple[list[str], Any]:
    """Follow one job's log to its end: (its lines, its final info). An interrupt cancels the job, then
    propagates."""
    lines: list[str] = []
    try:
        for line in api.fetch_job_logs(job_id=state.job_id, namespace=namespace, follow=True):
            lines.append(line)
            shown = one_line(line, 2000)  # escape codes and fake 'Error:' lines stay inside the job's line
            if on_line:
                on_line(shown)
            else:
                log.info("job| %s", shown)
        info = api.wait_for_job(state.job_id, namespace=namespace, poll_interval=1.0)
    except KeyboardInterrupt:
        _cancel(api, namespace, [state])
        raise
    return lines, info


def _cancel(api: Any, namespace: str, states: Iterable[CellState]) -> None:
    for state in states:
        if state.job_id and state.stage not in DONE:
            try:
                api.cancel_job(job_id=state.job_id, namespace=namespace)
                state.stage, state.message, state.finished = "canceled", "interrupted", time.monotonic()
                log.warning("canceled job %s (%s)", state.job_id, state.cell.where)
            except Exception as e:  # keep cancelling the others
                log.warning("could not cancel job %s: %s (cancel it with: hf jobs cancel %s)", state.job_id,
                            first_line(e, 120), state.job_id)


def run_farm(
    cells: Sequence[Cell],
    *,
    token: str | None = None,
    on_change: Callable[[list[CellState]], None] | None = None,
    poll_interval: float = 2.0,
) -> list[CellState]:
    """Submit one job per cell, follow them to the end, and return every cell's outcome.

    Nothing is submitted unless every cell passes ``plan_farm``. A failed cell keeps its log's tail and the
    others go on. ``on_change`` sees the cells whenever one changes stage. An interrupt cancels every job still
    queued or running, then propagates.
    """
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import httpx

    from aotpack.hub import _hub_errors

    api, namespace, token = _session(token)
    with _hub_errors("jobs"):
        planned = plan_farm(cells, hardware=_hardware(api))
    error = refused(planned)
    if error:
        raise error
    states = [CellState(cell) for cell in cells]
    notify = (lambda: on_change(states)) if on_change else (lambda: None)
    try:
        for state, plan in zip(states, planned):
            state.submitted = time.monotonic()
            try:
                job = _submit(api, namespace, plan, token, tag_in_job=False)
                state.job_id, state.url, state.stage = job.id, job.url, _stage(job)
            except (hfe.HfHubHTTPError, httpx.TransportError) as e:
                state.stage, state.finished = "error", time.monotonic()
                state.message = f"not submitted: {first_line(e, 200)}"
            notify()
        while any(s.stage not in DONE for s in states):
            time.sleep(poll_interval)
            if any([_follow(api, namespace, s) for s in states if s.stage not in DONE]):
                notify()
    except KeyboardInterrupt:
        _cancel(api, namespace, states)
        notify()
        raise
    _tag_repos(states, token)
    notify()
    return states


def _follow(api: Any, namespace: str, state: CellState) -> bool:
    """Ask how one running cell's job is doing; True when its stage changed."""
    from huggingface_hub import errors as hfe
    from huggingface_hub.utils import httpx

    try:
        info = api.inspect_job(job_id=state.job_id, namespace=namespace)
        stage = _stage(info)
        if stage in DONE:
            _conclude(state, list(api.fetch_job_logs(job_id=state.job_id, namespace=namespace)), stage,
                      info.status.message)
            _check_pushed(api, state)
            return True
        if stage != state.stage:
            state.stage = stage
            return True
    except hfe.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is not None and 400 <= status < 500 and status not in (408, 429):
            state.stage, state.finished = "error", time.monotonic()
            state.message = f"could not follow the job: {first_line(e, 200)}"
            return True
    except httpx.TransportError as e:  # the next round asks again
        log.debug("could not inspect job %s: %s", state.job_id, first_line(e, 120))
    return False
