"""What machine this is, as far as compiled code cares: device, GPU capability or CPU ISA, versions."""

from __future__ import annotations

import platform as _platform
import sys
from functools import lru_cache
from pathlib import Path

_CPU_FLAGS = ("avx2", "avx512f", "avx512dq", "avx512vl", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
              "amx_bf16", "amx_int8", "avx_vnni", "fma", "f16c")
_AVX512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"}
# The /proc/cpuinfo flags each of inductor's x86 ISAs (VecAVX2, VecAVX512, VecAVX512VNNI, VecAMX, named as
# _isa_name names them) compiles for: a load checks these instead of asking inductor, whose check compiles and
# runs test programs (seconds on a cold compiler cache).
ISA_FLAGS = {"avx2": {"avx2", "fma", "f16c"}, "avx512": _AVX512, "avx512_vnni": _AVX512 | {"avx512_vnni"},
             "amx_tile": _AVX512 | {"avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}}


def cpu_flags() -> list[str]:
    """The CPU features that matter to compiled kernels, read from /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in _CPU_FLAGS if f in have]
    return []


def _torch_base(version: str) -> str:
    return version.split("+", 1)[0]


def isa_from_flags(flags: list[str]) -> str | None:
    """The most capable of inductor's x86 ISAs whose flags this CPU has; None elsewhere (then ask inductor)."""
    have = set(flags)
    fits = [isa for isa, need in ISA_FLAGS.items() if need <= have]
    return max(fits, key=lambda isa: len(ISA_FLAGS[isa])) if fits else None


def cpu_isa() -> str:
    """The vector ISA inductor generates code for on this CPU (e.g. 'avx512', 'avx2', 'none')."""
    from torch._inductor import cpu_vec_isa

    isa = cpu_vec_isa.pick_vec_isa()
    return _isa_name(isa) if isa else "none"


def _isa_name(isa) -> str:
    # inductor's str() of an ISA lists the base and its extension ('avx512 avx512_vnni'); the last word
    # names the class uniquely and makes a plain folder name.
    return str(isa).split()[-1]


def supported_isas() -> list[str]:
    from torch._inductor import cpu_vec_isa

    return [_isa_name(i) for i in cpu_vec_isa.valid_vec_isa_list()] + ["none"]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=None)
def describe(device: str | None = None, *, probe_isa: bool = True) -> dict:
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
    info = {
        "device": device,
        "arch": _platform.machine(),
        "isa": None,
        "cpu_flags": cpu_flags(),
        "cuda_capability": None,
        "gpu_name": None,
        "torch": torch.__version__,
        "torchao": installed("torchao"),
        "diffusers": installed("diffusers"),
        "python": ".".join(map(str, sys.version_info[:3])),
    }
    if device == "cpu":
        info["isa"] = cpu_isa() if probe_isa else isa_from_flags(info["cpu_flags"])
    elif device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info["cuda_capability"] = f"{major}.{minor}"
        info["gpu_name"] = torch.cuda.get_device_name()
    return info


def tag(info: dict) -> str:
    """A short platform name for folder names and the Hub index: 'cpu-x86_64-avx512', 'cuda-sm90'."""
    if info["device"] == "cuda":
        return "cuda-sm" + (info.get("cuda_capability") or "").replace(".", "")
    return f"cpu-{info['arch']}-{info.get('isa') or 'none'}"


def mismatches(built: dict, here: dict) -> list[str]:
    """Why code built on ``built`` cannot run on ``here``; empty when it can."""
    out = []
    if built["device"] != here["device"]:
        out.append(f"built for device {built['device']}, this machine runs {here['device']}")
        return out
    if built["arch"] != here["arch"]:
        out.append(f"built for {built['arch']}, this machine is {here['arch']}")
    if _torch_base(built["torch"]) != _torch_base(here["torch"]):
        out.append(f"built with torch {built['torch']}, this machine has torch {here['torch']}")
    if built["device"] == "cuda" and built.get("cuda_capability") != here.get("cuda_capability"):
        out.append(
            f"built for GPU capability sm{built.get('cuda_capability')}, this GPU is sm{here.get('cuda_capability')}"
        )
    if built["device"] == "cpu":
        isa = built.get("isa") or "none"
        need = ISA_FLAGS.get(isa)
        if need is not None and built["arch"] == here["arch"] == "x86_64" and here.get("cpu_flags"):
            lacking = sorted(need - {f for f in here["cpu_flags"] if isinstance(f, str)})
            if lacking:
                out.append(f"built for CPU ISA {isa}, this CPU lacks {', '.join(lacking)}")
        elif isa != "none" and isa not in supported_isas():  # another architecture's ISA: ask inductor
            out.append(f"built for CPU ISA {isa}, this CPU supports {', '.join(supported_isas())}")
    return out
