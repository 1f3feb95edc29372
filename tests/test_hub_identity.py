"""A pulled build is loaded against what was pulled; the Hub index is untrusted input; push checks before it commits.

The attacker here can write AOTPACK_CACHE (not AOTPACK_STATE, where the sealed pull records live): after the pull's
last check they swap the pulled folder for another self-consistent artifact (another build's files, manifest
included, or another build signed by the same key). Every way of loading it afterwards must refuse it before any
package is opened. The real huggingface_hub client talks to tests/hub_server.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import aotpack
from aotpack import hub as aothub
from aotpack.artifact.files import MODEL, sha256_file
from aotpack.cli import cli as cli_group
from aotpack.errors import HubError, IntegrityError
from aotpack.hub import download as hub_download  # where pull looks _verify_pulled up

from test_hub import TOKEN, env, files_at, head, hub, online, refused, unique_copy  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow
RUN = {"prompt": "a dog surfing on the moon", "height": 64, "width": 64, "steps": 1}


def swap(folder: Path, other: Path) -> None:
    """The attacker's move: the pulled folder becomes a copy of another, self-consistent artifact."""
    shutil.rmtree(folder)
    shutil.copytree(other, folder)


def swap_after_pull(monkeypatch, other: Path) -> None:
    """The attacker wins the race: the folder is swapped right after the pull's last check of it."""
    real = hub_download._verify_pulled

    def verified_then_swapped(root, name, *args):
        result = real(root, name, *args)
        swap(root / "builds" / name, other)
        return result

    monkeypatch.setattr(hub_download, "_verify_pulled", verified_then_swapped)


def test_t16_a_pulled_folder_swapped_after_the_pull_is_never_loaded(hub, online, artifacts, opened, monkeypatch,
                                                                    tmp_path):
    from huggingface_hub import constants

    aothub.push(artifacts("int8wo"), "me/swap", tag_name="v1")
    folder = aothub.pull("me/swap", revision="v1")
    assert aotpack.load(folder).manifest.scheme.name == "int8wo"  # the genuine pull loads by its path
    evil = artifacts("none")
    evil_code = sha256_file(evil / MODEL)
    before = len(opened)
    swap(folder, evil)
    refused(IntegrityError, lambda: aotpack.load(folder), "not the one pulled", "aotpack pull me/swap")  # (a)
    refused(IntegrityError, lambda: aotpack.run(folder, **RUN, out=tmp_path / "a.png"), "not the one pulled")
    link = tmp_path / "link"  # a link to the pulled folder, or to '..' inside the cache: the same pulled build
    link.symlink_to(folder, target_is_directory=True)
    refused(IntegrityError, lambda: aotpack.load(link), "not the one pulled")
    refused(IntegrityError, lambda: aotpack.load(str(folder / ".." / folder.name)), "not the one pulled")
    shutil.rmtree(folder)  # the pulled folder made a link to an artifact outside the cache
    folder.symlink_to(evil, target_is_directory=True)
    refused(IntegrityError, lambda: aotpack.load(folder), "not the one pulled")
    folder.unlink()

    swap_after_pull(monkeypatch, evil)  # (c) online, by repo id: the pull verifies, then the folder is swapped
    refused(IntegrityError, lambda: aotpack.load("me/swap", revision="v1"), "not the one pulled")
    refused(IntegrityError, lambda: aotpack.run("me/swap", revision="v1", **RUN, out=tmp_path / "c.png"),
            "not the one pulled")
    result = CliRunner().invoke(cli_group, ["run", "me/swap", "--revision", "v1", "--prompt", "x", "--steps", "1",
                                            "--out", str(tmp_path / "d.png")])  # (d) the command line, in-process
    assert result.exit_code == 1 and "not the one pulled" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # (b) offline, by repo id
    swap(folder, artifacts("int8wo"))  # genuine again, so that the offline pull itself passes; then swapped
    refused(IntegrityError, lambda: aotpack.load("me/swap", revision="v1"), "not the one pulled")
    assert evil_code not in opened[before:] and len(opened) == before and not list(tmp_path.glob("*.png"))


def test_t16_a_build_signed_by_the_same_key_cannot_be_substituted(hub, online, artifacts, opened, monkeypatch,
                                                                 tmp_path):
    from test_trust import _keys

    keys = _keys(tmp_path)
    genuine, other = tmp_path / "genuine", tmp_path / "other"
    for src, dest in ((artifacts("int8wo"), genuine), (artifacts("none"), other)):
        shutil.copytree(src, dest)
        aotpack.sign(dest, key_path=keys["builder"][0])
    trusted = [keys["builder"][1]]
    aothub.push(genuine, "me/same-key", tag_name="v1")
    folder = aothub.pull("me/same-key", revision="v1", trusted_keys=trusted)
    assert aotpack.load(other, trusted_keys=trusted).signer  # the substitute is validly signed by that key
    before = len(opened)
    swap(folder, other)
    refused(IntegrityError, lambda: aotpack.load(folder, trusted_keys=trusted), "not the one pulled")
    swap_after_pull(monkeypatch, other)
    refused(IntegrityError, lambda: aotpack.load("me/same-key", revision="v1", trusted_keys=trusted),
            "not the one pulled")
    assert len(opened) == before


def test_t16_a_folder_in_the_hub_cache_without_a_pull_record_is_refused(artifacts, tmp_path):
    from aotpack.paths import cache_dir

    planted = cache_dir() / "hub" / "models--me--never" / ("ab" * 20) / "builds" / "none-cpu-x86_64-avx2"
    shutil.copytree(artifacts("none"), planted)
    try:
        refused(IntegrityError, lambda: aotpack.load(planted), "no record of a pull", "aotpack pull me/never")
        link = tmp_path / "innocent-looking"
        link.symlink_to(planted, target_is_directory=True)
        refused(IntegrityError, lambda: aotpack.load(link), "no record of a pull")
        refused(IntegrityError, lambda: aotpack.load(planted.parent), "is not the folder of one pulled build")
    finally:
        shutil.rmtree(cache_dir() / "hub" / "models--me--never")
    assert aothub.pulled_identity(artifacts("none")) is None  # an ordinary folder is loaded as a folder


# ---- the index is untrusted input (t17) ---------------------------------------------------------------------

def put_index(hub, repo_id: str, builds: dict) -> None:
    """The server's index at the head of main, rewritten as a hostile repo would."""
    commit = hub.state.repos[repo_id].commits[head(hub, repo_id)]
    index = json.loads(commit["files"][aothub.INDEX]["data"])
    index["builds"].update(builds)
    commit["files"][aothub.INDEX] = {"data": json.dumps(index).encode(), "lfs": None}


def test_t17_a_hostile_index_is_skipped_on_pull_and_refused_on_push(hub, online, artifacts, tmp_path, caplog):
    aothub.push(artifacts("int8wo"), "me/hostile", tag_name="v1")
    good = json.loads(hub.state.repos["me/hostile"].commits[head(hub, "me/hostile")]["files"][aothub.INDEX]["data"])
    entry = next(iter(good["builds"].values()))
    put_index(hub, "me/hostile", {
        "a-list": [1, 2], "big": {**entry, "size": "big"}, "nowhere": {**entry, "platform": {}},
        "bare": {"scheme": "int8wo"}, "nan": {**entry, "build_seconds": float("nan")},
        "fake-platform": {**entry, "platform": {"device": "cpu"}}, "bad-sha": {**entry, "manifest_sha256": 7}})
    caplog.set_level(logging.WARNING, logger="aotpack")
    assert aothub.pull("me/hostile", revision="v1").is_dir()  # the good build; the others skipped, each said
    for name in ("a-list", "big", "nowhere", "bare", "nan", "fake-platform", "bad-sha"):
        assert f"ignoring build entry '{name}'" in caplog.text, name
    refused(HubError, lambda: aothub.pull("me/hostile", revision="v1", build="big"), "build 'big'",
            "unusable index entry", "'size' is not a number")
    refused(HubError, lambda: aothub.push(unique_copy(artifacts("int8wo"), tmp_path / "fresh"), "me/hostile"),
            "me/hostile/aotpack-index.json has an unusable build entry", "fix or delete that entry")


def test_t17_a_server_file_name_with_dotdot_is_one_line(hub, online, artifacts):
    result = aothub.push(artifacts("int8wo"), "me/dotdot")
    files = hub.state.repos["me/dotdot"].commits[result.commit]["files"]
    files[f"builds/{result.build}/../../escape.txt"] = {"data": b"x", "lfs": None}
    refused(HubError, lambda: aothub.pull("me/dotdot", revision=result.commit), "not a plain file name",
            "do not use this repo")


# ---- push checks before it commits (t18, h17) ----------------------------------------------------------------

def test_t18_push_refuses_a_signature_that_no_longer_covers_the_build(hub, online, artifacts, tmp_path):
    from test_trust import _keys

    from aotpack.errors import SignatureError

    keys = _keys(tmp_path)
    folder = tmp_path / "signed"
    shutil.copytree(artifacts("int8wo"), folder)
    aotpack.sign(folder, key_path=keys["builder"][0])
    signature = (folder / aothub.SIGNATURE).read_bytes()
    shutil.rmtree(folder)
    unique_copy(artifacts("int8wo"), folder)  # rebuilt (other weights, other manifest); the old signature left
    (folder / aothub.SIGNATURE).write_bytes(signature)
    refused(SignatureError, lambda: aothub.push(folder, "me/stale-sig"), "does not cover this build",
            "aotpack sign")
    (folder / aothub.SIGNATURE).write_bytes(b"not a signature")
    refused(SignatureError, lambda: aothub.push(folder, "me/stale-sig"), "does not cover this build")
    assert "me/stale-sig" not in hub.state.repos  # nothing was published


def test_h17_push_tag_onto_an_existing_tag_is_checked_before_committing(hub, online, artifacts, tmp_path, caplog):
    first = aothub.push(artifacts("int8wo"), "me/tagged", tag_name="v1")
    again = aothub.push(artifacts("int8wo"), "me/tagged", tag_name="v1")  # the tag already holds this build
    assert not again.uploaded and again.commit == first.commit and head(hub, "me/tagged") == first.commit
    fresh = unique_copy(artifacts("int8wo"), tmp_path / "fresh")
    refused(HubError, lambda: aothub.push(fresh, "me/tagged", tag_name="v1"), "tag 'v1' already exists",
            "nothing was pushed")
    assert head(hub, "me/tagged") == first.commit  # no commit landed
    caplog.set_level(logging.WARNING, logger="aotpack")
    replaced = aothub.push(fresh, "me/tagged", tag_name="v2")  # same name, different build: said first
    assert replaced.uploaded and f"holds another build named {replaced.build}" in caplog.text
    assert hub.state.repos["me/tagged"].tags == {"v1": first.commit, "v2": replaced.commit}
