"""push / pull / load-by-repo-id with the real huggingface_hub client against tests/hub_server.py.

Most tests call the library in this process (the ``online`` fixture points huggingface_hub's constants at the
test server); a few run the real ``aotpack`` command to check that an error is one line on stderr.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

import aotpack
from aotpack import hub as aothub
from aotpack.artifact import manifest as mf
from aotpack.artifact.files import WEIGHTS
from aotpack.errors import AotpackError, HubError, IncompatibleArtifactError, IntegrityError, ResourceError

from conftest import run_cli
from hub_server import HubServer

pytestmark = pytest.mark.slow
TOKEN = "hf_test_secret_token_1234567890"
RUN = {"prompt": "a dog surfing on the moon", "height": 64, "width": 64, "steps": 2}


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    server.add_user("me", TOKEN)
    server.add_user("eve", "hf_eve_token")
    yield server
    server.stop()


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """This process talks to the test server. aotpack reads HF_ENDPOINT (and huggingface_hub HF_TOKEN) at each
    call; huggingface_hub reads HF_HUB_CACHE, HF_HUB_OFFLINE and HF_HUB_DISABLE_XET once, at import, into its
    ``constants``, which its calls read: those are patched. Returns the fresh Hub cache."""
    from huggingface_hub import constants

    hub.state.reset_faults()
    cache = tmp_path / "hub-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return cache


@pytest.fixture
def env(hub, tmp_path):
    """For the real command in a fresh process: a fresh Hub cache, the server's address, the token in HF_TOKEN."""
    hub.state.reset_faults()
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf"), "AOTPACK_CACHE": str(tmp_path / "aotpack-cache")}


def cli(env, *args, **extra):
    return run_cli(*args, env={**env, **extra})


def one_error(result, *parts):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]) == 1, result.stderr
    for part in parts:
        assert part in result.stderr, (part, result.stderr)


def refused(exc_type, call, *parts):
    with pytest.raises(exc_type) as e:
        call()
    assert "\n" not in e.value.cause and "\n" not in e.value.hint
    for part in parts:
        assert part in str(e.value), (part, str(e.value))
    return e.value


def head(hub, repo_id, branch="main"):
    return hub.state.repos[repo_id].branches[branch]


def files_at(hub, repo_id, commit=None):
    return set(hub.state.repos[repo_id].commits[commit or head(hub, repo_id)]["files"])


def builds_in(hub, repo_id):
    return {p.split("/")[1] for p in files_at(hub, repo_id) if p.startswith("builds/")}


def image(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path))


def test_push_pull_load_gives_the_same_image(hub, online, artifacts, tmp_path):
    import aotpack

    local = artifacts("int8wo")
    result = aothub.push(local, "me/roundtrip", tag_name="v1")
    assert result.uploaded and result.url.endswith(f"/tree/{result.commit}/builds/{result.build}")
    folder = aothub.pull("me/roundtrip", revision="v1")
    assert json.loads((folder / mf.MANIFEST).read_text()) == json.loads((local / mf.MANIFEST).read_text())
    a = aotpack.run(local, **RUN, out=tmp_path / "local.png")
    b = aotpack.run("me/roundtrip", revision="v1", **RUN, out=tmp_path / "hub.png")
    assert (image(a) == image(b)).all()


def test_second_push_uploads_nothing(hub, online, artifacts):
    first = aothub.push(artifacts("int8wo"), "me/again")
    before, uploads = head(hub, "me/again"), hub.state.lfs_uploads
    again = aothub.push(artifacts("int8wo"), "me/again")
    assert not again.uploaded and again.commit == first.commit == before
    assert head(hub, "me/again") == before and hub.state.lfs_uploads == uploads


def test_one_repo_many_builds_index_and_card(hub, online, artifacts):
    aothub.push(artifacts("none"), "me/many")
    first = head(hub, "me/many")
    aothub.push(artifacts("int8wo"), "me/many", tag_name="both")
    second = head(hub, "me/many")
    commits = hub.state.repos["me/many"].commits
    assert commits[second]["parent"] == first  # one commit per push
    assert len(builds_in(hub, "me/many")) == 2 and {"aotpack-index.json", "README.md"} <= files_at(hub, "me/many")
    none_files = {p: f for p, f in commits[first]["files"].items() if p.startswith("builds/none-")}
    assert all(commits[second]["files"][p] == f for p, f in none_files.items())  # untouched
    card = commits[second]["files"]["README.md"]["data"].decode()
    for part in ("aotpack", "torchao", "aoti", "diffusers", "| none |", "| int8wo |", "aotpack.from_pretrained(None",
                 "error vs full precision"):
        assert part in card, part
    index = json.loads(commits[second]["files"]["aotpack-index.json"]["data"])
    for build in index["builds"].values():  # measured at build, shown per build
        q = build["quant_error"]
        assert 0 <= q["forward_max_abs"] < q["forward_ref_max"] and f"{q['forward_max_abs']:.1e} (of" in card
    pulled = aothub.pull("me/many", revision="both", quant="none")
    assert json.loads((pulled / mf.MANIFEST).read_text())["scheme"]["name"] == "none"
    assert not (pulled.parent / pulled.name.replace("none-", "int8wo-")).exists()  # only that build came down


def test_build_names_carry_options():
    options = {"fuse_qkv": True, "quantize_text_encoder": "int8wo", "quantize_vae": None, "compile_vae": False}
    assert aothub.name_of("int8wo", options, False, "cuda-sm90") == "int8wo-qkv-qte_int8wo-cuda-sm90"
    assert aothub.name_of("int8wo", {"fuse_qkv": False}, False, "cuda-sm90") == "int8wo-cuda-sm90"  # as before
    assert aothub.name_of("none", {"regional": True}, True, "cpu-x86_64-avx2") == "none-regional-lora-cpu-x86_64-avx2"


def test_h05_branch_needs_trust(hub, env, online, artifacts):
    aothub.push(artifacts("int8wo"), "me/trust")
    one_error(cli(env, "pull", "me/trust"), "'main' is a branch", "--trust")
    assert aothub.pull("me/trust", trust=True).is_dir()
    assert aothub.pull("me/trust", revision=head(hub, "me/trust")).is_dir()


def test_offline_from_the_cache(hub, online, artifacts, monkeypatch):
    from huggingface_hub import constants

    aothub.push(artifacts("int8wo"), "me/offline", tag_name="v1")
    folder = aothub.pull("me/offline", revision="v1")
    count = len(hub.state.requests)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert aothub.pull("me/offline", revision="v1") == folder and len(hub.state.requests) == count  # not one request
    refused(HubError, lambda: aothub.pull("me/offline", revision="v2"), "offline", "never pulled")


def test_a_build_planted_in_the_pull_folder_is_never_returned(hub, online, artifacts, monkeypatch):
    """Someone who can write AOTPACK_CACHE plants a consistent build (index, manifest and code) where pulls
    land. Online, index and manifest come from the server and the planted files fail their hashes; offline,
    only a build this machine pulled and verified online (a sealed record) is returned."""
    from huggingface_hub import constants

    aothub.push(artifacts("int8wo"), "me/planted", tag_name="v1")
    commit = head(hub, "me/planted")
    folder = aothub.pull("me/planted", revision=commit)
    evil = artifacts("none")
    import hashlib
    import os

    def plant():  # a consistent foreign build under the genuine build's name, mtimes kept (huggingface_hub
        for f in (mf.MANIFEST, "model.pt2", WEIGHTS):  # then takes the local files for the ones it noted)
            st = os.stat(folder / f)
            shutil.copy(evil / f, folder / f)
            os.utime(folder / f, ns=(st.st_atime_ns, st.st_mtime_ns))
        index_file = folder.parent.parent / aothub.INDEX
        st = os.stat(index_file)
        index = json.loads(index_file.read_text())
        index["builds"][folder.name]["manifest_sha256"] = hashlib.sha256((evil / mf.MANIFEST).read_bytes()).hexdigest()
        index_file.write_text(json.dumps(index))
        os.utime(index_file, ns=(st.st_atime_ns, st.st_mtime_ns))

    plant()
    pulled = aothub.pull("me/planted", revision=commit)  # online: the server's index and manifest; files hashed
    assert mf.read(pulled).scheme.name == "int8wo" and (pulled / "model.pt2").read_bytes() != (evil / "model.pt2").read_bytes()
    plant()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refused(HubError, lambda: aothub.pull("me/planted", revision=commit), "never pulled online here")


def test_h02_private_repo_refuses_missing_and_wrong_tokens(hub, online, artifacts, monkeypatch):
    aothub.push(artifacts("int8wo"), "me/secret", private=True, tag_name="v1")
    refused(HubError, lambda: aothub.pull("me/secret", revision="v1", token="hf_wrong"), "refused the token")
    refused(HubError, lambda: aothub.pull("me/secret", revision="v1", token="hf_eve_token"),
            "me/secret was not found, or it is private")
    monkeypatch.delenv("HF_TOKEN")
    refused(HubError, lambda: aothub.pull("me/secret", revision="v1"), "me/secret was not found, or it is private")
    assert aothub.pull("me/secret", revision="v1", token=TOKEN).is_dir()


def test_h01_push_without_token(hub, env, artifacts):
    one_error(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/notoken", HF_TOKEN=""), "refused the token")


def test_h03_h04_missing_repo_and_revision(hub, online, artifacts):
    refused(HubError, lambda: aothub.pull("me/nothing-here", revision="v1"), "me/nothing-here was not found")
    aothub.push(artifacts("int8wo"), "me/revs")
    refused(HubError, lambda: aothub.pull("me/revs", revision="v9"), "revision 'v9' does not exist in me/revs",
            "branches: main")
    refused(HubError, lambda: aothub.pull("me/revs", revision="0" * 40), "does not exist")


def test_h06_altered_bytes_are_refused_before_loading(hub, online, artifacts, tmp_path):
    import aotpack

    aothub.push(artifacts("int8wo"), "me/altered", tag_name="v1")
    data = bytearray((artifacts("int8wo") / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    build = next(p for p in files_at(hub, "me/altered") if p.endswith(WEIGHTS))
    hub.state.corrupt[build] = bytes(data)
    refused(IntegrityError, lambda: aothub.pull("me/altered", revision="v1"), "failed verification", WEIGHTS)
    refused(IntegrityError, lambda: aotpack.run("me/altered", revision="v1", prompt="x", out=tmp_path / "never.png"),
            "failed verification")
    hub.state.corrupt.clear()  # the bad bytes were evicted from the cache: the next pull downloads again
    assert aothub.pull("me/altered", revision="v1").is_dir()


def unique_copy(src: Path, dest: Path) -> Path:
    """A copy whose weights bytes the server has never seen (so an upload really happens)."""
    shutil.copytree(src, dest)
    data = bytearray((dest / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (dest / WEIGHTS).write_bytes(bytes(data))
    from aotpack.artifact.files import sha256_file

    manifest = json.loads((dest / mf.MANIFEST).read_text())
    manifest["files"][WEIGHTS] = {"size": len(data), "sha256": sha256_file(dest / WEIGHTS)}
    (dest / mf.MANIFEST).write_text(json.dumps(manifest))
    return dest


def test_h08_interrupted_upload_leaves_the_repo_as_it_was(hub, online, artifacts, tmp_path):
    aothub.push(artifacts("none"), "me/interrupted")
    before = head(hub, "me/interrupted")
    hub.state.drop_upload_once = True
    fresh = unique_copy(artifacts("int8wo"), tmp_path / "fresh")
    try:
        aothub.push(fresh, "me/interrupted")
    except AotpackError as e:
        assert "\n" not in e.cause
        assert head(hub, "me/interrupted") == before  # nothing committed
        aothub.push(fresh, "me/interrupted")
    else:  # the client retried the dropped upload itself; then the commit is whole
        pass
    assert hub.state.drop_upload_once is False  # the upload really was cut
    assert len(builds_in(hub, "me/interrupted")) == 2


def test_h09_server_errors_are_retried(hub, env, online, artifacts, tmp_path):
    aothub.push(artifacts("int8wo"), "me/flaky", tag_name="v1")
    hub.state.fail_next = 2
    assert aothub.pull("me/flaky", revision="v1").is_dir()
    assert hub.state.fail_next == 0
    hub.state.fail_next = 50
    one_error(cli(env, "pull", "me/flaky", "--revision", "v1"), "the Hub answered 503")
    assert hub.state.fail_next < 50 - 3  # retried before giving up
    fresh = unique_copy(artifacts("int8wo"), tmp_path / "fresh")
    hub.state.fail_next = 2  # pushes retry too: the commit names its parent, so a repeat cannot land twice
    assert aothub.push(fresh, "me/flaky").uploaded and hub.state.fail_next == 0


def test_h07_connection_dropped_mid_download(hub, online, artifacts):
    aothub.push(artifacts("int8wo"), "me/dropped", tag_name="v1")
    build = next(p for p in files_at(hub, "me/dropped") if p.endswith(WEIGHTS))
    hub.state.drop_download_once = build
    try:
        assert mf.read(aothub.pull("me/dropped", revision="v1"))  # resumed by the client: what arrived is verified
    except AotpackError as e:
        assert "\n" not in e.cause
    assert hub.state.drop_download_once is None  # the download really was cut
    assert aothub.pull("me/dropped", revision="v1").is_dir()


def test_h10_nothing_fits_lists_what_the_repo_has(hub, online, artifacts, tmp_path):
    other = tmp_path / "gpu-build"
    shutil.copytree(artifacts("int8wo"), other)
    data = json.loads((other / mf.MANIFEST).read_text())
    data["platform"].update(device="cuda", cuda_capability="9.0", isa=None, gpu_name="H100")
    (other / mf.MANIFEST).write_text(json.dumps(data))
    aothub.push(other, "me/gpu-only", tag_name="v1")
    refused(IncompatibleArtifactError, lambda: aothub.pull("me/gpu-only", revision="v1"),
            "no build fits this machine", "int8wo-cuda-sm90")


def test_h11_a_moved_tag_is_refused_until_refreshed(hub, env, online, artifacts, tmp_path):
    aothub.push(artifacts("int8wo"), "me/moved", tag_name="v1")
    first = head(hub, "me/moved")
    assert aothub.pull("me/moved", revision="v1").is_dir()  # pins v1 -> first (in AOTPACK_STATE)
    aothub.push(artifacts("none"), "me/moved")
    second = head(hub, "me/moved")
    hub.state.repos["me/moved"].tags["v1"] = second  # moved server-side, as a tampered repo would
    one_error(cli(env, "pull", "me/moved", "--revision", "v1"), "tag 'v1' of me/moved moved", first, second,
              "--refresh-pins")
    refused(HubError, lambda: aothub.pull("me/moved", revision="v1"), first, second)
    assert aothub.pull("me/moved", revision="v1", refresh_pins=True).parts[-3] == second
    assert aothub.pull("me/moved", revision="v1").parts[-3] == second  # re-pinned
    hub.state.repos["me/moved"].tags["v1"] = first
    assert aothub.pull("me/moved", revision="v1", trust=True).parts[-3] == first  # --trust accepts a move too


def test_h14_pins_file_is_untrusted_input(hub, online, artifacts, tmp_path, monkeypatch):
    from aotpack.paths import seal, unseal

    path = artifacts("int8wo")
    monkeypatch.setenv("AOTPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AOTPACK_STATE", str(tmp_path / "state"))  # this test's own pins (and record key)
    aothub.push(path, "me/pins", tag_name="v1")
    assert aothub.pull("me/pins", revision="v1").is_dir()
    pins = aothub._pins_file()
    data = unseal("pins", pins.read_bytes())
    assert data["schema_version"] == 1 and list(data["pins"].values()) == [head(hub, "me/pins")]
    assert [p.name for p in pins.parent.iterdir() if p.name.endswith(".tmp")] == []  # written atomically
    # someone who can write the cache pins the tag to a commit of their choosing: without the seal, refused
    forged = json.loads(pins.read_text())
    forged["payload"]["pins"] = {k: "f" * 40 for k in forged["payload"]["pins"]}
    for bad in (b"not json", b"[1, 2]", seal("pins", {"schema_version": 1, "pins": {"a|b|c": "0" * 39}}).encode(),
                seal("pins", {"schema_version": 1, "pins": {"x": "0" * 40}}).encode(),
                json.dumps(forged).encode(), json.dumps(data["pins"]).encode()):
        pins.write_bytes(bad)
        refused(HubError, lambda: aothub.pull("me/pins", revision="v1"), "is not a valid aotpack pins file")
    pins.unlink()
    pins.symlink_to(tmp_path / "elsewhere.json")
    refused(HubError, lambda: aothub.pull("me/pins", revision="v1"), "is not a valid aotpack pins file")
    pins.unlink()
    assert aothub.pull("me/pins", revision="v1").is_dir()  # deleted: pinned afresh


def test_h12_control_characters_stay_on_one_line(hub, env, online, artifacts):
    aothub.push(artifacts("int8wo"), "me/ctl", tag_name="v1")
    result = cli(env, "pull", "me/ctl", "--revision", "v1\nError: all good\x1b[2K\rv1")
    one_error(result, "is not a tag, branch or commit name")
    assert "\x1b" not in result.stderr and "\r" not in result.stderr
    refused(HubError, lambda: aothub.pull("me/ctl\nx", revision="v1"), "is not a Hub repo id")


def test_h13_full_disk_during_pull_leaves_no_partial_file(hub, online, artifacts, monkeypatch):
    """The disk fills while the weights arrive. No tmpfs can be mounted here (no root), so huggingface_hub's
    download writer is wrapped: it writes some bytes of the weights, then fails as a full disk does."""
    from huggingface_hub import file_download

    aothub.push(artifacts("int8wo"), "me/full", tag_name="v1")
    real = file_download.http_get

    def full_disk(url, temp_file, *args, **kwargs):
        if url.endswith(WEIGHTS):
            temp_file.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(url, temp_file, *args, **kwargs)

    monkeypatch.setattr(file_download, "http_get", full_disk)
    refused(ResourceError, lambda: aothub.pull("me/full", revision="v1"), "no space left", "free disk space")
    pulled = aothub.pulled_dir("me/full", head(hub, "me/full"))
    for where in (Path(online), pulled):
        assert not [p for p in where.rglob("*") if p.name.endswith(".incomplete")]
    assert not list(pulled.glob("builds/*/*"))  # no half build: what did arrive was evicted
    monkeypatch.setattr(file_download, "http_get", real)
    assert aothub.pull("me/full", revision="v1").is_dir()


def test_signature_travels_with_the_build(hub, online, artifacts, tmp_path):
    from test_trust import _keys

    folder = tmp_path / "signed"
    shutil.copytree(artifacts("int8wo"), folder)
    first = aothub.push(folder, "me/signed", tag_name="v1")
    aotpack.sign(folder, key_path=_keys(tmp_path)["builder"][0])  # push checks it covers the build's files
    signed = aothub.push(folder, "me/signed", tag_name="v2")  # same manifest: a new commit all the same
    assert signed.uploaded and signed.commit != first.commit
    assert f"builds/{signed.build}/{aothub.SIGNATURE}" in files_at(hub, "me/signed")
    pulled = aothub.pull("me/signed", revision="v2")
    assert (pulled / aothub.SIGNATURE).read_bytes() == (folder / aothub.SIGNATURE).read_bytes()
    assert not aothub.push(folder, "me/signed").uploaded
    (folder / aothub.SIGNATURE).unlink()  # replaced by an unsigned build: the old signature must not stay
    assert aothub.push(folder, "me/signed").uploaded
    assert f"builds/{signed.build}/{aothub.SIGNATURE}" not in files_at(hub, "me/signed")


def test_token_never_leaks(hub, online, artifacts, monkeypatch, caplog, capsys):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("HF_TOKEN")
    aothub.push(artifacts("int8wo"), "me/leak", token=TOKEN, tag_name="v1")
    aothub.pull("me/leak", revision="v1", token=TOKEN)
    refused(HubError, lambda: aothub.pull("me/leak", revision="v9", token=TOKEN), "v9")
    repo = hub.state.repos["me/leak"]
    out = capsys.readouterr()
    texts = [caplog.text, out.out, out.err]
    texts += [f["data"].decode(errors="replace") for f in repo.commits[head(hub, "me/leak")]["files"].values()
              if f["data"]]
    assert all(TOKEN not in t for t in texts)


def test_video_build_and_lora_swap_through_the_hub(hub, online, artifacts, lora_file, tmp_path):
    """Builds with extra files travel whole; a pulled artifact takes a LoRA like a local one."""
    import aotpack
    from PIL import Image

    aothub.push(artifacts("int8wo", recipe="tiny-cogvideox"), "me/video", tag_name="v1")
    out = aotpack.run("me/video", revision="v1", prompt="a dog", steps=1, out=tmp_path / "v.gif")
    with Image.open(out) as im:
        assert im.n_frames == 9
    aothub.push(artifacts("int8wo"), "me/styled", tag_name="v1")
    a = aotpack.run(artifacts("int8wo"), **RUN, lora=lora_file, out=tmp_path / "l.png")
    b = aotpack.run("me/styled", revision="v1", **RUN, lora=lora_file, out=tmp_path / "h.png")
    c = aotpack.run("me/styled", revision="v1", **RUN, out=tmp_path / "plain.png")
    assert (image(a) == image(b)).all() and not (image(a) == image(c)).all()


def test_a_signed_build_round_trips_and_keys_are_required_on_the_serving_box(hub, online, artifacts, tmp_path):
    """Signed here, pushed, pulled there: the builder's key accepts it, another key and a missing signature
    are refused before anything is loaded (pull and load alike)."""
    from test_trust import _keys

    from aotpack.errors import SignatureError

    keys = _keys(tmp_path)
    folder = tmp_path / "signed-real"
    shutil.copytree(artifacts("int8wo"), folder)
    aotpack.sign(folder, key_path=keys["builder"][0])
    aothub.push(folder, "me/signed-real", tag_name="v1")
    pulled = aothub.pull("me/signed-real", revision="v1", trusted_keys=[keys["builder"][1]])
    assert aotpack.load("me/signed-real", revision="v1", trusted_keys=[keys["builder"][1]]).signer
    refused(SignatureError, lambda: aothub.pull("me/signed-real", revision="v1", trusted_keys=[keys["stranger"][1]]),
            "not signed by any trusted key")
    refused(SignatureError, lambda: aotpack.load("me/signed-real", revision="v1", trusted_keys=[keys["stranger"][1]]),
            "not signed by any trusted key")
    aothub.push(artifacts("none"), "me/unsigned", tag_name="v1")
    refused(SignatureError, lambda: aothub.pull("me/unsigned", revision="v1", trusted_keys=[keys["builder"][1]]),
            "is not signed, and trusted keys are required")
    assert pulled.is_dir()
