import pytest

from aotpack.errors import RecipeError
from aotpack.recipe import get_recipe, list_recipes, parse_recipe, recipes_dir


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


def test_unknown_variant():
    with pytest.raises(RecipeError, match="unknown variant 'pro'"):
        get_recipe("flux", "pro")


def test_invalid_recipe_gathers_every_problem():
    import tomllib

    data = tomllib.loads((recipes_dir() / "tiny-flux.toml").read_text())
    data["dtype"] = "float8"
    data["shapes"]["batch"] = [4, 1]
    data["capture"]["height"] = 65
    data["colour"] = "blue"
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, source="broken.toml")
    msg = e.value.cause
    for part in ("dtype must be one of", "shapes.batch", "capture.height=65", "unknown key 'colour'"):
        assert part in msg, part
