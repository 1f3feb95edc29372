import pytest

from aotpack.errors import SchemeError
from aotpack.builder.schemes import SCHEMES, check_scheme, config_to_json, get_scheme, torchao_config, why_not

SEED_NAMES = ["none", "int8wo", "int8dq", "int4wo", "int4dq", "fp8wo", "fp8dq", "fp8dqrow",
              "fp6_e3m2", "fp5_e2m2", "fp4_e2m1", "sparsify"]


def test_every_seed_scheme_is_known():
    assert set(SEED_NAMES) <= set(SCHEMES)


@pytest.mark.parametrize("name", ["int8wo", "int8dq", "int4dq", "fp8wo", "fp8dq", "fp8dqrow", "int4wo", "sparsify"])
def test_configs_round_trip_through_torchao_json(name):
    from torchao.core.config import config_from_dict

    config = torchao_config(get_scheme(name))
    data = config_to_json(config)
    assert data["_type"] == type(config).__name__
    assert config_to_json(config_from_dict(data)) == data


@pytest.mark.parametrize("name", ["none", "int8wo", "int8dq", "fp8wo"])
def test_cpu_schemes_pass_on_cpu(name):
    assert check_scheme(name, "cpu").name == name


@pytest.mark.parametrize("name,needs", [("fp8dq", "sm89"), ("fp8dqrow", "sm89"), ("int4wo", "CUDA"), ("sparsify", "CUDA")])
def test_gpu_schemes_refused_on_cpu_with_an_alternative(name, needs):
    with pytest.raises(SchemeError) as e:
        check_scheme(name, "cpu")
    assert needs in e.value.cause
    assert e.value.hint.startswith("use --quant ")


def test_fp8_needs_ada_or_newer():
    assert why_not(get_scheme("fp8dq"), "cuda", (8, 0)) is not None
    assert why_not(get_scheme("fp8dq"), "cuda", (9, 0)) is None


@pytest.mark.parametrize("name", ["fp6_e3m2", "fp5_e2m2", "fp4_e2m1"])
def test_fpx_is_unavailable_in_torchao_018(name):
    with pytest.raises(SchemeError, match="removed the fpx"):
        check_scheme(name, "cuda", (9, 0))


def test_unknown_scheme():
    with pytest.raises(SchemeError, match="unknown quantization scheme 'int3'"):
        get_scheme("int3")
