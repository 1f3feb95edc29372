import copy
import json

import pytest

from aotpack.artifact import manifest as mf
from aotpack.errors import IncompatibleArtifactError, ManifestError
from aotpack.artifact.platform import describe


def sample() -> dict:
    return {
        "schema_version": mf.SCHEMA_VERSION,
        "aotpack_version": "0.1.0",
        "recipe": {"name": "tiny-flux", "variant": None, "family": "flux", "pipeline": "FluxPipeline",
                   "component": "transformer"},
        "model": {"checkpoint": "builtin:tiny-flux", "revision": "seed-0", "source": "builtin",
                  "config": {"in_channels": 16}},
        "scheme": {"name": "int8wo", "torchao_config": {"_type": "Int8WeightOnlyConfig"}},
        "dtype": "float32",
        "inputs": {
            "tensors": [{"name": "hidden_states", "shape": ["batch", "image_seq", 16], "dtype": "float32"},
                        {"name": "txt_ids", "shape": [32, 3], "dtype": "float32"}],
            "dynamic": {"batch": [1, 4], "image_seq": [4, 256]},
            "image": {"height": [32, 256], "width": [32, 256], "multiple": 16},
            "max_sequence_length": 32,
        },
        "platform": dict(describe("cpu")),
        "files": {"model.pt2": {"size": 3, "sha256": "a" * 64}, "weights.safetensors": {"size": 4, "sha256": "b" * 64}},
        "build": {"date": "2026-11-24T00:00:00+00:00", "stages": {"compile": 1.0}, "peak_rss_bytes": 1,
                  "max_abs_error": 0.0, "quant_abs_error": 0.0},
    }


def test_round_trip():
    data = sample()
    assert mf.parse(mf.dumps(data)) == data


def test_not_json():
    with pytest.raises(ManifestError, match="not valid JSON"):
        mf.parse("{nope")


def test_not_an_object():
    with pytest.raises(ManifestError, match="JSON object"):
        mf.parse("[1, 2]")


def test_missing_and_unknown_fields_are_all_reported():
    data = sample()
    del data["dtype"]
    del data["platform"]["torch"]
    data["extra"] = 1
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    for part in ("missing field 'dtype'", "missing field 'platform.torch'", "unknown field 'extra'"):
        assert part in e.value.cause


def test_wrong_types():
    data = sample()
    data["build"]["peak_rss_bytes"] = True
    data["files"]["model.pt2"]["sha256"] = "xyz"
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    assert "build.peak_rss_bytes" in e.value.cause and "files['model.pt2']" in e.value.cause


def test_newer_schema_asks_for_an_upgrade():
    data = sample()
    data["schema_version"] = mf.SCHEMA_VERSION + 1
    data["aotpack_version"] = "9.0.0"
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    assert "newer aotpack (9.0.0)" in e.value.cause and "pip install -U aotpack" in e.value.hint


def test_older_schema():
    data = sample()
    data["schema_version"] = 0
    with pytest.raises(ManifestError, match="schema 0 is not supported"):
        mf.validate(data)


@pytest.mark.parametrize("name", ["../evil.so", "/etc/passwd", ".hidden", "a/b", "..", ""])
def test_file_names_cannot_escape(name):
    data = sample()
    data["files"][name] = {"size": 1, "sha256": "c" * 64}
    with pytest.raises(ManifestError, match="not a plain file name"):
        mf.validate(data)


def test_same_platform_is_compatible():
    mf.check_compatible(sample(), describe("cpu"))


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("torch", "2.99.0", "built with torch 2.99.0"),
        ("device", "cuda", "built for device cuda"),
        ("arch", "aarch64", "built for aarch64"),
        ("isa", "amx_tile_9000", "built for CPU ISA amx_tile_9000"),
    ],
)
def test_platform_mismatch_is_refused(field, value, expect):
    data = sample()
    data["platform"][field] = value
    with pytest.raises(IncompatibleArtifactError) as e:
        mf.check_compatible(data, describe("cpu"))
    assert expect in e.value.cause and "rebuild" in e.value.hint


def test_cpu_isa_is_checked_against_the_cpu_flags_without_probing():
    from aotpack.artifact.platform import describe as here_now

    here = dict(here_now("cpu", probe_isa=False)) | {"arch": "x86_64"}
    data = sample()
    data["platform"].update(arch="x86_64", isa="amx_tile")
    with pytest.raises(IncompatibleArtifactError) as e:
        mf.check_compatible(data, here | {"cpu_flags": ["avx2", "fma", "f16c", "avx512f"]})
    assert ("built for CPU ISA amx_tile, this CPU lacks amx_bf16, amx_int8, amx_tile, avx512_vnni, avx512bw"
            in e.value.cause)
    data["platform"]["isa"] = "avx2"
    mf.check_compatible(data, here | {"cpu_flags": ["avx2", "fma", "f16c"]})


def test_gpu_capability_mismatch():
    built = copy.deepcopy(sample()["platform"]) | {"device": "cuda", "cuda_capability": "9.0", "isa": None}
    here = dict(built) | {"cuda_capability": "8.0"}
    data = sample() | {"platform": built}
    with pytest.raises(IncompatibleArtifactError, match="sm9.0, this GPU is sm8.0"):
        mf.check_compatible(data, here)


def test_dumps_is_stable_json():
    text = mf.dumps(sample())
    assert json.loads(text)["schema_version"] == mf.SCHEMA_VERSION
