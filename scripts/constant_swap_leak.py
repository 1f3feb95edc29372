"""Measure what torch keeps after ``load_constants(..., user_managed=True)``: RSS growth over many constant swaps
of one compiled block, and whether tensors swapped out and dropped are freed.

    python scripts/constant_swap_leak.py ARTIFACT [SWAPS]     # ARTIFACT: a regional build, e.g. tiny-flux --regional

Measured on this repo's 2-core AVX2 box (tiny-flux int8wo regional, 46 constants a block): +20 MiB after 15 000
swaps (~32 bytes a constant a swap), and 46 of 46 swapped-out tensors still alive. A regional model swaps on
every block call of a class with several instances; a LoRA swap keeps the weights it replaced.
"""

from __future__ import annotations

import gc
import sys
import weakref

import psutil

import aotpack


def main(artifact: str, swaps: int = 15000) -> None:
    model = aotpack.load(artifact)
    block = next(m for m in model.modules() if hasattr(m.forward, "code") and hasattr(m.forward, "constants"))
    shared, a = block.forward.code, block.forward.constants
    b = {k: v.clone() for k, v in a.items()}
    proc = psutil.Process()
    for d in (a, b):
        shared.compiled.load_constants(d, check_full_update=True, user_managed=True)
    gc.collect()
    start = proc.memory_info().rss
    for n in range(1, swaps + 1):
        shared.compiled.load_constants(a if n % 2 else b, check_full_update=True, user_managed=True)
        if n % 5000 == 0:
            gc.collect()
            print(f"{n} swaps of {len(a)} constants: RSS +{(proc.memory_info().rss - start) / 2**20:.2f} MiB")
    c = {k: v.clone() for k, v in a.items()}
    alive = [weakref.ref(v) for v in c.values()]
    shared.compiled.load_constants(c, check_full_update=True, user_managed=True)
    shared.compiled.load_constants(a, check_full_update=True, user_managed=True)
    del c
    gc.collect()
    print(f"tensors swapped out and dropped, still alive: {sum(r() is not None for r in alive)} of {len(alive)}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(x) for x in sys.argv[2:3]))
