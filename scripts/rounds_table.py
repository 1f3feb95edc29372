"""The table the interleaved-rounds scripts print (frozen_dynamic.py, packed_linears.py): one line per run, its
median and minimum seconds and its median over the fastest median."""

from __future__ import annotations


def print_rounds(title: str, times: dict) -> None:
    """``times``: {name: {"median_s", "min_s"}} as ``aotpack.bench.interleaved._rounds`` returns it."""
    best = min(t["median_s"] for t in times.values())
    print(f"{title}\n")
    print("| variant | median s | min s | / fastest |\n|---|---|---|---|")
    for n, t in times.items():
        print(f"| {n} | {t['median_s']:.4f} | {t['min_s']:.4f} | {t['median_s'] / best:.2f} |")
