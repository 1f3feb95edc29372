"""``inspect``: read an artifact's manifest (validated) and summarise it for people."""

from __future__ import annotations

import os

from aotpack.artifact import manifest as mf


def inspect(path: str | os.PathLike) -> dict:
    """The validated manifest of the artifact at ``path``."""
    return mf.read(path)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def summarize(data: dict) -> str:
    """A human summary of a manifest, one fact per line."""
    r, p, b = data["recipe"], data["platform"], data["build"]
    from aotpack.artifact.platform import tag

    lines = [
        f"recipe      {r['name']}" + (f" ({r['variant']})" if r["variant"] else "") + f" -> {r['pipeline']}.{r['component']}",
        f"checkpoint  {data['model']['checkpoint']}" + (f" @ {data['model']['revision']}" if data["model"]["revision"] else ""),
        f"scheme      {data['scheme']['name']}"
        + (f" ({data['scheme']['torchao_config']['_type']})" if data["scheme"]["torchao_config"] else ""),
        f"dtype       {data['dtype']}",
        f"platform    {tag(p)}: torch {p['torch']}, torchao {p['torchao']}, diffusers {p['diffusers']}, python {p['python']}",
    ]
    dyn = ", ".join(f"{k} {v[0]}..{v[1]}" for k, v in data["inputs"]["dynamic"].items())
    img = data["inputs"]["image"]
    frames = f", frames {img['frames'][0]}..{img['frames'][1]}" if img.get("frames") else ""
    lines.append(f"inputs      {dyn}; height {img['height'][0]}..{img['height'][1]}, width {img['width'][0]}..{img['width'][1]}"
                 f" (multiples of {img['multiple']}){frames}; text tokens {data['inputs']['max_sequence_length']}")
    for name, entry in sorted(data["files"].items()):
        lines.append(f"file        {name:<22} {_mb(entry['size']):>12}  sha256 {entry['sha256'][:16]}...")
    total = sum(e["size"] for e in data["files"].values())
    lines.append(f"total       {_mb(total)}")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in b["stages"].items())
    lines.append(f"built       {b['date']} with aotpack {data['aotpack_version']}: {stages}")
    quant = b["quant_abs_error"]
    lines.append(f"accuracy    compiled vs eager max |diff| {b['max_abs_error']:.2e}"
                 + (f"; quantized vs unquantized {quant:.2e}" if quant is not None else ""))
    opts = {k: v for k, v in (data.get("options") or {}).items() if v}
    if opts:
        lines.append("options     " + ", ".join(k if v is True else f"{k}={v}" for k, v in opts.items()))
    if data.get("lora"):
        lines.append(f"lora        {data['lora']['file']} at scale {data['lora']['scale']} "
                     f"({data['lora']['modules']} modules, sha256 {data['lora']['sha256'][:16]}...)")
    if data.get("plan"):
        plan = data["plan"]
        counts = ", ".join(f"{k} {v}" for k, v in sorted(plan["counts"].items()))
        lines.append(f"plan        {plan['file']}: {counts} layers (error budget {plan['budget']})")
    for name, mod in (data.get("modules") or {}).items():
        lines.append(f"module      {name}: {mod['model']} + {mod['weights']}")
    return "\n".join(lines)
