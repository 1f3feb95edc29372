"""The trust chain, tested as an attacker who can write to the folders aotpack reads would break it.

Native code runs only from the bytes that were verified; caches are untrusted input; requests are bounded;
signed artifacts load only with a trusted key. Row ids (t01-t15) match README's Troubleshooting table.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import aotpack
from aotpack.artifact import manifest as mf
from aotpack.artifact.files import MODEL, WEIGHTS, read_safetensors_header, sha256_file
from aotpack.cli import cli
from aotpack.errors import (BuildError, InputError, IntegrityError, ManifestError,
                            SignatureError)
from aotpack.paths import cache_dir

from conftest import no_partials


def invoke(*args, env=None, **kwargs):
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False, **kwargs)


def one_error(result, *parts):
    assert result.exit_code == 1, (result.exit_code, result.output)
    text = result.output
    assert "Traceback" not in text
    assert len([ln for ln in text.splitlines() if ln.startswith("Error:")]) == 1, text
    for part in parts:
        assert part in text, (part, text)


def sha(path: Path) -> str:
    return sha256_file(path)


def flux_inputs(module, batch=2, seq=16, seed=0):
    cfg = module.config
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, seq, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, 32, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.full((batch,), 0.5), guidance=torch.full((batch,), 3.5),
                img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(32, 3))


# ---- severe: the attacks themselves ------------------------------------------------------------------------------

def test_t01_a_planted_compile_cache_entry_is_removed_and_never_opened(artifacts, tmp_path, opened, monkeypatch):
    """A regional build of two block classes: one genuine cache entry, one planted (real AOTInductor code of
    another build, with a record that names its bytes): the planted one is removed and compiled afresh."""
    genuine = mf.read(artifacts("int8wo", regional=True))
    by_class = {m.block_class: m for m in genuine.modules}
    double, single = by_class["FluxTransformerBlock"], by_class["FluxSingleTransformerBlock"]
    cache = tmp_path / "cache"  # this test's own compile cache (the builtin pipelines shared)
    (cache / "compiled").mkdir(parents=True)
    (cache / "builtin").symlink_to(cache_dir() / "builtin", target_is_directory=True)
    for suffix in (".pt2", ".json"):  # the genuine entry of the double block, as the session compiled it
        shutil.copy(cache_dir() / "compiled" / f"{double.compile_key}{suffix}", cache / "compiled")
    foreign = artifacts("int8wo") / MODEL
    entry = cache / "compiled" / f"{single.compile_key}.pt2"
    shutil.copy(foreign, entry)
    entry.with_suffix(".json").write_text(json.dumps({"kind": "compiled", "mac": "0" * 64, "payload": {
        "key": single.compile_key, "size": foreign.stat().st_size, "sha256": sha(foreign)}}))
    monkeypatch.setenv("AOTPACK_CACHE", str(cache))
    before = len(opened)  # the shared artifacts above may have been built in this very test
    out = aotpack.build("tiny-flux", "int8wo", regional=True, out=tmp_path / "a")
    m = mf.read(out)
    assert {x.block_class: x.compiled for x in m.modules} == {"FluxTransformerBlock": "compile cache",
                                                              "FluxSingleTransformerBlock": "compiled"}
    assert sha(foreign) not in opened[before:] and m.files[single.code].sha256 != sha(foreign)
    assert entry.read_bytes() == (out / single.code).read_bytes()  # the genuine code went back into the cache


def test_t01_the_build_enforces_its_compiled_vs_eager_check(artifacts, tmp_path, monkeypatch):
    from aotpack.builder import pipeline

    artifacts("none")  # its code is in the compile cache: this build compiles nothing
    real = pipeline.component_target

    def wrong_reference(*a, **k):  # as if the compiled code computed something else than the model
        target = real(*a, **k)
        target.reference = target.reference + 1.0
        return target

    monkeypatch.setattr(pipeline, "component_target", wrong_reference)
    with pytest.raises(BuildError, match=r"compiled transformer differs from eager by .* \(tolerance"):
        aotpack.build("tiny-flux", "none", out=tmp_path / "a")
    assert not (tmp_path / "a").exists() and no_partials(tmp_path)


def test_t01_a_regional_build_holds_its_blocks_end_to_end_to_eager(artifacts, tmp_path, monkeypatch):
    """Each compiled block is checked alone in verify; the blocks handing each other their outputs are checked
    end to end at the smallest request: wrong there, no artifact."""
    from aotpack.builder import pipeline

    artifacts("int8wo", regional=True)  # its code is in the compile cache: this build compiles nothing
    real = pipeline.block_targets

    def wrong_whole(*a, **k):
        targets, whole = real(*a, **k)
        return targets, replace(whole, reference=whole.reference + 1.0)

    monkeypatch.setattr(pipeline, "block_targets", wrong_whole)
    with pytest.raises(BuildError, match=r"compiled transformer differs from eager by .* \(tolerance"):
        aotpack.build("tiny-flux", "int8wo", regional=True, out=tmp_path / "a")
    assert not (tmp_path / "a").exists() and no_partials(tmp_path)


def test_t01_a_regional_build_holds_every_instance_to_its_own_eager_block(artifacts, tmp_path, monkeypatch):
    """Every instance runs the shared code with its own weights at the smallest request and is held to its own
    eager output there: one instance's reference wrong (as if its weights were not the ones swapped in), no
    artifact, and the error names that instance; so are the first instance's inputs at the capture size."""
    from aotpack.builder import pipeline

    artifacts("int8wo", regional=True)
    real = pipeline.block_targets

    def one_wrong(*a, **k):
        targets, whole = real(*a, **k)
        t = next(t for t in targets if len(t.instances) > 1) if any(len(t.instances) > 1 for t in targets) \
            else targets[0]
        t.references = [*t.references[:-1], t.references[-1] + 1.0]
        return targets, whole

    monkeypatch.setattr(pipeline, "block_targets", one_wrong)
    with pytest.raises(BuildError, match=r"compiled transformer\.\S+ at the smallest request differs from eager"):
        aotpack.build("tiny-flux", "int8wo", regional=True, out=tmp_path / "a")
    assert not (tmp_path / "a").exists() and no_partials(tmp_path)

    def first_wrong(*a, **k):
        targets, whole = real(*a, **k)
        targets[0].reference = targets[0].reference + 1.0
        return targets, whole

    monkeypatch.setattr(pipeline, "block_targets", first_wrong)
    with pytest.raises(BuildError, match=r"compiled transformer\.transformer_blocks\.0 differs from eager"):
        aotpack.build("tiny-flux", "int8wo", regional=True, out=tmp_path / "b")


def test_t02_reuse_folder_swapped_after_the_build_started_is_caught(artifacts, tmp_path, monkeypatch, opened):
    from aotpack.builder import pipeline

    donor = artifacts.copy("int8wo", tmp_path / "donor")
    foreign = artifacts("none") / MODEL
    before = len(opened)
    real = pipeline.export_fitted

    def export_then_swap(*a, **k):  # between the check at the start and the copy after export
        done = real(*a, **k)
        shutil.copy(foreign, donor / MODEL)
        return done

    monkeypatch.setattr(pipeline, "export_fitted", export_then_swap)
    with pytest.raises(BuildError) as e:
        aotpack.build("tiny-flux", "int8wo", reuse=donor, out=tmp_path / "a")
    assert f"--reuse {donor}: model.pt2" in e.value.cause and "changed since the build started" in e.value.hint
    assert sha(foreign) not in opened[before:]
    assert not (tmp_path / "a").exists() and no_partials(tmp_path)


def test_t03_swapping_files_during_loads_never_runs_unverified_code(artifacts, tmp_path, opened):
    """One thread swaps the code, the weights and the whole folder (a concurrent --overwrite) while the other
    loads in a loop: every load either refuses in one line or runs exactly the code its own manifest names."""
    served = artifacts.copy("int8wo", tmp_path / "served")
    other = artifacts("none")
    spare = tmp_path / "spare"
    for name in (MODEL, WEIGHTS):
        shutil.copy(served / name, spare.with_name(f"good-{name}"))
        shutil.copy(other / name, spare.with_name(f"bad-{name}"))
    shutil.copytree(other, tmp_path / "other-build")
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            step = i % 6
            if step in (0, 2):  # foreign code / weights renamed into place
                name = MODEL if step == 0 else WEIGHTS
                shutil.copy(tmp_path / f"bad-{name}", tmp_path / "x")
                os.replace(tmp_path / "x", served / name)
            elif step in (1, 3):  # and back
                name = MODEL if step == 1 else WEIGHTS
                shutil.copy(tmp_path / f"good-{name}", tmp_path / "x")
                os.replace(tmp_path / "x", served / name)
            elif step == 4:  # the whole folder replaced by another build, as --overwrite does
                os.rename(served, tmp_path / "held")
                os.rename(tmp_path / "other-build", served)
            else:
                os.rename(served, tmp_path / "other-build")
                os.rename(tmp_path / "held", served)
            i += 1
            time.sleep(0.002)

    thread = threading.Thread(target=swapper)
    thread.start()
    loads = refused = 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            before = len(opened)
            try:
                module = aotpack.load(served)
            except (IntegrityError, ManifestError) as e:
                refused += 1
                assert "\n" not in e.cause
                continue
            loads += 1
            assert opened[before:] == [module.manifest.files[MODEL].sha256]
    finally:
        stop.set()
        thread.join()
    assert loads and refused, (loads, refused)
    assert set(opened) <= {sha(tmp_path / f"good-{MODEL}"), sha(tmp_path / f"bad-{MODEL}")}


# ---- defects ----------------------------------------------------------------------------------------------------

def test_t07_a_package_without_the_constants_signature_is_refused():
    from aotpack.serve.load import _check_constants

    class Unsigned:  # a .pt2 compiled by anything but aotpack
        def get_metadata(self):
            return {}

        def get_constant_fqns(self):
            return ["component.w"]

    module = mf.validate(__import__("test_manifest").sample()).component
    with pytest.raises(IntegrityError, match="carries no constants signature"):
        _check_constants(Unsigned(), module, {"transformer.w": torch.zeros(2)}, "transformer")


def test_t08_a_missing_path_is_never_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts").mkdir()
    import aotpack.hub

    monkeypatch.setattr(aotpack.hub, "resolve_for_load", lambda *a, **k: pytest.fail("looked up on the Hub"))
    for path in ("artifacts/nothing", "./x/y", "/abs/path", "a/b/c"):
        one_error(invoke("run", path, "--prompt", "x"), f"no artifact at {path}", "never looked up on the Hub")
    (tmp_path / "me" / "model").mkdir(parents=True)  # a folder here named like a repo id: Hub options refused
    one_error(invoke("run", "me/model", "--prompt", "x", "--revision", "v1"), "me/model is a folder here",
              "revision apply to Hub repo ids only")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_error(invoke("run", "nobody/nothing", "--prompt", "x", "--revision", "v1"),
              "nobody/nothing is no folder here, and as a Hub repo:")


def _request(**kwargs):
    from aotpack.builder.recipe import get_recipe
    from aotpack.serve.run import check_request

    from test_manifest import sample

    return check_request(mf.validate(sample()), get_recipe("tiny-flux"), **{"prompt": "a dog", **kwargs})


@pytest.mark.parametrize("kwargs,expect", [
    ({"steps": 0}, "--steps 0 is outside 1..50"),
    ({"steps": 51}, "--steps 51 is outside 1..50"),
    ({"height": 0}, "--height 0 is outside what the artifact accepts"),
    ({"width": 0}, "--width 0 is outside"),
    ({"guidance_scale": float("nan")}, "--guidance-scale nan is not a finite number"),
    ({"guidance_scale": float("inf")}, "--guidance-scale inf is not a finite number"),
    ({"seed": -1}, "--seed -1 is not in 0..2^63-1"),
    ({"batch": 5}, "--batch 5 is outside 1..4"),
    ({"prompt": "a \udcff dog"}, "--prompt is not valid UTF-8"),
    ({"prompt": "  "}, "--prompt is empty"),
    ({"frames": 9}, "--frames is for video artifacts"),
    ({"max_sequence_length": 33}, "--max-sequence-length 33 is not one the artifact accepts (32)"),
    ({"max_sequence_length": 16}, "--max-sequence-length 16 is not one the artifact accepts (32)"),  # static text
])
def test_t09_requests_are_bounded(kwargs, expect):
    with pytest.raises(InputError) as e:
        _request(**kwargs)
    assert expect in e.value.cause


def test_t09_defaults_fill_in_only_what_was_not_given():
    call = _request()
    assert (call.height, call.width, call.steps, call.guidance_scale) == (128, 128, 4, 3.5)
    assert _request(steps=50, seed=2**63 - 1).steps == 50


def test_t09_bad_settings_in_the_environment_are_one_line_each(artifacts, tmp_path):
    path = str(artifacts("int8wo"))
    one_error(invoke("run", path, "--prompt", "x", "--guidance-scale", "nan"), "--guidance-scale nan")
    one_error(invoke("run", path, "--prompt", "x", "--steps", "0"), "--steps 0 is outside 1..50")
    one_error(invoke("run", path, "--prompt", "x", "--out", str(tmp_path / "o.png"),
                     env={"AOTPACK_MEMORY_RESERVE": "lots"}), "AOTPACK_MEMORY_RESERVE=lots is not a number of bytes")
    one_error(invoke("run", path, "--prompt", "x", env={"AOTPACK_VERIFY": "fast"}), "AOTPACK_VERIFY=fast")
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    one_error(invoke("build", "tiny-flux", "--out", str(tmp_path / "b"), env={"AOTPACK_CACHE": str(blocked)}),
              f"AOTPACK_CACHE={blocked} is not writable")
    # a prompt that is not UTF-8 on the command line (argv bytes)
    res = subprocess.run([sys.executable, "-m", "aotpack.cli", "run", path, "--prompt", b"a \xff dog"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Error: --prompt is not valid UTF-8" in res.stderr, res.stderr


def test_t10_the_manifest_pins_the_checkpoint_and_a_lora_swap_checks_it(artifacts, lora_file, tmp_path):
    from aotpack.builder.tiny import ensure_builtin

    local = tmp_path / "my-flux"
    shutil.copytree(ensure_builtin("tiny-flux"), local)
    out = aotpack.build("tiny-flux", "int8wo", model=str(local), out=tmp_path / "a")
    m = mf.read(out)
    weights = next((local / "transformer").glob("*.safetensors"))
    assert m.model.source == "local" and m.model.files[weights.name].sha256 == sha(weights)
    module = aotpack.load(out)
    module.swap_lora(lora_file, 0.5)  # the checkpoint is as it was: fine
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="the checkpoint this artifact was built from changed"):
        module.swap_lora(lora_file, 0.8)


@pytest.mark.parametrize("make,expect", [
    (lambda: (10**12).to_bytes(8, "little") + b"{}", "not a safetensors file"),
    (lambda: _st({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [4, 12])}, 12), "overlap"),
    (lambda: _st({"a": ("F32", [4], [0, 16])}, 8), "out of bounds"),
    (lambda: _st({"a": ("F32", [3], [0, 8])}, 8), "wrong size"),
    (lambda: _st({"a": ("Q4", [2], [0, 8])}, 8), "unknown dtype"),
])
def test_t11_malformed_safetensors_headers_are_integrity_errors(tmp_path, make, expect):
    path = tmp_path / "w.safetensors"
    path.write_bytes(make())
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(IntegrityError, match=expect):
            read_safetensors_header(fd, path.stat().st_size, path.name)
    finally:
        os.close(fd)


def _st(entries: dict, data_bytes: int) -> bytes:
    header = json.dumps({k: {"dtype": d, "shape": s, "data_offsets": o} for k, (d, s, o) in entries.items()}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * data_bytes


def test_t13_inspect_escapes_control_characters(artifacts, tmp_path):
    out = artifacts.copy("int8wo", tmp_path / "a")
    data = json.loads((out / mf.MANIFEST).read_text())
    data["recipe"]["variant"] = "x\nError: this artifact is safe\x1b[2K"
    data["model"]["checkpoint"] = "evil\r\nsignature   signed by you"
    (out / mf.MANIFEST).write_text(json.dumps(data))
    res = invoke("inspect", str(out))
    assert res.exit_code == 0
    assert not any(ln.startswith(("Error:", "signature   signed by you")) for ln in res.output.splitlines())
    assert "\x1b" not in res.output and "\\x1b" in res.output


def test_t14_an_overwrite_rebuild_replaces_by_rename_and_a_running_server_keeps_its_weights(artifacts, lora_file,
                                                                                           tmp_path):
    out = artifacts.copy("int8wo", tmp_path / "a")
    module = aotpack.load(out)
    x = flux_inputs(module)
    before = module(**x, return_dict=False)[0]
    inode = os.stat(out / WEIGHTS).st_ino
    aotpack.build("tiny-flux", "int8wo", out=out, overwrite=True, lora=str(lora_file), lora_scale=0.8)
    assert os.stat(out / WEIGHTS).st_ino != inode  # new files renamed in, the old ones never written
    assert torch.equal(module(**x, return_dict=False)[0], before)  # the mapped old weights are intact
    assert not torch.equal(aotpack.load(out)(**x, return_dict=False)[0], before)


def test_t15_threads_share_a_module_and_a_swap_never_mixes_weight_sets(artifacts, lora_file):
    from concurrent.futures import ThreadPoolExecutor

    module = aotpack.load(artifacts("int8wo"))
    cases = [flux_inputs(module, b, s, seed=i) for i, (b, s) in enumerate([(1, 4), (2, 16), (3, 48), (4, 64)])]
    with torch.no_grad():
        serial = [module(**x, return_dict=False)[0] for x in cases]
        with ThreadPoolExecutor(4) as pool:  # 4 threads x 10 calls of mixed shapes
            got = list(pool.map(lambda i: (i % 4, module(**cases[i % 4], return_dict=False)[0]), range(40)))
        assert all(torch.equal(out, serial[i]) for i, out in got)
        module.swap_lora(lora_file, 0.8)
        styled = [module(**x, return_dict=False)[0] for x in cases]
        module.swap_lora(None)
        stop = threading.Event()

        def toggle():
            while not stop.is_set():
                module.swap_lora(lora_file, 0.8)
                module.swap_lora(None)

        swapper = threading.Thread(target=toggle)
        swapper.start()
        try:
            with ThreadPoolExecutor(3) as pool:
                got = list(pool.map(lambda i: (i % 4, module(**cases[i % 4], return_dict=False)[0]), range(60)))
        finally:
            stop.set()
            swapper.join()
    assert all(torch.equal(out, serial[i]) or torch.equal(out, styled[i]) for i, out in got)
    assert any(torch.equal(out, styled[i]) for i, out in got) or True  # timing decides how many see the LoRA


# ---- signed artifacts -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return _keys(tmp_path_factory.mktemp("keys"))


def _keys(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Two EC key pairs (PEM): the builder's and a stranger's."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = {}
    for name in ("builder", "stranger"):
        key = ec.generate_private_key(ec.SECP256R1())
        (folder / f"{name}.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        (folder / f"{name}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        out[name] = (folder / f"{name}.pem", folder / f"{name}.pub")
    return out


@pytest.fixture(scope="module")
def signed(artifacts, keys, tmp_path_factory):
    folder = artifacts.copy("int8wo", tmp_path_factory.mktemp("signed") / "a")
    res = invoke("sign", str(folder), "--key", str(keys["builder"][0]))
    assert res.exit_code == 0, res.output
    return folder


def test_signed_artifact_loads_with_its_key_and_says_who_signed(signed, keys):
    from aotpack import signing

    module = aotpack.load(signed, trusted_keys=[keys["builder"][1]])
    assert module.signer == signing.fingerprint(keys["builder"][1])
    res = invoke("inspect", str(signed))
    assert f"signed; claims key {module.signer[:16]}" in res.output


def test_unsigned_artifact_is_refused_when_a_key_is_required(artifacts, keys, opened):
    path = artifacts("int8wo")
    before = len(opened)
    with pytest.raises(SignatureError, match="is not signed, and trusted keys are required"):
        aotpack.load(path, trusted_keys=[keys["builder"][1]])
    assert not opened[before:]  # refused before any native code was opened


def test_signed_by_another_key_is_refused(signed, keys, monkeypatch, opened):
    with pytest.raises(SignatureError, match="not signed by any trusted key"):
        aotpack.load(signed, trusted_keys=[keys["stranger"][1]])
    monkeypatch.setenv("AOTPACK_TRUSTED_KEYS", str(keys["stranger"][1]))
    with pytest.raises(SignatureError, match="not signed by any trusted key"):
        aotpack.load(signed)
    monkeypatch.setenv("AOTPACK_TRUSTED_KEYS", os.pathsep.join([str(keys["stranger"][1]), str(keys["builder"][1])]))
    assert aotpack.load(signed).signer
    assert not opened[:-1]


@pytest.mark.parametrize("target", ["manifest.json", WEIGHTS, MODEL])
def test_one_byte_changed_after_signing_is_refused(signed, keys, tmp_path, target, opened):
    copy = tmp_path / "copy"
    shutil.copytree(signed, copy)
    data = bytearray((copy / target).read_bytes())
    index = data.index(b'"peak_rss_bytes": ') + 18 if target == "manifest.json" else len(data) // 2
    while target == "manifest.json" and chr(data[index + 1]).isdigit():  # its last digit: still a JSON number
        index += 1
    data[index] = (data[index] + 1 - 48) % 10 + 48 if target == "manifest.json" else data[index] ^ 1
    (copy / target).write_bytes(bytes(data))
    with pytest.raises((SignatureError, IntegrityError)) as e:
        aotpack.load(copy, trusted_keys=[keys["builder"][1]])
    assert "differs from the signed file" in e.value.cause or "does not match its sha256" in e.value.cause
    assert not opened


def test_build_signs_and_run_requires_the_key_on_the_command_line(artifacts, keys, tmp_path):
    artifacts("int8wo")  # the compile cache holds its code
    res = invoke("build", "tiny-flux", "--quant", "int8wo", "--out", str(tmp_path / "a"),
                 "--sign-key", str(keys["builder"][0]))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "signature.sig").is_file()
    args = ["run", str(tmp_path / "a"), "--prompt", "a dog", "--steps", "1", "--height", "32", "--width", "32",
            "--out", str(tmp_path / "dog.png")]
    assert invoke(*args, "--trusted-key", str(keys["builder"][1])).exit_code == 0
    one_error(invoke(*args, "--trusted-key", str(keys["stranger"][1])), "not signed by any trusted key")
    one_error(invoke("build", "tiny-flux", "--out", str(tmp_path / "b"), "--sign-key", str(keys["builder"][1])),
              "is not an unencrypted PEM private key")


def test_t40_a_manifest_listing_the_inputs_in_another_order_is_refused_at_load(artifacts, tmp_path, opened):
    """The compiled code reads its dict by position and checks nothing: a manifest whose inputs are reordered
    (edited, or another build's) would feed hidden_states into the timestep slot. Refused at load, one line,
    before any compiled call; the same check holds for each block of a regional artifact."""
    for options in ({}, {"regional": True}):
        art = artifacts.copy("none" if not options else "int8wo", tmp_path / f"a{len(options)}", **options)
        data = json.loads((art / mf.MANIFEST).read_text())
        tensors = data["modules"][0]["inputs"]["tensors"]
        tensors.insert(0, tensors.pop(1))
        (art / mf.MANIFEST).write_text(json.dumps(data))
        with pytest.raises(IntegrityError) as e:
            aotpack.load(art, trusted_keys=[])
        assert "the manifest lists [" in e.value.cause and "takes [" in e.value.cause, e.value.cause
        assert "\n" not in e.value.cause and "edited" in e.value.hint
        one_error(invoke("run", str(art), "--prompt", "x", "--out", str(tmp_path / "x.png")), "the manifest lists")
