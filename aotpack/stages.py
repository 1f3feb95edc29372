"""Stage timing and peak memory, logged as plain facts: 'export took 2.1 s, peak RSS 1.20 GB'."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from typing import Iterator

log = logging.getLogger("aotpack")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux: VmHWM of /proc/self/status. Not getrusage's ru_maxrss, which a process inherits from the one that
    started it (a bench worker would report its parent's build peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


@contextlib.contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    log.info("%s ...", name)
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)
    log.info("%s took %.1f s, peak RSS %.2f GB", name, timings[name], peak_rss_bytes() / 1e9)
