"""Quantization schemes by the names of the diffusers-torchao recipes, mapped to torchao 0.18 configs.

Each scheme says what hardware it needs, so that a build fails in one line before any heavy work.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from aotpack.errors import SchemeError


@dataclasses.dataclass(frozen=True)
class Scheme:
    name: str
    description: str
    devices: tuple[str, ...]            # devices with a kernel for it ("cpu", "cuda")
    min_cuda_capability: tuple[int, int] | None = None
    make_config: Callable[[], Any] | None = None
    unavailable: str | None = None      # why the installed torchao cannot do it at all
    instead: str = "int8wo"
    group_size: int | None = None       # linears whose in_features it does not divide stay unquantized
    dynamic: bool = False               # activations are quantized per call (a reordered sum can flip a step)

    def needs(self) -> str:
        if self.unavailable:
            return "unavailable in torchao 0.18"
        parts = []
        for d in self.devices:
            if d == "cuda" and self.min_cuda_capability:
                parts.append("CUDA sm%d%d+" % self.min_cuda_capability)
            else:
                parts.append(d.upper() if d == "cpu" else "CUDA")
        return " or ".join(parts)


def _int8wo():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8dq():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int4wo():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=128)


def _int4dq():
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4)


def _fp8wo():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _fp8dq():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

    return Float8DynamicActivationFloat8WeightConfig()


def _fp8dqrow():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _sparsify():
    from torchao.sparsity.sparse_api import SemiSparseWeightConfig

    return SemiSparseWeightConfig()


_FPX = "torchao 0.18 removed the fpx (floating point e-m) weight-only configs"

SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("none", "no quantization (the recipe's dtype)", ("cpu", "cuda")),
        Scheme("int8wo", "int8 weight-only, per-row scales", ("cpu", "cuda"), make_config=_int8wo),
        Scheme("int8dq", "int8 dynamic activations + int8 weights", ("cpu", "cuda"), make_config=_int8dq,
               dynamic=True),
        Scheme("int4wo", "int4 weight-only, group size 128 (tinygemm)", ("cuda",), make_config=_int4wo,
               group_size=128),
        Scheme("int4dq", "int8 dynamic activations + int4 weights (group 32)", ("cpu", "cuda"), make_config=_int4dq,
               group_size=32, dynamic=True),
        Scheme("fp8wo", "float8 e4m3 weight-only", ("cpu", "cuda"), make_config=_fp8wo, instead="int8wo"),
        Scheme("fp8dq", "float8 dynamic activations + weights, per tensor", ("cuda",), (8, 9), _fp8dq,
               instead="int8dq", dynamic=True),
        Scheme("fp8dqrow", "float8 dynamic activations + weights, per row", ("cuda",), (8, 9), _fp8dqrow,
               instead="int8dq", dynamic=True),
        Scheme("fp6_e3m2", "float6 e3m2 weight-only", (), unavailable=_FPX, instead="fp8wo or int8wo"),
        Scheme("fp5_e2m2", "float5 e2m2 weight-only", (), unavailable=_FPX, instead="fp8wo or int8wo"),
        Scheme("fp4_e2m1", "float4 e2m1 weight-only", (), unavailable=_FPX, instead="fp8wo or int8wo"),
        Scheme("sparsify", "2:4 semi-structured sparsity (cuSPARSELt)", ("cuda",), (8, 0), _sparsify,
               instead="int8dq"),
    )
}


def get_scheme(name: str) -> Scheme:
    """The scheme called ``name``; an unknown name is a SchemeError listing the known ones."""
    if name not in SCHEMES:
        raise SchemeError(f"unknown quantization scheme '{name}'", f"choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[name]


def why_not(scheme: Scheme, device: str, cuda_capability: tuple[int, int] | None = None) -> str | None:
    """Why ``scheme`` cannot run on this device, or None when it can."""
    if scheme.unavailable:
        return scheme.unavailable
    if device not in scheme.devices:
        return f"{scheme.name} needs {scheme.needs()}; this machine runs on {device.upper()}"
    if device == "cuda" and scheme.min_cuda_capability and cuda_capability is not None:
        if tuple(cuda_capability) < scheme.min_cuda_capability:
            return (f"{scheme.name} needs CUDA sm%d%d+, this GPU is sm%d%d"
                    % (*scheme.min_cuda_capability, *cuda_capability))
    return None


def check_scheme(name: str, device: str, cuda_capability: tuple[int, int] | None = None) -> Scheme:
    """Return the scheme, or raise one SchemeError saying why it cannot run here and what to use instead."""
    scheme = get_scheme(name)
    reason = why_not(scheme, device, cuda_capability)
    if reason:
        raise SchemeError(f"scheme '{name}' cannot run here: {reason}", f"use --quant {scheme.instead} instead")
    return scheme


# The schemes a frozen build takes: their folded constants are views, sums or oneDNN-packed copies of the weights,
# never larger than them (int8dq: each int8 weight transposed in place and its column sums for the int8 GEMM).
FREEZABLE = ("none", "int8dq")


def freezes_by_default(recipe: Any, device: str, quant: str, *, lora: bool = False, compile_vae: bool = False,
                       reuse: bool = False) -> bool:
    """Whether a build without --freeze/--no-freeze freezes: where its recipe says ``freeze = true`` and an
    explicit --freeze would be taken (``check_freeze``: one rule for both). On every CPU kind, float32 ``none``
    included: on AVX2-only boxes the frozen flux-blocks artifact ran 1.16-1.34x faster than the unfrozen one on one
    (AMD EPYC Zen 3, ``artifacts/bench/flux-blocks-cpu-x86_64-avx2-2026-12-08``) and within 3 % of it on another
    (``...-avx2-2026-12-07``)."""
    if not recipe.freeze:
        return False
    try:
        check_freeze(device, lora, quant=quant, compile_vae=compile_vae, reuse=reuse)
    except SchemeError:
        return False
    return True


def check_freeze(device: str, lora: bool, *, quant: str = "none", compile_vae: bool = False,
                 reuse: bool = False) -> None:
    """``--freeze``: inductor's freezing of CPU weights, for a build of the unquantized or int8dq model (whole graph or
    regional: each block instance replays its own folds) without a build-time LoRA; its folded constants are
    computed at load from the artifact's weights (aotpack.artifact.folds). Refused before anything is loaded where
    it cannot hold."""
    if device != "cpu":
        raise SchemeError("--freeze packs weights for a CPU's oneDNN kernels; this build is for " + device,
                          "leave --freeze out")
    if lora:
        raise SchemeError("--freeze is not combined with --lora yet (a frozen artifact's weights are packed at "
                          "load, and a LoRA is fused and swapped on plain weights)", "leave one of them out")
    if quant not in FREEZABLE:
        cause = ("--freeze with --quant int8wo: inductor's freezing folds its int8 weights back to float at load "
                 "(measured on tiny-flux: each weight dequantized and packed in float32, 4x the bytes int8wo "
                 "stores)") if quant == "int8wo" else \
            f"--freeze is for --quant {' or '.join(FREEZABLE)}, not {quant} (a plan may choose int8wo per layer)"
        raise SchemeError(cause, "use --freeze with --quant int8dq or none (with --dtype bfloat16 on a CPU with bf16 "
                          "matrix units), or leave --freeze out")
    if compile_vae or reuse:
        what = "--compile-vae (the VAE's channels-last weights do not fold)" if compile_vae else \
            "--reuse (a frozen build records its folds while it compiles: it always compiles)"
        raise SchemeError(f"--freeze is not combined with {what}", "leave one of them out")


def check_max_autotune(device: str) -> None:
    """``--max-autotune`` tunes GPU kernels. On a CPU, inductor's GEMM templates pack the weights into new
    constants baked into the code, which an artifact whose weights live outside the code cannot feed (measured:
    fp32 and bf16 builds fail after compiling, int8dq gains nothing): refused before anything is loaded."""
    if device != "cuda":
        raise SchemeError("--max-autotune is for CUDA builds: on a CPU inductor's GEMM templates pack the weights "
                          "into the compiled code, which an artifact with its weights beside the code cannot use",
                          "leave --max-autotune out on a CPU")


def torchao_config(scheme: Scheme) -> Any | None:
    """A fresh torchao config object for ``scheme`` (None for 'none')."""
    return scheme.make_config() if scheme.make_config else None


def quantize(module: Any, scheme: Scheme, config: Any) -> None:
    """Apply ``config`` to the linears of ``module`` that the scheme can take."""
    import torch
    from torchao.quantization import quantize_

    from aotpack.errors import BuildError, first_line

    def fits(m: Any, fqn: str) -> bool:
        return (isinstance(m, torch.nn.Linear) and type(m.weight.data) is torch.Tensor  # not quantized already
                and (not scheme.group_size or m.in_features % scheme.group_size == 0))

    try:
        quantize_(module, config, filter_fn=fits)
    except Exception as e:
        first = first_line(e)
        raise BuildError(f"torchao could not apply {scheme.name}: {type(e).__name__}: {first[:300]}",
                         "try another --quant; set AOTPACK_DEBUG=1 for the full trace") from e


def quantize_named(module: Any, name: str) -> bool:
    """Quantize ``module``'s linears with the scheme called ``name``; False (nothing done) for 'none'."""
    scheme = get_scheme(name)
    config = torchao_config(scheme)
    if config is None:
        return False
    quantize(module, scheme, config)
    return True


def compile_tolerance(schemes: set[str], dtype: str) -> float:
    """How far (relative to the output's largest magnitude) the compiled module may be from the eager one on the
    same inputs: compiled code reorders float sums (~1e-6 in fp32); bf16/fp16 keep ~3 significant digits; and
    with dynamic activation quantization a reordered sum can flip one rounding step of an activation."""
    rel = 1e-3 if dtype == "float32" else 5e-2
    if any(get_scheme(s).dynamic for s in schemes):
        rel = max(rel, 5e-2)
    return rel


def config_to_json(config: Any | None) -> dict | None:
    """torchao's own JSON-able form of a config (round-trips with ``config_from_dict``)."""
    if config is None:
        return None
    from torchao.core.config import config_to_dict

    return config_to_dict(config)
