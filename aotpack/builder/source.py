"""Resolve where a pipeline comes from (builtin, local folder, Hub id) and load it with from_pretrained."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from aotpack.artifact.files import file_entries
from aotpack.artifact.manifest import FileEntry, ModelRef
from aotpack.builder.recipe import Recipe
from aotpack.builder.tiny import ensure_builtin
from aotpack.errors import HubError, RecipeError, first_line

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclasses.dataclass(frozen=True)
class Source:
    """A pipeline checkpoint: ``checkpoint`` as the manifest records it, ``location`` what from_pretrained gets."""

    checkpoint: str
    revision: str | None
    kind: str            # "builtin", "local" or "hub"
    location: str


def resolve_source(recipe: Recipe, model: str | None = None, device: str = "cpu") -> Source:
    """Where to read the pipeline from; fails early when the recipe's checkpoint cannot run here."""
    if model:
        path = Path(model).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise RecipeError(
                    f"{model} is not a diffusers pipeline folder (no model_index.json)",
                    "pass a folder written by save_pretrained, or a Hub repo id",
                )
            return Source(str(path.resolve()), None, "local", str(path.resolve()))
        if model.count("/") != 1 or model.startswith((".", "/", "~")):
            raise RecipeError(f"--model {model}: no such folder, and not a Hub repo id (owner/name)",
                              "check the path")
        return Source(model, None, "hub", model)
    if recipe.builtin:
        return Source(recipe.checkpoint, recipe.revision, "builtin", str(ensure_builtin(recipe.builtin)))
    if recipe.checkpoint_needs and recipe.checkpoint_needs != device:
        raise RecipeError(
            f"recipe '{recipe.full_name}' builds {recipe.checkpoint}, which needs a {recipe.checkpoint_needs.upper()} "
            f"device and network access; this machine runs on {device.upper()}",
            f"build tiny-{recipe.family} here, or pass --model with a local diffusers folder that fits this machine",
        )
    return Source(recipe.checkpoint, recipe.revision, "hub", recipe.checkpoint)


def source_of(model: ModelRef) -> Source:
    """Where the rest of the pipeline comes from, as the manifest recorded it: a Hub checkpoint at the commit
    the build read (not the branch or tag it was asked for)."""
    if model.source == "builtin":
        name = model.checkpoint.split(":", 1)[1]
        return Source(model.checkpoint, model.revision, "builtin", str(ensure_builtin(name)))
    revision = model.commit or model.revision
    return Source(model.checkpoint, revision, model.source, model.checkpoint)


def component_folder(source: Source, component: str) -> Path:
    """The local folder of a pipeline's component (a Hub checkpoint is fetched, that component only)."""
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        from aotpack.hub import endpoint

        try:
            root = snapshot_download(source.location, revision=source.revision, allow_patterns=[f"{component}/*"],
                                     endpoint=endpoint())
        except Exception as e:  # network, auth, missing repo: one line
            raise HubError(f"could not fetch {source.location}/{component}: {first_line(e)}",
                           "check the network and 'hf auth login'") from None
        return Path(root) / component
    return Path(source.location) / component


def hub_commit(folder: Path) -> str | None:
    """The commit of a Hub snapshot folder (.../snapshots/<commit>/<component>)."""
    name = folder.parent.name
    return name if _COMMIT.match(name) else None


def component_files(folder: Path) -> dict[str, FileEntry]:
    """Size and sha256 of the component folder's weights, as the manifest records them for a local or builtin
    checkpoint: a LoRA swap re-reads these files, and checks them first."""
    return file_entries(folder, "*.safetensors")


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_pipeline(recipe: Recipe, source: Source, *, dtype: str, with_component: bool = True, skip: tuple = (),
                  **extra):
    """Load the recipe's pipeline (``recipe``: anything with ``pipeline`` and ``component``, a manifest's recipe
    too) from ``source``; without the component when ``with_component`` is False, so a serving box never reads
    the original transformer's weights (nor those of the parts in ``skip``). ``extra``: more keywords for the
    pipeline class's ``from_pretrained``."""
    import diffusers

    cls = getattr(diffusers, recipe.pipeline, None)
    if cls is None:
        raise RecipeError(f"diffusers {diffusers.__version__} has no pipeline class {recipe.pipeline}",
                          "upgrade diffusers")
    kwargs = {"dtype": torch_dtype(dtype)}
    if source.kind == "hub" and source.revision:
        kwargs["revision"] = source.revision
    if not with_component:
        kwargs[recipe.component] = None
    for name in skip:
        kwargs[name] = None
    kwargs.update(extra)
    try:
        pipe = cls.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError) as e:
        first = first_line(e)
        if source.kind == "hub":
            raise HubError(
                f"could not load {source.checkpoint} from the Hub: {first}",
                "check the network, the repo id and 'hf auth login' (gated models need an accepted licence)",
            ) from None
        raise RecipeError(f"could not load the pipeline from {source.location}: {first}",
                          f"check that it is a {recipe.pipeline} folder") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe
