"""The repo's model card (README.md), made with huggingface_hub's ``ModelCard`` from the builds' index."""

from __future__ import annotations

from aotpack.artifact.platform import tag


def _error_cell(b: dict) -> str:
    q = b.get("quant_error")  # an index read from the Hub is untrusted input: shown only when well-formed
    keys = ("forward_max_abs", "forward_ref_max")
    if not isinstance(q, dict) or not all(isinstance(q.get(k), (int, float)) for k in keys):
        return "—"
    return f"{q['forward_max_abs']:.1e} (of {q['forward_ref_max']:.2f})"


def _example_call(b: dict) -> str:
    """The keywords of a pipeline call inside the build's recorded bounds (an index from the Hub is untrusted:
    only well-formed integers are used, else the pipeline's defaults)."""
    req = b.get("request") if isinstance(b.get("request"), dict) else {}

    def bound(key: str) -> tuple[int, int] | None:
        v = req.get(key)
        ok = isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        return (v[0], v[1]) if ok and 0 < v[0] <= v[1] <= 1 << 16 else None

    multiple = req.get("multiple") if isinstance(req.get("multiple"), int) and 0 < req["multiple"] < 1 << 12 else 1
    parts = []
    for key in ("height", "width"):
        lo_hi = bound(key)
        if lo_hi:
            size = max(lo_hi[0], min(lo_hi[1], 512)) // multiple * multiple
            parts.append(f"{key}={max(size, lo_hi[0])}")
    if isinstance(req.get("max_steps"), int) and req["max_steps"] > 0:
        parts.append(f"num_inference_steps={min(4, req['max_steps'])}")
    if isinstance(req.get("max_sequence_length"), int) and 0 < req["max_sequence_length"] < 1 << 16:
        parts.append(f"max_sequence_length={req['max_sequence_length']}")
    frames = bound("frames")
    if frames:
        parts.append(f"num_frames={frames[0]}")
    return ", ".join(parts)


def _bounds(b: dict) -> str:
    """The build's recorded request bounds, for the card's table."""
    req = b.get("request") if isinstance(b.get("request"), dict) else {}
    shown = [f"{k} {'..'.join(str(x) for x in req[k])}" for k in ("height", "width", "frames")
             if isinstance(req.get(k), list) and len(req[k]) == 2 and all(isinstance(x, int) for x in req[k])]
    if isinstance(req.get("max_sequence_length"), int):
        shown.append(f"text <= {req['max_sequence_length']}")
    return ", ".join(shown) or "—"  # integers only: nothing from the index reaches the table as text


def _rows(builds: dict) -> str:
    """The card's table of builds, one row each, sorted by name."""
    return "\n".join(
        f"| `{name}` | {b['scheme']} | "
        f"{b.get('dtype') if b.get('dtype') in ('float32', 'bfloat16', 'float16') else '—'} | {tag(b['platform'])} | "
        f"{b['platform']['torch']} | {_bounds(b)} | {b['size'] / 1e6:.1f} MB | {_error_cell(b)} | "
        f"{b['build_seconds']:.0f} s |{' yes |' if b.get('signature_sha256') else ' |'}"
        for name, b in sorted(builds.items())
    )


def model_card(repo_id: str, index: dict, tag_name: str | None = None) -> str:
    """README.md of the repo, made with huggingface_hub's ModelCard from the builds' index: what the repo is
    (aotpack builds, not a diffusers folder), the base model and its licence, each build's dtype, bounds and
    error, and a loading example that runs as written."""
    from huggingface_hub import ModelCard, ModelCardData

    builds = index["builds"]
    checkpoints = sorted({b["checkpoint"] for b in builds.values()})
    base = [c for c in checkpoints if not c.startswith(("builtin:", "/"))]
    card_data = ModelCardData(
        base_model=base[0] if len(base) == 1 else (base or None),
        library_name="aotpack",  # not a diffusers folder: DiffusionPipeline.from_pretrained(repo) cannot load it
        tags=["aotpack", "torchao", "aoti", "diffusers"],
    )

    rows = _rows(builds)
    one = sorted(builds)[0] if builds else "SCHEME-PLATFORM"
    call = _example_call(builds[one]) if builds else ""
    revision = f'"{tag_name}"' if tag_name else '"<tag or commit>"'
    licence = (f"The weights are derived from {', '.join(f'`{c}`' for c in base)}: its licence applies to them."
               if base else "The weights are derived from the checkpoints named above.")
    content = f"""---
{card_data.to_yaml()}
---

# {repo_id}

Ahead-of-time compiled ([AOTInductor](https://pytorch.org/docs/stable/torch.compiler_aot_inductor.html)) and
[torchao](https://github.com/pytorch/ao)-quantized transformer of {', '.join(f'`{c}`' for c in checkpoints)},
packaged by **aotpack**. This repo is not a diffusers pipeline folder (`DiffusionPipeline.from_pretrained` of
it finds no `model_index.json`): it holds builds for aotpack to drop into the base model's pipeline. Each
build is a folder under `builds/`: `model.pt2` (compiled code), `weights.safetensors` (quantized weights) and
`manifest.json` (sha256 of every file, platform, input ranges), and `signature.sig` when its builder signed it.
The error is the largest difference of one transformer forward from the full-precision model's, measured at
build (of the largest output value). {licence}

| build | scheme | dtype | platform | torch | a call may ask | size | error vs full precision | build time | signed |
|---|---|---|---|---|---|---|---|---|---|
{rows}

```python
import aotpack  # pip install aotpack: picks the build that fits this machine, verifies every file, then loads

# None: the base model's pipeline (the checkpoint the build was made from); or a local folder / Hub id of it
pipe = aotpack.from_pretrained(None, "{repo_id}", revision={revision})
image = pipe("a dog surfing on the moon", {call}).images[0]
```

A `.pt2` holds native code: load it from a pinned revision (a tag or a commit), as above. This
machine-specific build `{one}` only runs on the platform its name says; aotpack refuses the others.
"""
    return str(ModelCard(content))
