"""The bench's results: the machine it ran on, the results table (results.md/.csv/.json/.png) with its targets
marked met or missed, the build table (builds.md/.csv/.json, gathered over runs), and the plan printed first."""

from __future__ import annotations

import csv
import io
import json
import os
import platform as _platform
import sys
from pathlib import Path
from typing import Callable

from aotpack.bench.bound import bound_table
from aotpack.bench.interleaved import PRUNE
from aotpack.bench.variants import COMPILES, REGIONAL, SHOWN


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    from aotpack.artifact.platform import describe, tag

    here = describe()
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return {"platform": tag(here), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "gpu": here.gpu_name,
            "torch": torch.__version__, "python": _platform.python_version(), "os": _platform.platform()}



COLUMNS = ["ckpt_id", "batch_size", "fuse", "compile", "compile_vae", "quantization", "sparsify", "model_memory",
           "inference_memory", "time", "variant", "cold_start", "first_image", "forward", "weights", "threads",
           "build_export", "build_compile", "build_total", "pt2"]


def _round(value: float | None, digits: int) -> float | str:
    return "" if value is None else round(value, digits)


def _records(recipe, rows: list[dict], common: dict) -> list[dict]:
    out = []
    for r in rows:
        out.append({
            "ckpt_id": recipe.checkpoint, "batch_size": common["batch"], "fuse": False,
            "compile": r["variant"] != "eager", "compile_vae": False, "quantization": r["quant"],
            "sparsify": r["quant"] == "sparsify",
            "model_memory": round(r["model_memory"] / 2**30, 3), "inference_memory": round(r["inference_memory"] / 2**30, 3),
            "time": round(r["image_s"], 3), "variant": r["variant"], "cold_start": round(r["cold_start_s"], 2),
            "first_image": round(r["first_image_s"], 2), "forward": round(r["forward_s"], 4),
            "weights": round(r["weights_bytes"] / 2**20, 1), "threads": r["threads"],
            # the artifact's build (its manifest): eager and torch.compile rows have none
            "build_export": _round(r.get("export_s"), 1), "build_compile": _round(r.get("compile_s"), 1),
            "build_total": _round(r.get("total_s"), 1),
            "pt2": _round(r["pt2_bytes"] / 2**20 if r.get("pt2_bytes") is not None else None, 2),
        })
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def _machine_line(info: dict) -> str:
    return (f"Machine: {info['cpu']}, {info['cores']} cores ({info['threads']} torch threads), "
            f"{info['memory_gb']} GiB" + (f", GPU {info['gpu']}" if info["gpu"] else "") +
            f"; platform {info['platform']}; torch {info['torch']}, python {info['python']}; {info['os']}.")


# the stages whose time grows with depth (the eager passes), each a column beside export and compile
PASS_STAGES = ("reference", "quantize", "eager", "verify", "quant error")
BUILD_COLUMNS = ["recipe", "blocks", "quant", "dtype", "mode", "modules", "capture", "reference_s", "quantize_s",
                 "eager_s", "export_s", "compile_s", "verify_s", "quant_error_s", "total_s", "wall_s", "pt2_mib",
                 "weights_mib", "peak_rss_gib", "code"]
DEPTH_TARGET = 1.5   # a deep regional build's wall time against the same width at 1 + 1 blocks
_BUILD_NOTE = ("Build time by stage from each artifact's manifest (`build.stages`): export and compile summed over "
               "its compiled modules (one per block class in a regional build); reference, quantize, eager, "
               "verify and quant error are the passes over the model; `capture` is the recipe's capture call "
               "(height x width, text tokens, batch, steps); total = every stage (load and save too); wall = the build "
               "process from start to exit (empty when the artifact existed); .pt2 = the compiled code, all "
               "modules; peak RSS of the build process. `code` says where the compiled code came from: "
               "'compiled' is a cold compile.")


def _build_rows(records: list[dict]) -> list[dict]:
    def r(v: float | None, d: int = 1) -> float | str:
        return "" if v is None else round(v, d)

    return [{"recipe": b["recipe"], "blocks": b["blocks"], "quant": b["quant"], "dtype": b["dtype"], "mode": b["mode"],
             "modules": b["modules"], "capture": b.get("capture", ""),
             **{f"{k.replace(' ', '_')}_s": r((b.get("stages") or {}).get(k)) for k in PASS_STAGES},
             "export_s": r(b["export_s"]), "compile_s": r(b["compile_s"]),
             "total_s": r(b["total_s"]), "wall_s": r(b["wall_s"]), "pt2_mib": r(b["pt2_bytes"] / 2**20, 2),
             "weights_mib": r(b["weights_bytes"] / 2**20), "peak_rss_gib": r(b["peak_rss_bytes"] / 2**30, 2),
             "code": b["code"]} for b in records]


def _build_table(records: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(BUILD_COLUMNS) + " |", "|" + "---|" * len(BUILD_COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in BUILD_COLUMNS) + " |" for row in _build_rows(records)]
    pairs = {}
    for b in records:
        pairs.setdefault((b["recipe"], b["quant"], b["dtype"]), {})[b["mode"]] = b
    ratios = [(key, p["regional"], p["whole"]) for key, p in pairs.items() if {"regional", "whole"} <= set(p)]
    if ratios:
        lines += ["", "| recipe | quant | compile regional / whole | total regional / whole | .pt2 regional / whole |",
                  "|---|---|---|---|---|"]
        for (recipe, quant, _), reg, whole in ratios:
            lines.append(f"| {recipe} | {quant} | {_ratio(reg['compile_s'], whole['compile_s'])} | "
                         f"{_ratio(reg['total_s'], whole['total_s'])} | {_ratio(reg['pt2_bytes'], whole['pt2_bytes'])} |")
    return lines + _depth_table(records)


def _depth_table(records: list[dict]) -> list[str]:
    """Deep against shallow: each row of recipe X beside the same scheme, dtype and mode of X-shallow (flux-depth's
    1 + 1 variant), wall time and every pass's sum, the regional wall marked against ``DEPTH_TARGET``."""
    by = {(b["recipe"], b["quant"], b["dtype"], b["mode"]): b for b in records}
    pairs = [(b, by[(b["recipe"] + "-shallow", *key)]) for (_, *key), b in by.items()
             if (b["recipe"] + "-shallow", *key) in by]
    if not pairs:
        return []
    lines = ["", f"| recipe | quant | mode | blocks deep / shallow | wall deep / shallow (target <= {DEPTH_TARGET} "
             "regional) | passes s deep / shallow | compile s deep / shallow |", "|---|---|---|---|---|---|---|"]
    for deep, shallow in pairs:
        passes = [sum((b.get("stages") or {}).get(k, 0.0) for k in PASS_STAGES) for b in (deep, shallow)]
        wall = _ratio(deep["wall_s"], shallow["wall_s"])
        lines.append(f"| {deep['recipe']} | {deep['quant']} | {deep['mode']} | {deep['blocks']} / {shallow['blocks']} | "
                     f"{_target(wall, DEPTH_TARGET) if deep['mode'] == 'regional' else wall} | "
                     f"{passes[0]:.1f} / {passes[1]:.1f} | {_r1(deep['compile_s'])} / {_r1(shallow['compile_s'])} |")
    return lines


def _r1(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def write_builds(out: Path, records: list[dict], info: dict) -> None:
    """builds.md, builds.csv and builds.json in ``out``: the build table. Rows already in builds.json for
    other (recipe, scheme, dtype, mode) and the same platform are kept: several runs gather one table."""
    key = lambda b: (b["recipe"], b["quant"], b["dtype"], b["mode"])  # noqa: E731
    merged: dict[tuple, dict] = {}
    try:
        old = json.loads((out / "builds.json").read_text())
        if old.get("machine", {}).get("platform") == info["platform"]:
            merged = {key(b): b for b in old.get("builds", [])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass
    merged.update({key(b): b for b in records})
    records = sorted(merged.values(), key=lambda b: (b["recipe"], b["quant"], b["dtype"], b["mode"] != "whole"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=BUILD_COLUMNS)
    w.writeheader()
    w.writerows(_build_rows(records))
    (out / "builds.csv").write_text(buf.getvalue())
    lines = ["# aotpack builds", "", _machine_line(info), "", _BUILD_NOTE, ""] + _build_table(records)
    (out / "builds.md").write_text("\n".join(lines) + "\n")
    (out / "builds.json").write_text(json.dumps({"machine": info, "builds": records}, indent=2) + "\n")


def print_plan(out: Path, name: str, quants: list[str], variants: tuple, wanted: dict, path_of: Callable,
               images: int) -> None:
    """The bench's plan on stderr before anything runs: the runs, the builds missing, and an estimate from an
    earlier run in ``out`` (its cold starts and images), where there is one."""
    missing = [f"{q}{' regional' if r else ''}" for q in quants for r in wanted.values()
               if not (path_of(q, r) / "manifest.json").is_file()]
    runs = len(quants) * len(variants)
    print(f"bench {name}: {len(quants)} scheme(s) ({', '.join(quants)}) x {len(variants)} variants "
          f"({', '.join(variants)}) = {runs} runs, each in a fresh process, {images} image(s) after the first; "
          f"then 2 loads per artifact; builds first: {', '.join(missing) or 'none (all exist)'}", file=sys.stderr)
    try:
        earlier = json.loads((out / "results.json").read_text())["rows"]
        seconds = sum(r["cold_start_s"] + (1 + images) * r["image_s"] for r in earlier
                      if r.get("quant") in quants and r.get("variant") in variants)
        print(f"  estimate from the last run in {out}: about {seconds / 60:.0f} min of runs, plus builds",
              file=sys.stderr)
    except (OSError, ValueError, KeyError, TypeError):
        print("  no earlier run in this folder to estimate the time from", file=sys.stderr)


def _target(ratio: str, limit: float) -> str:
    """A ratio cell marked against its target: '0.21 met', '1.31 missed' ('n/a' stays)."""
    try:
        return f"{ratio} {'met' if float(ratio) <= limit else 'missed'}"
    except ValueError:
        return ratio


def write_results(out: Path, recipe, rows: list[dict], loads: dict, builds: dict, info: dict, common: dict, *,
                  artifacts: list[dict] = (), interleaved: dict | None = None, matrix: dict | None = None) -> None:
    """results.md/.csv/.json/.png. ``loads`` and ``builds`` (seconds of builds run here) are keyed by artifact
    label (the scheme; 'SCHEME regional' for a regional one); ``artifacts``: their ``build_record``s."""
    records = _records(recipe, rows, common)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(records)
    (out / "results.csv").write_text(buf.getvalue())
    lines = _results_head(recipe, info, common)
    for rec in records:
        lines.append("| " + " | ".join(str(rec[c]) for c in COLUMNS) + " |")
    lines += _targets_table(rows, loads) + bound_table(rows, info.get("matmul_gflops") or {})
    lines += interleaved_table(interleaved or {}) + matrix_table(matrix or {}) + _loads_table(loads, builds)
    if artifacts:
        lines += ["", "## Builds", "", _BUILD_NOTE, ""] + _build_table(list(artifacts))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"machine": info, "workload": common, "rows": rows,
                                                   "loads": loads, "builds": builds,
                                                   "artifacts": list(artifacts),
                                                   "interleaved": interleaved or {},
                                                   "compile_matrix": matrix or {}}, indent=2) + "\n")
    _plot(out / "results.png", records, recipe.full_name)


def _results_head(recipe, info: dict, common: dict) -> list[str]:
    """results.md down to the results table's header: the machine, the workload, what each column means."""
    return [f"# aotpack bench: {recipe.full_name}", "", _machine_line(info),
            f"Workload: {recipe.pipeline} at {common['height']}x{common['width']}, {common['steps']} steps, "
            f"batch {common['batch']}, {common['dtype']}; each variant in a fresh process with the checkpoint and "
            f"artifact evicted from the page cache and an empty inductor cache.", "",
            "memory in GiB (RSS on CPU: model_memory when ready to serve, inference_memory the peak; "
            "max_memory_allocated on GPU), time = seconds per image (steady), cold_start = process start to the "
            "first transformer output, first_image = process start to the first image, forward = seconds per "
            "transformer forward (steady, median), weights in MiB; for the artifacts (aotpack, aotpack-regional: "
            "one compiled module per block class, every block instance runs it with its own weights) "
            "build_export, build_compile and build_total (every stage) in seconds from the manifest, "
            "pt2 = the compiled code in MiB.", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]


def _targets_table(rows: list[dict], loads: dict) -> list[str]:
    """The '## Targets' section: one line a scheme, each ratio marked against its target."""
    lines = ["", "## Targets", "", "Each ratio is marked met or missed against its target.", "",
             "| scheme | cold start aotpack / compile+cache (<= 0.25) | forward aotpack / fastest torch.compile "
             "(<= 1.0) | RSS after load and one forward / weights (<= 1.15) | load / read floor (<= 2): "
             "first, later | forward regional / whole (<= 1.02) | cold start regional / whole |",
             "|---|---|---|---|---|---|---|"]
    by = {(r["quant"], r["variant"]): r for r in rows}
    for quant in dict.fromkeys(r["quant"] for r in rows):
        a, cc = by.get((quant, "aotpack")), by.get((quant, "compile+cache"))
        compiled = [by[(quant, v)] for v in COMPILES if (quant, v) in by]
        c = min(compiled, key=lambda r: r["forward_s"]) if compiled else None
        fastest = f" ({c['variant']})" if c else ""
        reg, ld = by.get((quant, REGIONAL)), loads.get(quant)
        rss = _target(_ratio(ld["rss_after_forward"], ld["weights_bytes"]), 1.15) if ld else "n/a"
        load = (f"{_target(_ratio(ld['first_load_s'], ld['read_s']), 2)}, "
                f"{_target(_ratio(ld['load_s'], ld['read_s']), 2)}") if ld else "n/a"
        lines.append(
            f"| {quant} | {_target(_ratio(a and a['cold_start_s'], cc and cc['cold_start_s']), 0.25)} | "
            f"{_target(_ratio(a and a['forward_s'], c and c['forward_s']), 1.0)}{fastest} | "
            f"{rss} | {load} | "
            f"{_target(_ratio(reg and reg['forward_s'], a and a['forward_s']), 1.02)} | "
            f"{_ratio(reg and reg['cold_start_s'], a and a['cold_start_s'])} |")
    return lines


def _loads_table(loads: dict, builds: dict) -> list[str]:
    """The '## Artifact load' section: one line an artifact, its reads and loads from a cold page cache."""
    lines = ["", "## Artifact load", "", "Each figure in a fresh process with a cold page cache (torch, diffusers, "
             "safetensors and the model's diffusers class imported: a serving process has them). A first load "
             "hashes every byte; later loads of the same files skip the hash (file identity remembered, see "
             "README) and map the weights lazily, so their bytes are read by the first forward (a frozen "
             "int8dq artifact reads its int8 weights at load, for their column sums).", "",
             "| artifact | artifact MiB | read s (cold, floor) | first aotpack.load s | later aotpack.load s | "
             "RSS added by load MiB | RSS after one forward MiB | build s |", "|---|---|---|---|---|---|---|---|"]
    for label, ld in loads.items():
        built = f"{builds[label]:.1f}" if label in builds else "(existed)"
        lines.append(f"| {label} | {ld['artifact_bytes'] / 2**20:.1f} | {ld['read_s']:.2f} | "
                     f"{ld['first_load_s']:.2f} | {ld['load_s']:.2f} | "
                     f"{ld['rss_added_by_load'] / 2**20:.0f} | {ld['rss_after_forward'] / 2**20:.0f} | {built} |")
    return lines


def _plot(path: Path, records: list[dict], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: pip install 'aotpack[bench]'
        return
    quants = sorted({r["quantization"] for r in records}, key=[r["quantization"] for r in records].index)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, label in zip(axes, ("cold_start", "time", "inference_memory"),
                              ("cold start, s", "seconds per image", "peak memory, GiB")):
        shown = [v for v in SHOWN if any(r["variant"] == v for r in records)]
        width = 0.8 / len(shown)
        for i, v in enumerate(shown):
            ys = [next((r[key] for r in records if r["variant"] == v and r["quantization"] == q), 0) for q in quants]
            ax.bar([j + i * width for j in range(len(quants))], ys, width, label=v)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(quants))], quants)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"aotpack bench: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def interleaved_table(results: dict[str, dict]) -> list[str]:
    """The '## Forward, interleaved in one process' section: a line a scheme and variant, against the fastest
    torch.compile row of that scheme (the forward target, measured where the box's drift cancels)."""
    if not results:
        return []
    lines = ["", "## Forward, interleaved in one process", "",
             f"Every variant once per round ({next(iter(results.values())).get('rounds', '?')} rounds), in "
             "rotating order, in one process (the inputs: the transformer's own "
             "arguments in a pipeline call at the recipe's run size); s a forward; the target: aotpack at most "
             "the fastest torch.compile variant, and the regional artifact at most 1.02x the whole graph (the "
             "fresh-process rows above drift by more than that between processes).", "",
             "| scheme | variant | median s | min s | / fastest torch.compile (aotpack <= 1.0) | "
             "/ aotpack (regional <= 1.02) |", "|---|---|---|---|---|---|"]
    for quant, res in results.items():
        compiled = [r["median_s"] for r in res["rows"] if r["variant"].startswith("compile")]
        whole = next((r["median_s"] for r in res["rows"] if r["variant"] == "aotpack"), None)
        for r in res["rows"]:
            ratio = f"{r['median_s'] / min(compiled):.2f}" if compiled else "n/a"
            cell = _target(ratio, 1.0) if r["variant"] == "aotpack" else ratio
            to_whole = _ratio(r["median_s"], whole) if whole else "n/a"
            if r["variant"] == REGIONAL:
                to_whole = _target(to_whole, 1.02)
            lines.append(f"| {quant} | {r['variant']} | {r['median_s']:.4f} | {r['min_s']:.4f} | {cell} | "
                         f"{to_whole} |")
    return lines


AS_ACCURATE = 1.25  # a variant "as accurate" as the artifact: forward error at most this times the artifact's


def matrix_table(res: dict) -> list[str]:
    """The '## The default artifact against every torch.compile variant' section (``bench --compile-matrix``):
    one interleaved process, a line a variant, each against the artifact; two targets: the artifact at most the
    fastest torch.compile variant that compiled, and at most the fastest of those as accurate as it (forward error
    within ``AS_ACCURATE`` x the artifact's: a bf16 variant 4x less accurate is not what an fp32 default trades)."""
    if not res.get("rows"):
        return []
    art = next(r for r in res["rows"] if r["variant"] == "aotpack")
    compiled = [r for r in res["rows"] if r["mode"] != "artifact" and "median_s" in r]
    # "as accurate": within AS_ACCURATE x the artifact's error, or 1e-4 of it (an unquantized fp32 artifact's error is
    # compiler rounding, ~1e-7, where a ratio means nothing)
    bound = max(AS_ACCURATE * art["error"], art["error"] + 1e-4) if "error" in art else None
    close = [r for r in compiled if bound is not None and r.get("error", float("inf")) <= bound]
    lines = ["", "## The default artifact against every torch.compile variant", "",
             f"The recipe's default artifact ({res['what']}) and torch.compile of the checkpoint in every dtype, "
             "scheme and inductor mode, once each per round in rotating order in one process "
             f"({res['rounds']} rounds, {res['threads']} threads; every row on the transformer's arguments in one "
             "float32 pipeline call, cast to its dtype); s a forward, and the forward's error: its largest "
             "difference from the float32 eager model's output (unquantized), relative to that output's largest."
             + (f" A row marked (first calls) took over {PRUNE:g}x the fastest row's in the faster of two timed "
                "first calls, and ran no rounds (the default artifact always runs them)."
                if any(r.get("pruned") for r in res["rows"]) else ""),
             "", _matrix_target("the fastest torch.compile variant", art, compiled, "none compiled"),
             _matrix_target(f"the fastest as accurate (error <= {AS_ACCURATE} x the artifact's)", art, close,
                            "none compiled as accurate" if bound is not None else "the artifact's error not measured"),
             *_other_artifacts(res["rows"], compiled), "",
             "| variant | dtype | scheme | mode | median s | min s | / aotpack | forward error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("pruned"):  # over PRUNE x the fastest in its first calls: it ran no rounds
            cells = f"{r['median_s']:.4f} (first calls) | | {r['median_s'] / art['median_s']:.2f}"
        elif "median_s" in r:
            cells = f"{r['median_s']:.4f} | {r['min_s']:.4f} | {r['median_s'] / art['median_s']:.2f}"
        else:
            cells = f"fails: {r.get('fails', 'no timing')} | | "
        error = f"{r['error']:.2%}" if "error" in r else ""
        lines.append(f"| {r['variant']} | {r['dtype']} | {r['scheme']} | {r['mode']} | {cells} | {error} |")
    return lines


def _other_artifacts(rows: list[dict], compiled: list[dict]) -> list[str]:
    """A line for each other artifact the matrix ran (the other frozen builds): its time against the fastest
    torch.compile variant."""
    if not compiled:
        return []
    best = min(compiled, key=lambda r: r["median_s"])
    return [f"Another artifact, {r['variant']}: {r['median_s'] / best['median_s']:.2f}x the fastest torch.compile "
            f"variant ({best['variant']})." for r in rows
            if r["mode"] == "artifact" and r["variant"] != "aotpack" and "median_s" in r]


def _matrix_target(what: str, art: dict, rows: list[dict], none: str) -> str:
    if not rows:
        return f"Target: the default artifact at most {what}: n/a ({none})."
    best = min(rows, key=lambda r: r["median_s"])
    return f"Target: the default artifact at most {what} ({best['variant']}): " + \
        _target(f"{art['median_s'] / best['median_s']:.2f}", 1.0) + "."
