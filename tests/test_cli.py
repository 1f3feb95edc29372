"""The command line a script and a person expect: results on stdout (``--json`` for scripts), the rest on
stderr, ``-q`` before or after the command, refusals that need no torch made without importing it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from aotpack.cli import cli
from hub_server import HubServer

TOKEN = "hf_cli_test_token_0123456789"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("args, message", [
    (["build", "flux"], "Error: recipe 'flux' builds black-forest-labs/FLUX.1-dev, which needs a CUDA device"),
    (["build", "tiny-flux", "--quant", "fp8dq"], "Error: scheme 'fp8dq' cannot run here"),
    (["build", "flux3"], "Error: unknown recipe 'flux3'"),
    (["build", "tiny-flux", "--variant", "schnell"], "Error: recipe tiny-flux has no variant 'schnell'"),
    (["build", "tiny-flux", "--max-autotune"], "Error: --max-autotune is for CUDA builds"),
    (["build", "tiny-flux", "--freeze"], "Error: --freeze with --quant int8wo: inductor's freezing folds"),
    (["build", "tiny-flux", "--quant", "none", "--freeze", "--compile-vae"], "Error: --freeze is not combined with "
     "--compile-vae"),
])
def test_refusals_that_need_no_torch_do_not_import_it(args, message):
    # a fresh interpreter: this one has torch loaded already. Where a GPU node exists torch must decide.
    from aotpack.artifact.platform import gpu_possible

    if gpu_possible():
        pytest.skip("this machine may have a GPU: the device check needs torch")
    code = ("import sys\nfrom aotpack.cli import cli\ntry:\n    cli(%r, prog_name='aotpack')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n") % (args,)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "exit 1 False", (done.stdout, done.stderr)
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count("Error:") == 1 and "Traceback" not in done.stderr


def test_quiet_works_before_and_after_the_command():
    for args in (["-q", "recipes", "--json"], ["recipes", "-q", "--json"], ["recipes", "--json", "--quiet"]):
        res = invoke(*args)
        assert res.exit_code == 0, res.output
        assert "tiny-flux" in [r["name"] for r in json.loads(res.stdout)["recipes"]]
    res = invoke("build", "flux3", "-q")
    assert res.exit_code == 1 and res.stderr.startswith("Error: unknown recipe 'flux3'")


@pytest.fixture
def online(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = HubServer().start()
    server.add_user("me", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.stop()


def test_push_and_pull_print_their_result_on_stdout_and_json_for_scripts(online, artifacts):
    path = artifacts("int8wo")
    first = invoke("push", str(path), "me/cli-json", "--tag", "v1", "--json")  # the repo as an argument
    assert first.exit_code == 0, first.output
    pushed = json.loads(first.stdout)
    assert pushed["uploaded"] is True and pushed["repo_id"] == "me/cli-json" and pushed["tag"] == "v1"
    assert pushed["url"].startswith(online.url) and len(pushed["commit"]) == 40
    again = invoke("push", str(path), "--repo-id", "me/cli-json")  # nothing new: still the URL on stdout
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == pushed["url"] and "already there" in again.stderr
    pulled = invoke("pull", "me/cli-json", "--revision", "v1", "--json")
    assert pulled.exit_code == 0, pulled.output
    info = json.loads(pulled.stdout)
    assert info["build"] == pushed["build"] and info["commit"] == pushed["commit"]
    assert (__import__("pathlib").Path(info["path"]) / "manifest.json").is_file()
    both = invoke("push", str(path), "me/a", "--repo-id", "me/b")
    assert both.exit_code == 2 and "two repos given" in both.stderr


def test_f51_max_autotune_on_a_cpu_is_refused_by_the_library_too(tmp_path):
    from aotpack.builder.spec import resolve
    from aotpack.errors import SchemeError

    with pytest.raises(SchemeError, match="--max-autotune is for CUDA builds") as e:
        resolve("tiny-flux", "int8wo", max_autotune=True, device="cpu", out=tmp_path / "x")
    assert e.value.hint == "leave --max-autotune out on a CPU" and not (tmp_path / "x").exists()


def _request(**kwargs):
    from aotpack.artifact import manifest as mf
    from aotpack.builder.recipe import get_recipe
    from aotpack.serve.run import check_request

    from test_manifest import sample

    return check_request(mf.validate(sample()), get_recipe("tiny-flux"), **{"prompt": "a dog", **kwargs})


def test_f53_a_size_that_is_not_a_multiple_says_so_and_names_the_sizes_near_it():
    from aotpack.errors import InputError

    with pytest.raises(InputError) as e:
        _request(height=100)
    assert e.value.cause == "--height 100 is not a multiple of 16, as the artifact needs"
    assert e.value.hint == "pass --height 96 or 112"
    with pytest.raises(InputError, match="--width 512 is outside what the artifact accepts: 32..256"):
        _request(width=512)


def test_f54_run_writes_into_existing_folders_only_and_as_any_file_is_written(artifacts, tmp_path):
    import os
    import stat

    path = str(artifacts("int8wo"))
    missing = tmp_path / "missing" / "x.png"
    res = invoke("run", path, "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "--out",
                 str(missing))
    assert res.exit_code == 1 and f"the folder {missing.parent} does not exist" in res.stderr
    assert not missing.parent.exists()  # no folder made for it
    out = tmp_path / "x.png"
    old = os.umask(0o022)
    try:
        res = invoke("run", path, "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", "--out",
                     str(out), "--json")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == {"path": str(out)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_f55_a_lora_folder_is_not_a_missing_file(tmp_path):
    from aotpack.builder.spec import resolve
    from aotpack.errors import InputError

    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(InputError) as e:
        resolve("tiny-flux", "int8wo", lora=tmp_path / "lora", out=tmp_path / "x")
    assert e.value.cause == f"LoRA {tmp_path / 'lora'} is a folder, not a file"
    assert "pytorch_lora_weights.safetensors" in e.value.hint


def test_f56_a_downloaded_hub_repo_folder_points_to_its_builds(tmp_path):
    import aotpack
    from aotpack.errors import ManifestError

    (tmp_path / "aotpack-index.json").write_text("{}")
    (tmp_path / "builds" / "int8wo-cpu-x86_64-avx2").mkdir(parents=True)
    (tmp_path / "builds" / "int8wo-cpu-x86_64-avx2" / "manifest.json").write_text("{}")
    for call in (aotpack.inspect, aotpack.load):
        with pytest.raises(ManifestError) as e:
            call(tmp_path)
        assert "not an aotpack artifact" in e.value.cause
        assert f"{tmp_path / 'builds'}/NAME (int8wo-cpu-x86_64-avx2)" in e.value.hint


def test_f57_offline_a_repo_never_pulled_says_so_without_a_cached_main(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    res = invoke("run", "me/nothing", "--prompt", "x")
    assert res.exit_code == 1
    assert "offline, and nothing of me/nothing was pulled here with a tag" in res.stderr, res.stderr
    assert "main" not in res.stderr and res.stderr.count("Error:") == 1
    res = invoke("run", "me/nothing", "--prompt", "x", "--revision", "v1")
    assert "offline, and 'v1' of me/nothing was never pulled here" in res.stderr, res.stderr


def test_f58_build_push_checks_the_hub_before_building(online, tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    out = tmp_path / "never"
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token_000000")
    t0 = time.perf_counter()
    res = invoke("build", "tiny-flux", "--out", str(out), "--push", "me/x")
    assert res.exit_code == 1 and "refused the token (401 Unauthorized)" in res.stderr, res.stderr
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    res = invoke("build", "tiny-flux", "--out", str(out), "--push", "me/x")
    assert res.exit_code == 1 and "HF_HUB_OFFLINE is set: the build could not be pushed to me/x" in res.stderr
    assert time.perf_counter() - t0 < 60 and not out.exists()  # nothing was built


def test_the_python_api_shows_the_stage_lines_by_default():
    code = ("import aotpack, logging\n"
            "logging.getLogger('aotpack').info('compile transformer (1 of 1) took 1.0 s')\n"
            "aotpack.set_progress(False)\n"
            "logging.getLogger('aotpack').info('not shown')\n"
            "logging.getLogger('aotpack').warning('a warning still is')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stderr.splitlines() == ["compile transformer (1 of 1) took 1.0 s", "a warning still is"], done.stderr
    quiet = subprocess.run([sys.executable, "-c", "import aotpack, logging\n"
                            "logging.getLogger('aotpack').info('x')"], capture_output=True, text=True,
                           timeout=60, env={**__import__("os").environ, "AOTPACK_PROGRESS": "0"})
    assert quiet.stderr == ""


def test_the_model_card_is_honest_and_its_loading_example_runs(online, artifacts, tmp_path, monkeypatch):
    """library_name is aotpack (DiffusionPipeline.from_pretrained of the repo cannot work: it says so), each
    build's dtype and bounds are shown, and the card's Python block runs as written against the repo."""
    import re

    import aotpack

    aotpack.push(artifacts("int8wo"), "me/card", tag="v1")
    repo = online.state.repos["me/card"]
    card = repo.commits[repo.branches["main"]]["files"]["README.md"]["data"].decode()
    assert "library_name: aotpack" in card and "not a diffusers pipeline folder" in card
    assert "| float32 |" in card and "height 32..256" in card and "text <= 32" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'revision="v1"' in code and "max_sequence_length=32" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card's own example, against the test Hub
    assert scope["image"].size == (256, 256)
