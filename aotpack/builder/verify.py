"""What a build proves before it publishes: every compiled module against eager (a regional block's every instance,
and its blocks end to end), and the quantized compiled model against the full-precision one (one forward and the
final latents of a pipeline call)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from aotpack.artifact.manifest import CompiledModule, QuantError
from aotpack.builder.capture import Call, record_call, unflatten_inputs
from aotpack.builder.compile import named_call
from aotpack.builder.schemes import compile_tolerance
from aotpack.builder.spec import BuildSpec
from aotpack.builder.targets import Compiled, EndToEnd
from aotpack.errors import BuildError

log = logging.getLogger("aotpack")


def verify(spec: BuildSpec, out: Path, parts: list[Compiled], end_to_end: EndToEnd | None = None
           ) -> tuple[Any, list[CompiledModule], torch.Tensor | None]:
    """Load the artifact just written as a serving box does, and hold every compiled module to its tolerance
    against eager: a whole graph on the captured inputs; a regional block's first instance on the block inputs
    captured, and every instance on the block inputs at the smallest request (its own weights through the shared
    code); then the whole regional model, its blocks handing each other their outputs, at the smallest request
    (``end_to_end``). Returns the loaded model, the modules with their measured errors, and the whole
    component's output on the captured inputs (None for a regional build). One load: AOTInductor keeps a
    package's constants mapped while the process lives."""
    from aotpack.serve.load import load

    loaded = load(out, trusted_keys=[])
    modules, component_out = [], None
    for c in parts:
        t = c.target
        error = tolerance = 0.0
        for i, (what, run, reference) in enumerate(_runs(spec, loaded, t)):
            # the module's first call: a crash in its native code names it (faulthandler, see crash_report)
            got = (named_call(f"module {c.module.name} ({what})", run) if i == 0 else run())[0]
            error = max(error, check_close(what, got, reference, t.schemes, spec.dtype))
            tolerance = max(tolerance, _tolerance(reference, t.schemes, spec.dtype))
            if t.kind == "component":
                component_out = got
        log.info("%s: compiled vs eager max |diff| %.2e (tolerance %.1e)", c.module.name, error, tolerance)
        modules.append(_with_error(c.module, error, tolerance))
    if end_to_end is not None:
        component = spec.recipe.component
        got = named_call(f"blocks of {component}, called by the model", lambda: loaded(
            **unflatten_inputs(end_to_end.example), return_dict=False))[0]
        schemes = {s for c in parts for s in c.target.schemes}
        error = check_close(component, got, end_to_end.reference, schemes, spec.dtype)
        log.info("%s, its compiled blocks end to end at the smallest request: max |diff| %.2e", component, error)
    return loaded, modules, component_out


def _runs(spec: BuildSpec, loaded: Any, t: Any) -> list[tuple[str, Any, torch.Tensor]]:
    """(what, the compiled call, its eager reference) for each check of the target ``t``."""
    if t.kind == "vae_decoder":
        return [(t.name, lambda: loaded.vae_decoder.decode(t.example["z"], return_dict=False), t.reference)]
    if t.kind != "block":
        return [(t.name, lambda: loaded(**unflatten_inputs(t.example), return_dict=False), t.reference)]
    strip = len(spec.recipe.component) + 1
    first = loaded.get_submodule(t.instances[0][strip:])
    runs = [(t.instances[0], lambda: _tensors(first(**unflatten_inputs(t.example))), t.reference)]
    return runs + [(f"{inst} at the smallest request", lambda b=loaded.get_submodule(inst[strip:]):
                    _tensors(b(**unflatten_inputs(t.check))), ref) for inst, ref in zip(t.instances, t.references)]


def _tensors(out: Any) -> tuple:
    """A block's output as the tensors it holds (one tensor, or a tuple with a None)."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(x for x in out if x is not None)


def _tolerance(reference: torch.Tensor, schemes: set[str], dtype: str) -> float:
    return compile_tolerance(schemes, dtype) * max(1.0, float(reference.float().abs().max()))


def check_close(what: str, got: torch.Tensor, reference: torch.Tensor, schemes: set[str], dtype: str) -> float:
    """max |got - reference|, or a BuildError when it is beyond the tolerance of ``schemes`` in ``dtype``."""
    error = float((got.float() - reference.float()).abs().max())
    tolerance = _tolerance(reference, schemes, dtype)
    if not error <= tolerance:
        raise BuildError(f"compiled {what} differs from eager by {error:.3g} (tolerance {tolerance:.3g})",
                         "the compiled code is wrong for this model; set AOTPACK_DEBUG=1 and report it")
    return error


def _with_error(m: CompiledModule, error: float, tolerance: float) -> CompiledModule:
    return replace(m, max_abs_error=error, tolerance=tolerance)


def measure_quant_error(spec: BuildSpec, pipe: Any, full: Call, loaded: Any,
                        component_out: torch.Tensor | None) -> QuantError:
    """The quantized compiled model, as it will be served, against the full-precision eager model: on the
    captured inputs, and on the final latents of one pipeline call at the capture settings (its first step runs
    the captured inputs: for a regional build, that step's output is the forward compared)."""
    component = spec.recipe.component
    setattr(pipe, component, loaded)
    try:
        call = named_call(f"{component}, called by its pipeline", lambda: record_call(pipe, spec.recipe))
    finally:
        setattr(pipe, component, None)
    forward = component_out if component_out is not None else call.first_output
    return QuantError(forward_max_abs=float((forward.float() - full.first_output.float()).abs().max()),
                      forward_ref_max=float(full.first_output.float().abs().max()),
                      latents_max_abs=float((call.latents - full.latents).abs().max()),
                      latents_ref_max=float(full.latents.abs().max()))
