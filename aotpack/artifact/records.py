"""The parts of a manifest: what was built from what (recipe, checkpoint, scheme), the compiled modules and where
their constants live, what a request may ask, and how the build went. Frozen dataclasses with one JSON form
(``schema.encode``/``decode``); ``Manifest`` itself, which holds them, is in ``aotpack.artifact.manifest``, which
re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aotpack.artifact.input_spec import InputSpec


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


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
    # a frozen build (CPU): {constant: its steps over weights}, replayed at load (aotpack.artifact.folds)
    fold: dict | None = field(default=None, metadata={"omit_default": True})

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
    freeze: bool = field(default=False, metadata={"omit_default": True})


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
class Identity:
    """What a manifest of every schema starts with: which aotpack wrote it, and what it is a build of."""

    schema_version: int
    aotpack_version: str
    recipe: RecipeRef
    model: ModelRef
    scheme: SchemeRef
    dtype: str
