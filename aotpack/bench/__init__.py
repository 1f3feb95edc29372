"""``aotpack bench``: eager, torch.compile (cold), torch.compile + its portable cache, and the aotpack
artifact (whole graph, and regional where the model has repeated blocks), side by side; every variant in a fresh
process, started with the page cache of the checkpoint and the artifact evicted (``posix_fadvise(DONTNEED)``)
and an empty inductor cache.

Per variant: cold start (process start -> first transformer output, and -> first image), steady latency
per transformer forward and per image, resident memory when ready and at its peak (``max_memory_allocated``
on GPU), weights bytes; for the artifacts also their build (export, compile and all stages, from the manifest)
and the bytes of their compiled code, and ``aotpack.load`` against the time to read their bytes (the floor).
Writes ``results.md`` (the seed's columns + these), ``results.csv``, ``results.json`` and ``results.png`` (with
matplotlib). ``build_only``: fresh builds only (each in its own process with an empty compile cache), written
to ``builds.md/.csv/.json`` - the depth-scaling table.

The parts: ``variants`` (what each row builds and loads), ``measure`` (one variant in a fresh process:
``python -m aotpack.bench``), ``builds`` (fresh builds, and the build record of an artifact), ``results``
(the tables and the plan), ``run`` (``run_bench``, the plan in order).
"""

from __future__ import annotations

from aotpack.bench.builds import build_artifact, build_record
from aotpack.bench.measure import evict, load_worker, main, worker
from aotpack.bench.results import (BUILD_COLUMNS, COLUMNS, _target, machine, print_plan, write_builds,
                                   write_results)
from aotpack.bench.run import run_bench
from aotpack.bench.variants import GPU_VARIANTS, REGIONAL, SHOWN, VARIANTS, has_repeated_blocks

__all__ = ["_target",  # the tests mark ratios with it
           "BUILD_COLUMNS", "COLUMNS", "GPU_VARIANTS", "REGIONAL", "SHOWN", "VARIANTS", "build_artifact",
           "build_record", "evict", "has_repeated_blocks", "load_worker", "machine", "main", "print_plan",
           "run_bench", "worker", "write_builds", "write_results"]
