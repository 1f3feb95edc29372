"""Steady transformer forwards of artifacts and of torch.compile on the same model, interleaved in ONE process
(what `aotpack bench` runs for its forward target; see aotpack/bench/interleaved.py).

    python scripts/interleaved_forward.py ARTIFACT [ARTIFACT ...] [--rounds N] [--no-compile]

Every artifact must be of the same model (say its whole-graph and its regional build, or its schemes and dtypes:
the inputs are cast to each artifact's dtype; the torch.compile rows take the first's). Prints a table.
"""

from __future__ import annotations

import argparse
import platform


def main() -> None:
    from aotpack.artifact.platform import describe, tag
    from aotpack.bench.interleaved import interleaved

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true", help="artifacts only")
    args = ap.parse_args()
    res = interleaved(args.artifacts, compile_rows=not args.no_compile, rounds=args.rounds)
    best = min(r["median_s"] for r in res["rows"])
    print(f"{res['what']}; {platform.machine()} {tag(describe())}, {res['threads']} threads, "
          f"{res['rounds']} interleaved rounds\n")
    print("| variant | median s | min s | / fastest |\n|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['variant']} | {r['median_s']:.4f} | {r['min_s']:.4f} | {r['median_s'] / best:.2f} |")


if __name__ == "__main__":
    main()
