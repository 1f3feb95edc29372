import pytest

from aotpack.artifact.manifest import Relation
from aotpack.errors import RecipeError
from aotpack.builder.recipe import get_recipe, list_recipes, parse_recipe, recipes_dir


def test_shipped_recipes_all_load():
    names = list_recipes()
    assert {"flux", "tiny-flux"} <= set(names)
    for name in names:
        r = get_recipe(name)
        assert r.batch[0] <= r.capture["batch"] <= r.batch[1]
        lo, hi = r.image_seq_range()
        assert 0 < lo <= hi
        for variant in r.variants:
            assert get_recipe(name, variant).variant == variant


def test_flux_recipe_names_the_real_checkpoints():
    assert get_recipe("flux").checkpoint == "black-forest-labs/FLUX.1-dev"
    schnell = get_recipe("flux", "schnell")
    assert schnell.checkpoint == "black-forest-labs/FLUX.1-schnell"
    assert schnell.run["steps"] == 4


def test_tiny_flux_is_builtin_and_float32():
    r = get_recipe("tiny-flux")
    assert r.builtin == "tiny-flux" and r.dtype == "float32"
    assert r.image_seq_range() == (4, 256)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(RecipeError) as e:
        get_recipe("flux2")
    assert "unknown recipe 'flux2'" in e.value.cause
    assert "tiny-flux" in e.value.hint


def test_unknown_variant_names_the_variants_not_the_file():
    with pytest.raises(RecipeError, match="recipe flux has no variant 'pro'") as e:
        get_recipe("flux", "pro")
    assert e.value.hint == "choose one of: schnell"
    with pytest.raises(RecipeError, match="recipe tiny-flux has no variant 'schnell'") as e:
        get_recipe("tiny-flux", "schnell")
    assert "leave --variant out" in e.value.hint and "recipe file" not in e.value.hint


def test_invalid_recipe_gathers_every_problem():
    import tomllib

    data = tomllib.loads((recipes_dir() / "tiny-flux.toml").read_text())
    data["dtype"] = "float8"
    data["shapes"]["batch"] = [4, 1]
    data["capture"]["height"] = 65
    data["colour"] = "blue"
    data["freeze"] = "yes"
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, source="broken.toml")
    msg = e.value.cause
    for part in ("dtype must be one of", "shapes.batch", "capture.height=65", "unknown key 'colour'",
                 "freeze must be true or false"):
        assert part in msg, part


def test_video_recipes_and_their_dims():
    tiny = get_recipe("tiny-cogvideox")
    assert tiny.is_video and tiny.frames == (5, 17)
    assert tiny.dim_range("latent_frames") == [2, 5]
    assert tiny.dim_range("latent_height") == [4, 16, 2]  # latent rows, in steps of the patch size
    assert tiny.dim_range("video_seq") == [2 * 2 * 2, 5 * 8 * 8]
    assert tiny.relations()[0] == Relation("video_seq", ("latent_frames", "latent_height", "latent_width"), "product", 4)
    kwargs = tiny.pipeline_kwargs(height=64, width=64, steps=2, guidance_scale=6.0, batch=1, frames=9)
    assert kwargs["num_videos_per_prompt"] == 1 and kwargs["num_frames"] == 9
    two_b = get_recipe("cogvideox")
    assert two_b.checkpoint == "THUDM/CogVideoX-2b" and set(two_b.dynamic) == {"batch"}
    five_b = get_recipe("cogvideox", "5b")
    assert five_b.checkpoint == "THUDM/CogVideoX-5b" and five_b.dtype == "bfloat16"
    assert "video_seq" in five_b.dynamic and five_b.height == (320, 768)


def test_video_dims_need_a_video_recipe():
    import tomllib

    data = tomllib.loads((recipes_dir() / "tiny-flux.toml").read_text())
    data["inputs"]["latent_frames"] = {"hidden_states": 1}
    data["inputs"]["colour"] = {"hidden_states": 1}
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, source="broken.toml")
    assert "inputs.latent_frames needs output = 'video'" in e.value.cause
    assert "inputs.colour: unknown dim" in e.value.cause


def test_t10_hub_checkpoints_are_pinned_by_commit():
    import re
    import tomllib

    for name in list_recipes():
        for variant in (None, *get_recipe(name).variants):
            r = get_recipe(name, variant)
            if not r.builtin:
                assert re.fullmatch(r"[0-9a-f]{40}", r.revision), (name, variant, r.revision)
    data = tomllib.loads((recipes_dir() / "flux.toml").read_text())
    data["revision"] = "main"
    with pytest.raises(RecipeError, match="revision must be a 40-hex commit"):
        parse_recipe(data, source="flux.toml")


def test_t09_every_recipe_bounds_the_steps_a_request_may_ask():
    for name in list_recipes():
        r = get_recipe(name)
        assert 0 < r.run["steps"] <= r.run["max_steps"] == r.request().max_steps


def test_deep_recipes_build_regionally_by_default_and_the_tiny_ones_whole():
    # Regional pays off with depth (flux-depth: 35.9 s vs 235.2 s); at 1 + 1 blocks it gains nothing and its
    # per-block Python calls dominate a tiny model's forward, so the test and bench recipes stay whole-graph.
    assert {n for n in list_recipes() if get_recipe(n).regional} == {"flux", "flux-depth", "cogvideox"}


def test_recipes_listing_piped_into_head_is_not_an_error():
    import subprocess
    import sys

    p = subprocess.run(f"'{sys.executable}' -m aotpack.cli recipes | head -1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert "Error" not in p.stderr, p.stderr
    assert p.stdout.count("\n") == 1
