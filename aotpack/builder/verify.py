"""What a build proves before it publishes: every compiled module against eager on the captured inputs, and the
quantized compiled model against the full-precision one (one forward and the final latents of a pipeline call)."""

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
from aotpack.builder.targets import Compiled
from aotpack.errors import BuildError

log = logging.getLogger("aotpack")


def verify(spec: BuildSpec, out: Path, parts: list[Compiled]) -> tuple[Any, list[CompiledModule], torch.Tensor | None]:
    """Load the artifact just written as a serving box does, and hold every compiled module (each instance of a
    regional block on the block inputs captured) to its tolerance against eager on the captured inputs. Returns
    the loaded model, the modules with their measured errors, and the whole component's output (None for a
    regional build: the whole regional model, whose blocks hand each other their outputs, is checked end to end
    by ``measure_quant_error``'s pipeline call). One load: AOTInductor keeps a package's constants mapped while
    the process lives."""
    from aotpack.serve.load import load

    loaded = load(out, trusted_keys=[])
    component = spec.recipe.component
    modules, component_out = [], None
    for c in parts:
        t = c.target
        if t.kind == "vae_decoder":
            runs = [(t.name, lambda: loaded.vae_decoder.decode(t.example["z"], return_dict=False), t.reference)]
        elif t.kind == "block":  # each instance through its own (compiled) forward, with its own weights
            runs = [(inst, lambda b=loaded.get_submodule(inst[len(component) + 1:]):
                     _tensors(b(**unflatten_inputs(t.example))), ref) for inst, ref in zip(t.instances, t.references)]
        else:
            runs = [(t.name, lambda: loaded(**unflatten_inputs(t.example), return_dict=False), t.reference)]
        error = tolerance = 0.0
        for i, (what, run, reference) in enumerate(runs):
            # the module's first call: a crash in its native code names it (faulthandler, see crash_report)
            got = (named_call(f"module {c.module.name} ({what})", run) if i == 0 else run())[0]
            error = max(error, check_close(what, got, reference, t.schemes, spec.dtype))
            tolerance = max(tolerance, _tolerance(reference, t.schemes, spec.dtype))
            if t.kind == "component":
                component_out = got
        log.info("%s: compiled vs eager max |diff| %.2e (tolerance %.1e)", c.module.name, error, tolerance)
        modules.append(_with_error(c.module, error, tolerance))
    return loaded, modules, component_out


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


def measure_quant_error(spec: BuildSpec, pipe: Any, full: Call, loaded: Any, parts: list[Compiled],
                        component_out: torch.Tensor | None, whole_reference: torch.Tensor | None) -> QuantError:
    """The quantized compiled model, as it will be served, against the full-precision eager model: on the
    captured inputs, and on the final latents of one pipeline call at the capture settings. That call's first
    step runs the captured inputs: for a regional build its output is the end-to-end check of the blocks handing
    each other their outputs, against the quantized eager model (``whole_reference``)."""
    component = spec.recipe.component
    setattr(pipe, component, loaded)
    try:
        call = named_call(f"blocks of {component}, called by the model" if whole_reference is not None else
                          f"{component}, called by its pipeline", lambda: record_call(pipe, spec.recipe))
    finally:
        setattr(pipe, component, None)
    if whole_reference is not None:
        schemes = {s for c in parts for s in c.target.schemes}
        check_close(component, call.first_output, whole_reference, schemes, spec.dtype)
    forward = component_out if component_out is not None else call.first_output
    return QuantError(forward_max_abs=float((forward.float() - full.first_output.float()).abs().max()),
                      forward_ref_max=float(full.first_output.float().abs().max()),
                      latents_max_abs=float((call.latents - full.latents).abs().max()),
                      latents_ref_max=float(full.latents.abs().max()))


