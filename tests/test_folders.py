"""Folders and names aotpack makes: a build removes only the temporary folders it can prove are its own (t34),
and every choice that changes an artifact is in its folder and Hub build name (h18). No compile here."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aotpack import hub as aothub
from aotpack.artifact import files as artifact
from aotpack.builder.spec import default_out
from aotpack.artifact import manifest as mf
from aotpack.errors import OutputExistsError

from test_hub import builds_in, hub, online  # noqa: F401  (fixtures)
from test_manifest import sample

# A child build that dies midway (os._exit: no clean-up runs), as a killed build would. With "old", it dies
# while replacing an earlier artifact: after moving that one aside, before deleting it.
_KILLED = """
import os, shutil, sys
from pathlib import Path
from aotpack.artifact import files as artifact
final, stage = Path(sys.argv[1]), sys.argv[2]
if stage == "old":
    artifact.shutil.rmtree = lambda *a, **k: os._exit(0)
with artifact.atomic_folder(final, overwrite=True) as tmp:
    (tmp / "manifest.json").write_text(sys.argv[3])
    if stage == "partial":
        os._exit(0)
    if stage == "wait":
        print("ready", flush=True)
        sys.stdin.readline()
        os._exit(0)
"""


def _child(final: Path, stage: str, **kwargs):
    return subprocess.Popen([sys.executable, "-c", _KILLED, str(final), stage, json.dumps(sample())], **kwargs)


def _killed(final: Path, stage: str) -> set[str]:
    """Run a build of ``final`` that dies at ``stage``; the names it left beside ``final``."""
    before = set(os.listdir(final.parent))
    assert _child(final, stage).wait(60) == 0
    return set(os.listdir(final.parent)) - before


def _planted(parent: Path) -> dict[Path, bytes]:
    """Files that look like leftovers of a build of 'a' (or of '*') but that aotpack did not make."""
    forged = json.dumps({"kind": "temporary-folder", "payload": {"folder": ".a.partial-999999998-f", "final": "a",
                                                                 "kind": "partial", "pid": 999999998},
                         "mac": "0" * 64})
    files = {
        parent / ".precious.old-photos" / "family.jpg": b"\xff\xd8 a photo",
        parent / ".other.partial-999999-x" / "state": b"another tool's",
        parent / ".a.old-x" / "keep": b"no mark",                          # older aotpack's, or a user's
        parent / ".a.partial-999999999-abc" / "keep": b"dead pid, no mark",
        parent / ".a.partial-999999998-f" / artifact.MARK: forged.encode(),  # a mark without the key
        parent / ".a.partial-١٢-x" / "keep": b"unicode digits",
        parent / ".a.partial-99999999999999999999999-x" / "keep": b"no pid",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_t34_a_build_leaves_every_lookalike_alone(tmp_path, caplog):
    files = _planted(tmp_path)
    with caplog.at_level(logging.WARNING, logger="aotpack"):
        with artifact.atomic_folder(tmp_path / "a") as tmp:
            (tmp / "manifest.json").write_bytes(b"{}")
    assert all(p.read_bytes() == data for p, data in files.items())
    assert os.listdir(tmp_path / "a") == ["manifest.json"]  # the mark stays outside the artifact
    assert "left " in caplog.text and ".a.old-x" in caplog.text and "precious" not in caplog.text


def test_t34_a_glob_out_is_refused_and_deletes_nothing(tmp_path):
    files = _planted(tmp_path)
    for name in ("*", "a?", "[ab]"):
        with pytest.raises(OutputExistsError, match="glob character"):
            with artifact.atomic_folder(tmp_path / name) as tmp:
                (tmp / "manifest.json").write_bytes(b"{}")
    assert all(p.read_bytes() == data for p, data in files.items())
    assert not any(n in os.listdir(tmp_path) for n in ("*", "a?", "[ab]"))


def test_t34_killed_builds_are_still_swept(tmp_path):
    final = tmp_path / "a"
    partial = _killed(final, "partial")
    assert len(partial) == 1 and next(iter(partial)).startswith(".a.partial-")
    with artifact.atomic_folder(final) as tmp:
        (tmp / "manifest.json").write_text(json.dumps(sample()))  # an artifact: --overwrite may replace it
    old = _killed(final, "old")  # replacing the artifact just made: the earlier one moved aside, not deleted
    assert {n.split("-")[0] for n in old} == {".a.old", ".a.partial"} and final.is_dir()
    planted = _planted(tmp_path)
    with artifact.atomic_folder(final, overwrite=True) as tmp:
        (tmp / "manifest.json").write_bytes(b"{}")
    left = set(os.listdir(tmp_path))
    assert not (partial | old) & left, "a killed build's own folders are removed"
    assert all(p.read_bytes() == data for p, data in planted.items())


def test_t34_a_live_builds_folder_is_left_alone(tmp_path):
    final = tmp_path / "a"
    child = _child(final, "wait", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (theirs,) = [n for n in os.listdir(tmp_path) if n.startswith(".a.partial-")]
        with artifact.atomic_folder(tmp_path / "a") as tmp:
            (tmp / "manifest.json").write_bytes(b"{}")
        assert (tmp_path / theirs / "build" / "manifest.json").is_file()
    finally:
        child.stdin.close()
        child.wait(60)


def test_t34_build_with_a_glob_out_refuses_in_one_line_before_any_work(tmp_path):
    """What `aotpack build tiny-flux --out 'work/m6/*'` runs: refused by the checks that come before the model."""
    import aotpack

    files = _planted(tmp_path)
    with pytest.raises(OutputExistsError, match="glob character") as e:
        aotpack.build("tiny-flux", "int8wo", out=tmp_path / "*")
    assert "\n" not in e.value.cause and "--out" in e.value.hint
    assert all(p.read_bytes() == data for p, data in files.items())
    assert "*" not in os.listdir(tmp_path)


# ---- names (h18) ------------------------------------------------------------------------------------------------

def _with(**changes) -> dict:
    data = sample()
    data.update(changes)
    return data


def _lora(sha: str, scale: float = 1.0) -> dict:
    return {"file": "style.safetensors", "sha256": sha, "scale": scale, "modules": 4}


def test_h18_hub_build_names_carry_dtype_lora_and_variant():
    plain = aothub.build_name(sample())
    assert plain == "int8wo-" + plain.split("-", 1)[1] and "fp32" not in plain  # tiny-flux's own dtype: unnamed
    names = [plain, aothub.build_name(_with(dtype="bfloat16")), aothub.build_name(_with(dtype="float16")),
             aothub.build_name(_with(lora=_lora("1a2b3c4d" + "0" * 56))),
             aothub.build_name(_with(lora=_lora("5e6f7a8b" + "0" * 56))),
             aothub.build_name(_with(lora=_lora("5e6f7a8b" + "0" * 56, 0.5))),
             aothub.build_name(_with(dtype="bfloat16", lora=_lora("1a2b3c4d" + "0" * 56)))]
    assert len(set(names)) == len(names), names
    assert names[1].startswith("int8wo-bf16-") and names[3].startswith("int8wo-lora_1a2b3c4d-")
    assert names[5].startswith("int8wo-lora_5e6f7a8b_x0.5-")
    assert all(mf.is_safe_name(n) for n in names)
    schnell = _with(recipe={**sample()["recipe"], "name": "flux", "variant": "schnell"}, dtype="bfloat16")
    assert aothub.build_name(schnell).startswith("int8wo-schnell-")  # flux's own dtype is bfloat16: unnamed
    assert "fp32" in aothub.build_name({**schnell, "dtype": "float32"})
    unknown = _with(recipe={**sample()["recipe"], "name": "not-shipped-here"})
    assert "-fp32-" in aothub.build_name(unknown)  # no recipe to say what its default is: always named


def test_h18_name_of_keeps_its_positional_form():
    """aotpack.farm plans names before the build as name_of(scheme, options, False, platform)."""
    assert aothub.name_of("int8wo", {"fuse_qkv": True}, False, "cuda-sm90") == "int8wo-qkv-cuda-sm90"
    assert aothub.name_of("none", {"regional": True}, True, "cpu-x86_64-avx2") == "none-regional-lora-cpu-x86_64-avx2"
    assert aothub.name_of("int8wo", {}, False, "cuda-sm90", dtype="bfloat16", default_dtype="bfloat16") \
        == "int8wo-cuda-sm90"
    assert aothub.name_of("int8wo", {}, True, "cuda-sm90", lora_sha256="ab" * 32, lora_scale=2) \
        == "int8wo-lora_abababab_x2-cuda-sm90"


def test_h18_default_folders_differ_by_dtype_options_and_lora(tmp_path):
    from aotpack.artifact.manifest import Options
    from aotpack.builder.spec import LoraRequest

    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    one.write_bytes(b"lora one")
    two.write_bytes(b"lora two")
    base = dict(recipe_name="tiny-flux", quant="int8wo", platform_tag="cpu-x86_64-avx2", artifacts_dir="artifacts")
    plain = default_out(**base, options=Options(), dtype="float32", default_dtype="float32")
    assert plain == default_out(**base) == Path("artifacts/tiny-flux-int8wo-cpu-x86_64-avx2")  # as before
    assert default_out(**base, regional=True, options=Options(regional=True)).name.endswith("avx2-regional")
    folders = [plain, default_out(**base, dtype="bfloat16", default_dtype="float32"),
               default_out(**base, options=Options(fuse_qkv=True)),
               default_out(**base, lora=LoraRequest(one, 1.0)), default_out(**base, lora=LoraRequest(two, 1.0)),
               default_out(**base, lora=LoraRequest(two, 0.5))]
    assert len(set(folders)) == len(folders), folders
    assert folders[1].name == "tiny-flux-int8wo-cpu-x86_64-avx2-bf16"
    assert folders[3].name.startswith("tiny-flux-int8wo-cpu-x86_64-avx2-lora_")


def test_h18_the_readme_lora_build_after_make_demo_gets_its_own_folder(tmp_path, lora_file, monkeypatch):
    """`make demo` builds artifacts/tiny-flux-int8wo-...; `build tiny-flux --lora style.safetensors` then must
    not stop at "already exists". Resolving the request is enough to see it (no compile)."""
    from aotpack.builder.spec import resolve

    monkeypatch.chdir(tmp_path)
    demo = resolve("tiny-flux", "int8wo").out
    demo.mkdir(parents=True)
    (demo / "manifest.json").write_text(json.dumps(sample()))
    lora = resolve("tiny-flux", "int8wo", lora=lora_file).out
    assert lora != demo and lora.parent == demo.parent and "-lora_" in lora.name
    assert resolve("tiny-flux", "int8wo", dtype="bfloat16").out.name == demo.name + "-bf16"


def test_h18_one_repo_keeps_fp32_bf16_and_two_lora_builds_side_by_side(hub, online, artifacts, tmp_path):
    """Pushed into one repo, builds that differ only in dtype or LoRA all stay (their names used to be one).
    The copies differ only in their manifests (what build_name reads); their files are the real build's."""
    import shutil

    def rewritten(name: str, **changes) -> Path:
        folder = tmp_path / name
        shutil.copytree(artifacts("int8wo"), folder)
        data = json.loads((folder / mf.MANIFEST).read_text())
        (folder / mf.MANIFEST).write_text(json.dumps({**data, **changes}))
        return folder

    folders = [artifacts("int8wo"), rewritten("bf16", dtype="bfloat16"),
               rewritten("lora1", lora=_lora("1a2b3c4d" + "0" * 56)),
               rewritten("lora2", lora=_lora("5e6f7a8b" + "0" * 56))]
    names = [aothub.push(folder, "me/h18-names").build for folder in folders]
    assert len(set(names)) == 4 and builds_in(hub, "me/h18-names") == set(names)
