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


def test_interrupt_midway_keeps_the_old_artifact(tmp_path):
    final = tmp_path / "a"
    final.mkdir()
    _write(final, {"manifest.json": b"old"})
    with pytest.raises(KeyboardInterrupt):
        with artifact.atomic_folder(final, overwrite=True) as tmp:
            _write(tmp, {"manifest.json": b"new"})
            raise KeyboardInterrupt
    assert (final / "manifest.json").read_bytes() == b"old"
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
    _write(final, {"manifest.json": b"old", "stale": b"1"})
    with artifact.atomic_folder(final, overwrite=True) as tmp:
        _write(tmp, {"manifest.json": b"new"})
    assert sorted(os.listdir(final)) == ["manifest.json"]
    assert (final / "manifest.json").read_bytes() == b"new" and no_partials(tmp_path)


def test_stale_partials_of_dead_builds_are_swept(tmp_path):
    stale = tmp_path / ".a.partial-999999999-abc"
    stale.mkdir()
    with artifact.atomic_folder(tmp_path / "a") as tmp:
        _write(tmp, {"manifest.json": b"{}"})
    assert not stale.exists()


def _files(tmp_path):
    _write(tmp_path, {"model.pt2": b"code", "weights.safetensors": b"weights"})
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
    with pytest.raises(IntegrityError, match="model.pt2 is 2 bytes, the manifest says 4"):
        artifact.verify_files(tmp_path, files)


def test_verify_catches_a_missing_file(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "model.pt2").unlink()
    with pytest.raises(IntegrityError, match="model.pt2 is missing"):
        artifact.verify_files(tmp_path, files)
