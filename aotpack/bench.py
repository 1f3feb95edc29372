"""Load benchmark of one artifact, each measurement in a fresh process:

    python -m aotpack.bench ARTIFACT [ARTIFACT ...]

prints a markdown table: bytes on disk, the time to read them (the floor), aotpack.load time (hash check
included), resident memory added by the load and after three forwards (weights paged in, activations
freed) against the weights' bytes, and the steady latency of one
transformer forward at the exported example size. The full side-by-side bench (eager, torch.compile,
compile cache) is issue #4's `aotpack bench`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def _child(path: str) -> dict:
    import psutil
    import torch

    import aotpack
    from aotpack import manifest as mf

    import torch._inductor.package  # noqa: F401  (import cost is process start, not load)

    proc = psutil.Process()
    data = mf.read(path)
    files = [Path(path) / name for name in data["files"]]
    t = time.perf_counter()
    for f in files:  # read once: the floor any loader pays (page cache warm after this, for both)
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    read_s = time.perf_counter() - t
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    module = aotpack.load(path)
    load_s = time.perf_counter() - t
    rss1 = proc.memory_info().rss
    ranges = data["inputs"]["dynamic"]
    batch, seq = 1, min(256, ranges["image_seq"][1])
    x = {}
    for spec in data["inputs"]["tensors"]:
        shape = [{"batch": batch, "image_seq": seq}.get(d, d) if isinstance(d, str) else d for d in spec["shape"]]
        x[spec["name"]] = torch.randn(shape, dtype=getattr(torch, spec["dtype"])) * 0.1
    with torch.no_grad():
        module(**x)
        t = time.perf_counter()
        for _ in range(3):
            module(**x)
        fwd_s = (time.perf_counter() - t) / 3
    rss2 = proc.memory_info().rss
    return {
        "artifact": Path(path).name, "scheme": data["scheme"]["name"],
        "weights_bytes": data["files"]["weights.safetensors"]["size"],
        "model_bytes": data["files"]["model.pt2"]["size"],
        "read_s": read_s, "load_s": load_s, "rss_added": rss1 - rss0, "rss_after_forward": rss2 - rss0,
        "forward_s": fwd_s, "batch": batch, "image_seq": seq, "threads": torch.get_num_threads(),
    }


def measure(path: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "aotpack.bench", "--child", path], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    head = ("| artifact | scheme | weights MB | model.pt2 MB | read s (floor) | load s | load/read | "
            "RSS added by load MB | + after forwards MB | (after forwards)/weights | forward s |")
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        lines.append(
            f"| {r['artifact']} | {r['scheme']} | {r['weights_bytes'] / 1e6:.1f} | {r['model_bytes'] / 1e6:.1f} | "
            f"{r['read_s']:.2f} | {r['load_s']:.2f} | {r['load_s'] / max(r['read_s'], 1e-9):.1f}x | "
            f"{r['rss_added'] / 1e6:.0f} | {r['rss_after_forward'] / 1e6:.0f} | "
            f"{r['rss_after_forward'] / r['weights_bytes']:.2f} | {r['forward_s']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        print(json.dumps(_child(argv[1])))
        return
    if not argv:
        print(__doc__)
        return
    print(table([measure(p) for p in argv]))


if __name__ == "__main__":
    main(sys.argv[1:])
