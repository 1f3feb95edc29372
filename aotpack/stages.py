"""Stage timing and peak memory, logged as plain facts: 'export took 2.1 s, peak RSS 1.20 GB'.

A stage that runs long says so while it runs ('compile transformer: 60 s so far'), so a ten-minute build never
looks hung.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
import sys
import threading
import time
from typing import Iterator

log = logging.getLogger("aotpack")
HEARTBEAT_S = 30.0


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
def stage(name: str, timings: dict[str, float], *, label: str | None = None,
          heartbeat: float = HEARTBEAT_S) -> Iterator[None]:
    """Time the block as stage ``name`` (added up if the name repeats) and log its start, progress and end
    (as ``label`` when given: 'compiling transformer (1 of 2)')."""
    name_shown = label or name
    log.info("%s ...", name_shown)
    t0 = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(heartbeat):
            log.info("%s: %.0f s so far", name_shown, time.perf_counter() - t0)

    ticker = threading.Thread(target=beat, daemon=True, name=f"aotpack-{name}")
    ticker.start()
    try:
        yield
    finally:
        done.set()
    elapsed = time.perf_counter() - t0
    timings[name] = round(timings.get(name, 0.0) + elapsed, 3)
    log.info("%s took %.1f s, peak RSS %.2f GB", name_shown, elapsed, peak_rss_bytes() / 1e9)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Ctrl-C during the block is a KeyboardInterrupt even where the code it lands in turns it into another error
    (measured: inside AOTInductor's compile it surfaced as an UnboundLocalError from a ``finally``, and inside
    export's fake tensors as a TypeError that torch logs with its traceback: once the signal came, log records
    are dropped, so the user sees one line)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    seen = threading.Event()

    quieted: list[logging.Handler] = []

    def quiet(record: logging.LogRecord) -> bool:
        return False

    def handler(signum: int, frame: object) -> None:
        if not seen.is_set():
            seen.set()
            quieted.extend(h for name in ("torch", None) for h in logging.getLogger(name).handlers)
            for h in quieted:
                h.addFilter(quiet)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    except KeyboardInterrupt:
        raise
    except BaseException:
        if seen.is_set():
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        for h in quieted:
            h.removeFilter(quiet)
