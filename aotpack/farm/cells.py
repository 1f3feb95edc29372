"""A farm's cells: one build each (recipe, scheme, Jobs flavor, repo), the platform a flavor gives, and a cell's
state while and after its job runs."""

from __future__ import annotations

import dataclasses
import re
import time

from aotpack.errors import FarmError, one_line

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
_TIMEOUT = re.compile(r"(\d+(\.\d+)?[smhd]|\d+)")  # what run_job reads: '2h', '90m', '1.5d', '3600'


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


def _cap(cap: str | None) -> tuple[int, int] | None:
    return tuple(int(x) for x in cap.split(".")) if cap else None  # type: ignore[return-value]


def _timeout_problem(timeout: str) -> str | None:
    """Why a job timeout cannot be given to Hugging Face Jobs, or None."""
    if not isinstance(timeout, str) or not _TIMEOUT.fullmatch(timeout) or float(timeout.rstrip("smhd")) <= 0:
        return (f"'timeout' {one_line(repr(timeout), 40)} is not a duration: a number of seconds or a number "
                "with s, m, h or d, e.g. \"2h\"")
    return None
