"""``run_bench``: the bench's plan in order: which artifacts are built, which variant runs after which (each in a
fresh process, see ``measure``), what each is measured against; then the results are written (``results``)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from aotpack.bench.builds import build_artifact, build_record, weights_bytes
from aotpack.bench.measure import spawn
from aotpack.bench.results import machine, print_plan, write_builds, write_results
from aotpack.bench.bound import matmul_rates
from aotpack.bench.variants import REGIONAL, VARIANTS, has_repeated_blocks


def run_bench(recipe_name: str, quants: list[str], *, out: Path, steps: int | None = None, images: int = 2,
              variants: tuple[str, ...] | None = None, variant: str | None = None, max_autotune: bool = False,
              dtype: str | None = None, regional: bool | None = None, build_only: bool = False,
              artifacts_dir: Path = Path("artifacts"), cold_builds: bool = True, compile_matrix: bool = False) -> Path:
    """Build (or reuse) the artifacts, run every variant for every scheme, write results; returns ``out``.

    ``variants``: default eager, compile, compile+freezing, compile+cache, aotpack, plus aotpack-regional when
    ``regional`` (default: when the model has repeated blocks). Artifacts that are missing are built from scratch (see
    ``build_artifact``); existing ones are reused and their manifests say how they were built.
    ``build_only``: build every artifact afresh (whole graph, and regional when ``regional``), run nothing, and
    write the build table to ``out/builds.md``, ``.csv`` and ``.json``; rows of other recipes, variants or
    schemes already in ``out/builds.json`` (same platform) are kept, so that one folder gathers a table.
    ``compile_matrix``: also the recipe's default artifact (its default scheme, in the dtype ``auto`` or ``dtype``
    gives it here) against torch.compile in every dtype x scheme x mode, interleaved in one process (``matrix``)."""
    from aotpack.artifact.platform import default_device, describe
    from aotpack.builder.recipe import get_recipe
    from aotpack.builder.source import resolve_source
    from aotpack.builder.spec import build_dtype

    recipe = get_recipe(recipe_name, variant)
    here = describe(device := default_device())
    default = recipe.default_for(here.device, here.cpu_flags)[0]  # the scheme a plain `aotpack build` takes here
    dtypes = {q: build_dtype(dtype or recipe.dtype, here, q) for q in [*quants, default]}
    out.mkdir(parents=True, exist_ok=True)
    source = resolve_source(recipe, None, device)  # builtins are made here, once, outside any timed build
    if regional is None:
        regional = REGIONAL in variants if variants is not None else has_repeated_blocks(recipe, source)
    if variants is None:
        variants = VARIANTS + ((REGIONAL,) if regional else ())
    wanted = {"aotpack": False} | ({REGIONAL: True} if REGIONAL in variants or (build_only and regional) else {})

    def path_of(quant: str, is_regional: bool) -> Path:
        return _artifact_path(recipe, quant, here, artifacts_dir, is_regional, dtypes[quant])

    build = {"variant": variant, "dtypes": dtypes, "cold": cold_builds}  # how a missing artifact is built
    if build_only:
        write_builds(out, _build_all(recipe, quants, wanted, path_of, **build), machine())
        return out
    print_plan(out, recipe.full_name, quants, variants, wanted, path_of, images)
    rates = matmul_rates(device)  # the machine's matmul bound: before the runs and after, the higher of each
    rows, loads, builds, records, inter = [], {}, {}, [], {}
    checkpoint_dir = Path(source.location) if source.kind != "hub" else None
    common = {"recipe": recipe.name, "recipe_variant": variant, "device": device,
              "dtype": _dtypes_line({q: dtypes[q] for q in quants}), "height": recipe.capture["height"],
              "width": recipe.capture["width"],
              "steps": steps or recipe.run["steps"], "images": images, "batch": 1, "max_autotune": max_autotune}
    for quant in quants:
        paths = {v: path_of(quant, r) for v, r in wanted.items()}
        facts = _ensure_artifacts(recipe, quant, paths, wanted, builds, records, **build)
        rows += _run_variants({**common, "dtype": dtypes[quant]}, quant, variants, paths, facts, checkpoint_dir)
        loads.update(_load_artifacts(quant, paths))
        if any(v.startswith("compile") for v in variants):  # the forward target, where the box's drift cancels
            inter[quant] = _interleaved(paths)
    matrix = _matrix(recipe, default, path_of, builds, records, max_autotune, **build) if compile_matrix else None
    after = matmul_rates(device)  # a busy neighbour for a few seconds halves one reading, never both
    rates = {k: max(v, after.get(k, 0.0)) for k, v in rates.items()}
    info = {**machine(), "matmul_gflops": {k: round(v, 1) for k, v in rates.items()}}
    write_results(out, recipe, rows, loads, builds, info, common, artifacts=records, interleaved=inter,
                  matrix=matrix)
    return out


def _artifact_path(recipe: Any, quant: str, here: Any, artifacts_dir: Path, regional: bool, dtype: str,
                   freeze: bool | None = None) -> Path:
    """Where ``aotpack build`` puts this artifact by default (its name says a frozen build: ``freeze``, or the
    recipe's default)."""
    from aotpack.artifact.platform import tag
    from aotpack.artifact.records import Options
    from aotpack.builder.schemes import freezes_by_default
    from aotpack.builder.spec import default_out

    options = Options(freeze=freezes_by_default(recipe, here.device, quant) if freeze is None else freeze)
    return default_out(recipe.full_name, quant, tag(here), artifacts_dir, regional=regional, options=options,
                       dtype=dtype, default_dtype=recipe.dtype)


def _dtypes_line(dtypes: dict[str, str]) -> str:
    """The dtype(s) the bench ran: one, or each scheme's when ``auto`` chose differently per scheme."""
    if len(set(dtypes.values())) <= 1:
        return next(iter(dtypes.values()), "")
    return ", ".join(f"{d} ({q})" for q, d in dtypes.items())


def _build_all(recipe: Any, quants: list[str], wanted: dict, path_of: Callable, *, variant: str | None,
               dtypes: dict[str, str], cold: bool) -> list[dict]:
    """``build_only``: every artifact built afresh, one after the other; their ``build_record``s."""
    records = []
    for quant in quants:
        for is_regional in wanted.values():
            path = path_of(quant, is_regional)
            print(f"  building {recipe.full_name} {quant} {'regional' if is_regional else 'whole graph'} ...",
                  file=sys.stderr)
            wall = build_artifact(recipe.name, quant, path, regional=is_regional, variant=variant,
                                  dtype=dtypes[quant], cold=cold)
            records.append(build_record(path, recipe_name=recipe.full_name, wall_s=wall))
            r = records[-1]
            print(f"  {quant:<8} {r['mode']:<8} export {r['export_s']:.1f} s, compile {r['compile_s']:.1f} s, "
                  f"total {r['total_s']:.1f} s, .pt2 {r['pt2_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
    return records


def _ensure_artifacts(recipe: Any, quant: str, paths: dict, wanted: dict, builds: dict, records: list[dict], *,
                      variant: str | None, dtypes: dict[str, str], cold: bool) -> dict:
    """Build the artifacts of ``quant`` that are missing (their seconds into ``builds``), record every one's
    build into ``records``; returns the build facts of each artifact variant, for its row."""
    facts = {}
    for v, path in paths.items():
        label = _label(quant, v)
        if not (path / "manifest.json").is_file():
            builds[label] = build_artifact(recipe.name, quant, path, regional=wanted[v], variant=variant, cold=cold,
                                           dtype=dtypes[quant])
        records.append(build_record(path, recipe_name=recipe.full_name, wall_s=builds.get(label)))
        facts[v] = {k: records[-1][k] for k in ("export_s", "compile_s", "total_s", "pt2_bytes")}
    return facts


def _run_variants(common: dict, quant: str, variants: tuple, paths: dict, facts: dict,
                  checkpoint_dir: Path | None) -> list[dict]:
    """Every variant of ``quant``, each in a fresh process from a cold page cache and an empty compiler cache;
    compile+cache reads the portable cache the compile variant saved (or a compile run made for it)."""
    rows = []
    whole = paths["aotpack"]
    with tempfile.TemporaryDirectory(prefix="aotpack-bench-") as tmp:
        cache_file = Path(tmp) / "megacache.bin"
        for v in variants:
            if v == "compile+cache" and not cache_file.exists():
                if "compile" in variants:
                    raise RuntimeError("the compile variant did not save a portable cache")
                spawn("worker", {**common, "variant": "compile", "quant": quant, "save_cache": str(cache_file)},
                      env={"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)})
            path = paths.get(v, whole)  # eager and compile read the whole-graph artifact's plan (auto)
            cold = [p for p in (checkpoint_dir, path) if p is not None]
            env = {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(dir=tmp)}  # always an empty compiler cache
            args = {**common, "variant": v, "quant": quant, "artifact": str(path),
                    "save_cache": str(cache_file) if v == "compile" else None, "cache_file": str(cache_file)}
            r = spawn("worker", args, env=env, evict_folders=tuple(cold))
            r.update({"quant": quant, "dtype": common["dtype"], "weights_bytes": weights_bytes(path),
                      **facts.get(v, {})})
            rows.append(r)
            print(f"  {quant:<8} {v:<16} cold start {r['cold_start_s']:6.1f} s, forward {r['forward_s']:.3f} s, "
                  f"image {r['image_s']:.2f} s", file=sys.stderr)
    return rows


def _interleaved(paths: dict) -> dict:
    """The artifacts and torch.compile (default, freezing) of one scheme, interleaved in one fresh process."""
    with tempfile.TemporaryDirectory(prefix="aotpack-bench-") as tmp:
        r = spawn("interleaved", {"paths": [str(p) for p in paths.values()], "compile": True},
                  env={"TORCHINDUCTOR_CACHE_DIR": tmp})
    shown = ", ".join(f"{x['variant']} {x['median_s']:.3f} s" for x in r["rows"])
    print(f"  interleaved: {shown}", file=sys.stderr)
    return r


def _matrix(recipe: Any, default: str, path_of: Callable, builds: dict, records: list[dict], max_autotune: bool,
            **build: Any) -> dict:
    """The recipe's default artifact here (scheme ``default``; built first when missing, and in the build table
    once) against every torch.compile variant, interleaved in one fresh process."""
    path = path_of(default, False)
    if not any(r.get("path") == str(path) for r in records):  # not a scheme the bench ran
        _ensure_artifacts(recipe, default, {"aotpack": path}, {"aotpack": False}, builds, records, **build)
    from aotpack.artifact.platform import default_device

    others = _frozen(recipe, path, build) if default_device() == "cpu" else []
    print(f"  compile matrix: {path.name} against torch.compile in every dtype, scheme and mode ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="aotpack-bench-") as tmp:
        r = spawn("matrix", {"path": str(path), "max_autotune": max_autotune, "others": [str(p) for p in others]},
                  env={"TORCHINDUCTOR_CACHE_DIR": tmp})
    shown = ", ".join(f"{x['variant']} {x['median_s']:.3f} s" for x in r["rows"] if "median_s" in x)
    print(f"  compile matrix: {shown}", file=sys.stderr)
    return r


# The frozen artifacts a CPU matrix runs beside the default (scheme, dtype): the fastest torch.compile variants
# measured were bf16 none + freezing (an AMX box), bf16 int8dq + freezing (another AMX box) and fp32 int8dq +
# freezing (AVX512-BF16 + VNNI): one bench run on a box shows which artifact is its fastest.
FROZEN = (("none", "bfloat16"), ("int8dq", "bfloat16"), ("int8dq", "float32"))


def _frozen(recipe: Any, default: Path, build: dict) -> list[Path]:
    """A CPU matrix's other artifacts: the recipe's model built ``--freeze`` in each of ``FROZEN`` but the default
    artifact's own and those this CPU cannot run fast (bf16 without bf16 units, int8 matmuls without int8 units:
    their torch.compile rows show it); each built when missing; one whose build fails is left out, and the bench
    says why."""
    from aotpack.artifact import manifest as mf
    from aotpack.artifact.platform import BF16_UNITS, describe, slow_scheme
    from aotpack.errors import AotpackError

    m, here = mf.read(default), describe()
    paths = []
    for quant, dtype in FROZEN:
        if m.options.freeze and (quant, dtype) == (m.scheme.name, m.dtype):
            continue
        slow = slow_scheme(here.device, here.cpu_flags, quant) or (
            "this CPU has no bf16 units" if dtype == "bfloat16" and not set(BF16_UNITS) & set(here.cpu_flags) else None)
        if slow:
            print(f"  compile matrix: no frozen {dtype} {quant} artifact ({slow})", file=sys.stderr)
            continue
        # named as `aotpack build` names it (the bench's own artifact of that scheme where that one is frozen)
        path = _artifact_path(recipe, quant, here, default.parent, False, dtype, freeze=True)
        if not (path / "manifest.json").is_file():
            try:
                build_artifact(recipe.name, quant, path, regional=False, variant=build.get("variant"),
                               dtype=dtype, cold=build.get("cold", True), extra=("--freeze",))
            except AotpackError as e:  # the matrix runs without it, and says why
                print(f"  compile matrix: the frozen {dtype} {quant} build failed ({e.cause}); left out",
                      file=sys.stderr)
                continue
        paths.append(path)
    return paths


def _load_artifacts(quant: str, paths: dict) -> dict:
    """``aotpack.load`` of each artifact of ``quant``: a first boot (every byte hashed), then a later one."""
    loads = {}
    whole = paths["aotpack"]
    for v, path in paths.items():
        label, inputs = _label(quant, v), {"inputs_from": str(whole)} if v != "aotpack" else {}
        loads[label] = spawn("load", {"artifact": str(path), "full": True, **inputs})  # a first boot (hashes)
        first = loads[label]["load_s"]
        loads[label] = spawn("load", {"artifact": str(path), **inputs})  # a later boot (hashes remembered)
        loads[label]["first_load_s"] = first
    return loads


def _label(quant: str, variant: str) -> str:
    """The name of an artifact in the load and build tables: its scheme, and 'regional' for a regional one."""
    return f"{quant} regional" if variant == REGIONAL else quant
