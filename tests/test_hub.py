"""push / pull / load-by-repo-id with the real huggingface_hub client against tests/hub_server.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aotpack.artifact import manifest as mf
from aotpack.artifact.files import WEIGHTS

from conftest import run_cli
from hub_server import HubServer

pytestmark = pytest.mark.slow
TOKEN = "hf_test_secret_token_1234567890"


@pytest.fixture(scope="module")
def hub():
    server = HubServer().start()
    server.add_user("me", TOKEN)
    server.add_user("eve", "hf_eve_token")
    yield server
    server.stop()


@pytest.fixture
def env(hub, tmp_path):
    """A fresh Hub cache per test; the server's address; the user's token in HF_TOKEN."""
    hub.state.reset_faults()
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf"), "AOTPACK_CACHE": str(tmp_path / "aotpack-cache")}


def cli(env, *args, **extra):
    return run_cli(*args, env={**env, **extra})


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def one_error(result, *parts):
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]) == 1, result.stderr
    for part in parts:
        assert part in result.stderr, (part, result.stderr)


def head(hub, repo_id, branch="main"):
    return hub.state.repos[repo_id].branches[branch]


def files_at(hub, repo_id, commit):
    return set(hub.state.repos[repo_id].commits[commit]["files"])


def test_push_pull_load_gives_the_same_image(hub, env, artifacts, tmp_path):
    local = artifacts("int8wo")
    ok(cli(env, "push", str(local), "--repo-id", "me/roundtrip", "--tag", "v1"))
    folder = Path(ok(cli(env, "pull", "me/roundtrip", "--revision", "v1")))
    assert json.loads((folder / mf.MANIFEST).read_text()) == json.loads((local / mf.MANIFEST).read_text())
    args = ["--prompt", "a dog surfing on the moon", "--height", "64", "--width", "64", "--steps", "2"]
    ok(cli(env, "run", str(local), *args, "--out", str(tmp_path / "local.png")))
    ok(cli(env, "run", "me/roundtrip", "--revision", "v1", *args, "--out", str(tmp_path / "hub.png")))
    from PIL import Image
    import numpy as np

    a = np.asarray(Image.open(tmp_path / "local.png"))
    b = np.asarray(Image.open(tmp_path / "hub.png"))
    assert a.shape == b.shape and (a == b).all()


def test_second_push_uploads_nothing(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/again"))
    before, uploads = head(hub, "me/again"), hub.state.lfs_uploads
    out = ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/again"))
    assert "nothing uploaded" in out
    assert head(hub, "me/again") == before and hub.state.lfs_uploads == uploads


def test_one_repo_many_builds_index_and_card(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("none")), "--repo-id", "me/many"))
    first = head(hub, "me/many")
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/many", "--tag", "both"))
    second = head(hub, "me/many")
    commits = hub.state.repos["me/many"].commits
    assert commits[second]["parent"] == first  # one commit per push
    files = files_at(hub, "me/many", second)
    names = {p.split("/")[1] for p in files if p.startswith("builds/")}
    assert len(names) == 2 and {"aotpack-index.json", "README.md"} <= files
    none_files = {p: f for p, f in commits[first]["files"].items() if p.startswith("builds/none-")}
    assert all(commits[second]["files"][p] == f for p, f in none_files.items())  # untouched
    card = commits[second]["files"]["README.md"]["data"].decode()
    for part in ("aotpack", "torchao", "aoti", "diffusers", "| none |", "| int8wo |", "aotpack.load_into(pipe"):
        assert part in card, part
    pulled = Path(ok(cli(env, "pull", "me/many", "--revision", "both", "--quant", "none")))
    assert mf.read(pulled)["scheme"]["name"] == "none"
    assert not (pulled.parent / pulled.name.replace("none-", "int8wo-")).exists()  # only that build came down


def test_h05_branch_needs_trust(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/trust"))
    one_error(cli(env, "pull", "me/trust"), "'main' is a branch", "--trust")
    assert Path(ok(cli(env, "pull", "me/trust", "--trust"))).is_dir()
    commit = head(hub, "me/trust")
    assert Path(ok(cli(env, "pull", "me/trust", "--revision", commit))).is_dir()


def test_offline_from_the_cache(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/offline", "--tag", "v1"))
    online = ok(cli(env, "pull", "me/offline", "--revision", "v1"))
    count = len(hub.state.requests)
    offline = ok(cli(env, "pull", "me/offline", "--revision", "v1", HF_HUB_OFFLINE="1"))
    assert offline == online and len(hub.state.requests) == count  # not one request


def test_h02_private_repo_refuses_missing_and_wrong_tokens(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/secret", "--private", "--tag", "v1"))
    one_error(cli(env, "pull", "me/secret", "--revision", "v1", HF_TOKEN=""), "me/secret was not found, or it is private")
    one_error(cli(env, "pull", "me/secret", "--revision", "v1", HF_TOKEN="hf_wrong"), "refused the token")
    one_error(cli(env, "pull", "me/secret", "--revision", "v1", HF_TOKEN="hf_eve_token"), "private")
    assert Path(ok(cli(env, "pull", "me/secret", "--revision", "v1"))).is_dir()


def test_h01_push_without_token(hub, env, artifacts):
    one_error(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/notoken", HF_TOKEN=""), "refused the token")


def test_h03_h04_missing_repo_and_revision(hub, env, artifacts):
    one_error(cli(env, "pull", "me/nothing-here", "--revision", "v1"), "me/nothing-here was not found")
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/revs"))
    one_error(cli(env, "pull", "me/revs", "--revision", "v9"), "revision 'v9' does not exist")


def test_h06_altered_bytes_are_refused_before_loading(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/altered", "--tag", "v1"))
    data = bytearray((artifacts("int8wo") / WEIGHTS).read_bytes())
    data[-10] ^= 0xFF
    build = next(p for p in files_at(hub, "me/altered", head(hub, "me/altered")) if p.endswith(WEIGHTS))
    hub.state.corrupt[build] = bytes(data)
    one_error(cli(env, "pull", "me/altered", "--revision", "v1"), "failed verification", "weights.safetensors")
    one_error(cli(env, "run", "me/altered", "--revision", "v1", "--prompt", "x", "--out", "/tmp/never.png"),
              "failed verification")
    hub.state.corrupt.clear()  # the bad bytes were evicted from the cache: the next pull downloads again
    assert Path(ok(cli(env, "pull", "me/altered", "--revision", "v1"))).is_dir()


def unique_copy(src: Path, dest: Path) -> Path:
    """A copy whose weights bytes the server has never seen (so an upload really happens)."""
    shutil.copytree(src, dest)
    data = bytearray((dest / WEIGHTS).read_bytes())
    data[-1] ^= 0x01
    (dest / WEIGHTS).write_bytes(bytes(data))
    from aotpack.artifact.files import file_entries

    manifest = json.loads((dest / mf.MANIFEST).read_text())
    manifest["files"] = file_entries(dest)
    (dest / mf.MANIFEST).write_text(json.dumps(manifest))
    return dest


def test_h08_interrupted_upload_leaves_the_repo_as_it_was(hub, env, artifacts, tmp_path):
    ok(cli(env, "push", str(artifacts("none")), "--repo-id", "me/interrupted"))
    before = head(hub, "me/interrupted")
    hub.state.drop_upload_once = True
    fresh = unique_copy(artifacts("int8wo"), tmp_path / "fresh")
    res = cli(env, "push", str(fresh), "--repo-id", "me/interrupted")
    assert hub.state.drop_upload_once is False  # the upload really was cut
    if res.returncode == 0:  # the client retried the dropped upload itself; then the commit is whole
        assert len({p.split("/")[1] for p in files_at(hub, "me/interrupted", head(hub, "me/interrupted"))
                    if p.startswith("builds/")}) == 2
    else:
        one_error(res)
        assert head(hub, "me/interrupted") == before
        assert files_at(hub, "me/interrupted", before) == files_at(hub, "me/interrupted", head(hub, "me/interrupted"))
        ok(cli(env, "push", str(fresh), "--repo-id", "me/interrupted"))


def test_h09_server_errors_are_retried(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/flaky", "--tag", "v1"))
    hub.state.fail_next = 2
    assert Path(ok(cli(env, "pull", "me/flaky", "--revision", "v1"))).is_dir()
    hub.state.fail_next = 50
    one_error(cli(env, "pull", "me/flaky", "--revision", "v1", HF_HOME=env["HF_HOME"] + "2"), "503")
    hub.state.fail_next = 0


def test_h07_connection_dropped_mid_download(hub, env, artifacts):
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/dropped", "--tag", "v1"))
    build = next(p for p in files_at(hub, "me/dropped", head(hub, "me/dropped")) if p.endswith(WEIGHTS))
    hub.state.drop_download_once = build
    res = cli(env, "pull", "me/dropped", "--revision", "v1")
    if res.returncode == 0:  # retried: what arrived was verified
        assert mf.read(Path(res.stdout.strip()))
    else:
        one_error(res)
    assert Path(ok(cli(env, "pull", "me/dropped", "--revision", "v1"))).is_dir()


def test_h10_nothing_fits_lists_what_the_repo_has(hub, env, artifacts, tmp_path):
    other = tmp_path / "gpu-build"
    shutil.copytree(artifacts("int8wo"), other)
    data = json.loads((other / mf.MANIFEST).read_text())
    data["platform"].update(device="cuda", cuda_capability="9.0", isa=None, gpu_name="H100")
    (other / mf.MANIFEST).write_text(json.dumps(data))
    ok(cli(env, "push", str(other), "--repo-id", "me/gpu-only", "--tag", "v1"))
    one_error(cli(env, "pull", "me/gpu-only", "--revision", "v1"), "no build fits this machine",
              "int8wo-cuda-sm90")


def test_token_never_leaks(hub, env, artifacts):
    res = cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/leak", "--token", TOKEN, "--tag", "v1",
              HF_TOKEN="")
    ok(res)
    pulled = cli(env, "pull", "me/leak", "--revision", "v1", "--token", TOKEN, HF_TOKEN="")
    ok(pulled)
    repo = hub.state.repos["me/leak"]
    texts = [res.stdout, res.stderr, pulled.stdout, pulled.stderr]
    texts += [f["data"].decode(errors="replace") for f in repo.commits[repo.branches["main"]]["files"].values() if f["data"]]
    assert all(TOKEN not in t for t in texts)


def test_video_build_and_lora_swap_through_the_hub(hub, env, artifacts, lora_file, tmp_path):
    """Builds with extra files travel whole; a pulled artifact takes a LoRA like a local one."""
    video = artifacts("int8wo", recipe="tiny-cogvideox")
    ok(cli(env, "push", str(video), "--repo-id", "me/video", "--tag", "v1"))
    out = tmp_path / "v.gif"
    ok(cli(env, "run", "me/video", "--revision", "v1", "--prompt", "a dog", "--steps", "1", "--out", str(out)))
    from PIL import Image

    with Image.open(out) as im:
        assert im.n_frames == 9
    ok(cli(env, "push", str(artifacts("int8wo")), "--repo-id", "me/styled", "--tag", "v1"))
    args = ["--prompt", "a dog", "--height", "64", "--width", "64", "--steps", "2"]
    ok(cli(env, "run", str(artifacts("int8wo")), *args, "--lora", str(lora_file), "--out", str(tmp_path / "l.png")))
    ok(cli(env, "run", "me/styled", "--revision", "v1", *args, "--lora", str(lora_file), "--out", str(tmp_path / "h.png")))
    ok(cli(env, "run", "me/styled", "--revision", "v1", *args, "--out", str(tmp_path / "plain.png")))
    import numpy as np

    a, b, c = (np.asarray(Image.open(tmp_path / n)) for n in ("l.png", "h.png", "plain.png"))
    assert (a == b).all() and not (a == c).all()
