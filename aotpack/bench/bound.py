"""How near each forward runs to the machine's matmul bound: the box's plain matmul rate per dtype (float32,
bfloat16, and int8 through ``torch._int_mm``), the linear FLOPs of one transformer forward (counted on the eager
row: every ``nn.Linear`` the forward calls, 2 * tokens * in * out), and each row's share of the rate its matmuls
run at (int8 for schemes that multiply in int8, the model dtype for the others: int8wo dequantizes first)."""

from __future__ import annotations

import time
from typing import Any

from aotpack.artifact.platform import INT8_MATMUL

# one real-width linear: 512 tokens through a 3072 x 3072 weight (FLUX.1's hidden size)
M, K, N = 512, 3072, 3072
# A dtype with no fast kernel here (bf16 without bf16 units: 0.45 GFLOP/s on an AVX2-only box, 21 s for one such
# call; int8 without VNNI: 1.3) is timed on PROBE_ROWS rows instead (a plain loop's rate hardly depends on the
# rows), and every dtype for at most BUDGET_S seconds a reading after its first two timed calls.
PROBE_ROWS = 32
SLOW_CALL_S = 0.2
BUDGET_S = 2.0


def matmul_rates(device: str = "cpu", repeats: int = 10) -> dict[str, float]:
    """GFLOP/s of a plain (M x K) @ (K x N) matmul on ``device``, per dtype; the best of up to ``repeats``."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    rates = {}
    for name in ("float32", "bfloat16", "int8"):
        if name == "int8":
            a = torch.randint(-127, 127, (M, K), generator=g, dtype=torch.int8).to(device)
            b = torch.randint(-127, 127, (K, N), generator=g, dtype=torch.int8).to(device)
            mm = torch._int_mm
        else:
            a = torch.randn(M, K, generator=g).to(device, getattr(torch, name))
            b = torch.randn(K, N, generator=g).to(device, getattr(torch, name))
            mm = torch.matmul
        try:
            sliver = a[:PROBE_ROWS]  # the warm-up and the probe (the faster of two calls), on a sliver of the rows
            probe = min(_timed(lambda: mm(sliver, b), sync) for _ in range(2))
        except RuntimeError:  # no kernel for it here
            continue
        rows = PROBE_ROWS if probe * M / PROBE_ROWS > SLOW_CALL_S else M
        x = a[:rows].contiguous()
        try:
            best = _best(lambda: mm(x, b), sync, repeats)
        except RuntimeError:  # no kernel at the full size
            continue
        rates[name] = 2 * rows * K * N / best / 1e9
    return rates


def _timed(run: Any, sync: Any) -> float:
    sync()
    t = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - t


def _best(run: Any, sync: Any, repeats: int) -> float:
    """The shortest of up to ``repeats`` timed calls of ``run`` (at least two: the first at a new size may pay for
    its set-up), the third on while BUDGET_S lasts."""
    times: list[float] = []
    while len(times) < max(repeats, 2) and (len(times) < 2 or sum(times) < BUDGET_S):
        times.append(_timed(run, sync))
    return min(times)


class LinearFlops:
    """Forward hooks on every ``nn.Linear`` of ``model`` that add up 2 * tokens * in * out per call (quantized
    linears keep their class and sizes); ``per_forward(n)`` is the total over ``n`` forwards, and removes them."""

    def __init__(self, model: Any) -> None:
        import torch

        self.total = 0
        self._hooks = [m.register_forward_hook(self._count) for m in model.modules()
                       if isinstance(m, torch.nn.Linear)]

    def _count(self, module: Any, args: tuple, out: Any) -> None:
        if args and hasattr(args[0], "shape"):
            tokens = args[0].numel() // max(module.in_features, 1)
            self.total += 2 * tokens * module.in_features * module.out_features

    def per_forward(self, forwards: int) -> int | None:
        for h in self._hooks:
            h.remove()
        return self.total // forwards if forwards and self._hooks else None


def rate_dtype(quant: str, dtype: str) -> str:
    """The dtype a scheme's matmuls run in: int8 for the int8-matmul schemes, the model dtype otherwise."""
    return "int8" if quant in INT8_MATMUL else dtype


def bound_table(rows: list[dict], rates: dict[str, float]) -> list[str]:
    """The '## Matmul bound' section: each row's linear GFLOP/s against the machine's rate for its matmuls."""
    if not rates:
        return []
    flops = {r["quant"]: r["linear_flops"] for r in rows if r.get("linear_flops")}
    lines = ["", "## Matmul bound", "",
             "Plain matmul on this machine (%d x %d @ %d x %d, best of up to 10 within %g s, before and after the "
             "runs; a dtype whose call would pass %g s is timed on %d rows): " % (M, K, K, N, BUDGET_S, SLOW_CALL_S,
                                                                                  PROBE_ROWS) +
             ", ".join(f"{k} {v:.3g} GFLOP/s" for k, v in rates.items()) + ". Linear FLOPs of one forward "
             "counted on the eager row (every nn.Linear call: 2 x tokens x in x out; attention not counted); "
             "share = those FLOPs per forward second / the rate of the dtype the matmuls run in.", "",
             "| scheme | variant | matmuls in | forward s | linear GFLOP | GFLOP/s | share of the matmul rate |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, s = flops.get(r["quant"]), r.get("forward_s")
        if not f or not s:
            continue
        dt = rate_dtype(r["quant"], r.get("dtype", "float32"))
        achieved = f / s / 1e9
        share = f"{achieved / rates[dt]:.0%}" if dt in rates else "n/a"
        lines.append(f"| {r['quant']} | {r['variant']} | {dt} | {s:.3f} | {f / 1e9:.1f} | {achieved:.0f} | {share} |")
    return lines
