"""What machine this is, as far as compiled code cares: device, GPU capability or CPU ISA, versions."""

from __future__ import annotations

import dataclasses
import platform as _platform
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from aotpack import _torch_compat as compat

# The /proc/cpuinfo flags recorded in a manifest (those inductor's x86 ISAs compile for, and a few more).
_CPU_FLAGS = ("avx2", "avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
              "amx_bf16", "amx_int8", "avx_vnni", "fma", "f16c")


@dataclass(frozen=True)
class Platform:
    """The machine a build ran on (recorded in the manifest) or a load runs on."""

    device: str
    arch: str
    isa: str | None
    cpu_flags: tuple[str, ...]
    cuda_capability: str | None
    gpu_name: str | None
    torch: str
    torchao: str
    diffusers: str
    python: str

    @classmethod
    def coerce(cls, value: "Platform | Mapping[str, Any]") -> "Platform":
        """A Platform from itself or from its JSON form (the Hub index stores that)."""
        if isinstance(value, Platform):
            return value
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in dict(value).items() if k in names}
        data["cpu_flags"] = tuple(f for f in data.get("cpu_flags") or () if isinstance(f, str))
        return cls(**data)

    @property
    def capability(self) -> tuple[int, int] | None:
        """The CUDA capability as numbers ((9, 0) for '9.0'), None on CPU."""
        if not self.cuda_capability:
            return None
        major, _, minor = self.cuda_capability.partition(".")
        return int(major), int(minor or 0)


# The CPU flags of bf16 matrix units: AMX tiles (Sapphire Rapids and later) or AVX512-BF16 dot products (Cooper
# Lake, Zen 4 and later). Without them oneDNN runs bf16 matmuls by widening to fp32, several times slower than fp32.
BF16_UNITS = ("amx_bf16", "avx512_bf16")


# Schemes whose linears multiply in int8 (activations quantized at run time): the float dtype only carries the
# glue (norms, attention, the quantize/dequantize around each matmul). On CPU, float32 ran them faster than bf16
# and with less error (flux-blocks, 4 steps at 256x256, 2-core AMD EPYC with AVX512-BF16/VNNI: 0.194 s a step in
# fp32 vs 0.238 s in bf16; final-latents error against the eager model of the same dtype 0.4 % vs 1.5 %), so
# ``auto`` keeps them in float32 there. With AMX (2-core Intel Xeon, AMX int8/bf16 + AVX512-BF16) bf16 gains nothing
# either: 0.333 vs 0.335 s a forward in one process, at 4x that error (1.6 % vs 0.42 %). A second AMX box (480 MiB
# L3) ran bf16 3 % faster (torch.compile 0.138 vs 0.143 s; one forward's error against the fp32 eager model, a
# different measure: 1.25 vs 1.28 %): too little, against the AMD box's loss, to split the rule by ISA.
INT8_MATMUL = ("int8dq",)


# The CPU flags of the int8 units torch's CPU int8 matmul (``torch._int_mm``) runs on: AMX int8 tiles or
# AVX512-VNNI. torch takes oneDNN for it only with AVX512-VNNI (``torch.cpu._is_vnni_supported`` checks only that
# flag, and torchao follows it; AVX-VNNI without AVX-512 is not used), else a reference loop: on a 2-core AMD EPYC
# with AVX2 only, no oneDNN call at all (ONEDNN_VERBOSE=1), torch._int_mm at 1.3-4.9 GFLOP/s against 142 GFLOP/s
# for a float32 matmul, and an int8dq linear (512 x 3072 @ 3072 x 3072) 1.81 s eager, 1.76 s compiled, against
# 0.069 s in float32 (26x).
INT8_UNITS = ("amx_int8", "avx512_vnni")


def slow_scheme(device: str, flags: tuple[str, ...] | list[str], scheme: str | None) -> str | None:
    """Why ``scheme`` runs many times slower than float32 ``none`` on a machine (``device``, its CPU ``flags``),
    or None: int8 matmuls on a CPU without int8 dot-product units."""
    if device == "cpu" and scheme in INT8_MATMUL and not any(f in flags for f in INT8_UNITS):
        return (f"{scheme} multiplies in int8, and torch runs int8 matmuls on this CPU without oneDNN (it has "
                "neither avx512_vnni nor amx_int8): ~25x slower than float32 here")
    return None


def compute_dtype(info: "Platform | Mapping[str, Any]", scheme: str | None = None) -> tuple[str, str]:
    """The dtype ``--dtype auto`` builds in on ``info`` (for ``scheme``), and why: bf16 on a GPU with bf16 tensor
    cores (sm80+) and on a CPU with bf16 matrix units, fp16 on an older GPU, fp32 on any other CPU and for a
    scheme whose matmuls run in int8 on CPU."""
    p = Platform.coerce(info)
    if p.device == "cuda":
        if (p.capability or (0, 0)) >= (8, 0):
            return "bfloat16", f"this GPU (sm{p.cuda_capability}) has bf16 tensor cores"
        return "float16", f"this GPU (sm{p.cuda_capability}) has fp16 but no bf16 tensor cores"
    if scheme in INT8_MATMUL:
        return "float32", f"{scheme} multiplies in int8 on this CPU; float32 carries the rest faster than bf16"
    units = [f for f in BF16_UNITS if f in p.cpu_flags]
    if units:
        return "bfloat16", f"this CPU has bf16 matrix units ({', '.join(units)})"
    return "float32", ("this CPU has no bf16 matrix units (neither amx_bf16 nor avx512_bf16): bf16 would run "
                       "widened to fp32, several times slower than fp32")


def cpu_flags() -> tuple[str, ...]:
    """The CPU features that matter to compiled kernels, read from /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in _CPU_FLAGS if f in have)
    return ()


def _torch_base(version: str) -> str:
    return version.split("+", 1)[0]


def isa_from_flags(flags: tuple[str, ...] | list[str]) -> str | None:
    """The most capable of inductor's x86 ISAs whose flags this CPU has; None elsewhere (then ask inductor)."""
    table = compat.isa_cpu_flags()
    have = set(flags)
    fits = [isa for isa, need in table.items() if need <= have]
    return max(fits, key=lambda isa: len(table[isa])) if fits else None


# Device nodes a CUDA (or ROCm, or WSL) GPU needs: with none of them torch cannot see a GPU either.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")


def gpu_possible() -> bool:
    """False when this machine certainly has no GPU torch could use, decided without importing torch (a second
    where torch's import takes 5-10): refusals that only need to know that stay fast."""
    return any(Path(p).exists() for p in _GPU_NODES)


def default_device() -> str:
    if not gpu_possible():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=None)
def describe(device: str | None = None, *, probe_isa: bool = True) -> Platform:
    """This machine as the manifest records it. ``probe_isa=False`` takes ``isa`` from the CPU flags instead of
    inductor's probe (which compiles test programs: seconds on a cold compiler cache); a load or a pull only
    needs it to prefer a build, ``mismatches`` checks the flags themselves. Builds probe: they record what
    inductor generated code for."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str:  # not imported: importing torchao costs a serving process ~0.3 s
        try:
            return version(name)
        except PackageNotFoundError:
            return "none"

    device = device or default_device()
    flags = cpu_flags()
    isa = capability = gpu = None
    if device == "cpu":
        isa = compat.pick_isa() if probe_isa else isa_from_flags(flags)
    elif device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        capability, gpu = f"{major}.{minor}", torch.cuda.get_device_name()
    return Platform(device=device, arch=_platform.machine(), isa=isa, cpu_flags=flags, cuda_capability=capability,
                    gpu_name=gpu, torch=str(torch.__version__), torchao=installed("torchao"),
                    diffusers=installed("diffusers"), python=".".join(map(str, sys.version_info[:3])))


def tag(info: "Platform | Mapping[str, Any]") -> str:
    """A short platform name for folder names and the Hub index: 'cpu-x86_64-avx512', 'cuda-sm90'."""
    p = Platform.coerce(info)
    if p.device == "cuda":
        return "cuda-sm" + (p.cuda_capability or "").replace(".", "")
    return f"cpu-{p.arch}-{p.isa or 'none'}"


def mismatches(built: "Platform | Mapping[str, Any]", here: "Platform | Mapping[str, Any]") -> list[str]:
    """Why code built on ``built`` cannot run on ``here``; empty when it can."""
    built, here = Platform.coerce(built), Platform.coerce(here)
    out = []
    if built.device != here.device:
        return [f"built for device {built.device}, this machine runs {here.device}"]
    if built.arch != here.arch:
        out.append(f"built for {built.arch}, this machine is {here.arch}")
    if _torch_base(built.torch) != _torch_base(here.torch):
        out.append(f"built with torch {built.torch}, this machine has torch {here.torch}")
    if built.device == "cuda" and built.cuda_capability != here.cuda_capability:
        out.append(f"built for GPU capability sm{built.cuda_capability}, this GPU is sm{here.cuda_capability}")
    if built.device == "cpu":
        isa = built.isa or "none"
        need = compat.isa_cpu_flags().get(isa)
        if need is not None and built.arch == here.arch == "x86_64" and here.cpu_flags:
            lacking = sorted(need - set(here.cpu_flags))
            if lacking:
                out.append(f"built for CPU ISA {isa}, this CPU lacks {', '.join(lacking)}")
        elif isa != "none" and isa not in compat.supported_isas():  # another architecture's ISA: ask inductor
            out.append(f"built for CPU ISA {isa}, this CPU supports {', '.join(compat.supported_isas())}")
    return out
