"""Build farm: compiled code is specific to its GPU, so build each (recipe, scheme, GPU) on Hugging Face Jobs.

One job per build: it installs this aotpack version with this environment's pinned dependencies, runs
``aotpack build RECIPE --quant S [options] --push REPO [--tag T]`` on the chosen flavor, and the build lands in
the repo beside the others (``push`` re-reads the index when another job's push lands first). The token
reaches the job as a secret: never in its command, its environment, a label or a log line.

    aotpack build flux --quant int8dq --on h200 --push me/flux-aot --tag v1     # one job, its log streamed
    aotpack farm matrix.toml --dry-run                                          # the cells, nothing submitted
    aotpack farm matrix.toml                                                    # one job per cell, a live table

Everything about jobs is huggingface_hub's (``HfApi.run_job``, ``inspect_job``, ``fetch_job_logs``,
``cancel_job``, ``list_jobs_hardware``); this package only decides what each job runs and watches them:
``cells`` (a cell, its flavor's platform, its state), ``matrix`` (the matrix file), ``cell_options`` (a cell's
build options), ``job_script`` (what travels to the job), ``plan`` (checking every cell first), ``jobs``
(submitting and watching) and ``results`` (what a finished job pushed, and the tags).
"""

from __future__ import annotations

from aotpack.farm.cell_options import options_from_context
from aotpack.farm.cells import (DEFAULT_IMAGE, DEFAULT_TIMEOUT, DONE, GPUS, STAGES, Cell, CellState, flavor_platform,
                                platform_label)
from aotpack.farm.job_script import Upload, _job_env, job_command, uploads_of
from aotpack.farm.jobs import remote_build, run_farm
from aotpack.farm.matrix import read_matrix
from aotpack.farm.plan import Planned, check_farm, plan_farm, refused

__all__ = [
    "DEFAULT_IMAGE", "DEFAULT_TIMEOUT", "DONE", "GPUS", "STAGES", "Cell", "CellState", "Planned", "Upload",
    "check_farm", "flavor_platform", "job_command", "options_from_context", "plan_farm", "platform_label",
    "read_matrix", "refused", "remote_build", "run_farm", "uploads_of",
    "_job_env",  # the job's environment: tests check it holds no token
]
