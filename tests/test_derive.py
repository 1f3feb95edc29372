"""Issue 18: a recipe derived from a model folder (or Hub id), with nothing written by hand.

Fast tests feed the axis namer made-up observations; the family tests derive each tiny family's recipe from real
pipeline calls (aotpack/builder/families.py) and, for the families no compiling test builds, export the
transformer with the derived dims and match eager at another size, batch and prompt (torch.export, no
AOTInductor). Whole AOTInductor builds from derived recipes are in test_generality.py.
"""

from __future__ import annotations

import dataclasses
import tomllib

import pytest
import torch

from aotpack.builder.derive import Options, _classify, derive, is_pipeline_source, to_toml
from aotpack.builder.recipe import parse_recipe, recipe_of
from aotpack.builder.spec import recipe_for
from aotpack.errors import RecipeError

CALLS = ("base", "size", "prompt", "batch", "frames", "text")


def moves(**axes):
    """{(input, axis): {call: size}} from {name: (base, {call: size})}."""
    out = {}
    for key, (base, changed) in axes.items():
        name, axis = key.rsplit("_", 1)
        out[(name, int(axis))] = {c: changed.get(c, base) for c in CALLS}
    return out


def test_d01_axes_are_named_by_how_they_move():
    axes = _classify(moves(
        hidden_0=(2, {"batch": 4}), mask_0=(2, {"batch": 4}),          # CFG: 2 per output
        hidden_2=(8, {"size": 16}), hidden_3=(8, {"size": 24}),         # rows x2, columns x3
        tokens_1=(16, {"size": 96}),                                    # x6: image tokens
        text_1=(12, {"prompt": 20, "text": 12}),                        # an unpadded text encoder
        rope_0=(28, {"size": 108, "prompt": 36}),                       # text + image tokens
    ), set(), {"base": {}}, "Model")
    assert axes.inputs == {"batch": {"hidden": 0, "mask": 0}, "latent_height": {"hidden": 2},
                           "latent_width": {"hidden": 3}, "image_seq": {"tokens": 1}, "text_seq": {"text": 1},
                           "rotary_seq": {"rope": 0}}
    assert axes.divisor == 2


def test_d01_a_mask_over_padded_text_and_image_tokens_is_a_sum_with_static_text():
    axes = _classify(moves(tokens_1=(16, {"size": 96}), text_1=(512, {"text": 256}),
                           mask_1=(528, {"size": 608, "text": 272})), set(), {"base": {}}, "Chroma")
    assert axes.inputs["rotary_seq"] == {"mask": 1} and axes.inputs["text_seq"] == {"text": 1}


def test_d01_an_axis_no_rule_names_is_refused_in_one_line():
    with pytest.raises(RecipeError) as e:
        _classify(moves(odd_1=(7, {"size": 9})), set(), {"base": {}}, "Odd")
    assert "axis 1 of odd moves in a way aotpack cannot name" in e.value.cause and "size 9" in e.value.cause
    assert "aotpack recipe" in e.value.hint and "\n" not in str(e.value)


def test_d01_two_axes_of_one_dim_must_move_by_the_same_sizes():
    with pytest.raises(RecipeError) as e:
        _classify(moves(a_1=(16, {"size": 96}), b_0=(32, {"size": 192})), set(), {"base": {}}, "M")
    assert "moves like image_seq but not by the same sizes" in e.value.cause


def test_d02_a_bare_recipe_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-flux").mkdir()
    assert not is_pipeline_source("tiny-flux") and is_pipeline_source("./tiny-flux")
    assert is_pipeline_source("someone/some-model") and not is_pipeline_source("someone/r.toml")


def test_d02_derive_options_are_refused_beside_a_recipe_and_variant_model_beside_a_source(tmp_path):
    with pytest.raises(RecipeError) as e:
        recipe_for("tiny-flux", None, None, {"max_size": 64}, "cpu")
    assert e.value.cause == "--max-size: only for a model folder or Hub id as the source"
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(RecipeError, match="variants belong to recipes"):
        recipe_for(str(tmp_path), "schnell", None, {}, "cpu")
    with pytest.raises(RecipeError, match="pass the model once"):
        recipe_for(str(tmp_path), None, "/x", {}, "cpu")
    with pytest.raises(RecipeError, match="--max-frames must be a positive integer"):
        recipe_for(str(tmp_path), None, None, {"max_frames": 0}, "cpu")


def test_d02_a_folder_without_model_index_or_component_is_refused_in_one_line(tmp_path):
    with pytest.raises(RecipeError, match=r"not a diffusers pipeline folder \(no model_index.json\)"):
        derive(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "vae": ["diffusers", "X"]}')
    with pytest.raises(RecipeError) as e:
        derive(str(tmp_path))
    assert e.value.cause == "FluxPipeline has no component 'transformer'" and "--component, one of: vae" in e.value.hint


def test_d03_call_table_is_validated():
    from aotpack.builder.recipe import get_recipe

    data = dict(get_recipe("tiny-flux").data)
    for bad in ({"fixed": {"callback": [1]}}, {"text": "max sequence"}, {"batch_divisor": 0}, {"nope": 1}):
        with pytest.raises(RecipeError, match="call"):
            parse_recipe({**data, "call": bad}, pinned=False)


# ---- each tiny family: its recipe derived from real pipeline calls ------------------------------------------

EXPECT = {  # dim -> the inputs it names; "fixed": the settings a baked-in argument fixes; divisor: CFG batch
    "tiny-sd3": dict(dims={"batch", "latent_height", "latent_width", "text_seq"}, divisor=2),
    "tiny-wan": dict(dims={"batch", "latent_frames", "latent_height", "latent_width", "text_seq"}, video=True),
    "tiny-qwenimage": dict(dims={"batch", "image_seq", "text_seq"}, fixed_size=True, text_dynamic=True),
    "tiny-ltx": dict(dims={"batch", "video_seq", "text_seq"}, divisor=2, fixed_size=True, video=True),
    "tiny-hunyuanvideo": dict(dims={"batch", "latent_frames", "latent_height", "latent_width", "text_seq"}, video=True),
    "tiny-chroma": dict(dims={"batch", "image_seq", "text_seq", "rotary_seq"}),
    "tiny-flux2-klein": dict(dims={"batch", "image_seq", "text_seq"}),
    "tiny-flux-kontext": dict(dims={"batch", "image_seq", "text_seq"}),
    "tiny-sana": dict(dims={"batch", "latent_height", "latent_width", "text_seq"}, divisor=2),
}


@pytest.fixture(scope="session")
def derived():
    """{family: derived recipe dict}, derived once per session (max size 192 - 64 where a baked-in argument fixes
    the size, which is then the run's -, at most 17 frames)."""
    from aotpack.builder.families import ensure_family

    done: dict = {}

    def get(family: str) -> dict:
        if family not in done:
            fixed = EXPECT[family].get("fixed_size")
            done[family] = derive(str(ensure_family(family)), Options(max_size=64 if fixed else 192, max_frames=17))
        return done[family]

    return get


@pytest.mark.slow  # no compile, but every family's pipeline runs up to its transformer six times (1-10 s each)
@pytest.mark.parametrize("family", list(EXPECT))
def test_d04_each_family_derives_a_recipe_that_parses_and_round_trips_as_toml(family, derived):
    from aotpack.builder.families import FAMILIES

    data = derived(family)
    want = EXPECT[family]
    assert data["pipeline"] == FAMILIES[family].pipeline and data["dtype"] == "float32"
    assert set(data["inputs"]) == want["dims"] | {"batch"}
    assert data["call"]["batch_divisor"] == want.get("divisor", 1)
    assert (data.get("output") == "video") == bool(want.get("video"))
    shapes = data["shapes"]
    assert (shapes["height"][0] == shapes["height"][1]) == bool(want.get("fixed_size"))
    text = data["ranges"]["text_seq"]
    assert (text[0] < text[1]) == bool(want.get("text_dynamic"))  # padded text encoders: one static length
    assert tomllib.loads(to_toml(data)) == data
    r = parse_recipe(data, pinned=False)
    assert r.is_video == bool(want.get("video")) and r.capture["height"] % r.multiple == 0


def other_call(r, family):
    """The recipe's capture call at another size, batch and prompt, inside its bounds."""
    cap = dict(r.capture)
    cap["prompt"] = "an owl"
    if r.batch[1] > r.batch[0]:
        cap["batch"] = r.batch[0] * 3
    if r.height[1] > r.height[0]:
        cap["height"], cap["width"] = r.height[0], r.width[1]
    if r.is_video and r.frames[1] > r.frames[0]:
        cap["frames"] = r.frames[1]
    return dataclasses.replace(r, capture=cap)


# Wan (video; parameters on the root) and FLUX.2 klein (packed tokens, a non-contiguous input) are here rather
# than as whole-graph compiles in test_generality's g05: the export and its dims are what the folder decides; the
# compile of a derived whole graph is proven once there (SD3), the derived block builds of all three likewise.
@pytest.mark.slow  # torch.export of each (no AOTInductor): 2-5 s a family
@pytest.mark.parametrize("family", ["tiny-ltx", "tiny-hunyuanvideo", "tiny-chroma", "tiny-flux-kontext", "tiny-sana",
                                    "tiny-wan", "tiny-flux2-klein"])
def test_d05_the_derived_dims_export_and_match_eager_at_another_request(family, derived):
    from diffusers import DiffusionPipeline

    from aotpack.builder.capture import capture_inputs
    from aotpack.builder.export import ComponentWrapper, component_spec, export_fitted
    from aotpack.builder.families import ensure_family

    r = parse_recipe(derived(family), pinned=False)
    pipe = DiffusionPipeline.from_pretrained(str(ensure_family(family)))
    pipe.set_progress_bar_config(disable=True)
    example, constants = capture_inputs(pipe, r)
    spec = component_spec(example, r)
    wrapper = ComponentWrapper(pipe.transformer.eval(), constants)
    ep, spec = export_fitted(wrapper, example, spec)
    if family == "tiny-chroma":  # its forward fixes the batch: exported static, the request keeps the batch
        assert spec.dynamic["batch"] == (r.capture["batch"],) * 2
        r = dataclasses.replace(r, batch=spec.dynamic["batch"])
    again, _ = capture_inputs(pipe, other_call(r, family))
    tensors = {k: v for k, v in again.items() if k in spec.names}
    assert {k: v.shape for k, v in tensors.items()} != {k: example[k].shape for k in tensors}
    spec.check(tensors, torch.device("cpu"))  # inside the bounds the manifest would record
    with torch.no_grad():
        got, want = ep.module()(tensors), wrapper(again)
    diff = (got - want).abs().max().item()
    print(f"{family}: exported vs eager at another request: max |diff| {diff:.2e}")
    assert diff < 1e-4


def test_d06_an_artifact_is_served_from_the_recipe_its_manifest_records():
    from aotpack.artifact.manifest import RecipeRef
    from aotpack.builder.recipe import get_recipe

    data = dict(get_recipe("tiny-flux").data, name="not-shipped", run={**get_recipe("tiny-flux").run, "steps": 3})
    r = recipe_of(RecipeRef("not-shipped", None, "flux", "FluxPipeline", "transformer", data=data))
    assert r.name == "not-shipped" and r.run["steps"] == 3
    with pytest.raises(RecipeError, match="the artifact's recipe"):
        recipe_of(RecipeRef("x", None, "flux", "FluxPipeline", "transformer", data={**data, "shapes": 3}))
    assert recipe_of(RecipeRef("tiny-flux", None, "flux", "FluxPipeline", "transformer")) == get_recipe("tiny-flux")


@pytest.mark.slow  # one pipeline run up to its transformer
def test_d02_a_max_size_below_the_probed_sizes_is_refused_in_one_line():
    from aotpack.builder.families import ensure_family

    with pytest.raises(RecipeError) as e:
        derive(str(ensure_family("tiny-sd3")), Options(max_size=32))
    assert e.value.cause == "--max-size 32 is below the smallest size the pipeline was called at (64)"
    assert e.value.hint == "pass --max-size 64 or more"


# ---- a Hub repo id as the source (the tests' Hub-compatible server) ---------------------------------------------

from test_hub import TOKEN, hub, online  # noqa: E402,F401  (fixtures: the server, this process talking to it)


@pytest.mark.slow  # one pipeline run up to its transformer, through the Hub
def test_d07_a_hub_repo_id_is_derived_at_the_commit_its_branch_points_to_and_stays_pinned(hub, online, tmp_path):
    from huggingface_hub import HfApi

    from aotpack.builder.families import ensure_family
    from aotpack.builder.spec import resolve

    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("me/tiny-sd3")
    first = api.upload_folder(repo_id="me/tiny-sd3", folder_path=str(ensure_family("tiny-sd3"))).oid
    r = recipe_for("me/tiny-sd3", None, None, {"revision": "main", "max_size": 192}, "cpu")
    assert r.checkpoint == "me/tiny-sd3" and r.revision == first  # the branch resolved, the commit recorded
    (tmp_path / "note.md").write_text("moved")
    moved = api.upload_file(repo_id="me/tiny-sd3", path_or_fileobj=str(tmp_path / "note.md"),
                            path_in_repo="note.md").oid
    assert moved != first
    spec = resolve(r, "none", out=tmp_path / "out")  # the build reads the commit it derived from, not main
    assert spec.source.kind == "hub" and spec.source.revision == first
    with pytest.raises(RecipeError) as e:
        recipe_for("me/nothing-here", None, None, {}, "cpu")
    assert e.value.cause.startswith("could not read me/nothing-here from the Hub") and "\n" not in str(e.value)


@pytest.mark.slow  # the real command in a fresh process, one family's probe calls
def test_d08_aotpack_recipe_prints_the_derived_recipe_as_toml_and_json(tmp_path, derived):
    import json

    from conftest import run_cli

    from aotpack.builder.families import ensure_family

    folder = str(ensure_family("tiny-flux2-klein"))
    proc = run_cli("recipe", folder, "--max-size", "192")
    assert proc.returncode == 0, proc.stderr[-1500:]
    data = tomllib.loads(proc.stdout)
    assert data["pipeline"] == "Flux2KleinPipeline" and data["checkpoint"] == folder
    assert data == derived("tiny-flux2-klein")  # derive(folder, Options(max_size=192, max_frames=17)), in-process
    (tmp_path / "mine.toml").write_text(proc.stdout)
    assert parse_recipe(tomllib.loads((tmp_path / "mine.toml").read_text()), pinned=False).name == data["name"]
    as_json = run_cli("recipe", folder, "--max-size", "192", "--json")
    assert json.loads(as_json.stdout) == data


def test_d08_aotpack_recipe_refuses_what_is_no_model_source_in_one_line(tmp_path):
    from conftest import run_cli

    proc = run_cli("recipe", str(tmp_path / "nope"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "is neither a diffusers pipeline folder nor a Hub repo id" in proc.stderr
