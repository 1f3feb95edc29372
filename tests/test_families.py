"""The tiny random pipelines of other diffusers families (aotpack/builder/families.py): each is built offline,
loads through ``DiffusionPipeline.from_pretrained`` and runs its default call eagerly at both sizes (and both
frame counts for video), giving finite latents of the shape the call asks for. No compile here."""

from __future__ import annotations

import json

import pytest
import torch

from aotpack.builder.families import FAMILIES, ensure_family
from aotpack.errors import RecipeError


# Not slow: each family takes 1-5 s of CPU (build, load and all its calls; measured on 2 threads).
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_offline_and_runs_its_default_call_at_both_sizes(name):
    from diffusers import DiffusionPipeline

    family = FAMILIES[name]
    folder = ensure_family(name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == family.pipeline
    assert ensure_family(name) == folder  # built once, then reused
    pipe = DiffusionPipeline.from_pretrained(folder)  # HF_HUB_OFFLINE=1 (conftest): nothing may be fetched
    assert type(pipe).__name__ == family.pipeline
    calls = family.calls()
    assert len({(c["height"], c["width"], c.get("num_frames")) for c in calls}) == len(calls) >= 2
    for call in calls:
        out = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0))
        latents = out.frames if hasattr(out, "frames") else out.images
        want = family.latent(call["height"], call["width"], call.get("num_frames", 1))
        assert tuple(latents.shape) == want, (call["height"], call["width"], call.get("num_frames"))
        assert torch.isfinite(latents).all()


def test_family_unknown_name_is_refused_in_one_line():
    with pytest.raises(RecipeError) as e:
        ensure_family("tiny-nope")
    assert "tiny-nope" in str(e.value) and "tiny-wan" in e.value.hint
