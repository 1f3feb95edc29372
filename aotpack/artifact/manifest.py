"""manifest.json: the typed contract between build and load. Versioned, written once, checked on load.

Every value that crosses from the build to a serving box is a frozen dataclass; the JSON schema and its
validation are derived from them (``schema.decode``), so the structure is described once. An artifact is a
list of compiled modules (the transformer, the VAE decoder, one per block class in a regional build) that
share one weights file. This module holds ``Manifest`` and its reading and checks; its parts live beside it
(``records``: refs, compiled modules, build info; ``input_spec``: what a compiled module accepts) and are
re-exported here. Schema 1 manifests (aotpack 0.1) are read through ``manifest_v1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aotpack.artifact import folds
from aotpack.artifact import manifest_v1 as v1
from aotpack.artifact.input_spec import InputSpec, Relation, TensorSpec
from aotpack.artifact.platform import Platform, mismatches
from aotpack.artifact.records import (BuildInfo, CompiledModule, FileEntry, Identity, LoraRef, ModelRef, Options,
                                      PlanRef, QuantError, RecipeRef, Request, SchemeRef)
from aotpack.artifact.schema import decode, encode
from aotpack.errors import IncompatibleArtifactError, ManifestError, one_line

__all__ = [
    "SCHEMA_VERSION", "MANIFEST", "MAX_MANIFEST_BYTES", "is_safe_name", "Manifest", "validate", "parse", "read_bytes",
    "no_manifest", "read", "sha256", "check_compatible",
    # the parts, from input_spec and records
    "TensorSpec", "Relation", "InputSpec", "FileEntry", "RecipeRef", "ModelRef", "SchemeRef", "Request",
    "CompiledModule", "QuantError", "BuildInfo", "Options", "LoraRef", "PlanRef",
]

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20   # a real manifest is a few KB; a bigger one is not ours
_SHA = re.compile(r"^[0-9a-f]{64}$")
# A file name inside an artifact: one plain path component, no traversal, no hidden files.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HINT = "rebuild the artifact, or download it again"


def is_safe_name(name: Any) -> bool:
    """True for a plain file name that cannot escape its folder (no '/', '..', absolute or hidden paths)."""
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class Manifest(Identity):
    request: Request
    platform: Platform
    files: dict[str, FileEntry]
    modules: tuple[CompiledModule, ...]
    build: BuildInfo
    options: Options = Options()
    lora: LoraRef | None = None
    plan: PlanRef | None = None
    # regional, CPU: the linears outside the blocks that run with int8 weights (aotpack.serve.glue)
    glue_int8: tuple[str, ...] = field(default=(), metadata={"omit_default": True})

    @property
    def component(self) -> CompiledModule:
        """The module that stands in for the pipeline's component (whole graph), or the first block."""
        return next((m for m in self.modules if m.kind == "component"), self.modules[0])

    def module(self, kind: str) -> CompiledModule | None:
        return next((m for m in self.modules if m.kind == kind), None)

    @property
    def max_abs_error(self) -> float:
        return max(m.max_abs_error for m in self.modules)

    @property
    def is_video(self) -> bool:
        return self.request.output == "video"

    def weights_bytes(self) -> int:
        return sum(self.files[name].size for name in {m.weights for m in self.modules})

    def to_json(self) -> dict:
        return encode(self)

    def dumps(self) -> str:
        text = json.dumps(self.to_json(), indent=2) + "\n"
        validate(json.loads(text))  # what is written is what a loader accepts
        return text

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)


# ---- reading -----------------------------------------------------------------------------------------------

_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool",
           "float8_e4m3fn", "float8_e5m2", "complex64"}  # complex64: rotary tables (Qwen-Image)


def _request_problems(req: Request) -> list[str]:
    problems = []
    pairs = [("batch", req.batch), ("height", req.height), ("width", req.width)] + \
        ([("frames", req.frames)] if req.frames is not None else [])
    for name, (lo, hi) in pairs:
        if not 1 <= lo <= hi:
            problems.append(f"request.{name} must be [min, max] with 1 <= min <= max")
    for name in ("multiple", "max_sequence_length", "max_steps", "temporal_compression"):
        if getattr(req, name) < 1:
            problems.append(f"request.{name} must be >= 1")
    if req.output not in ("image", "video") or (req.output == "video") != (req.frames is not None):
        problems.append("request.output must be 'image', or 'video' with frames")
    return problems


def _module_problems(m: Manifest) -> list[str]:
    problems = []
    names = [mod.name for mod in m.modules if mod is not None]
    if len(set(names)) != len(names):
        problems.append("modules must have distinct names")
    kinds = [mod.kind for mod in m.modules if mod is not None]
    if m.options is not None and m.options.regional != ("block" in kinds) or ("component" in kinds) == ("block" in kinds):
        problems.append("modules must be one component (whole graph) or blocks (regional), as options.regional says")
    for i, mod in enumerate(m.modules):
        if mod is None or mod.inputs is None:
            continue
        if not (mod.code.endswith(".pt2") and mod.weights.endswith(".safetensors")):
            problems.append(f"modules[{i}] must name a .pt2 and a .safetensors file")
        if (mod.kind == "block") != (mod.block_class is not None) or not all(isinstance(s, str) and s for s in
                                                                                mod.instances):
            problems.append(f"modules[{i}] must name its instances (and, as a block, its class)")
        parts = mod.output.split(",") if mod.output else []
        if mod.output not in ("", "tensor") and not (set(parts) <= {"none", "tensor"} and "tensor" in parts):
            problems.append(f"modules[{i}].output must be '', 'tensor' or a list of 'none'/'tensor'")
        if not all(t.dtype in _DTYPES for t in mod.inputs.tensors):
            problems.append(f"modules[{i}] names an input dtype that is not a tensor dtype")
        if mod.fold is not None:
            if getattr(m.platform, "device", None) != "cpu" or not (m.options and m.options.freeze):
                problems.append(f"modules[{i}].fold belongs to a CPU module of a --freeze build only")
            problems.extend(f"modules[{i}].{p}" for p in folds.problems(mod.fold)[:3])
    return problems


def _semantic_problems(m: Manifest) -> list[str]:
    problems = []
    if m.dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.request is not None:
        problems.extend(_request_problems(m.request))
    problems.extend(_module_problems(m))
    for name, entry in m.files.items():
        if not is_safe_name(name):
            problems.append(f"file name {name!r} is not a plain file name")
        if entry is None or entry.size is None or entry.size < 0 or not _SHA.match(entry.sha256 or ""):
            problems.append(f"files[{name!r}] must be {{size: int >= 0, sha256: 64 hex digits}}")
    if not m.modules:
        problems.append("modules must list at least one compiled module")
    for i, mod in enumerate(m.modules):
        if mod is None or mod.inputs is None:
            continue
        for f in (mod.code, mod.weights):
            if f not in m.files:
                problems.append(f"modules[{i}] names {f!r}, which files does not list")
        if mod.kind not in ("component", "vae_decoder", "block") or not mod.instances:
            problems.append(f"modules[{i}] must be a component, vae_decoder or block with instances")
        problems.extend(f"modules[{i}]: {p}" for p in mod.inputs.problems())
    glue = m.glue_int8 or ()
    if glue and (not (m.options is not None and m.options.regional) or len(set(glue)) != len(glue)
                 or not all(isinstance(n, str) and n for n in glue)
                 or getattr(m.platform, "device", None) != "cpu"):
        problems.append("glue_int8 must list distinct linear names, in a regional CPU artifact only")
    if m.request is not None and m.request.output not in ("image", "video"):
        problems.append("request.output must be 'image' or 'video'")
    return problems


def validate(data: Any) -> Manifest:
    """Check parsed JSON against the schema; every problem is gathered into one ManifestError."""
    if not isinstance(data, dict):
        raise ManifestError("manifest.json must hold a JSON object", "rebuild the artifact")
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool):
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema {version} comes from a newer aotpack "
                f"({one_line(str(data.get('aotpack_version', '?')), 40)}); this aotpack reads schema "
                f"{SCHEMA_VERSION} and older", "upgrade aotpack: pip install -U aotpack")
        if version == 1:
            return _from_v1(data)
        if version != SCHEMA_VERSION:
            raise ManifestError(f"manifest schema {version} is not supported (this aotpack reads 1 and "
                                f"{SCHEMA_VERSION})", "rebuild the artifact with this aotpack")
    problems: list[str] = []
    manifest = decode(Manifest, data, "", problems)
    if manifest is not None and not problems:
        problems.extend(_semantic_problems(manifest))
    _raise(problems)
    return manifest


def _raise(problems: list[str]) -> None:
    if problems:
        raise ManifestError("manifest.json is invalid: " + one_line("; ".join(problems[:8]), 900)
                            + (f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""), _HINT)


def parse(text: str | bytes) -> Manifest:
    """Parse and validate manifest JSON text."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest.json is {len(text)} bytes, more than any aotpack manifest", _HINT)
    try:
        data = json.loads(text)
    except RecursionError:
        raise ManifestError("manifest.json is nested too deeply to be an aotpack manifest", _HINT) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"manifest.json is not valid JSON ({one_line(str(e), 120)})", _HINT) from None
    try:
        return validate(data)
    except RecursionError:
        raise ManifestError("manifest.json is nested too deeply to be an aotpack manifest", _HINT) from None


def read_bytes(folder: str | Path) -> bytes:
    """The bytes of ``folder/manifest.json`` (bounded), with one-line errors for what is not an artifact."""
    folder = Path(folder)
    if not folder.exists():
        raise ManifestError(f"no artifact at {one_line(str(folder))}", "build one with 'aotpack build', or check the path")
    if not folder.is_dir():
        raise ManifestError(f"{one_line(str(folder))} is not a folder",
                            "pass the artifact folder (the one holding manifest.json)")
    path = folder / MANIFEST
    if not path.is_file():
        raise no_manifest(folder)
    with open(path, "rb") as f:
        return f.read(MAX_MANIFEST_BYTES + 1)


def no_manifest(folder: Path) -> ManifestError:
    """The error for a folder without a manifest; a Hub repo's folder (``hf download`` of an aotpack repo) is
    told where its builds are."""
    hint = "pass the artifact folder"
    builds = folder / "builds"
    if (folder / "aotpack-index.json").is_file() or builds.is_dir():
        names = sorted(p.name for p in builds.iterdir() if (p / MANIFEST).is_file())[:4] if builds.is_dir() else []
        hint = (f"this is an aotpack Hub repo's folder: pass one of its builds, {one_line(str(builds))}/NAME"
                + (f" ({', '.join(one_line(n, 60) for n in names)})" if names else "")
                + ", or load it by repo id: aotpack.load('OWNER/NAME', revision=...)")
    return ManifestError(f"{one_line(str(folder))} has no {MANIFEST}: not an aotpack artifact", hint)


def read(folder: str | Path) -> Manifest:
    """Read and validate ``folder/manifest.json``."""
    return parse(read_bytes(folder))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_compatible(manifest: Manifest, here: Platform) -> None:
    """Raise IncompatibleArtifactError when the artifact was built for another platform."""
    problems = mismatches(manifest.platform, here)
    if problems:
        raise IncompatibleArtifactError(
            "artifact does not fit this machine: " + one_line("; ".join(problems)),
            "rebuild it here with 'aotpack build', or pull a build for this platform",
        )


# ---- schema 1 (aotpack 0.1) ----------------------------------------------------------------------------------

def _from_v1(data: dict) -> Manifest:
    """A schema-1 manifest as today's Manifest (``manifest_v1`` holds its layout and converts its parts)."""
    problems: list[str] = []
    old = decode(v1.V1, data, "", problems)
    _raise(problems)
    manifest = Manifest(
        schema_version=1, aotpack_version=old.aotpack_version, recipe=old.recipe, model=old.model, scheme=old.scheme,
        dtype=old.dtype, request=v1.request_of(old), platform=old.platform, files=old.files,
        modules=v1.modules_of(old), build=v1.build_of(old), options=v1.options_of(old), lora=old.lora, plan=old.plan)
    _raise(_semantic_problems(manifest))
    return manifest
