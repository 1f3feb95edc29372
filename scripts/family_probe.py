"""What each tiny family's pipeline does with its transformer today: the groundwork for recipe-free capture.

    python scripts/family_probe.py [FAMILY ...]

For each family of aotpack/builder/families.py (built offline on first use, in ``AOTPACK_CACHE``), the pipeline
runs its default calls eagerly while hooks record: the transformer forward's signature; what the pipeline passes it
(positional or keyword, tensor shape/dtype/stride/contiguity, non-tensor values), per pipeline call, so the axes
that move show up side by side; ``_repeated_blocks``, the block classes, instances whose structure differs, what
each block class is called with and returns; the root's own parameters; and every attribute the pipeline reads or
calls on the transformer (``cache_context`` and the like). Prints one section per family.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections import defaultdict
from typing import Any


def describe(v: Any, depth: int = 0) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        flag = "" if v.is_contiguous() else " NONCONTIG"
        return f"T{list(v.shape)} {str(v.dtype).removeprefix('torch.')} stride={list(v.stride())}{flag}"
    if isinstance(v, (list, tuple)) and depth < 2:
        inner = ", ".join(describe(x, depth + 1) for x in v[:4]) + (", ..." if len(v) > 4 else "")
        return f"{type(v).__name__}[{len(v)}]({inner})"
    if isinstance(v, dict):
        return "dict{" + ", ".join(f"{k}: {describe(x, depth + 1)}" for k, x in list(v.items())[:6]) + "}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def bind(fn, args, kwargs) -> dict[str, tuple[str, Any]]:
    """Each argument by its parameter name, with how it was passed ("pos" or "kw"; "*args"/"**kw" when it went
    into a catch-all)."""
    sig = inspect.signature(fn)
    bound = sig.bind(*args, **kwargs).arguments
    out = {}
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            out[f"*{name}"] = ("pos", value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update({k: ("**kw", v) for k, v in value.items()})
        else:
            out[name] = ("kw" if name in kwargs else "pos", value)
    return out


class Recorder:
    """Hooks on the transformer's forward, on each block class's instances, and an attribute-reading proxy."""

    def __init__(self, transformer) -> None:
        self.t = transformer
        self.forward_calls: list[dict] = []           # every transformer forward of the current pipeline call
        self.blocks: dict[str, list] = defaultdict(list)  # class -> [(bound args, output)] of instance 0
        self.attrs: dict[str, set] = defaultdict(set)
        self.handles = []

    def install(self, block_classes: set[str]) -> None:
        real = self.t.forward

        def forward(*args, **kwargs):
            self.forward_calls.append(bind(real, args, kwargs))
            return real(*args, **kwargs)

        self.t.forward = forward
        seen = set()
        for name, m in self.t.named_modules():
            cls = type(m).__name__
            key = (cls, structure(m))
            if cls in block_classes and key not in seen:  # the first instance of each structural variant
                seen.add(key)
                label = f"{cls} ({name})"
                self.handles.append(m.register_forward_hook(self._block_hook(label, m), with_kwargs=True))

    def _block_hook(self, label, module):
        def hook(_m, args, kwargs, output):
            if not self.blocks[label]:
                self.blocks[label].append((bind(module.forward, args, kwargs), output))
        return hook


class Proxy:
    """Stands in for ``pipe.transformer`` so every attribute the pipeline reads is recorded by name and kind."""

    def __init__(self, target, record) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_record", record)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        kind = "method" if inspect.ismethod(value) else type(value).__name__
        if kind == "method":
            def called(*a, **k):
                self._record[name].add("(" + ", ".join([describe(x) for x in a] + [f"{kk}={type(v).__name__}"
                                                                                   for kk, v in k.items()]) + ")")
                return value(*a, **k)
            return called
        self._record[name].add(kind)
        return value

    def __call__(self, *a, **k):
        self._record["__call__"].add(f"{len(a)} positional, {len(k)} keyword")
        return self._target(*a, **k)


def block_classes(t) -> tuple[set[str], str]:
    declared = getattr(t, "_repeated_blocks", None) or []
    if declared:
        return set(declared), "declared"
    import torch

    found = {type(m[0]).__name__ for _, m in t.named_children() if isinstance(m, torch.nn.ModuleList) and len(m)}
    return found, "not declared; the root's ModuleLists"


def structure(m) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in m.state_dict().items())


def variants(t, classes: set[str]) -> dict[str, str]:
    """Per block class: instances, and how many structurally different ones (parameter names and shapes)."""
    shapes, count = defaultdict(set), defaultdict(int)
    for m in t.modules():
        if type(m).__name__ in classes:
            shapes[type(m).__name__].add(structure(m))
            count[type(m).__name__] += 1
    return {c: f"{count[c]} instances, {len(s)} structure(s)" for c, s in shapes.items()}


def probe(name: str) -> None:
    import torch
    from diffusers import DiffusionPipeline

    from aotpack.builder.families import FAMILIES, ensure_family

    fam = FAMILIES[name]
    pipe = DiffusionPipeline.from_pretrained(ensure_family(name))
    pipe.set_progress_bar_config(disable=True)
    t = pipe.transformer
    classes, how = block_classes(t)
    rec = Recorder(t)
    rec.install(classes)
    object.__setattr__(pipe, "transformer", Proxy(t, rec.attrs))  # past DiffusionPipeline.__setattr__'s config
    per_call = []
    for call in fam.calls():
        rec.forward_calls = []
        with torch.no_grad():
            pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0))
        per_call.append(rec.forward_calls)
    object.__setattr__(pipe, "transformer", t)
    print(f"\n=== {name}: {fam.pipeline} / {type(t).__name__}")
    print(f"forward{inspect.signature(type(t).forward)}".replace("self, ", ""))
    sizes = ["x".join(str(c[k]) for k in ("height", "width", "num_frames") if k in c) for c in fam.calls()]
    print(f"forward calls per pipeline call: {[len(c) for c in per_call]} (steps=2) at {sizes}")
    print("args of the first forward of each pipeline call:")
    first = [c[0] for c in per_call]
    for arg in first[0]:
        how_passed = first[0][arg][0]
        vals = [describe(c[arg][1]) if arg in c else "-" for c in first]
        same = all(v == vals[0] for v in vals)
        print(f"  {arg:24s} {how_passed:3s} " + (vals[0] if same else "\n" + "\n".join(f"{'':30s}{v}" for v in vals)))
    one = per_call[0]
    changing = sorted({k for c in one for k, (_, v) in c.items()
                       if describe(v) != describe(one[0].get(k, ("", None))[1])})
    print(f"args differing between the forwards of one pipeline call: {changing or 'none'}")
    for k in changing:
        print(f"  {k}: " + " | ".join(dict.fromkeys(describe(c[k][1]) if k in c else "-" for c in one)))
    print(f"_repeated_blocks: {getattr(t, '_repeated_blocks', None)}  block classes ({how}): {sorted(classes)}")
    print(f"structural variants per block class: {variants(t, classes)}")
    for cls, [(bound, out)] in sorted(rec.blocks.items()):
        print(f"  block {cls}: called with")
        for arg, (p, v) in bound.items():
            print(f"    {arg:22s} {p:3s} {describe(v)}")
        print(f"    -> returns {describe(out)}")
    root = [(k, list(v.shape)) for k, v in t.named_parameters(recurse=False)]
    bufs = [(k, list(v.shape)) for k, v in t.named_buffers(recurse=False)]
    print(f"root parameters: {root or 'none'}  root buffers: {bufs or 'none'}")
    print("attributes the pipeline uses on pipe.transformer:")
    for attr, kinds in sorted(rec.attrs.items()):
        kinds = sorted(kinds)
        more = f" ... ({len(kinds)} distinct)" if len(kinds) > 2 else ""
        print(f"  {attr:22s} {'; '.join(kinds[:2])[:150]}{more}")


def main() -> None:
    from aotpack.builder.families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"default: all of {', '.join(FAMILIES)}")
    names = parser.parse_args().families or list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        parser.error(f"unknown family {', '.join(unknown)}; families: {', '.join(FAMILIES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    for name in names:
        try:
            probe(name)
        except Exception as e:  # one family's failure is a finding, not the end of the table
            print(f"\n=== {name}: PROBE FAILED: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
