"""The typed manifest: JSON round trip, every problem gathered, schema 1 still read, platform checks."""

import copy
import json

import pytest

from aotpack.artifact import manifest as mf
from aotpack.artifact.manifest import InputSpec, Manifest, Relation, TensorSpec
from aotpack.artifact.platform import describe
from aotpack.artifact.schema import encode
from aotpack.errors import IncompatibleArtifactError, InputError, ManifestError

SHA = "a" * 64


def sample() -> dict:
    spec = {"tensors": [{"name": "hidden_states", "shape": ["batch", "image_seq", 16], "dtype": "float32"},
                        {"name": "txt_ids", "shape": [32, 3], "dtype": "float32"}],
            "dynamic": {"batch": [1, 4], "image_seq": [4, 256]}, "relations": []}
    return {
        "schema_version": mf.SCHEMA_VERSION,
        "aotpack_version": "0.2.0",
        "recipe": {"name": "tiny-flux", "variant": None, "family": "flux", "pipeline": "FluxPipeline",
                   "component": "transformer"},
        "model": {"checkpoint": "builtin:tiny-flux", "revision": "seed-0", "source": "builtin",
                  "config": {"in_channels": 16}, "commit": None, "files": {}},
        "scheme": {"name": "int8wo", "torchao_config": {"_type": "Int8WeightOnlyConfig"}},
        "dtype": "float32",
        "request": {"batch": [1, 4], "height": [32, 256], "width": [32, 256], "multiple": 16,
                    "max_sequence_length": 32, "max_steps": 50, "output": "image", "frames": None,
                    "temporal_compression": 1},
        "platform": encode(describe("cpu")),
        "files": {"model.pt2": {"size": 10, "sha256": SHA}, "weights.safetensors": {"size": 20, "sha256": SHA}},
        "modules": [{"name": "transformer", "kind": "component", "code": "model.pt2",
                     "weights": "weights.safetensors", "root": "component", "instances": ["transformer"],
                     "inputs": spec, "scheme": "int8wo", "max_abs_error": 1e-6, "tolerance": 1e-3,
                     "compile_key": None, "compiled": "compiled", "config": None, "block_class": None}],
        "build": {"date": "2026-11-24T00:00:00+00:00", "stages": {"compile": 1.0}, "peak_rss_bytes": 1,
                  "quant_error": None},
        "options": {"fuse_qkv": False, "quantize_text_encoder": None, "quantize_vae": None, "compile_vae": False,
                    "max_autotune": False, "regional": False},
        "lora": None,
        "plan": None,
    }


def v1_sample() -> dict:
    """A schema-1 manifest as aotpack 0.1 wrote it."""
    return {
        "schema_version": 1, "aotpack_version": "0.1.0",
        "recipe": {"name": "tiny-flux", "variant": None, "family": "flux", "pipeline": "FluxPipeline",
                   "component": "transformer"},
        "model": {"checkpoint": "builtin:tiny-flux", "revision": "seed-0", "source": "builtin",
                  "config": {"in_channels": 16}},
        "scheme": {"name": "int8wo", "torchao_config": {"_type": "Int8WeightOnlyConfig"}},
        "dtype": "float32",
        "inputs": {"tensors": [{"name": "hidden_states", "shape": ["batch", "image_seq", 16], "dtype": "float32"}],
                   "dynamic": {"batch": [1, 4], "image_seq": [4, 256]},
                   "image": {"height": [32, 256], "width": [32, 256], "multiple": 16}, "max_sequence_length": 32},
        "platform": encode(describe("cpu")),
        "files": {"model.pt2": {"size": 10, "sha256": SHA}, "weights.safetensors": {"size": 20, "sha256": SHA},
                  "vae_decoder.pt2": {"size": 1, "sha256": SHA}, "vae_decoder.safetensors": {"size": 1, "sha256": SHA}},
        "build": {"date": "2026-11-24T00:00:00+00:00", "stages": {"compile": 1.0}, "peak_rss_bytes": 1,
                  "max_abs_error": 0.0, "quant_abs_error": None, "compile_key": "k" * 64, "compiled": "compiled"},
        "options": {"fuse_qkv": True, "quantize_text_encoder": None, "quantize_vae": None, "compile_vae": True},
        "lora": None,
        "modules": {"vae_decoder": {"component": "vae", "model": "vae_decoder.pt2",
                                    "weights": "vae_decoder.safetensors", "scheme": "none", "config": {},
                                    "inputs": {"tensors": [{"name": "z", "shape": ["batch", 4, 8, 8],
                                                            "dtype": "float32"}], "dynamic": {"batch": [1, 4]}},
                                    "max_abs_error": 0.0}},
        "plan": None,
    }


def test_round_trip():
    m = mf.validate(sample())
    assert isinstance(m, Manifest) and mf.parse(m.dumps()) == m
    assert json.loads(m.dumps()) == sample()


def test_schema_1_is_still_read():
    m = mf.validate(v1_sample())
    assert m.schema_version == 1 and m.options.fuse_qkv and m.options.compile_vae
    assert [x.name for x in m.modules] == ["transformer", "vae_decoder"]
    assert m.module("vae_decoder").weights == "vae_decoder.safetensors" and m.component.compile_key == "k" * 64
    assert m.request.max_sequence_length == 32 and m.component.key("transformer", "component.a") == "component.a"


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
    assert "build.peak_rss_bytes" in e.value.cause


def test_bad_sha_is_refused():
    data = sample()
    data["files"]["model.pt2"]["sha256"] = "xyz"
    with pytest.raises(ManifestError, match=r"files\['model.pt2'\] must be"):
        mf.validate(data)


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


def test_t11_field_errors_are_manifest_errors_before_anything_runs():
    data = sample()
    data["dtype"] = 7
    data["modules"][0]["code"] = "other.pt2"
    data["modules"][0]["inputs"]["tensors"][0]["shape"] = ["batch", "nonsense", 16]
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    assert "field 'dtype' must be str" in e.value.cause
    data = sample()
    data["modules"][0]["code"] = "other.pt2"
    data["modules"][0]["inputs"]["tensors"][0]["shape"] = ["batch", "nonsense", 16]
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    assert "'other.pt2', which files does not list" in e.value.cause and "dynamic dims" in e.value.cause


def test_t11_deep_nesting_and_huge_manifests_are_manifest_errors():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ManifestError, match="nested too deeply|not valid JSON"):
        mf.parse(deep)
    with pytest.raises(ManifestError, match="more than any aotpack manifest"):
        mf.parse(b" " * (mf.MAX_MANIFEST_BYTES + 1))
    data = sample()
    data["model"]["config"] = {"a": json.loads("[" * 500 + "]" * 500)}
    assert mf.validate(data)  # free-form config may nest; the parser's own limit guards it


def test_t11_non_finite_numbers_are_refused():
    text = json.dumps(sample()).replace('"max_abs_error": 1e-06', '"max_abs_error": NaN')
    with pytest.raises(ManifestError, match="max_abs_error"):
        mf.parse(text)


def test_t13_field_names_with_control_characters_stay_on_one_line():
    data = sample()
    data["recipe"]["evil\nError: fake line\x1b[2K"] = 1
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    assert "\n" not in e.value.cause and "\x1b" not in e.value.cause


def test_same_platform_is_compatible():
    mf.check_compatible(mf.validate(sample()), describe("cpu"))


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
        mf.check_compatible(mf.validate(data), describe("cpu"))
    assert expect in e.value.cause and "rebuild" in e.value.hint


def test_cpu_isa_is_checked_against_the_cpu_flags_without_probing():
    from dataclasses import replace

    here = replace(describe("cpu", probe_isa=False), arch="x86_64")
    data = sample()
    data["platform"].update(arch="x86_64", isa="amx_tile")
    with pytest.raises(IncompatibleArtifactError) as e:
        mf.check_compatible(mf.validate(data), replace(here, cpu_flags=("avx2", "fma", "f16c", "avx512f")))
    assert ("built for CPU ISA amx_tile, this CPU lacks amx_bf16, amx_int8, amx_tile, avx512_vnni, avx512bw"
            in e.value.cause)
    data["platform"]["isa"] = "avx2"
    mf.check_compatible(mf.validate(data), replace(here, cpu_flags=("avx2", "fma", "f16c")))


def test_gpu_capability_mismatch():
    data = sample()
    data["platform"].update(device="cuda", cuda_capability="9.0", isa=None)
    here = mf.validate(copy.deepcopy(data)).platform
    from dataclasses import replace

    with pytest.raises(IncompatibleArtifactError, match="sm9.0, this GPU is sm8.0"):
        mf.check_compatible(mf.validate(data), replace(here, cuda_capability="8.0"))


def test_dumps_is_stable_json():
    text = mf.validate(sample()).dumps()
    assert json.loads(text)["schema_version"] == mf.SCHEMA_VERSION


# ---- InputSpec: the one description of a compiled module's inputs ----------------------------------------------

def _spec():
    return InputSpec(tensors=(TensorSpec("x", ("batch", "rows", 3), "float32"), TensorSpec("ids", ("rows",), "int64"),
                              TensorSpec("rot", ("seq",), "float32")),
                     dynamic={"batch": (1, 4), "rows": (2, 12, 2), "seq": (2, 40)},
                     relations=(Relation("seq", ("batch", "rows"), "sum"),))


def test_input_spec_axes_and_sizes():
    spec = _spec()
    assert spec.axes() == {"batch": {"x": 0}, "rows": {"x": 1, "ids": 0}, "seq": {"rot": 0}}
    assert spec.sizes(lambda name, rng: rng[0]) == {"batch": 1, "rows": 2, "seq": 3}


def test_input_spec_check_names_the_first_problem():
    import torch

    spec = _spec()
    good = {"x": torch.zeros(2, 4, 3), "ids": torch.zeros(4, dtype=torch.int64), "rot": torch.zeros(6)}
    spec.check(good, "cpu")
    cases = [
        ({**good, "x": torch.zeros(5, 4, 3)}, "outside the artifact's range [1, 4]"),
        ({**good, "x": torch.zeros(2, 5, 3)}, "not a multiple of 2"),
        ({**good, "ids": torch.zeros(6, dtype=torch.int64)}, "another input has 4"),
        ({**good, "rot": torch.zeros(7)}, "seq is 7 but batch + rows is 6"),
        ({**good, "ids": torch.zeros(4)}, "dtype float32, the artifact expects int64"),
        ({k: v for k, v in good.items() if k != "rot"}, "missing input(s): rot"),
        ({**good, "other": torch.zeros(1)}, "unexpected input(s): other"),
        ({**good, "x": torch.zeros(2, 4, 4)}, "dim 2 is 4, the artifact was exported with 3"),
    ]
    for inputs, expect in cases:
        with pytest.raises(InputError) as e:
            spec.check(inputs, "cpu")
        assert expect in e.value.cause, (expect, e.value.cause)


@pytest.mark.parametrize("change,expect", [
    (lambda d: d.update(dtype="float33"), "dtype must be float32, bfloat16 or float16"),
    (lambda d: d["request"].update(multiple=0), "request.multiple must be >= 1"),
    (lambda d: d["request"].update(height=[256, 32]), "request.height must be [min, max]"),
    (lambda d: d["request"].update(output="video"), "request.output must be"),
    (lambda d: d["modules"].append(dict(d["modules"][0])), "modules must have distinct names"),
    (lambda d: d["modules"][0].update(code="weights.safetensors"), "must name a .pt2 and a .safetensors"),
    (lambda d: d["options"].update(regional=True), "as options.regional says"),
    (lambda d: d["modules"][0]["inputs"]["tensors"][0].update(dtype="load"), "not a tensor dtype"),
    (lambda d: d["modules"][0].update(kind="block"), "as a block, its class"),
])
def test_t11_values_that_would_fail_after_native_code_are_refused_before(change, expect):
    data = sample()
    change(data)
    with pytest.raises(ManifestError) as e:
        mf.validate(data)
    assert expect in e.value.cause

def test_g02_baked_constants_round_trip_and_stay_out_of_manifests_without_any():
    data = sample()
    assert "constants" not in mf.validate(data).dumps()  # an artifact without any: its JSON as before
    data["modules"][0]["inputs"]["constants"] = {"img_shapes": [[[1, 4, 4]]], "mask": None, "scale": 0.5}
    m = mf.validate(data)
    assert m.modules[0].inputs.constants["img_shapes"] == [[[1, 4, 4]]]
    assert mf.validate(json.loads(m.dumps())) == m
    bad = copy.deepcopy(data)
    bad["modules"][0]["inputs"]["constants"] = {"hidden_states": 1, "x": {"a": 1}}  # names a tensor; not plain
    with pytest.raises(ManifestError) as e:
        mf.validate(bad)
    assert "'hidden_states'" in str(e.value) and "'x'" in str(e.value)
