import os

import pytest

from aotpack.artifact import files as artifact
from aotpack.errors import IntegrityError, OutputExistsError

from conftest import no_partials


def _write(folder, files):
    for name, data in files.items():
        (folder / name).write_bytes(data)


def test_atomic_folder_publishes_only_when_complete(tmp_path):
    final = tmp_path / "a"
    with artifact.atomic_folder(final) as tmp:
        _write(tmp, {"manifest.json": b"{}", "x": b"1"})
        assert not final.exists()
    assert (final / "x").read_bytes() == b"1"
    assert no_partials(tmp_path)


def test_error_midway_leaves_nothing(tmp_path):
    final = tmp_path / "a"
    with pytest.raises(OSError):
        with artifact.atomic_folder(final) as tmp:
            _write(tmp, {"x": b"1"})
            raise OSError(28, "No space left on device")
    assert not final.exists() and no_partials(tmp_path)


def _manifest() -> bytes:
    from test_manifest import sample
    import json

    return json.dumps(sample()).encode()


def test_interrupt_midway_keeps_the_old_artifact(tmp_path):
    final = tmp_path / "a"
    final.mkdir()
    _write(final, {"manifest.json": _manifest()})
    with pytest.raises(KeyboardInterrupt):
        with artifact.atomic_folder(final, overwrite=True) as tmp:
            _write(tmp, {"manifest.json": b"new"})
            raise KeyboardInterrupt
    assert (final / "manifest.json").read_bytes() == _manifest()
    assert no_partials(tmp_path)


def test_existing_folder_refused_without_overwrite(tmp_path):
    final = tmp_path / "a"
    final.mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        with artifact.atomic_folder(final):
            pass


def test_overwrite_never_deletes_a_non_artifact(tmp_path):
    final = tmp_path / "home"
    final.mkdir()
    _write(final, {"thesis.tex": b"precious"})
    with pytest.raises(OutputExistsError, match="not an aotpack artifact"):
        with artifact.atomic_folder(final, overwrite=True):
            pass
    assert (final / "thesis.tex").read_bytes() == b"precious"


def test_overwrite_replaces_an_artifact(tmp_path):
    final = tmp_path / "a"
    final.mkdir()
    _write(final, {"manifest.json": _manifest(), "stale": b"1"})
    with artifact.atomic_folder(final, overwrite=True) as tmp:
        _write(tmp, {"manifest.json": b"new"})
    assert sorted(os.listdir(final)) == ["manifest.json"]
    assert (final / "manifest.json").read_bytes() == b"new" and no_partials(tmp_path)


def test_t05_overwrite_refuses_a_folder_whose_manifest_is_not_aotpack(tmp_path):
    final = tmp_path / "extension"
    final.mkdir()
    _write(final, {"manifest.json": b'{"manifest_version": 3, "name": "my browser extension"}', "bg.js": b"x"})
    with pytest.raises(OutputExistsError, match="not an aotpack artifact"):
        with artifact.atomic_folder(final, overwrite=True):
            pass
    assert sorted(os.listdir(final)) == ["bg.js", "manifest.json"]


def test_stale_partials_of_dead_builds_are_swept(tmp_path):
    from test_folders import _killed  # a build that really died midway (an unmarked lookalike stays: t34)

    stale = _killed(tmp_path / "a", "partial")
    with artifact.atomic_folder(tmp_path / "a") as tmp:
        _write(tmp, {"manifest.json": b"{}"})
    assert stale and not stale & set(os.listdir(tmp_path))


def _zip(entries: dict) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _files(tmp_path):
    _write(tmp_path, {"model.pt2": _zip({"model/code.so": b"code"}), "weights.safetensors": b"weights"})
    return artifact.file_entries(tmp_path)


def test_verify_accepts_intact_files(tmp_path):
    artifact.verify_files(tmp_path, _files(tmp_path))


def test_verify_catches_a_flipped_byte(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "weights.safetensors").write_bytes(b"weighTs")
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        artifact.verify_files(tmp_path, files)


def test_verify_catches_truncation(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "model.pt2").write_bytes(b"co")
    with pytest.raises(IntegrityError, match=r"model.pt2 is 2 bytes, the manifest says \d+ \(truncated or replaced\)"):
        artifact.verify_files(tmp_path, files)


def test_verify_catches_a_missing_file(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "model.pt2").unlink()
    with pytest.raises(IntegrityError, match="model.pt2 is missing"):
        artifact.verify_files(tmp_path, files)


@pytest.mark.parametrize("entries,expect", [
    ({"../../evil.so": b"x"}, "outside its folder"),
    ({"/etc/evil.so": b"x"}, "outside its folder"),
    ({"model/big.bin": b"\0" * (64 << 20)}, "zip bomb"),
    # an older build's (or anyone's) CPU flex-attention code: scratch for 2 threads, indexed by the thread number
    ({"model/data/aotinductor/model/k.kernel.cpp": b"  int64_t num_thread = 2;\n"}, "per-thread buffers sized for"),
])
def test_t12_package_entries_are_checked_before_torch_sees_them(tmp_path, entries, expect):
    import zipfile

    data = _zip({})
    if "big" in next(iter(entries)):
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr("model/big.bin", entries["model/big.bin"])
        data = buf.getvalue()
        assert len(data) < (1 << 20)  # a small archive that unpacks to 64 MiB
    else:
        import io

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, blob in entries.items():
                z.writestr(zipfile.ZipInfo(name), blob)
        data = buf.getvalue()
    _write(tmp_path, {"model.pt2": data})
    files = artifact.file_entries(tmp_path)
    with pytest.raises(IntegrityError, match=expect):
        artifact.verify_files(tmp_path, files)


def test_t03_verified_files_read_the_bytes_that_were_hashed_not_the_path_again(tmp_path):
    """Open once, hash through the open file, hand out that file: a swap after the check is never read."""
    _write(tmp_path, {"weights.safetensors": b"good weights", "model.pt2": _zip({"model/a.so": b"good"})})
    files = artifact.file_entries(tmp_path)
    with artifact.VerifiedFiles(tmp_path, files) as vf:
        data_path, code_path = vf.data("weights.safetensors"), vf.code("model.pt2")
        (tmp_path / "swap").write_bytes(b"evil weights")
        os.replace(tmp_path / "swap", tmp_path / "weights.safetensors")
        (tmp_path / "model.pt2").write_bytes(_zip({"model/a.so": b"evil"}))
        assert open(data_path, "rb").read() == b"good weights"
        assert b"good" in code_path.read_bytes() and b"evil" not in code_path.read_bytes()
        assert oct(code_path.parent.stat().st_mode & 0o777) == "0o700"
    assert not code_path.exists()  # the private copy goes with the handle


def test_t06_remembered_hashes_are_sealed_and_an_invalid_verify_mode_is_an_error(tmp_path, monkeypatch):
    from aotpack.errors import ConfigError

    files = _files(tmp_path)
    artifact.verify_files(tmp_path, files)  # hashes and remembers
    st = os.stat(tmp_path / "weights.safetensors")
    assert artifact.verified_before(tmp_path / "weights.safetensors", st, files["weights.safetensors"].sha256)
    # a record planted by someone who can write the cache (right path, stamp and sha256, no valid seal) is ignored
    record = artifact._record(tmp_path / "model.pt2")
    (tmp_path / "model.pt2").write_bytes(_zip({"model/code.so": b"evil"}))
    st = os.stat(tmp_path / "model.pt2")
    import json

    record.write_text(json.dumps({"kind": "verified", "payload": {"path": str((tmp_path / "model.pt2").absolute()),
                                  "stamp": artifact._stamp(st), "sha256": files["model.pt2"].sha256}, "mac": "0" * 64}))
    assert not artifact.verified_before(tmp_path / "model.pt2", st, files["model.pt2"].sha256)
    with pytest.raises(IntegrityError):
        artifact.verify_files(tmp_path, files)
    monkeypatch.setenv("AOTPACK_VERIFY", "sometimes")
    with pytest.raises(ConfigError, match="AOTPACK_VERIFY=sometimes is not a verify mode"):
        artifact.verify_files(tmp_path, files)


def test_t03_a_file_others_can_write_is_copied_privately_and_never_remembered(tmp_path):
    """Group-writable (or someone else's, or hard-linked): it could change in place after the check, so the loader
    reads a private copy made as it was hashed, and no remembered hash vouches for it."""
    _write(tmp_path, {"weights.safetensors": b"weights of a shared folder", "model.pt2": _zip({"m/a.so": b"x"})})
    os.chmod(tmp_path / "weights.safetensors", 0o664)
    files = artifact.file_entries(tmp_path)
    with artifact.VerifiedFiles(tmp_path, files) as vf:
        path = vf.data("weights.safetensors")
        assert not path.startswith("/proc/") and open(path, "rb").read() == b"weights of a shared folder"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600" or os.stat(path).st_uid == os.getuid()
    st = os.stat(tmp_path / "weights.safetensors")
    assert not artifact.verified_before(tmp_path / "weights.safetensors", st, files["weights.safetensors"].sha256)
    os.chmod(tmp_path / "weights.safetensors", 0o644)
    os.link(tmp_path / "weights.safetensors", tmp_path / "other-name")  # a second name: writable elsewhere
    with artifact.VerifiedFiles(tmp_path, files) as vf:
        assert not vf.data("weights.safetensors").startswith("/proc/")


def test_t06_a_planted_record_key_is_refused(tmp_path, monkeypatch):
    from aotpack.errors import ConfigError
    from aotpack.paths import _record_key, seal

    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "record.key").write_bytes(b"k" * 32)
    os.chmod(state / "record.key", 0o644)  # readable by others: whoever wrote it can forge records
    monkeypatch.setenv("AOTPACK_STATE", str(state))
    _record_key.cache_clear()
    with pytest.raises(ConfigError, match="is not private to this user"):
        seal("pins", {})
    os.chmod(state / "record.key", 0o600)
    _record_key.cache_clear()
    assert seal("pins", {})
    _record_key.cache_clear()


def test_t35_a_package_that_fails_to_load_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    """A .pt2 that passes every check aotpack makes (its manifest was rewritten for it) but that torch cannot
    load: neither aotpack's private copy nor torch's extraction folder stays in the temp folder."""
    import hashlib
    import json

    import aotpack
    from aotpack import _torch_compat as compat
    from safetensors.torch import save_file
    import torch

    from test_manifest import sample
    from test_torch_compat import _broken_package, _fresh_tmpdir

    folder = tmp_path / "art"
    folder.mkdir()
    _broken_package(folder / artifact.MODEL)
    save_file({"w": torch.zeros(2)}, str(folder / artifact.WEIGHTS))
    data = sample()
    data["files"] = {name: {"size": (folder / name).stat().st_size,
                            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest()}
                     for name in (artifact.MODEL, artifact.WEIGHTS)}
    (folder / "manifest.json").write_text(json.dumps(data))
    tmp = _fresh_tmpdir(tmp_path, monkeypatch)
    compat.preload()
    with pytest.raises(Exception):
        aotpack.load(folder)
    assert os.listdir(tmp) == []
