"""AOTPACK_STATE (the folder of the record key that seals aotpack's records): a symlink means the folder it points
to, which must be this user's and writable by no one else; a state folder that cannot hold the key is one
ConfigError line, never "no valid record" for every genuine entry."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from aotpack.artifact import files as artifact
from aotpack.errors import ConfigError
from aotpack.paths import _record_key, seal, state_dir, unseal


@pytest.fixture
def state(tmp_path, monkeypatch):
    """Point AOTPACK_STATE at ``tmp_path/link`` (what the test makes it) with a fresh record key cache."""
    link = tmp_path / "link"
    monkeypatch.setenv("AOTPACK_STATE", str(link))
    _record_key.cache_clear()
    yield link
    _record_key.cache_clear()


def test_t30_a_symlinked_state_folder_is_the_folder_it_points_to(tmp_path, state, monkeypatch):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    state.symlink_to(real)
    assert state_dir() == real.resolve()
    assert unseal("pins", seal("pins", {"a": 1})) == {"a": 1}
    assert (real / "record.key").is_file()
    # a genuine remembered hash is found again (today: no key could be made, so every record was "not valid")
    monkeypatch.setenv("AOTPACK_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"some weights")
    os.chmod(weights, 0o644)
    st, sha = weights.stat(), hashlib.sha256(b"some weights").hexdigest()
    artifact.remember_verified(weights, st, sha)
    assert artifact.verified_before(weights, st, sha)
    # the same records through the real path: one folder, one key
    _record_key.cache_clear()
    monkeypatch.setenv("AOTPACK_STATE", str(real))
    assert artifact.verified_before(weights, st, sha)


@pytest.mark.parametrize("target", ["group-writable", "file", "dangling"])
def test_t30_a_state_folder_that_cannot_hold_the_key_is_one_config_error(tmp_path, state, target):
    real = tmp_path / "real"
    if target == "group-writable":
        real.mkdir()
        os.chmod(real, 0o770)  # someone else could plant a record key there
        match = "is not private to this user"
    elif target == "file":
        real.write_bytes(b"not a folder")
        match = "cannot hold aotpack's record key \\(not a folder\\)"
    else:
        (tmp_path / "gone").mkdir()
        real = tmp_path / "gone" / "file"
        real.write_bytes(b"")
        real = real / "state"  # under a file: cannot be made
        match = "cannot hold aotpack's record key \\(not a folder\\)"
    state.symlink_to(real)
    for attempt in (lambda: seal("pins", {}), lambda: unseal("pins", '{"kind": "pins", "payload": 1, "mac": "0"}')):
        with pytest.raises(ConfigError, match=match) as e:
            attempt()
        assert "\n" not in e.value.cause and "AOTPACK_STATE" in e.value.hint
    assert not Path(tmp_path / "real" / "record.key").exists()


def test_t30_remembered_hashes_without_a_usable_state_folder_mean_hash_again(tmp_path, state, monkeypatch):
    """A serving box whose state folder cannot hold the key (a read-only home) still loads: no record is trusted
    and every file is hashed; only what must write a record (a pull, a pin, the compile cache) refuses."""
    state.write_bytes(b"not a folder")
    monkeypatch.setenv("AOTPACK_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"some weights")
    st, sha = weights.stat(), hashlib.sha256(b"some weights").hexdigest()
    artifact.remember_verified(weights, st, sha)  # nothing to seal with: skipped, not an error
    assert not artifact.verified_before(weights, st, sha)
    with pytest.raises(ConfigError):
        seal("pins", {})
