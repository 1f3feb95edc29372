"""Schema 1 manifests (aotpack 0.1): their layout (``V1``), and its parts as today's records.

``aotpack.artifact.manifest.validate`` decodes a schema-1 manifest as ``V1`` and assembles a ``Manifest`` from
the parts these functions convert: model.pt2 + weights.safetensors keyed by the compiled names, and (with
--compile-vae) vae_decoder.pt2 + its own weights file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aotpack.artifact.input_spec import InputSpec, Relation, TensorSpec
from aotpack.artifact.platform import Platform
from aotpack.artifact.records import BuildInfo, CompiledModule, FileEntry, Identity, LoraRef, Options, PlanRef, Request


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
class V1(Identity):
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


def modules_of(old: V1) -> tuple[CompiledModule, ...]:
    """The compiled modules: the component (model.pt2 + weights.safetensors), then any compiled VAE decoder."""
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
    return tuple(modules)


def request_of(old: V1) -> Request:
    """What a request may ask: schema 1 kept it in its inputs' image table and the dynamic batch."""
    image = old.inputs.image
    batch = tuple(old.inputs.dynamic.get("batch", (1, 1))[:2])
    return Request(batch=batch, height=image.height, width=image.width, multiple=image.multiple,
                   max_sequence_length=old.inputs.max_sequence_length, max_steps=1000, output=image.output,
                   frames=image.frames, temporal_compression=4 if image.output == "video" else 1)


def build_of(old: V1) -> BuildInfo:
    return BuildInfo(date=old.build.date, stages=old.build.stages, peak_rss_bytes=old.build.peak_rss_bytes)


def options_of(old: V1) -> Options:
    """The options today's aotpack knows (schema 1 kept a free-form table)."""
    opts = {k: v for k, v in (old.options or {}).items() if k in {f.name for f in dataclasses.fields(Options)}}
    return Options(**opts)
