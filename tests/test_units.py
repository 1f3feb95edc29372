"""Unit tests of the pure functions the stages are made of (no compile, no pipeline)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from aotpack.artifact.platform import Platform, describe, isa_from_flags, mismatches, tag
from aotpack.builder.capture import flatten_inputs, spread_tuples, unflatten_inputs
from aotpack.builder.weights import CheckpointReader, Lora
from aotpack.errors import BuildError, InputError, one_line
from aotpack.paths import seal, unseal


def _platform(**changes) -> Platform:
    base = Platform(device="cpu", arch="x86_64", isa="avx2", cpu_flags=("avx2", "fma", "f16c"), cuda_capability=None,
                    gpu_name=None, torch="2.13.0+cpu", torchao="0.18.0", diffusers="0.42.1", python="3.11.7")
    return replace(base, **changes)


def test_isa_from_flags_picks_the_most_capable_isa_the_flags_allow():
    assert isa_from_flags(("avx2", "fma", "f16c")) == "avx2"
    avx512 = ("avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512vl", "avx512bw")
    assert isa_from_flags(avx512) == "avx512"
    assert isa_from_flags(avx512 + ("avx512_vnni",)) == "avx512_vnni"
    assert isa_from_flags(avx512 + ("avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")) == "amx_tile"
    assert isa_from_flags(("avx2",)) is None  # avx2 code needs fma and f16c too
    assert isa_from_flags(()) is None


def test_mismatches_names_every_reason():
    built = _platform(isa="avx512", torch="2.11.0")
    assert mismatches(built, _platform()) == ["built with torch 2.11.0, this machine has torch 2.13.0+cpu",
                                              "built for CPU ISA avx512, this CPU lacks avx512bw, avx512dq, "
                                              "avx512f, avx512vl"]
    assert mismatches(_platform(), _platform(torch="2.13.0+cu130")) == []  # the local build tag does not matter
    assert mismatches(_platform(device="cuda", cuda_capability="9.0"), _platform())[0].startswith("built for device")
    gpu = _platform(device="cuda", cuda_capability="9.0", isa=None)
    assert mismatches(gpu, replace(gpu, cuda_capability="8.9")) == ["built for GPU capability sm9.0, this GPU is sm8.9"]
    assert mismatches({**vars(_platform())}, _platform()) == []  # the JSON form (Hub index) works too


def test_tag_names_the_platform():
    assert tag(_platform()) == "cpu-x86_64-avx2"
    assert tag(_platform(device="cuda", cuda_capability="12.0")) == "cuda-sm120"
    assert tag(describe("cpu", probe_isa=False)).startswith("cpu-")


def test_spread_and_unflatten_are_inverse():
    a, b = torch.zeros(2), torch.ones(3)
    kwargs = {"x": a, "rot": (a, b), "n": 3, "none": None}
    spread = spread_tuples(kwargs)
    assert list(spread) == ["x", "rot.0", "rot.1", "n", "none"]
    flat = flatten_inputs(kwargs)
    assert list(flat) == ["x", "rot.0", "rot.1"]
    back = unflatten_inputs(flat)
    assert back["rot"][0] is not None and torch.equal(back["rot"][1], b) and torch.equal(back["x"], a)
    assert unflatten_inputs({"a.b": a}) == {"a.b": a}  # a dot without an index is a plain name


def test_lora_apply_adds_scaled_low_rank_delta():
    a = torch.tensor([[1.0, 0.0]])           # rank 1, in 2
    b = torch.tensor([[2.0], [3.0]])          # out 2
    lora = Lora(path="x.safetensors", sha256="0" * 64, scale=0.5, deltas={"m.weight": (a, b, 2.0)})
    w = torch.zeros(2, 2)
    assert torch.equal(lora.apply("m.weight", w), torch.tensor([[2.0, 0.0], [3.0, 0.0]]))
    assert lora.apply("other.weight", w) is w
    assert lora.modules() == {"m"}
    with pytest.raises(InputError, match="trained for another model"):
        lora.apply("m.weight", torch.zeros(3, 3))
    assert lora.apply("m.weight", w.bfloat16()).dtype == torch.bfloat16


def test_checkpoint_reader_reads_each_tensor_and_refuses_bad_files(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int8),
               "e": torch.zeros(0)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    with CheckpointReader(tmp_path) as reader:
        assert "a" in reader and "z" not in reader
        for k, v in tensors.items():
            assert torch.equal(reader.get(k), v) and reader.get(k).dtype == v.dtype
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(BuildError, match="broken safetensors header"):
        CheckpointReader(tmp_path)
    (tmp_path / "w.safetensors").unlink()
    (tmp_path / "w.bin").write_bytes(b"pickle")
    with pytest.raises(BuildError, match=r"holds no safetensors weights \(only pickled w.bin\)"):
        CheckpointReader(tmp_path)


def test_planner_chooses_the_fastest_scheme_within_the_budget():
    from aotpack.builder.plan import Planner

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 64)
    strict = Planner("cpu", tokens=16, dtype=torch.float32, budget=0.0, repeats=1)
    assert strict.choose("l", linear) == "none"  # only the unquantized layer has no error
    loose = Planner("cpu", tokens=16, dtype=torch.float32, budget=0.99, repeats=1)
    choice = loose.choose("l", linear)
    entry = loose.plan()["layers"]["l"]
    assert entry["scheme"] == choice and entry["error"] <= 0.99
    timings = loose.timings["64x64"]
    fitting = [s for s, e in entry["errors"].items() if e <= 0.99]
    assert timings[choice] == min(timings[s] for s in fitting)
    plan = loose.plan()
    assert plan["torchao"]["_type"] == "FqnToConfig" and "l" in plan["torchao"]["_data"]["fqn_to_config"]


def test_sealed_records_refuse_forgery_and_other_kinds():
    text = seal("pins", {"a": 1})
    assert unseal("pins", text) == {"a": 1}
    assert unseal("verified", text) is None
    forged = json.loads(text)
    forged["payload"] = {"a": 2}
    assert unseal("pins", json.dumps(forged)) is None
    for junk in ("", "[]", "{", '{"kind": "pins"}', "[" * 10000):
        assert unseal("pins", junk) is None


def test_one_line_escapes_what_could_fake_a_line():
    assert one_line("a\nb\x1b[2K\tc") == "a\\nb\\x1b[2K\\tc"
    assert len(one_line("x" * 1000, 50)) == 50


def test_an_interrupt_the_compiler_turns_into_another_error_is_still_an_interrupt():
    import os
    import signal

    import logging

    from aotpack.stages import interrupts

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.seen = []

        def emit(self, record):
            self.seen.append(record.getMessage())

    keep, torch_log = Keep(), logging.getLogger("torch")
    torch_log.addHandler(keep)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts():
                torch_log.error("before")
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(10**6):  # the signal lands here
                        pass
                finally:
                    # what torch does on the way out: log the error it was turned into, with its traceback
                    logging.getLogger("torch._subclasses.fake_tensor").error("fake tensor raised TypeError")
                    raise UnboundLocalError("cannot access local variable 'old_apply_views'")
        torch_log.error("after")
    finally:
        torch_log.removeHandler(keep)
    assert keep.seen == ["before", "after"]  # the aftermath of a Ctrl-C is not shown; the rest is
    with pytest.raises(ValueError):  # without a Ctrl-C, an error stays what it is
        with interrupts():
            raise ValueError("plain")
