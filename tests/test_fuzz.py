"""Property tests: thousands of mutated manifests and input shapes, and no outcome but success or an
aotpack error. Bounded: a fixed number of examples, no deadline per example."""

from __future__ import annotations

import copy
import json

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from aotpack.artifact import manifest as mf
from aotpack.errors import AotpackError, InputError, ManifestError

from test_manifest import sample

SETTINGS = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


PATHS = [p for p in _paths(sample()) if p]


@st.composite
def mutated_manifests(draw):
    data = copy.deepcopy(sample())
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                parent[path[-1]] = draw(json_values)
            elif action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, dict):
                parent[draw(st.text(max_size=8))] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # an earlier mutation removed this path
    return data


@SETTINGS
@given(mutated_manifests())
def test_mutated_manifests_parse_or_raise_manifest_error(data):
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        return
    try:
        parsed = mf.parse(text)
    except ManifestError as e:
        assert e.cause and "\n" not in e.cause
        return
    # Anything accepted must be usable by the loader's checks without crashing.
    try:
        mf.check_compatible(parsed, parsed.platform)
    except AotpackError:
        pass


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_parser(blob):
    try:
        mf.parse(blob)
    except ManifestError:
        pass


def _spec():
    return mf.validate(sample()).component.inputs


dims = st.integers(0, 300)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


@st.composite
def inputs(draw):
    out = {}
    for name in draw(st.sets(st.sampled_from(["hidden_states", "txt_ids", "img_ids", "other"]), max_size=4)):
        shape = draw(st.lists(dims, min_size=0, max_size=4))
        out[name] = torch.empty((), dtype=draw(st.sampled_from(DTYPES))).expand(shape)  # no memory
    if draw(st.booleans()):
        out["hidden_states"] = draw(st.sampled_from([None, 3, "x", [1, 2]]))
    return out


SPEC = _spec()


@SETTINGS
@given(inputs())
def test_shape_checker_accepts_or_raises_input_error(x):
    try:
        SPEC.check(x, "cpu")
    except InputError as e:
        assert e.cause and "\n" not in e.cause
        return
    # Accepted: then every dynamic size is inside its range and static sizes match.
    hs = x["hidden_states"]
    assert 1 <= hs.shape[0] <= 4 and 4 <= hs.shape[1] <= 256 and hs.shape[2] == 16
    assert tuple(x["txt_ids"].shape) == (32, 3)
