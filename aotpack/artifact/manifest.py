"""manifest.json: the typed contract between build and load. Versioned, written once, checked on load.

Every value that crosses from the build to a serving box is a frozen dataclass here; the JSON schema and its
validation are derived from them (``schema.decode``), so the structure is described once. An artifact is a
list of compiled modules (the transformer, the VAE decoder, one per block class in a regional build) that
share one weights file. Schema 1 manifests (aotpack 0.1) are read through ``_from_v1``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from aotpack.artifact.platform import Platform, mismatches
from aotpack.artifact.schema import decode, encode
from aotpack.errors import IncompatibleArtifactError, InputError, ManifestError, one_line

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
class FileEntry:
    size: int
    sha256: str


# ---- the input signature of a compiled module -------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One input of a compiled module: its shape (ints, or the names of dynamic dims) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class Relation:
    """A tie between dims that export cannot express and the loader checks itself:
    ``dim == product(of) / divisor`` (``op="product"``) or ``dim == sum(of)`` (``op="sum"``)."""

    dim: str
    of: tuple[str, ...]
    op: str = "product"
    divisor: int = 1

    def expected(self, sizes: Mapping[str, int]) -> int:
        if self.op == "sum":
            return sum(sizes[d] for d in self.of)
        n = 1
        for d in self.of:
            n *= sizes[d]
        return n // self.divisor

    def describe(self) -> str:
        if self.op == "sum":
            return " + ".join(self.of)
        return " x ".join(self.of) + (f" / {self.divisor}" if self.divisor != 1 else "")


@dataclass(frozen=True)
class InputSpec:
    """What a compiled module accepts: its tensors in call order, the dynamic dims' [min, max(, multiple)]
    and the relations between dims. Export, capture, the call-time check, the bench and run all use it."""

    tensors: tuple[TensorSpec, ...]
    dynamic: dict[str, tuple[int, ...]]
    relations: tuple[Relation, ...] = ()
    # non-tensor arguments baked into the compiled code ({name: None, a number, a string or a list of those});
    # left out of the JSON when empty, so manifests without any read (and are written) as before
    constants: dict[str, Any] = field(default_factory=dict, metadata={"omit_default": True})

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def axes(self) -> dict[str, dict[str, int]]:
        """{dim: {input: axis}}: where each dynamic dim appears."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors:
            for axis, d in enumerate(t.shape):
                if isinstance(d, str):
                    out.setdefault(d, {})[t.name] = axis
        return out

    def problems(self) -> list[str]:
        out = []
        for name, rng in self.dynamic.items():
            if not (len(rng) in (2, 3) and 0 <= rng[0] <= rng[1] and (len(rng) == 2 or rng[2] >= 1)):
                out.append(f"inputs.dynamic.{name!r} must be [min, max] or [min, max, multiple]")
        for t in self.tensors:
            if not all((isinstance(d, int) and d >= 0) or d in self.dynamic for d in t.shape):
                out.append(f"input {t.name!r} must have a shape of ints >= 0 or dynamic dims")
        for r in self.relations:
            if r.dim not in self.dynamic or not r.of or not all(d in self.dynamic for d in r.of) \
                    or r.op not in ("product", "sum") or r.divisor < 1:
                out.append(f"relation of {r.dim!r} must name dynamic dims, op product or sum, divisor >= 1")
        for name, value in self.constants.items():
            if name in self.names or not _plain(value):
                out.append(f"inputs.constants.{name!r} must be null, a number, a string or a list of those, "
                           "and not name a tensor input")
        return out

    def check_constants(self, inputs: Mapping[str, Any]) -> None:
        """Raise InputError if an argument baked into the compiled code is passed with another value (one left
        out takes the baked value)."""
        for name, want in self.constants.items():
            if name not in inputs or _same(inputs[name], want):
                continue
            got = inputs[name]
            shown = f"a {type(got).__name__}" if hasattr(got, "shape") else _show(got)
            raise InputError(f"{name} is {shown}, but the artifact was compiled with {name}={_show(want)} baked in",
                             f"pass {name}={_show(want)} (the build's capture settings), or rebuild with a recipe "
                             f"whose capture call uses the size, frames and batch that give this {name}")

    def check(self, inputs: Mapping[str, Any], device: Any, hint: Callable[[str], str] | None = None) -> None:
        """Raise InputError unless every input matches the exported names, dtypes, devices and ranges.

        AOTInductor does not check shapes itself: a wrong size would read out of bounds.
        """
        import torch

        hint = hint or (lambda dim: "rebuild with a wider range")
        self.check_constants(inputs)  # first: a baked size (img_shapes) says more than the tensor it shapes
        names = self.names
        missing = [n for n in names if inputs.get(n) is None]
        if missing:
            raise InputError(f"missing input(s): {', '.join(missing)}", "pass every input the artifact was exported with")
        extra = sorted(str(k) for k, v in inputs.items() if k not in names and k not in self.constants
                       and v is not None)
        if extra:
            raise InputError(f"unexpected input(s): {', '.join(extra)}", "this artifact was exported without them")
        bound: dict[str, int] = {}
        for spec in self.tensors:
            name, t = spec.name, inputs[spec.name]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name} must be a tensor, got {type(t).__name__}", "pass a torch.Tensor")
            dtype = str(t.dtype).removeprefix("torch.")
            if dtype != spec.dtype:
                raise InputError(f"{name} has dtype {dtype}, the artifact expects {spec.dtype}",
                                 f"cast it, or build with --dtype {dtype}")
            if t.device.type != torch.device(device).type:
                raise InputError(f"{name} is on {t.device.type}, the artifact runs on {torch.device(device).type}",
                                 f"move the inputs (and the pipeline) to {torch.device(device).type}")
            want = spec.shape
            if t.dim() != len(want):
                raise InputError(f"{name} has {t.dim()} dims {list(t.shape)}, the artifact expects {len(want)} "
                                 f"({list(want)})", "check the pipeline and the artifact match")
            for axis, (size, w) in enumerate(zip(t.shape, want)):
                if isinstance(w, int):
                    if size != w:
                        raise InputError(f"{name} dim {axis} is {size}, the artifact was exported with {w}",
                                         "use the recipe's settings (e.g. max_sequence_length) or rebuild")
                    continue
                lo, hi, *step = self.dynamic[w]
                if not lo <= size <= hi:
                    raise InputError(f"{name} dim {axis} ({w}) is {size}, outside the artifact's range [{lo}, {hi}]",
                                     hint(w))
                if step and size % step[0]:
                    raise InputError(f"{name} dim {axis} ({w}) is {size}, not a multiple of {step[0]}", hint(w))
                if bound.setdefault(w, size) != size:
                    raise InputError(f"{name} dim {axis} ({w}) is {size} but another input has {bound[w]}",
                                     "inputs disagree on one dynamic size")
        for name, (lo, hi, *_) in self.dynamic.items():  # a fixed size no tensor carries (padded text)
            if lo == hi:
                bound.setdefault(name, lo)
        for rel in self.relations:
            if rel.dim in bound and all(d in bound for d in rel.of):
                want_size = rel.expected(bound)
                if bound[rel.dim] != want_size:
                    raise InputError(f"{rel.dim} is {bound[rel.dim]} but {rel.describe()} is {want_size}",
                                     "inputs disagree (e.g. rotary embeddings made for another size)")

    def sizes(self, choose: Callable[[str, tuple[int, ...]], int]) -> dict[str, int]:
        """One size per dynamic dim (``choose(dim, range)``), with the relations applied."""
        sizes = {name: choose(name, rng) for name, rng in self.dynamic.items()}
        for rel in self.relations:
            sizes[rel.dim] = rel.expected(sizes)
        return sizes


def _plain(value: Any, depth: int = 0) -> bool:
    """A value a manifest may record as a baked-in argument: null, bool, int, finite float, string, or a list of
    those (bounded depth)."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    return isinstance(value, (list, tuple)) and depth < 8 and all(_plain(v, depth + 1) for v in value)


def _same(got: Any, want: Any) -> bool:
    """``got`` equals the recorded ``want``, a tuple matching a list (JSON has lists only) and a bool never a
    number."""
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(map(_same, got, want))
    if isinstance(want, bool) or isinstance(got, bool) or want is None or isinstance(want, str):
        return type(got) is type(want) and got == want
    import numbers

    return isinstance(got, numbers.Real) and got == want


def _show(value: Any) -> str:
    """A value as a request shows it (tuples as lists, as the manifest holds them), cut to one short line."""
    def plain(v: Any) -> Any:
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    text = repr(plain(value))
    return one_line(text if len(text) <= 80 else text[:77] + "...")


# ---- what the artifact is ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecipeRef:
    name: str
    variant: str | None
    family: str
    pipeline: str
    component: str
    # the recipe as built (the TOML table, parsed): the artifact is served from it, so a recipe file or a
    # derived recipe needs no file at serving time; left out of the JSON when empty (older manifests)
    data: dict[str, Any] = field(default_factory=dict, metadata={"omit_default": True})

    @property
    def full_name(self) -> str:
        return f"{self.name}-{self.variant}" if self.variant else self.name


@dataclass(frozen=True)
class ModelRef:
    """The checkpoint read: ``revision`` as asked, ``commit`` as resolved on the Hub, and for local and builtin
    folders the sha256 of the component's high-precision files (a LoRA swap re-reads and checks them)."""

    checkpoint: str
    revision: str | None
    source: str             # "builtin", "local" or "hub"
    config: dict
    commit: str | None = None
    files: dict[str, FileEntry] = field(default_factory=dict)   # the component folder's files


@dataclass(frozen=True)
class SchemeRef:
    name: str
    torchao_config: dict | None


@dataclass(frozen=True)
class Request:
    """What a serving request may ask of the artifact's pipeline (checked before any native call)."""

    batch: tuple[int, int]
    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int
    max_sequence_length: int
    max_steps: int
    output: str = "image"                       # "image" or "video"
    frames: tuple[int, int] | None = None
    temporal_compression: int = 1


@dataclass(frozen=True)
class CompiledModule:
    """One compiled program of the artifact and where its constants live in the weights file.

    The constant ``f`` of instance ``i`` is the weights entry ``key(instances[i], f)``: the constant's name
    with the wrapper's ``root`` replaced by the instance's path in the pipeline (``transformer``,
    ``vae``, ``transformer.transformer_blocks.3``). A whole-graph component has one instance.
    """

    name: str
    kind: str                       # "component", "vae_decoder" or "block"
    code: str                       # the .pt2 file
    weights: str                    # the safetensors file holding its constants
    root: str                       # first part of every constant name ("" keeps names as they are)
    instances: tuple[str, ...]
    inputs: InputSpec
    scheme: str
    max_abs_error: float
    tolerance: float
    compile_key: str | None = None
    compiled: str | None = None     # "compiled", "compile cache" or "reused from DIR"
    config: dict | None = None      # the module's diffusers config, where it is not the component's
    block_class: str | None = None  # a regional block: the diffusers class whose instances run this code
    # a block's output as its own forward returns it: "" a tuple of tensors, "tensor" one tensor, or the tuple's
    # items ("none,tensor": SD3's last block); the compiled code returns the tensors only
    output: str = field(default="", metadata={"omit_default": True})

    def key(self, instance: str, constant: str) -> str:
        if not self.root:
            return constant
        rest = constant[len(self.root) + 1:] if constant.startswith(self.root + ".") else constant
        return f"{instance}.{rest}" if instance else rest


@dataclass(frozen=True)
class QuantError:
    """The quantized compiled model against the full-precision eager model: on the captured inputs (one
    forward) and on the final latents of one whole pipeline call."""

    forward_max_abs: float
    forward_ref_max: float
    latents_max_abs: float | None = None
    latents_ref_max: float | None = None


@dataclass(frozen=True)
class BuildInfo:
    date: str
    stages: dict[str, float]
    peak_rss_bytes: int
    quant_error: QuantError | None = None


@dataclass(frozen=True)
class Options:
    fuse_qkv: bool = False
    quantize_text_encoder: str | None = None
    quantize_vae: str | None = None
    compile_vae: bool = False
    max_autotune: bool = False
    regional: bool = False


@dataclass(frozen=True)
class LoraRef:
    file: str
    sha256: str
    scale: float
    modules: int


@dataclass(frozen=True)
class PlanRef:
    file: str
    budget: float | None
    counts: dict[str, int]
    layers: dict[str, str]


@dataclass(frozen=True)
class _Identity:
    """What a manifest of every schema starts with: which aotpack wrote it, and what it is a build of."""

    schema_version: int
    aotpack_version: str
    recipe: RecipeRef
    model: ModelRef
    scheme: SchemeRef
    dtype: str


@dataclass(frozen=True)
class Manifest(_Identity):
    request: Request
    platform: Platform
    files: dict[str, FileEntry]
    modules: tuple[CompiledModule, ...]
    build: BuildInfo
    options: Options = Options()
    lora: LoraRef | None = None
    plan: PlanRef | None = None

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

@dataclass(frozen=True)
class _V1Image:
    height: tuple[int, int]
    width: tuple[int, int]
    multiple: int
    frames: tuple[int, int] | None = None
    output: str = "image"


@dataclass(frozen=True)
class _V1Relation:
    dim: str
    product: tuple[str, ...]
    divisor: int


@dataclass(frozen=True)
class _V1Inputs:
    tensors: tuple[TensorSpec, ...]
    dynamic: dict[str, tuple[int, ...]]
    image: _V1Image
    max_sequence_length: int
    relations: tuple[_V1Relation, ...] = ()


@dataclass(frozen=True)
class _V1ModuleInputs:
    tensors: tuple[TensorSpec, ...]
    dynamic: dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class _V1Module:
    component: str
    model: str
    weights: str
    scheme: str
    config: dict
    inputs: _V1ModuleInputs
    max_abs_error: float


@dataclass(frozen=True)
class _V1Build:
    date: str
    stages: dict[str, float]
    peak_rss_bytes: int
    max_abs_error: float
    quant_abs_error: float | None
    compile_key: str | None = None
    compiled: str | None = None


@dataclass(frozen=True)
class _V1(_Identity):
    inputs: _V1Inputs
    platform: Platform
    files: dict[str, FileEntry]
    build: _V1Build
    options: dict | None = None
    lora: LoraRef | None = None
    modules: dict[str, _V1Module] | None = None
    plan: PlanRef | None = None


def _v1_spec(tensors, dynamic, relations=()) -> InputSpec:
    return InputSpec(tensors=tuple(tensors), dynamic=dict(dynamic),
                     relations=tuple(Relation(r.dim, r.product, "product", r.divisor) for r in relations))


def _from_v1(data: dict) -> Manifest:
    """A schema-1 manifest as today's Manifest: model.pt2 + weights.safetensors keyed by the compiled names,
    and (with --compile-vae) vae_decoder.pt2 + its own weights file."""
    problems: list[str] = []
    old = decode(_V1, data, "", problems)
    _raise(problems)
    opts = {k: v for k, v in (old.options or {}).items() if k in {f.name for f in dataclasses.fields(Options)}}
    image = old.inputs.image
    main = CompiledModule(
        name=old.recipe.component, kind="component", code="model.pt2", weights="weights.safetensors", root="",
        instances=(old.recipe.component,), inputs=_v1_spec(old.inputs.tensors, old.inputs.dynamic, old.inputs.relations),
        scheme=old.scheme.name, max_abs_error=old.build.max_abs_error, tolerance=float("inf"),
        compile_key=old.build.compile_key, compiled=old.build.compiled)
    modules = [main]
    for name, m in (old.modules or {}).items():
        modules.append(CompiledModule(
            name=name, kind="vae_decoder", code=m.model, weights=m.weights, root="", instances=(m.component,),
            inputs=_v1_spec(m.inputs.tensors, m.inputs.dynamic), scheme=m.scheme, max_abs_error=m.max_abs_error,
            tolerance=float("inf"), config=m.config))
    batch = tuple(old.inputs.dynamic.get("batch", (1, 1))[:2])
    manifest = Manifest(
        schema_version=1, aotpack_version=old.aotpack_version, recipe=old.recipe, model=old.model, scheme=old.scheme,
        dtype=old.dtype,
        request=Request(batch=batch, height=image.height, width=image.width, multiple=image.multiple,
                        max_sequence_length=old.inputs.max_sequence_length, max_steps=1000, output=image.output,
                        frames=image.frames, temporal_compression=4 if image.output == "video" else 1),
        platform=old.platform, files=old.files, modules=tuple(modules),
        build=BuildInfo(date=old.build.date, stages=old.build.stages, peak_rss_bytes=old.build.peak_rss_bytes),
        options=Options(**opts), lora=old.lora, plan=old.plan)
    _raise(_semantic_problems(manifest))
    return manifest
