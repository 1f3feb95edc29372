"""manifest.json: the contract between build and load. Versioned schema, written once, checked on load."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aotpack.errors import IncompatibleArtifactError, ManifestError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_SHA = re.compile(r"^[0-9a-f]{64}$")
# A file name inside an artifact: one plain path component, no traversal, no hidden files.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_OPT_STR = (str, type(None))


class Optional_:
    """A field that may be absent (added after schema 1 shipped; absent in older artifacts)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec


SCHEMA: dict[str, Any] = {
    "schema_version": int,
    "aotpack_version": str,
    "recipe": {"name": str, "variant": _OPT_STR, "family": str, "pipeline": str, "component": str},
    "model": {"checkpoint": str, "revision": _OPT_STR, "source": str, "config": dict},
    "scheme": {"name": str, "torchao_config": (dict, type(None))},
    "dtype": str,
    "inputs": {"tensors": list, "dynamic": dict, "image": dict, "max_sequence_length": int,
               "relations": Optional_(list)},
    "platform": {
        "device": str, "arch": str, "isa": _OPT_STR, "cpu_flags": list, "cuda_capability": _OPT_STR,
        "gpu_name": _OPT_STR, "torch": str, "torchao": str, "diffusers": str, "python": str,
    },
    "files": dict,
    "build": {"date": str, "stages": dict, "peak_rss_bytes": int, "max_abs_error": (float, int),
              "quant_abs_error": (float, int, type(None)),
              "compile_key": Optional_(str), "compiled": Optional_(str)},
    # build options (fused projections, quantized side components, ...), a LoRA fused at build time,
    # extra compiled modules (the VAE decoder) and the per-layer quantization plan
    "options": Optional_(dict),
    "lora": Optional_((dict, type(None))),
    "modules": Optional_(dict),
    "plan": Optional_((dict, type(None))),
}


def is_safe_name(name: Any) -> bool:
    """True for a plain file name that cannot escape its folder (no '/', '..', absolute or hidden paths)."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


def _check(value: Any, spec: Any, where: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where or 'manifest'} must be an object")
            return
        # repr() keeps every name on one line, whatever characters a hostile manifest puts in it
        for key in sorted(k for k in set(spec) - set(value) if not isinstance(spec[k], Optional_)):
            problems.append(f"missing field {(where + '.' if where else '') + key!r}")
        for key in sorted(set(value) - set(spec), key=str):
            problems.append(f"unknown field {(where + '.' if where else '') + str(key)!r}")
        for key in spec.keys() & value.keys():
            _check(value[key], spec[key], f"{where + '.' if where else ''}{key}", problems)
        return
    if isinstance(spec, Optional_):
        _check(value, spec.spec, where, problems)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    # bool is an int subclass; a schema int never means a bool.
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = "/".join("null" if t is type(None) else t.__name__ for t in types)
        problems.append(f"field {where!r} must be {names}, got {type(value).__name__}")


def validate(data: Any) -> dict:
    """Check ``data`` against the schema; every problem is gathered into one ManifestError."""
    if not isinstance(data, dict):
        raise ManifestError("manifest.json must hold a JSON object", "rebuild the artifact")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise ManifestError(
            f"manifest schema {version} comes from a newer aotpack ({data.get('aotpack_version', '?')}); "
            f"this aotpack reads schema {SCHEMA_VERSION}",
            "upgrade aotpack: pip install -U aotpack",
        )
    if version != SCHEMA_VERSION and isinstance(version, int) and not isinstance(version, bool):
        raise ManifestError(f"manifest schema {version} is not supported (this aotpack reads {SCHEMA_VERSION})",
                            "rebuild the artifact with this aotpack")
    problems: list[str] = []
    _check(data, SCHEMA, "", problems)
    files = data.get("files")
    if isinstance(files, dict):
        for name, entry in files.items():
            if not is_safe_name(name):
                problems.append(f"file name {name!r} is not a plain file name")
            if not (isinstance(entry, dict) and set(entry) == {"size", "sha256"}
                    and isinstance(entry["size"], int) and not isinstance(entry["size"], bool)
                    and entry["size"] >= 0 and isinstance(entry["sha256"], str) and _SHA.match(entry["sha256"])):
                problems.append(f"files[{name!r}] must be {{size: int >= 0, sha256: 64 hex digits}}")
    inputs = data.get("inputs")
    if isinstance(inputs, dict) and isinstance(inputs.get("tensors"), list):
        problems.extend(_check_tensor_specs(inputs["tensors"], inputs.get("dynamic")))
        dims = inputs.get("dynamic") if isinstance(inputs.get("dynamic"), dict) else {}
        for i, rel in enumerate(inputs.get("relations") or []):
            if not (isinstance(rel, dict) and set(rel) == {"dim", "product", "divisor"} and rel["dim"] in dims
                    and isinstance(rel["product"], list) and rel["product"]
                    and all(isinstance(d, str) and d in dims for d in rel["product"])
                    and type(rel["divisor"]) is int and rel["divisor"] >= 1):
                problems.append(f"inputs.relations[{i}] must be {{dim, product: [dims], divisor: int >= 1}}")
    plat = data.get("platform")
    if isinstance(plat, dict) and isinstance(plat.get("cpu_flags"), list) and \
            not all(isinstance(f, str) for f in plat["cpu_flags"]):
        problems.append("platform.cpu_flags must be a list of strings")
    modules = data.get("modules")
    if isinstance(modules, dict):
        for name, m in modules.items():
            if not (isinstance(m, dict) and isinstance(m.get("inputs"), dict) and isinstance(m.get("config"), dict)
                    and isinstance(m["inputs"].get("tensors"), list) and isinstance(m["inputs"].get("dynamic"), dict)
                    and all(isinstance(m.get(k), str) and m[k] in (files or {}) for k in ("model", "weights"))):
                problems.append(f"modules[{name!r}] must name its model and weights files and its inputs")
            else:
                problems.extend(_check_tensor_specs(m["inputs"]["tensors"], m["inputs"]["dynamic"]))
    if problems:
        raise ManifestError("manifest.json is invalid: " + "; ".join(problems[:8])
                            + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""),
                            "rebuild the artifact, or download it again")
    return data


def _check_tensor_specs(specs: list, dynamic: Any) -> list[str]:
    problems = []
    dims = dynamic if isinstance(dynamic, dict) else {}
    for name, rng in dims.items():
        if not (isinstance(rng, list) and len(rng) in (2, 3) and all(type(v) is int for v in rng)
                and 0 <= rng[0] <= rng[1] and (len(rng) == 2 or rng[2] >= 1)):
            problems.append(f"inputs.dynamic.{name!r} must be [min, max] or [min, max, multiple]")
    for i, spec in enumerate(specs):
        ok = (isinstance(spec, dict) and set(spec) == {"name", "shape", "dtype"} and isinstance(spec["name"], str)
              and isinstance(spec["dtype"], str) and isinstance(spec["shape"], list)
              and all((type(d) is int and d >= 0) or (isinstance(d, str) and d in dims) for d in spec["shape"]))
        if not ok:
            problems.append(f"inputs.tensors[{i}] must be {{name, shape: [int or dynamic dim], dtype}}")
    return problems


def parse(text: str | bytes) -> dict:
    """Parse and validate manifest JSON text."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest.json is not valid JSON ({e})", "rebuild the artifact, or download it again") from None
    return validate(data)


def read(folder: str | Path) -> dict:
    """Read and validate ``folder/manifest.json``."""
    folder = Path(folder)
    if not folder.exists():
        raise ManifestError(f"no artifact at {folder}", "build one with 'aotpack build', or check the path")
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder", "pass the artifact folder (the one holding manifest.json)")
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST}: not an aotpack artifact", "pass the artifact folder")
    return parse(path.read_bytes())


def dumps(data: dict) -> str:
    validate(data)
    return json.dumps(data, indent=2) + "\n"


def check_compatible(data: dict, here: dict) -> None:
    """Raise IncompatibleArtifactError when the artifact was built for another platform."""
    from aotpack.artifact.platform import mismatches

    problems = mismatches(data["platform"], here)
    if problems:
        raise IncompatibleArtifactError(
            "artifact does not fit this machine: " + "; ".join(problems),
            "rebuild it here with 'aotpack build', or pull a build for this platform",
        )
