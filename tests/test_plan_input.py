"""A ``--plan`` file is input like any other: checked fully when it is read, before any model loads.

No compile here: ``run_build`` (what loads the model) is replaced by a tripwire, so every refusal must come
from reading the plan. The same check (``aotpack.builder.plan.parse_plan``) is what the build farm runs on a
plan before it sends one to a job (tests/test_farm.py).
"""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from aotpack.builder import pipeline
from aotpack.builder.plan import Planner, parse_plan
from aotpack.cli import cli
from aotpack.errors import InputError

GOOD_LAYER = {"scheme": "int8wo", "error": 0.01, "errors": {"none": 0.0, "int8wo": 0.01}}


def plan(**change):
    data = {"version": 2, "device": "cpu", "tokens": 16, "budget": 0.05,
            "timings": {"8x8": {"none": 1e-5, "int8wo": 2e-5}}, "layers": {"x.proj": dict(GOOD_LAYER)},
            "torchao": {}}
    for key, value in change.items():
        if value is KeyError:
            data.pop(key)
        else:
            data[key] = value
    return data


# (what is wrong, the plan's JSON text, what the one line says)
BAD = [
    ("budget a word", plan(budget="lots"), "'budget' must be a number in [0, 1)"),
    ("budget too large", plan(budget=2), "'budget' must be a number"),
    ("budget negative", plan(budget=-0.1), "'budget' must be a number"),
    ("budget a bool", plan(budget=True), "'budget' must be a number"),
    ("budget NaN", json.dumps(plan()).replace('"budget": 0.05', '"budget": NaN'), "'budget' must be a number"),
    ("budget inf", json.dumps(plan()).replace('"budget": 0.05', '"budget": 1e400'), "'budget' must be a number"),
    ("version a bool", plan(version=True), "'version' must be one of 1, 2"),
    ("version unknown", plan(version=3), "'version' must be one of"),
    ("version missing", plan(version=KeyError), "'version' must be one of"),
    ("tokens a float", plan(tokens=1.5), "'tokens' must be a positive integer"),
    ("tokens a bool", plan(tokens=True), "'tokens' must be a positive integer"),
    ("device a number", plan(device=1), "'device' must be a string"),
    ("unknown key", plan(extra=1), "unknown key 'extra'"),
    ("torchao a list", plan(torchao=[]), "'torchao' must be an object"),
    ("timings negative", plan(timings={"8x8": {"int8wo": -1}}), "'timings' must map"),
    ("timings unknown scheme", plan(timings={"8x8": {"int3": 1.0}}), "'timings' must map"),
    ("no layers", plan(layers={}), "no 'layers' table"),
    ("layers a list", plan(layers=["x.proj"]), "no 'layers' table"),
    ("layer not an object", plan(layers={"x.proj": "int8wo"}), "layer 'x.proj' must be an object"),
    ("layer extra key", plan(layers={"x.proj": {**GOOD_LAYER, "why": 1}}), "layer 'x.proj' must be an object"),
    ("layer unknown scheme", plan(layers={"x.proj": {"scheme": "int3"}}), "unknown scheme 'int3'"),
    ("layer scheme a number", plan(layers={"x.proj": {"scheme": 5}}), "unknown scheme 5"),
    ("layer error a word", plan(layers={"x.proj": {**GOOD_LAYER, "error": "small"}}), "'error' must be a finite"),
    ("layer errors NaN", json.dumps(plan()).replace('"int8wo": 0.01}', '"int8wo": NaN}'), "'errors' must map"),
    ("not an object", [1, 2], "it is not a JSON object"),
]


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@pytest.fixture
def no_build(monkeypatch):
    """Loading the model is where a build starts: reaching it fails the test."""
    def tripwire(spec):
        raise AssertionError("the build started: the plan was not refused when it was read")

    monkeypatch.setattr(pipeline, "run_build", tripwire)


def assert_one_line(result, *parts):
    text = result.stderr if hasattr(result, "stderr") else result.output
    assert result.exit_code == 1, (result.exit_code, text)
    assert "Traceback" not in text and "unexpected" not in text, text
    assert len([ln for ln in text.splitlines() if ln.startswith("Error:")]) == 1, text
    for part in parts:
        assert part in text, (part, text)


@pytest.mark.parametrize("what,data,says", BAD, ids=[b[0] for b in BAD])
def test_t26_a_bad_plan_is_one_line_before_the_build_starts(what, data, says, tmp_path, no_build):
    bad = tmp_path / "plan.json"
    bad.write_text(_text(data))
    result = CliRunner().invoke(cli, ["build", "tiny-flux", "--plan", str(bad), "--out", str(tmp_path / "x")])
    assert_one_line(result, "plan file plan.json is not a valid aotpack plan", says)
    assert not (tmp_path / "x").exists()


def test_t26_plan_files_that_are_not_plan_files(tmp_path, no_build):
    """A FIFO (read blindly, it would hang), a /proc file, a file past the size limit: refused unread."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text(json.dumps(plan(torchao={"pad": "x" * (1 << 20)})))
    for path, says in ((fifo, "is not a regular file"), ("/proc/self/environ", "is not what its size says"),
                       (big, "is larger than 1024 KiB"), (tmp_path / "missing.json", "cannot be read")):
        result = CliRunner().invoke(cli, ["build", "tiny-flux", "--plan", str(path), "--out", str(tmp_path / "x")])
        assert_one_line(result, says)


def test_t26_what_the_planner_writes_passes_and_bad_ones_fail_in_the_api():
    import torch

    planner = Planner("cpu", 4, torch.float32, repeats=1)
    planner.choose("blocks.0.proj", torch.nn.Linear(32, 32))
    written = json.loads(json.dumps(planner.plan()))  # as stored in plan.json
    assert parse_plan(json.dumps(written).encode(), "plan.json", "cpu")["layers"]["blocks.0.proj"]["scheme"]
    assert parse_plan(json.dumps({"version": 1, "layers": {"a": {"scheme": "none"}}}).encode(), "p", "cpu")
    for _, data, says in BAD:
        with pytest.raises(InputError, match="not a valid aotpack plan") as e:
            parse_plan(_text(data).encode(), "plan.json", "cpu")
        assert says in e.value.cause and "\n" not in e.value.cause
