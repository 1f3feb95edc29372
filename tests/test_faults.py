"""The table of bad inputs and faults (README, Troubleshooting): each gives one clear line and leaves
nothing half-written. Row ids match the README table."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import aotpack
from aotpack.artifact import manifest as mf
from aotpack.artifact.files import MODEL, WEIGHTS, file_entries
from aotpack.artifact.schema import encode
from aotpack.cli import cli
from aotpack.errors import InputError, IntegrityError, ResourceError

from conftest import REPO, no_partials, run_cli


def invoke(*args, env=None):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    return result


def assert_one_clear_error(result, *parts):
    assert result.exit_code == 1, (result.exit_code, result.output)
    text = result.stderr if hasattr(result, "stderr") else result.output
    assert "Traceback" not in text
    lines = [ln for ln in text.strip().splitlines() if ln.startswith(("Error:", "Hint:"))]
    assert lines and lines[0].startswith("Error:"), text
    assert len([ln for ln in lines if ln.startswith("Error:")]) == 1
    for part in parts:
        assert part in text, (part, text)


def edit_manifest(folder: Path, change, rehash: bool = False) -> None:
    data = json.loads((folder / mf.MANIFEST).read_text())
    change(data)
    if rehash:
        data["files"] = encode(file_entries(folder))
    (folder / mf.MANIFEST).write_text(json.dumps(data))


# ---- build: refused before any heavy work ------------------------------------------------------------

def test_f01_unknown_recipe(tmp_path):
    assert_one_clear_error(invoke("build", "flux3", "--out", str(tmp_path / "x")), "unknown recipe 'flux3'")
    assert not (tmp_path / "x").exists()


def test_f02_unknown_scheme(tmp_path):
    assert_one_clear_error(invoke("build", "tiny-flux", "--quant", "int3", "--out", str(tmp_path / "x")),
                           "unknown quantization scheme 'int3'", "Hint: choose one of")


def test_f03_scheme_needs_another_device(tmp_path):
    assert_one_clear_error(invoke("build", "tiny-flux", "--quant", "fp8dq", "--out", str(tmp_path / "x")),
                           "needs CUDA sm89+", "--quant int8dq")


def test_f04_scheme_missing_from_torchao(tmp_path):
    assert_one_clear_error(invoke("build", "tiny-flux", "--quant", "fp6_e3m2", "--out", str(tmp_path / "x")),
                           "torchao 0.18 removed the fpx", "fp8wo or int8wo")


def test_f05_real_checkpoint_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_clear_error(invoke("build", "flux", "--quant", "int8dq", "--out", str(tmp_path / "x")),
                           "needs a CUDA device", "--model")


def test_f06_model_folder_is_not_a_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_clear_error(invoke("build", "flux", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "x")),
                           "not a diffusers pipeline folder")


def test_f07_output_exists_is_refused_and_untouched(artifacts, tmp_path):
    out = artifacts.copy("int8wo", tmp_path / "a")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert_one_clear_error(invoke("build", "tiny-flux", "--quant", "int8wo", "--out", str(out)),
                           "already exists", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_f08_overwrite_never_deletes_a_foreign_folder(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "cat.jpg").write_bytes(b"meow")
    assert_one_clear_error(invoke("build", "tiny-flux", "--out", str(out), "--overwrite"), "not an aotpack artifact")
    assert (out / "cat.jpg").read_bytes() == b"meow"


# ---- load: manifest, platform, files ------------------------------------------------------------------

def test_f09_missing_artifact(tmp_path):
    assert_one_clear_error(invoke("inspect", str(tmp_path / "nope")), "no artifact at")


def test_f10_folder_without_manifest(tmp_path):
    assert_one_clear_error(invoke("inspect", str(tmp_path)), "not an aotpack artifact")


@pytest.mark.parametrize(
    "row,text,expect",
    [
        ("f11_not_json", b"{ this is not json", "not valid JSON"),
        ("f12_binary_garbage", b"\xff\xfe\x00\x01", "not valid JSON"),
        ("f13_not_an_object", b"[]", "must hold a JSON object"),
    ],
)
def test_unreadable_manifest(artifacts, tmp_path, row, text, expect):
    out = artifacts.copy("int8wo", tmp_path / row)
    (out / mf.MANIFEST).write_bytes(text)
    assert_one_clear_error(invoke("inspect", str(out)), expect)


@pytest.mark.parametrize(
    "row,change,expect",
    [
        ("f14_old_schema", lambda d: d.update(schema_version=0), "schema 0 is not supported"),
        ("f15_newer_aotpack", lambda d: d.update(schema_version=99, aotpack_version="7.0"), "newer aotpack (7.0)"),
        ("f16_unknown_field", lambda d: d.update(surprise=True), "unknown field 'surprise'"),
        ("f17_missing_field", lambda d: d.pop("request"), "missing field 'request'"),
        ("f18_traversal_name", lambda d: d["files"].update({"../../.bashrc": {"size": 1, "sha256": "0" * 64}}),
         "not a plain file name"),
    ],
)
def test_bad_manifest_is_refused(artifacts, tmp_path, row, change, expect):
    out = artifacts.copy("int8wo", tmp_path / row)
    edit_manifest(out, change)
    assert_one_clear_error(invoke("run", str(out), "--prompt", "x", "--out", str(tmp_path / "o.png")), expect)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "row,change,expect",
    [
        ("f19_other_torch", lambda p: p.update(torch="2.11.0"), "built with torch 2.11.0"),
        ("f20_other_device", lambda p: p.update(device="cuda", cuda_capability="9.0"), "built for device cuda"),
        ("f21_other_isa", lambda p: p.update(isa="amx+avx512_fp16"), "built for CPU ISA amx+avx512_fp16"),
        ("f22_other_arch", lambda p: p.update(arch="aarch64"), "built for aarch64"),
    ],
)
def test_other_platform_is_refused(artifacts, tmp_path, row, change, expect):
    out = artifacts.copy("int8wo", tmp_path / row)
    edit_manifest(out, lambda d: change(d["platform"]))
    assert_one_clear_error(invoke("run", str(out), "--prompt", "x", "--out", str(tmp_path / "o.png")),
                           expect, "rebuild")


def test_f23_missing_weights(artifacts, tmp_path):
    out = artifacts.copy("int8wo", tmp_path / "a")
    (out / WEIGHTS).unlink()
    assert_one_clear_error(invoke("run", str(out), "--prompt", "x", "--out", str(tmp_path / "o.png")),
                           "weights.safetensors is missing")


def test_f24_truncated_model(artifacts, tmp_path):
    out = artifacts.copy("int8wo", tmp_path / "a")
    data = (out / MODEL).read_bytes()
    (out / MODEL).write_bytes(data[: len(data) // 2])
    assert_one_clear_error(invoke("run", str(out), "--prompt", "x", "--out", str(tmp_path / "o.png")),
                           "model.pt2 is", "truncated or replaced")


def test_f25_flipped_byte_in_weights(artifacts, tmp_path):
    out = artifacts.copy("int8wo", tmp_path / "a")
    data = bytearray((out / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / WEIGHTS).write_bytes(bytes(data))
    res = run_cli("run", str(out), "--prompt", "x", "--out", str(tmp_path / "o.png"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "Error: weights.safetensors does not match its sha256" in res.stderr


def test_f25b_flipped_byte_after_a_verified_load(artifacts, tmp_path):
    """A verified file is not hashed again while its identity (inode, size, mtime, ctime) holds; an in-place
    edit that even restores the mtime still changes the ctime, and is caught."""
    out = artifacts.copy("int8wo", tmp_path / "a")
    aotpack.load(out)  # hashes and remembers
    from aotpack.artifact.files import verified_before

    assert verified_before(out / WEIGHTS, os.stat(out / WEIGHTS), mf.read(out).files[WEIGHTS].sha256)
    st = (out / WEIGHTS).stat()
    with open(out / WEIGHTS, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(out / WEIGHTS, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        aotpack.load(out)


def test_f26_weights_of_another_build(artifacts, tmp_path):
    """Hashes agree (the manifest was re-written), but the names and shapes are another build's."""
    out = artifacts.copy("none", tmp_path / "a")
    shutil.copy(artifacts("int8wo") / WEIGHTS, out / WEIGHTS)
    edit_manifest(out, lambda d: None, rehash=True)
    with pytest.raises(IntegrityError, match="weights do not match the compiled constants"):
        aotpack.load(out)


def test_f27_not_enough_memory(artifacts, monkeypatch):
    # Simulates a small machine: the reserve aotpack keeps free is raised past what is available.
    monkeypatch.setenv("AOTPACK_MEMORY_RESERVE", str(1 << 50))
    with pytest.raises(ResourceError, match=r"the weights need .* GiB but only .* GiB of memory is available"):
        aotpack.load(artifacts("int8wo"))


# ---- call time ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def module(artifacts):
    return aotpack.load(artifacts("int8wo"))


def good_inputs(module, batch=2, seq=16):
    cfg = module.config
    return dict(
        hidden_states=torch.randn(batch, seq, cfg.in_channels),
        encoder_hidden_states=torch.randn(batch, 32, cfg.joint_attention_dim),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
        img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(32, 3),
    )


@pytest.mark.parametrize(
    "row,mutate,expect",
    [
        ("f28_batch_too_large", lambda m, x: good_inputs(m, batch=5), "outside the artifact's range [1, 4]"),
        ("f29_image_too_large", lambda m, x: good_inputs(m, seq=300), "outside the artifact's range [4, 256]"),
        ("f30_wrong_dtype", lambda m, x: x | {"hidden_states": x["hidden_states"].bfloat16()}, "dtype bfloat16"),
        ("f31_wrong_device", lambda m, x: x | {"timestep": torch.empty(2, device="meta")}, "is on meta"),
        ("f32_missing_input", lambda m, x: {k: v for k, v in x.items() if k != "guidance"}, "missing input(s): guidance"),
        ("f33_text_length", lambda m, x: x | {"encoder_hidden_states": torch.randn(2, 40, 32)},
         "(text_seq) is 40, outside the artifact's range [1, 32]"),
        ("f34_sizes_disagree", lambda m, x: x | {"img_ids": torch.zeros(20, 3)}, "another input has 16"),
    ],
)
def test_bad_call_inputs(module, row, mutate, expect):
    with pytest.raises(InputError) as e:
        module(**mutate(module, good_inputs(module)))
    assert expect in e.value.cause


def test_f35_lora_scale_at_call_time(module):
    with pytest.raises(InputError, match="cannot change compiled code"):
        module(**good_inputs(module), joint_attention_kwargs={"scale": 0.5})


def test_f36_image_size_out_of_range_on_the_cli(artifacts, tmp_path):
    assert_one_clear_error(
        invoke("run", str(artifacts("int8wo")), "--prompt", "x", "--height", "512", "--out", str(tmp_path / "o.png")),
        "--height 512 is outside what the artifact accepts: 32..256")
    assert not (tmp_path / "o.png").exists()


# ---- build faults: disk full, interrupt ----------------------------------------------------------------

@pytest.mark.slow
def test_f37_disk_full_during_build(tmp_path, monkeypatch):
    from aotpack.builder import pipeline

    def full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "w"))

    monkeypatch.setattr(pipeline, "save_aligned", full)
    out = tmp_path / "a"
    assert_one_clear_error(invoke("build", "tiny-flux", "--quant", "none", "--out", str(out)),
                           "could not write the artifact: No space left on device", "free disk space")
    assert not out.exists() and no_partials(tmp_path)


def test_f38_interrupt_during_build_then_build_again(tmp_path, artifacts):
    out = tmp_path / "a"
    env = dict(os.environ, AOTPACK_CACHE=str(tmp_path / "cache"))  # an empty compile cache: it must compile
    proc = subprocess.Popen([sys.executable, "-m", "aotpack.cli", "build", "tiny-flux", "--quant", "none",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # wait until the compiler is running, then press Ctrl-C
        if line.startswith("compile"):
            time.sleep(2)
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, rest
    assert "Error: interrupted" in rest and "Traceback" not in rest
    assert not out.exists() and no_partials(tmp_path)
    # the same destination and the same cache; the code taken from a finished build (--reuse) rather than
    # compiled a second time
    again = run_cli("build", "tiny-flux", "--quant", "none", "--out", str(out), "--reuse", str(artifacts("none")),
                    env={"AOTPACK_CACHE": env["AOTPACK_CACHE"]})
    assert again.returncode == 0, again.stderr
    assert (out / mf.MANIFEST).is_file() and no_partials(tmp_path)


# ---- what aotpack never does -----------------------------------------------------------------------------

def test_f39_no_pickle_anywhere_in_the_package():
    """No pickle, no torch.load without weights_only=True, no pickle_weights constants format."""
    for path in (REPO / "aotpack").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "pickle.load" not in text, path
        assert "pickle_weights" not in text, path
        for i, line in enumerate(text.splitlines()):
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}:{i + 1}"


def test_f40_compiled_code_is_never_callable_before_its_constants(artifacts, monkeypatch):
    """Running the AOTI model before load_constants crashed the process: load() checks the weights first,
    and an error there leaves no half-ready module behind."""
    from aotpack import _torch_compat
    from aotpack.serve import load as runtime

    path = artifacts("int8wo")  # built first: the build itself loads the package to verify it
    calls = []
    real = _torch_compat.open_package

    def spy(path, **kwargs):
        m = real(path, **kwargs)
        calls.append(m)
        return m

    monkeypatch.setattr(_torch_compat, "open_package", spy)
    monkeypatch.setattr(runtime, "_check_constants", lambda *a: (_ for _ in ()).throw(IntegrityError("bad", "x")))
    with pytest.raises(IntegrityError):
        aotpack.load(path)
    assert len(calls) == 1  # the package was opened, but nothing was returned to call


# ---- LoRA, video and build options ------------------------------------------------------------------------

def test_f41_lora_file_missing(tmp_path):
    assert_one_clear_error(invoke("build", "tiny-flux", "--lora", str(tmp_path / "nope.safetensors"),
                                  "--out", str(tmp_path / "x")), "LoRA file", "does not exist")
    assert not (tmp_path / "x").exists()


def test_f42_lora_not_safetensors(tmp_path):
    bad = tmp_path / "style.bin"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    assert_one_clear_error(invoke("build", "tiny-flux", "--lora", str(bad), "--out", str(tmp_path / "x")),
                           "is not .safetensors", "never loads pickled weights")


def test_f43_lora_for_another_model(artifacts, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4)}, str(path))
    module = aotpack.load(artifacts("int8wo"))
    with pytest.raises(InputError, match="this LoRA was trained for another model"):
        module.swap_lora(path)
    save_file({"transformer.no_such_block.proj.lora_A.weight": torch.randn(4, 32),
               "transformer.no_such_block.proj.lora_B.weight": torch.randn(32, 4)}, str(path))
    with pytest.raises(InputError, match="targets transformer|trained for another model"):
        module.swap_lora(path)


def test_f44_lora_that_also_changes_the_text_encoder(artifacts, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "te.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)},
              str(path))
    assert_one_clear_error(invoke("build", "tiny-flux", "--lora", str(path), "--out", str(tmp_path / "x")),
                           "also changes text_encoder", "keep only the transformer keys")
    assert not (tmp_path / "x").exists() and no_partials(tmp_path)


def test_f45_compile_vae_on_a_video_recipe(tmp_path):
    assert_one_clear_error(invoke("build", "tiny-cogvideox", "--compile-vae", "--out", str(tmp_path / "x")),
                           "--compile-vae is not available for tiny-cogvideox")


def test_f46_frames_out_of_range_or_not_4k_plus_1(artifacts, tmp_path):
    path = str(artifacts("int8wo", recipe="tiny-cogvideox"))
    for frames in ("8", "21"):
        assert_one_clear_error(invoke("run", path, "--prompt", "x", "--frames", frames, "--out", str(tmp_path / "v.gif")),
                               f"--frames {frames} is outside what the artifact accepts: 5..17, of the form 4k+1")
    assert not (tmp_path / "v.gif").exists()


def test_f47_video_artifact_to_an_image_file_and_frames_for_an_image_artifact(artifacts, tmp_path):
    assert_one_clear_error(invoke("run", str(artifacts("int8wo", recipe="tiny-cogvideox")), "--prompt", "x",
                                  "--out", str(tmp_path / "v.png")), "this artifact makes videos")
    assert_one_clear_error(invoke("run", str(artifacts("int8wo")), "--prompt", "x", "--frames", "9",
                                  "--out", str(tmp_path / "v.png")), "--frames is for video artifacts")


def _local_copy(tmp_path):
    from aotpack.builder.tiny import ensure_builtin

    local = tmp_path / "local"
    shutil.copytree(ensure_builtin("tiny-flux"), local)
    return local


def test_f48_checkpoint_with_pickled_weights_only(tmp_path):
    local = _local_copy(tmp_path)
    for f in (local / "transformer").glob("*.safetensors"):
        f.unlink()
    (local / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    assert_one_clear_error(invoke("build", "tiny-flux", "--model", str(local), "--out", str(tmp_path / "x")),
                           "holds no safetensors weights (only pickled diffusion_pytorch_model.bin)")
    assert not (tmp_path / "x").exists() and no_partials(tmp_path)


def test_f49_checkpoint_with_a_broken_safetensors_header(tmp_path):
    local = _local_copy(tmp_path)
    weights = next((local / "transformer").glob("*.safetensors"))
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    assert_one_clear_error(invoke("build", "tiny-flux", "--model", str(local), "--out", str(tmp_path / "x")),
                           "is not a safetensors file")
    assert not (tmp_path / "x").exists() and no_partials(tmp_path)


def test_f50_side_scheme_unknown(tmp_path):
    assert_one_clear_error(invoke("build", "tiny-flux", "--quantize-text-encoder", "int3", "--out", str(tmp_path / "x")),
                           "--quantize-text-encoder: unknown quantization scheme 'int3'")


def test_f51_cuda_graphs_for_a_cpu_artifact(artifacts, tmp_path):
    assert_one_clear_error(invoke("run", str(artifacts("int8wo")), "--prompt", "x", "--cuda-graphs",
                                  "--out", str(tmp_path / "o.png")), "cuda_graphs needs a CUDA artifact")


def test_f52_plan_file_broken_or_for_another_model(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    assert_one_clear_error(invoke("build", "tiny-flux", "--plan", str(bad), "--out", str(tmp_path / "x")),
                           "plan file plan.json is not valid JSON")
    bad.write_text(json.dumps({"version": 1, "layers": {"x.proj": {"scheme": "fp8dq"}}}))
    assert_one_clear_error(invoke("build", "tiny-flux", "--plan", str(bad), "--out", str(tmp_path / "x")),
                           "uses fp8dq, which cannot run here")
    bad.write_text(json.dumps({"version": 1, "layers": {"no_such.proj": {"scheme": "int8wo"}}}))
    assert_one_clear_error(invoke("build", "tiny-flux", "--plan", str(bad), "--out", str(tmp_path / "x")),
                           "the plan names layers this model does not have: no_such.proj")
    assert not (tmp_path / "x").exists() and no_partials(tmp_path)
    assert_one_clear_error(invoke("build", "tiny-flux", "--plan", str(bad), "--quant", "int8wo",
                                  "--out", str(tmp_path / "x")), "--plan and --quant int8wo contradict")
