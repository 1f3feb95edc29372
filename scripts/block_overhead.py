"""What a regional artifact's block call costs beyond its compiled code, measured in a real pipeline call.

    python scripts/block_overhead.py ARTIFACT [ARTIFACT ...] [--steps N]

For each regional artifact: the pipeline is loaded from the artifact (as ``aotpack run`` does), warmed with one
call, then every block call of an N-step call is timed around the block's compiled ``forward`` (input check,
``.contiguous()``, lock, constant swap, compiled call) and around the compiled call alone. Prints a table.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any


def measure(path: str, steps: int) -> dict[str, Any]:
    import torch

    from aotpack.artifact.platform import describe, tag
    from aotpack.serve import regional
    from aotpack.serve.run import pipeline_for

    pipe, recipe = pipeline_for(path)
    blocks = [b.forward for b in pipe.transformer.modules() if isinstance(getattr(b, "forward", None),
                                                                          regional.CompiledBlock)]
    if recipe.output != "image":
        raise SystemExit(f"{path}: image recipes only")
    if not blocks:
        raise SystemExit(f"{path} is not a regional artifact (build it with --regional)")
    totals = {"outer": 0.0, "inner": 0.0, "swap": 0.0, "calls": 0}
    call0, swap0 = regional.CompiledBlock.__call__, regional.SharedCode._swap

    def call(self: Any, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return call0(self, *a, **k)
        finally:
            totals["outer"] += time.perf_counter() - t
            totals["calls"] += 1

    def swap(self: Any, instance: str, constants: Any) -> None:
        t = time.perf_counter()
        swap0(self, instance, constants)
        totals["swap"] += time.perf_counter() - t

    class Timed:
        def __init__(self, compiled: Any) -> None:
            self.compiled = compiled

        def __call__(self, inputs: Any) -> Any:
            t = time.perf_counter()
            try:
                return self.compiled(inputs)
            finally:
                totals["inner"] += time.perf_counter() - t

        def __getattr__(self, name: str) -> Any:
            return getattr(self.compiled, name)

    for code in {id(b.code): b.code for b in blocks}.values():
        code.compiled = Timed(code.compiled)
    regional.CompiledBlock.__call__, regional.SharedCode._swap = call, swap
    try:
        # the recipe's serving size and text length: inside the artifact's ranges
        kwargs = {"height": recipe.run["height"], "width": recipe.run["width"],
                  "max_sequence_length": recipe.max_sequence_length}
        pipe("a photo of a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0), **kwargs)
        totals.update(outer=0.0, inner=0.0, swap=0.0, calls=0)
        pipe("a photo of a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        regional.CompiledBlock.__call__, regional.SharedCode._swap = call0, swap0
    n = totals["calls"]
    return {"artifact": path, "scheme": pipe.transformer.manifest.scheme.name, "platform": tag(describe()),
            "block calls": n, "ms per block call": 1e3 * totals["outer"] / n,
            "ms compiled call": 1e3 * totals["inner"] / n,
            "overhead ms per call": 1e3 * (totals["outer"] - totals["inner"]) / n,
            "swap ms per call": 1e3 * totals["swap"] / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    rows = [measure(p, args.steps) for p in args.artifacts]
    cols = list(rows[0])
    print(f"{platform.processor() or platform.machine()}; each row one {args.steps}-step pipeline call\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
