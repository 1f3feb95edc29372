"""``inspect``: an artifact's validated manifest, and a summary of it for people (no code is loaded).

Every string that comes from the manifest is printed with control characters escaped: a manifest cannot
print fake lines.
"""

from __future__ import annotations

import os
from pathlib import Path

from aotpack.artifact import manifest as mf
from aotpack.artifact.manifest import Manifest
from aotpack.artifact.platform import tag
from aotpack.errors import one_line


def inspect(path: str | os.PathLike) -> Manifest:
    """The validated manifest of the artifact at ``path``."""
    return mf.read(path)


def signature_line(folder: Path) -> str:
    """'signed, claims key <fingerprint>' / 'not signed' (the claim is checked only when keys are required)."""
    from aotpack import signing

    try:
        data = signing.read_signature(folder)
    except signing.SignatureError as e:
        return f"unreadable signature ({e.cause})"
    if data is None:
        return "not signed"
    hint = signing.signer_hint(data)
    return (f"signed; claims key {hint[:16]}... (verified only with --trusted-key)" if hint
            else "signed, by an unnamed key (not an aotpack signature)")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def summarize(m: Manifest, folder: Path | None = None) -> str:
    """A human summary of a manifest, one fact per line."""
    s = one_line
    r, p, req = m.recipe, m.platform, m.request
    lines = [
        f"recipe      {s(r.name)}" + (f" ({s(r.variant)})" if r.variant else "") + f" -> {s(r.pipeline)}.{s(r.component)}",
        f"checkpoint  {s(m.model.checkpoint)}" + (f" @ {s(m.model.revision)}" if m.model.revision else "")
        + (f" (commit {s(m.model.commit)})" if m.model.commit else ""),
        f"scheme      {s(m.scheme.name)}"
        + (f" ({s(str(m.scheme.torchao_config.get('_type')))})" if m.scheme.torchao_config else ""),
        f"dtype       {s(m.dtype)}",
        f"platform    {s(tag(p))}: torch {s(p.torch)}, torchao {s(p.torchao)}, diffusers {s(p.diffusers)}, "
        f"python {s(p.python)}",
    ]
    frames = f", frames {req.frames[0]}..{req.frames[1]}" if req.frames else ""
    lines.append(f"request     batch {req.batch[0]}..{req.batch[1]}; height {req.height[0]}..{req.height[1]}, width "
                 f"{req.width[0]}..{req.width[1]} (multiples of {req.multiple}){frames}; text tokens "
                 f"{req.max_sequence_length}; steps <= {req.max_steps}")
    for mod in m.modules:
        dyn = ", ".join(f"{s(k)} {v[0]}..{v[1]}" for k, v in mod.inputs.dynamic.items())
        used = (f"{len(mod.instances)} instances: {s(', '.join(mod.instances[:3]))}"
                + (", ..." if len(mod.instances) > 3 else "")) if len(mod.instances) > 1 else s(mod.instances[0])
        lines.append(f"module      {s(mod.name)} ({s(mod.kind)}): {s(mod.code)} + {s(mod.weights)} for {used}; "
                     f"{dyn}; compiled vs eager max |diff| {mod.max_abs_error:.2e} (tolerance {mod.tolerance:.1e}), "
                     f"{s(mod.compiled or 'compiled')}"
                     + (f"; {len(mod.fold)} folded constants made from the weights at load" if mod.fold else ""))
    for name, entry in sorted(m.files.items()):
        lines.append(f"file        {s(name):<24} {_mb(entry.size):>12}  sha256 {s(entry.sha256[:16])}...")
    lines.append(f"total       {_mb(sum(e.size for e in m.files.values()))}")
    stages = ", ".join(f"{s(k)} {v:.1f} s" for k, v in m.build.stages.items())
    lines.append(f"built       {s(m.build.date)} with aotpack {s(m.aotpack_version)}: {stages}")
    q = m.build.quant_error
    if q is not None:
        latents = (f"; final latents max |diff| {q.latents_max_abs:.2e} (of {q.latents_ref_max:.2f})"
                   if q.latents_max_abs is not None else "")
        lines.append(f"accuracy    quantized vs full precision: one forward max |diff| {q.forward_max_abs:.2e} "
                     f"(of {q.forward_ref_max:.2f}){latents}")
    opts = {k: v for k, v in vars(m.options).items() if v}
    if opts:
        lines.append("options     " + ", ".join(k if v is True else f"{k}={s(str(v))}" for k, v in opts.items()))
    if m.lora:
        lines.append(f"lora        {s(m.lora.file)} at scale {m.lora.scale} ({m.lora.modules} modules, "
                     f"sha256 {s(m.lora.sha256[:16])}...)")
    if m.plan:
        counts = ", ".join(f"{s(k)} {v}" for k, v in sorted(m.plan.counts.items()))
        lines.append(f"plan        {s(m.plan.file)}: {counts} layers (error budget {m.plan.budget})")
    if folder is not None:
        lines.append(f"signature   {signature_line(Path(folder))}")
    return "\n".join(lines)
