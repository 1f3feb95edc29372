"""Build farm: compiled code is specific to its GPU, so build each (recipe, scheme, GPU) on Hugging Face Jobs.

One job per build: it installs this aotpack version with this environment's pinned dependencies, runs
``aotpack build RECIPE --quant S [options] --push REPO [--tag T]`` on the chosen flavor, and the build lands in
the repo beside the others (``push`` re-reads the index when another job's push lands first). The token
reaches the job as a secret: never in its command, its environment, a label or a log line.

    aotpack build flux --quant int8dq --on h200 --push me/flux-aot --tag v1     # one job, its log streamed
    aotpack farm matrix.toml --dry-run                                          # the cells, nothing submitted
    aotpack farm matrix.toml                                                    # one job per cell, a live table

Everything about jobs is huggingface_hub's (``HfApi.run_job``, ``inspect_job``, ``fetch_job_logs``,
``cancel_job``, ``list_jobs_hardware``); this module only decides what each job runs and watches them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from aotpack._version import __version__
from aotpack.errors import AotpackError, BuildError, FarmError, HubError, first_line, one_line

log = logging.getLogger("aotpack")

# python 3.12 and uv on Debian with a C++ compiler (AOTInductor compiles the wrapper of the generated code)
DEFAULT_IMAGE = "ghcr.io/astral-sh/uv:python3.12-bookworm"
DEFAULT_TIMEOUT = "2h"
# The GPU behind each Jobs flavor family, and its CUDA compute capability: the platform its builds get.
GPUS = (  # (flavor prefix, GPU, capability): the longest prefix first
    ("rtx-pro-6000", "RTX PRO 6000 Blackwell", "12.0"),
    ("l40s", "L40S", "8.9"),
    ("l4x", "L4", "8.9"),
    ("t4-", "T4", "7.5"),
    ("a10g-", "A10G", "8.6"),
    ("a100", "A100", "8.0"),
    ("h100", "H100", "9.0"),
    ("h200", "H200", "9.0"),
    ("b200", "B200", "10.0"),
)
STAGES = {"SCHEDULING": "queued", "RUNNING": "running", "COMPLETED": "completed", "ERROR": "error",
          "CANCELED": "canceled", "DELETED": "canceled"}
DONE = ("completed", "error", "canceled")
_RESULT = re.compile(r"/(?P<repo>[\w.-]+/[\w.-]+)/tree/(?P<commit>[0-9a-f]{40})/builds/(?P<build>[A-Za-z0-9_.-]+)\s*$")
_MAX_MATRIX_BYTES = 1 << 20
_PLAN_HINT = "pass the plan.json of an earlier --quant auto build"
_TIMEOUT = re.compile(r"(\d+(\.\d+)?[smhd]|\d+)")  # what run_job reads: '2h', '90m', '1.5d', '3600'
# build options a job cannot be given: where the job writes, and what makes it a job or a push
_NOT_OPTIONS = {"recipe", "quant", "variant", "out", "overwrite", "push_to", "tag_name", "on_flavor", "install",
                "as_json"}  # the job's last line must stay the URL of its push
# files on this machine that a job cannot read (and a private key that must never travel)
_LOCAL_ONLY = {"lora": "a LoRA file", "reuse": "an artifact folder", "sign_key": "a private key"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One build: what to build, on which flavor, and where it goes."""

    recipe: str
    scheme: str
    flavor: str
    repo_id: str                                  # may hold '{recipe}': the recipe's full name
    variant: str | None = None
    options: tuple[str, ...] = ()                 # `aotpack build` options, e.g. ('--fuse-qkv',)
    tag: str | None = None
    install: str | None = None                    # what pip installs as aotpack (default aotpack==VERSION)
    image: str = DEFAULT_IMAGE
    timeout: str = DEFAULT_TIMEOUT

    @property
    def recipe_name(self) -> str:
        return f"{self.recipe}-{self.variant}" if self.variant else self.recipe

    @property
    def repo(self) -> str:
        return self.repo_id.replace("{recipe}", self.recipe_name)

    @property
    def label(self) -> str:  # for people: escaped, as every value of a matrix is where it is shown
        return one_line(" ".join([self.recipe_name, self.scheme, *self.options]), 200)

    @property
    def where(self) -> str:
        return f"{self.label} on {one_line(self.flavor, 60)}"


@dataclasses.dataclass(frozen=True)
class Upload:
    """A file that travels to the job inside its command: the bytes read and checked here, once."""

    option: str                                   # the build option that names it, e.g. '--plan'
    source: str                                   # the path given here
    name: str                                     # its name in the job's folder
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def describe(self) -> str:
        where = f"{self.option} {one_line(self.source, 120)} as {self.name}"
        return f"{where}: {len(self.data)} bytes, sha256 {self.sha256}"


@dataclasses.dataclass
class Planned:
    """A checked cell: the platform its flavor gives, its price, and why it cannot be built (None: it can)."""

    cell: Cell
    platform: str
    price: str
    build: str | None = None                      # the build name it will push, where it can be told
    problem: str | None = None
    uploads: tuple[Upload, ...] = ()              # the files its job is sent (checked, read once)


@dataclasses.dataclass
class CellState:
    """A cell while and after it runs."""

    cell: Cell
    stage: str = "pending"                        # pending, queued, running, completed, error, canceled
    job_id: str | None = None
    url: str | None = None
    submitted: float | None = None
    finished: float | None = None
    build: str | None = None                      # the build's name in the repo, once completed
    commit: str | None = None
    message: str | None = None
    tail: list[str] = dataclasses.field(default_factory=list)

    @property
    def elapsed(self) -> float:
        if self.submitted is None:
            return 0.0
        return (self.finished or time.monotonic()) - self.submitted


# ---- flavors and the matrix ---------------------------------------------------------------------------------

def flavor_platform(flavor: str) -> tuple[str, str | None, str]:
    """(device, CUDA capability, GPU) of a Jobs flavor: 'l4x1' -> ('cuda', '8.9', 'L4'); 'cpu-basic' -> cpu."""
    if re.fullmatch(r"[a-z0-9][a-z0-9-]*", flavor):  # a flavor is a name: never a line break or an escape
        if flavor.startswith("cpu-"):
            return "cpu", None, "CPU"
        for prefix, gpu, cap in GPUS:
            if flavor.startswith(prefix):
                return "cuda", cap, gpu
    raise FarmError(f"unknown Jobs flavor {one_line(repr(flavor), 60)}", "see 'hf jobs hardware' for the flavors")


def platform_label(flavor: str) -> str:
    device, cap, _ = flavor_platform(flavor)
    return f"cuda-sm{cap.replace('.', '')}" if cap else "cpu"


_TOP = {"repo", "tag", "flavors", "schemes", "recipes", "build", "install", "image", "timeout"}
_ENTRY = {"recipe", "variant", "schemes", "flavors", "options", "repo", "tag", "install", "image", "timeout"}


def read_matrix(path: str | os.PathLike) -> list[Cell]:
    """The cells of a matrix file: every ``[[build]]`` entry (or ``recipes = [...]``) x its schemes x its
    flavors. Top-level keys are defaults that an entry may override. Every problem is reported at once."""
    path = Path(path)
    data = _load_matrix(path)
    problems = [f"unknown key {one_line(repr(k), 60)}" for k in sorted(set(data) - _TOP)]
    entries = data.get("build") or [{"recipe": r} for r in data.get("recipes", [])]
    if not isinstance(entries, list) or not entries:
        problems.append("no [[build]] entries and no 'recipes = [...]'")
        entries = []
    cells = []
    for i, entry in enumerate(entries, 1):
        where = f"build #{i}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is not a table")
            continue
        problems += [f"{where}: unknown key {one_line(repr(k), 60)}" for k in sorted(set(entry) - _ENTRY)]
        get = lambda key, default=None: entry.get(key, data.get(key, default))  # noqa: E731
        fields = {k: get(k) for k in ("recipe", "repo", "schemes", "flavors")}
        for key, value in fields.items():
            ok = isinstance(value, str) if key in ("recipe", "repo") else (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value))
            if not ok:
                kind = "a string" if key in ("recipe", "repo") else "a list of strings"
                problems.append(f"{where}: '{key}' must be {kind}")
        options = entry.get("options", [])
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            problems.append(f"{where}: 'options' must be a list of strings, e.g. [\"--fuse-qkv\"]")
            options = []
        scalars = {k: get(k) for k in ("variant", "tag", "install", "image", "timeout")}
        for key, value in scalars.items():
            if value is not None and not isinstance(value, str):
                problems.append(f"{where}: '{key}' must be a string")
        if isinstance(scalars["timeout"], str):
            problems += [f"{where}: {p}" for p in [_timeout_problem(scalars["timeout"])] if p]
        problems += _unprintable(where, {**fields, **scalars, "options": options})
        if any(p.startswith(where) for p in problems):
            continue
        for scheme in fields["schemes"]:
            for flavor in fields["flavors"]:
                cells.append(Cell(recipe=fields["recipe"], scheme=scheme, flavor=flavor, repo_id=fields["repo"],
                                  variant=scalars["variant"], options=tuple(options), tag=scalars["tag"],
                                  install=scalars["install"], image=scalars["image"] or DEFAULT_IMAGE,
                                  timeout=scalars["timeout"] or DEFAULT_TIMEOUT))
    if problems:
        raise FarmError(f"{one_line(path, 120)}: " + "; ".join(problems),
                        "see 'Build farm' in the README for the format")
    return cells


def _load_matrix(path: Path) -> dict:
    """The matrix file's TOML: a regular file of at most 1 MiB, UTF-8 (as TOML is)."""
    import tomllib

    from aotpack.builder.plan import read_small_file

    hint = "pass the path of a matrix .toml (see 'Build farm' in the README)"
    try:
        data = read_small_file(path, _MAX_MATRIX_BYTES)
    except ValueError as e:
        raise FarmError(f"matrix {one_line(path, 120)} {e}", hint) from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise FarmError(f"matrix {one_line(path, 120)} is not UTF-8 text (byte {e.start})", hint) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FarmError(f"{one_line(path, 120)} is not valid TOML: {first_line(e)}", hint) from None


def _timeout_problem(timeout: str) -> str | None:
    """Why a job timeout cannot be given to Hugging Face Jobs, or None."""
    if not isinstance(timeout, str) or not _TIMEOUT.fullmatch(timeout) or float(timeout.rstrip("smhd")) <= 0:
        return (f"'timeout' {one_line(repr(timeout), 40)} is not a duration: a number of seconds or a number "
                "with s, m, h or d, e.g. \"2h\"")
    return None


def _unprintable(where: str, values: dict[str, Any]) -> list[str]:
    """A problem for each value holding a control character (a newline would print a second 'Error:' line,
    an escape sequence would redraw the terminal): no flavor, repo or option needs one."""
    out = []
    for key, value in values.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.isprintable():
                out.append(f"{where}: '{key}' holds a control character: {one_line(repr(v), 80)}")
                break
    return out


# ---- options: what `aotpack build` in the job is given ------------------------------------------------------

def _build_command():
    """A parser of `aotpack build`'s options (those a job is given), declared where the CLI's own are."""
    import click

    from aotpack.options import build_options

    return click.command("build")(build_options(lambda *args, **kwargs: None))


def options_from_context(ctx: Any) -> list[str]:
    """The options typed on an ``aotpack build`` command line, as arguments again (for the job's command)."""
    from click.core import ParameterSource

    args: list[str] = []
    for param in ctx.command.params:
        if param.param_type_name != "option" or param.name in _NOT_OPTIONS:
            continue
        if ctx.get_parameter_source(param.name) != ParameterSource.COMMANDLINE:
            continue
        value, flag = ctx.params[param.name], param.opts[0]
        if param.is_flag:
            args += [flag] if value else []
        else:
            for v in (value if param.multiple else [value]):
                args += [flag, str(v)]
    return args


def _parsed(cell: Cell) -> tuple[dict, list[str]]:
    """The cell's options parsed by `aotpack build`'s own parser: (their values, the options normalized)."""
    import click

    command = _build_command()
    try:
        ctx = command.make_context("build", [cell.recipe, *cell.options], resilient_parsing=False)
    except (click.ClickException, click.exceptions.Exit) as e:
        message = e.format_message() if isinstance(e, click.ClickException) else "--help is not a build option"
        raise FarmError(f"options {one_line(' '.join(cell.options), 120)}: {first_line(Exception(message))}",
                        "use the options of 'aotpack build --help'") from None
    for param in ctx.command.params:
        if param.name in _NOT_OPTIONS and param.name != "recipe" and \
                ctx.get_parameter_source(param.name) == click.core.ParameterSource.COMMANDLINE:
            raise FarmError(f"options: {param.opts[0]} is set by the farm, not by a cell's options",
                            "use the matrix keys: schemes, variant, repo, tag, install")
    return ctx.params, options_from_context(ctx)


def _check_local_files(params: dict) -> None:
    for name, what in _LOCAL_ONLY.items():
        if params.get(name):
            if name == "sign_key":
                raise FarmError("--sign-key names a private key on this machine, which never goes into a job",
                                "sign the pulled build here with 'aotpack sign', then push it again")
            raise FarmError(f"--{name.replace('_', '-')} names {what} on this machine, which a job cannot read",
                            "build it here, or put the file in a Hub repo the job can download")
    model = params.get("model")
    if model and (os.path.exists(model) or model.startswith(("/", "./", "../", "~"))):
        raise FarmError(f"--model {one_line(model, 120)} is a local folder, which a job cannot read",
                        "pass a Hub repo id as --model")


def uploads_of(cell: Cell, params: dict, device: str, cap: tuple[int, int] | None) -> tuple[Upload, ...]:
    """The files the cell's job is sent, each read once and checked as what it claims to be, for the job's
    device: a ``--plan`` is a regular file (no link, FIFO, device or /proc file) holding a valid aotpack plan
    whose schemes run there. Anything else (the environment, a token file) is refused before any submission."""
    from aotpack.builder.plan import MAX_PLAN_BYTES, parse_plan, read_small_file

    plan = params.get("plan")
    if not plan:
        return ()
    if cell.scheme != "auto":
        raise FarmError(f"--plan and scheme {one_line(cell.scheme, 40)} contradict each other",
                        "give a cell with --plan the scheme 'auto'")
    shown = one_line(plan, 120)
    try:
        data = read_small_file(plan, MAX_PLAN_BYTES, follow_symlinks=False)
    except ValueError as e:
        raise FarmError(f"--plan {shown} {e}", _PLAN_HINT) from None
    try:
        parse_plan(data, shown, device, cap)
    except AotpackError as e:
        raise FarmError(f"--plan: {e.cause}", _PLAN_HINT) from None
    return (Upload("--plan", str(plan), "plan.json", data),)


def _cap(cap: str | None) -> tuple[int, int] | None:
    return tuple(int(x) for x in cap.split(".")) if cap else None  # type: ignore[return-value]


def _hardware(api: Any) -> dict[str, Any]:
    return {h.name: h for h in api.list_jobs_hardware()}


def plan_farm(cells: Sequence[Cell], *, hardware: dict[str, Any] | None = None) -> list[Planned]:
    """Check every cell before anything is submitted: the flavor exists and its GPU can run the scheme, the
    recipe and options are valid, each repo receives one checkpoint, and no two cells push the same build."""
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.schemes import get_scheme, why_not
    from aotpack.hub import _OPTION_NAMES, name_of

    out: list[Planned] = []
    checkpoints: dict[str, set[str]] = {}
    names: dict[tuple[str, str], Cell] = {}
    for cell in cells:
        planned = Planned(cell, "?", "?")
        out.append(planned)
        try:
            problem = _timeout_problem(cell.timeout)
            if problem:
                raise FarmError(problem, "e.g. timeout = \"2h\"")
            if hardware is not None and cell.flavor not in hardware:
                raise FarmError(f"flavor {one_line(repr(cell.flavor), 60)} is not offered by Hugging Face Jobs",
                                f"choose one of: {', '.join(sorted(hardware))}")
            device, cap, gpu = flavor_platform(cell.flavor)
            planned.platform = platform_label(cell.flavor)
            if hardware is not None:
                h = hardware[cell.flavor]
                planned.price = f"${h.unit_cost_usd:.4f}/{h.unit_label}"
            recipe = get_recipe(cell.recipe, cell.variant)
            if cell.scheme != "auto":
                reason = why_not(get_scheme(cell.scheme), device, _cap(cap))
                if reason:
                    raise FarmError(f"{one_line(cell.flavor, 60)} ({gpu}) cannot build {cell.scheme}: {reason}",
                                    "drop the cell or choose a newer GPU")
            params, _ = _parsed(cell)
            _check_local_files(params)
            planned.uploads = uploads_of(cell, params, device, _cap(cap))
            repo = cell.repo
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(repo)
            except ValueError:
                raise FarmError(f"repo {repo!r} is not owner/name", "e.g. repo = \"me/{recipe}-aot\"") from None
            checkpoints.setdefault(repo, set()).add(recipe.full_name)
            options = {k: params.get(k) for k in _OPTION_NAMES if params.get(k)}
            # a CPU flavor's ISA is known once its job runs
            planned.build = name_of(cell.scheme, options, False, planned.platform if cap else "cpu-...")
            other = names.setdefault((repo, planned.build), cell)
            if other is not cell:
                raise FarmError(f"{one_line(other.flavor, 60)} and {one_line(cell.flavor, 60)} would both push "
                                f"{planned.build} into {repo}",
                                "keep one of them (the build name does not tell them apart)")
        except AotpackError as e:
            planned.problem = e.cause
    for repo, recipes in checkpoints.items():
        if len(recipes) > 1:
            for planned in out:
                if planned.problem is None and planned.cell.repo == repo:
                    planned.problem = (f"{repo} would receive builds of {', '.join(sorted(recipes))}; a repo holds "
                                       "one model: put {recipe} in the repo name")
    return out


def check_farm(cells: Sequence[Cell], *, token: str | None = None) -> list[Planned]:
    """``plan_farm`` against the flavors Hugging Face Jobs offers now (and their prices); needs no login."""
    from huggingface_hub import HfApi

    from aotpack.hub import _hub_errors, endpoint

    with _hub_errors("jobs"):
        return plan_farm(cells, hardware=_hardware(HfApi(endpoint=endpoint(), token=token or False)))


def refused(planned: Sequence[Planned]) -> FarmError | None:
    """One error naming every cell that cannot be built, or None."""
    bad = [p for p in planned if p.problem]
    if not bad:
        return None
    first = bad[0]
    more = f" (and {len(bad) - 1} more cell{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    return FarmError(f"cell {first.cell.where}: {one_line(first.problem, 300)}{more}",
                     "fix or drop the refused cells (aotpack farm MATRIX --dry-run lists them); nothing was submitted")


# ---- one job --------------------------------------------------------------------------------------------------

def _pins() -> list[str]:
    """aotpack's dependencies at the versions installed here (what `make install` pinned), for the job."""
    from importlib.metadata import PackageNotFoundError, requires, version

    pins = []
    try:
        wanted = requires("aotpack") or []
    except PackageNotFoundError:
        return []
    for req in wanted:
        if "extra ==" in req:
            continue
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        try:
            pins.append(f"{name}=={version(name).split('+')[0]}")  # '+cpu' names a wheel index, not a release
        except PackageNotFoundError:
            continue
    return pins


def job_command(cell: Cell, *, tag_in_job: bool = True, uploads: Sequence[Upload] | None = None) -> list[str]:
    """The job's command: install aotpack and the pins, then build and push. No token in it. A farm tags its
    repos itself once every cell is in (``tag_in_job=False``): a tag is a pin and names one commit.
    ``uploads``: the files checked by ``plan_farm`` (their bytes are what travels); else they are read now."""
    params, options = _parsed(cell)
    if uploads is None:
        device, cap, _ = flavor_platform(cell.flavor)
        _check_local_files(params)
        uploads = uploads_of(cell, params, device, _cap(cap))
    install = [cell.install or f"aotpack=={__version__}", *_pins()]
    packages = " ".join(shlex.quote(x) for x in install)
    lines = ["set -e",  # uv where the image has it (the default one does), else pip
             f"if command -v uv >/dev/null; then uv pip install --system --quiet {packages}; "
             f"else python -m pip install --quiet {packages}; fi"]
    for upload in uploads:  # each travels inside the command, and the build reads it from the job's folder
        data = base64.b64encode(upload.data).decode()
        lines.append(f"echo {data} | base64 -d > {upload.name}")
        i = options.index(upload.option)
        options[i + 1] = upload.name
    args = ["aotpack", "build", cell.recipe, "--quant", cell.scheme]
    args += ["--variant", cell.variant] if cell.variant else []
    args += options + ["--push", cell.repo] + (["--tag", cell.tag] if cell.tag and tag_in_job else [])
    lines.append(" ".join(shlex.quote(a) for a in args))
    return ["sh", "-c", "\n".join(lines)]


def _job_env() -> dict[str, str]:
    """The job's environment: settings that say which Hub to push to, never a credential."""
    from huggingface_hub import constants

    from aotpack.hub import endpoint

    env = {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    if endpoint() != "https://huggingface.co":
        env["HF_ENDPOINT"] = endpoint()
    if constants.HF_HUB_DISABLE_XET:
        env["HF_HUB_DISABLE_XET"] = "1"
    return env


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
        lines: list[str] = []
        try:
            for line in api.fetch_job_logs(job_id=job.id, namespace=namespace, follow=True):
                lines.append(line)
                shown = one_line(line, 2000)  # escape codes and fake 'Error:' lines stay inside the job's line
                if on_line:
                    on_line(shown)
                else:
                    log.info("job| %s", shown)
            info = api.wait_for_job(job.id, namespace=namespace, poll_interval=1.0)
        except KeyboardInterrupt:
            _cancel(api, namespace, [state])
            raise
        _conclude(state, lines, _stage(info), info.status.message)
        _check_pushed(api, state)
    if state.stage != "completed":
        last = state.tail[-1] if state.tail else "no output"
        raise BuildError(f"job {job.id} on {one_line(flavor, 60)} ended {state.stage}: {state.message}; "
                         f"last line: {first_line(Exception(last), 200)}",
                         f"its log: hf jobs logs {job.id}")
    return state


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


# ---- many jobs ------------------------------------------------------------------------------------------------

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
